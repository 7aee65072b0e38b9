"""P1 + P8: what the search engine costs besides training, on the default config.

Fed by: the package and ``search_runs/quick.toml`` (the CPU default: digits, tiny, process
executor with 2 workers), with a reduced budget (``--children``, ``--initial``) so that it
finishes in a few minutes. Run by ``make bench`` from the repo root:

    .venv/bin/python analysis/bench_overhead.py [--children 40] [--initial 40] [--set K=V ...]

One search runs in-process (``evolution.Evolution`` on a fresh store in a temporary directory).

- ``engine_share`` = the store's engine seconds / wall seconds (``RunStore.seconds()``: the
  time the driver spent generating, screening, deduplicating and storing, as recorded per
  candidate; wall = the run's wall time). Goal <= 0.03.
- ``driver_busy_share``: an independent check of the same thing, = 1 - (time the driver spent
  blocked waiting for evaluations) / wall, measured here around ``wait_first``. It also counts
  what no candidate row is charged with (rebuilding the indexes after the initial phase, the
  progress bookkeeping, submitting). With the serial executor training happens inside
  ``submit``, so this check is only reported for pool executors.
- ``steps_per_child`` = surrogate training steps actually run (the ``steps`` of every
  evaluation that trained, references included) / proposed candidates (every candidates row
  of the initial and child phases: rejected, duplicate and failed proposals included) /
  ``surrogate.steps``. Goal <= 0.2.

Also reported: ``engine_share_child_phase`` (engine seconds of child rows / wall time of the
child phase: the steady state that dominates a full-budget run, whereas a reduced budget
over-weights the initial phase, where ~95% of random trees are rejected), ``driver_cpu_share``
(CPU seconds of the driver process / wall: what the driver takes from the cores the workers
train on, less sensitive than wall-clock figures to other jobs on a shared machine), and the
raw counts.

``--ks 1 8`` runs one search per K (``executor.candidates_per_worker``) in that order, the
whole comparison in one run; by default K = 1 and then the config's own K. The last line
printed is one JSON object: the figures of the config's K (or the last one) and ``by_k``, the
main figures of each.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gp_loss.search.evolution as evo  # noqa: E402
from gp_loss.config import load_config  # noqa: E402


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="config file (default: the built-in quick)")
    ap.add_argument("--children", type=int, default=40, help="search.children (quick: 300)")
    ap.add_argument("--initial", type=int, default=None, help="search.initial (quick: 40)")
    ap.add_argument("--run-dir", default=None,
                    help="keep the run store here (default: a temporary directory)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="further config overrides, applied last")
    ap.add_argument("--ks", type=int, nargs="+", default=None, metavar="K",
                    help="executor.candidates_per_worker values, one search each in this "
                         "order (default: 1, then the config's own K if it is not 1)")
    args = ap.parse_args(argv)

    overrides = [f"search.children={args.children}"]
    if args.initial is not None:
        overrides.append(f"search.initial={args.initial}")
    own = load_config(args.config, overrides + args.sets).executor.candidates_per_worker
    ks = args.ks or sorted({1, own})
    by_k = {}
    for k in ks:
        by_k[k] = measure(args, overrides + args.sets
                          + [f"executor.candidates_per_worker={k}"])
    out = {**by_k[own if own in by_k else ks[-1]],
           "by_k": {str(k): {f: v[f] for f in ("engine_share", "engine_share_child_phase",
                                                "driver_cpu_share", "wall_seconds",
                                                "engine_seconds", "evaluations", "proposals")}
                    for k, v in by_k.items()}}
    print(json.dumps(out))
    return out


def measure(args, sets) -> dict:
    """One search with the config + ``sets``; prints its figures, returns them."""
    cfg = load_config(args.config, sets)
    s, ex = cfg.search, cfg.executor
    print(f"config: {args.config or 'quick'} + {sets}")
    print(f"  {s.initial} initial + {s.children} children, population {s.population}, "
          f"{cfg.surrogate.steps} steps ({cfg.surrogate.dataset}/{cfg.surrogate.model}), "
          f"executor {ex.kind} x{ex.workers}; load average {_loadavg()}")

    # Instrumentation (no change to what the loop does): time blocked in wait_first, the
    # moment the initial phase ends, and the driver process's CPU time.
    waited, marks = [0.0], {}
    real_wait, real_select = evo.wait_first, evo.Evolution._select_initial

    def timed_wait(*a, **kw):
        t0 = time.perf_counter()
        try:
            return real_wait(*a, **kw)
        finally:
            waited[0] += time.perf_counter() - t0

    def marked_select(self):
        marks["initial_done"] = time.perf_counter()
        real_select(self)
        marks["evolve_start"] = time.perf_counter()

    evo.wait_first, evo.Evolution._select_initial = timed_wait, marked_select
    with tempfile.TemporaryDirectory(prefix="gp-loss-bench-") as tmp:
        store = evo.start_run(Path(args.run_dir or Path(tmp) / "run"), cfg)
        search = evo.Evolution(store, cfg)  # imports torch/sympy: before the clocks start
        t0, cpu0 = time.perf_counter(), time.process_time()
        result = search.run()
        measured_wall, driver_cpu = time.perf_counter() - t0, time.process_time() - cpu0
        rows = store.candidates()
        secs = store.seconds()
        store.close()
    evo.wait_first, evo.Evolution._select_initial = real_wait, real_select

    status = collections.Counter(r["status"] for r in rows)
    by_phase = collections.Counter(r["phase"] for r in rows)
    trained = [r for r in rows if r["status"] in ("evaluated", "failed") and r["result"]]
    steps_total = sum(int(r["result"].get("steps") or 0) for r in trained)
    steps_ref = sum(int(r["result"].get("steps") or 0) for r in trained
                    if r["phase"] == "reference")
    proposals = by_phase["initial"] + by_phase["child"]
    failed_reasons = collections.Counter((r["reason"] or "").split(" at step")[0][:40]
                                         for r in rows if r["status"] == "failed")
    wall = secs["wall"] or measured_wall
    engine_share = secs["engine"] / wall
    engine_by_phase = collections.Counter()
    for r in rows:
        engine_by_phase[r["phase"]] += r["engine_seconds"] or 0.0
    # The child phase alone: what dominates a full-budget run (quick: 300 children, 40 initial).
    child_wall = t0 + measured_wall - marks["evolve_start"] if "evolve_start" in marks else None
    child_share = engine_by_phase["child"] / child_wall if child_wall else None
    select_seconds = (marks["evolve_start"] - marks["initial_done"]
                      if "evolve_start" in marks else None)
    pool = ex.kind != "serial"
    busy_share = (measured_wall - waited[0]) / measured_wall if pool else None
    steps_per_child = steps_total / max(proposals, 1) / cfg.surrogate.steps

    print(f"stop: {result['stop_reason']}; best fitness {result['best_fitness']}")
    print(f"rows {len(rows)}: " + ", ".join(f"{k} {v}" for k, v in status.most_common()))
    print(f"failed by reason: {dict(failed_reasons)}")
    print(f"wall {wall:.1f} s, engine {secs['engine']:.2f} s, surrogate {secs['surrogate']:.1f} s "
          f"(summed over workers), driver waiting {waited[0]:.1f} s")
    print(f"engine seconds by phase: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                    engine_by_phase.items()) +
          (f"; child phase wall {child_wall:.1f} s; choosing the initial population "
           f"{select_seconds:.2f} s (not charged to any row)" if child_wall else ""))
    print(f"driver CPU {driver_cpu:.1f} s = {driver_cpu / measured_wall:.4f} of wall")
    print(f"engine_share {engine_share:.4f} (goal <= 0.03)" +
          (f"; child phase alone {child_share:.4f}" if child_share is not None else "") +
          (f"; driver busy share {busy_share:.4f}" if pool else ""))
    print(f"steps: {steps_total} trained ({steps_ref} for references) over {proposals} proposals "
          f"-> steps_per_child {steps_per_child:.4f} of a full {cfg.surrogate.steps}-step "
          f"evaluation (goal <= 0.2)")
    out = {
        "engine_share": round(engine_share, 5),
        "steps_per_child": round(steps_per_child, 5),
        "driver_busy_share": round(busy_share, 5) if pool else None,
        "engine_share_child_phase": round(child_share, 5) if child_share is not None else None,
        "driver_cpu_share": round(driver_cpu / measured_wall, 5),
        "engine_seconds_by_phase": {k: round(v, 3) for k, v in engine_by_phase.items()},
        "select_initial_seconds": round(select_seconds, 3) if select_seconds else None,
        "steps_per_child_without_references": round(
            (steps_total - steps_ref) / max(proposals, 1) / cfg.surrogate.steps, 5),
        "wall_seconds": round(wall, 2),
        "engine_seconds": round(secs["engine"], 3),
        "surrogate_seconds": round(secs["surrogate"], 2),
        "driver_wait_seconds": round(waited[0], 2),
        "proposals": proposals,
        "evaluations": len(trained),
        "steps_total": steps_total,
        "steps_reference": steps_ref,
        "steps_full": cfg.surrogate.steps,
        "counts": dict(status),
        "failed_reasons": dict(failed_reasons),
        "initial": s.initial, "children": s.children, "population": s.population,
        "executor": f"{ex.kind}x{ex.workers}", "candidates_per_worker": ex.candidates_per_worker,
        "stop_reason": result["stop_reason"],
        "loadavg": _loadavg(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "python": platform.python_version(),
    }
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
