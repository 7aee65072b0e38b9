"""The paper's evaluation protocol: shared pieces, and the one import for its two halves.

* ``compare.py`` -- transfer tables: losses x cells (dataset x model x augmentation) x seeds
  against cross-entropy, with Welch/Holm statistics and seed-paired wins/ties/losses.
* ``eliminate.py`` -- elimination rounds of rising fidelity over a run's best candidates.

Both train only through ``fitness.evaluate`` (the same worker function the search runs, so an
executor can run it), by way of ``run_jobs`` here; both take a run's best distinct candidates
from ``RunStore.top`` / ``RunStore.best``; bad input to either is an ``errors.InputError`` (``gp_loss.InputError``, CLI exit 2).

Fed by a run store (``store.py``) and ``execution/``. Used by ``compare.py`` and
``eliminate.py``, which import this module (the CLI, ``cli/protocol.py``, and ``analysis/``
import those two directly).
"""
from __future__ import annotations

from typing import Callable

from ..errors import describe


def run_jobs(jobs: list[tuple], executor, evaluate_fn: Callable, on_done=None,
             width: int = 1) -> list[dict]:
    """Run ``evaluate_fn(*job)`` for every job, ``executor.capacity`` in flight; results in job
    order. An exception carried by a future becomes a failed result.

    ``width`` > 1 (``executor.candidates_per_worker``) with ``fitness.evaluate`` itself: jobs
    whose model can be packed train ``width`` at a time (``fitness.evaluate_pack`` through an
    ``execution.packing.Packer``), the others alone; a job is ``evaluate``'s arguments
    ``(expr, pset, surrogate, seed, sign, with_test)``."""
    from ..execution import wait_first
    from ..execution.packing import Packer
    from ..surrogate.fitness import evaluate, evaluate_pack
    from ..surrogate.packtrain import effective_width

    packer = None
    if width > 1 and evaluate_fn is evaluate:
        packer = Packer(executor, width, evaluate_pack)
    capacity = max(1, getattr(packer or executor, "capacity", 1))
    results: list = [None] * len(jobs)
    inflight, queue = {}, list(range(len(jobs)))
    while queue or inflight:
        while queue and len(inflight) < capacity:
            i = queue.pop(0)
            expr, pset, sur, seed, sign, with_test = (jobs[i] + (False,))[:6] \
                if packer else (None,) * 6
            if packer and effective_width(sur["model"], width) > 1:
                inflight[packer.submit((pset, sur, with_test), (expr, seed, sign))] = i
            else:
                inflight[executor.submit(evaluate_fn, *jobs[i])] = i
        if packer:
            packer.flush()
        done, _ = wait_first(inflight)
        for fut in done:
            i = inflight.pop(fut)
            results[i] = _result(fut)
            if on_done:
                on_done(i, results[i])
    return results


def _result(fut) -> dict:
    try:
        return fut.result()
    except Exception as exc:  # a lost worker fails that run only
        # "lost": the failure is the executor's (a dead or timed-out worker), not a result of
        # the job's inputs: the compare ledger does not keep it, so a rerun trains it again
        return {"status": "failed", "reason": "error: " + describe(exc, 293),
                "fitness": 0.0, "val_acc": None, "test_acc": None, "seconds": None,
                "lost": True}
