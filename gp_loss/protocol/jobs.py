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


def run_jobs(jobs: list[tuple], executor, evaluate_fn: Callable, on_done=None) -> list[dict]:
    """Run ``evaluate_fn(*job)`` for every job, ``executor.capacity`` in flight; results in job
    order. An exception carried by a future becomes a failed result."""
    from ..execution import wait_first

    results: list = [None] * len(jobs)
    inflight, queue = {}, list(range(len(jobs)))
    while queue or inflight:
        while queue and len(inflight) < max(1, getattr(executor, "capacity", 1)):
            i = queue.pop(0)
            inflight[executor.submit(evaluate_fn, *jobs[i])] = i
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
        return {"status": "failed", "reason": "error: " + describe(exc, 293),
                "fitness": 0.0, "val_acc": None, "test_acc": None, "seconds": None}
