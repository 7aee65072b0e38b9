"""P5: candidates per hour with 2 workers vs 1 (process pool and Ray), on the same small search.

Fed by: the package and ``search_runs/quick.toml`` (digits, tiny, 300 steps), run as the
initial phase of a search only (``search.children=0``, no reference): the initial candidates
depend on ``search.seed`` and the birth number alone, so the 1-worker and the 2-worker runs
train exactly the same candidates and their throughputs compare like with like (children would
not: with several workers the trajectory depends on completion order). Run from the repo root:

    .venv/bin/python analysis/bench_scaling.py [--candidates 20] [--order 1,2,2,1]
                                               [--kinds process,ray] [--set K=V]

Each run is a fresh in-process search (``evolution.Evolution``) with ``executor.threads=1``;
for each worker count of ``--order`` one run per executor kind (``process``, then ``ray`` when
Ray is installed), so the kinds and the worker counts are interleaved (the machines are shared
and noisy); medians per kind and worker count. The Ray runs share one local 2-CPU cluster
started before the first of them (as a search would find a running cluster), each with its own
fresh actors. Reported:

- ``speedup_2_workers``: candidates per hour while the search runs, 2 workers / 1 worker. The
  rate is taken from the moment every worker has returned its first result to the last result
  (training steps completed in that span per second, divided by the run's mean steps per
  candidate, so which candidates fall inside the span does not bias it). Worker start-up
  (spawn, importing torch, loading the data: a few seconds, paid once per search) is left out
  because a search runs for minutes to hours. Goal >= 1.7 on 2 cores.
- ``speedup_whole_run``: candidates / wall seconds of the whole short run, start-up and tail
  included; with ~16 candidates the fixed start-up caps it well below the running rate.
- ``startup_seconds``: median time from the start of a run to its first result, minus that
  evaluation's own training time.
- ``speedup_quick_estimate``: the whole-run ratio projected to the quick config's 340
  evaluations from the measured start-up and running rates.
- ``ray_speedup_2_workers``: ``speedup_2_workers`` for the Ray executor (the same workload);
  ``ray_vs_process``: that divided by the process pool's (goal: within 10 %, >= 0.9);
  ``ray_startup_seconds`` and ``ray_candidates_per_hour_1/2`` as for the process pool.
- ``ceiling_2_procs``: the same ratio for a trivial CPU-bound Python loop in 1 vs 2 spawned
  processes, measured before each search run: what the machine offers at that moment. Linux
  autogroup scheduling gives each session an equal share of a busy machine, so while other
  jobs run, 2 workers get little more CPU than 1 and the ceiling drops towards 1; judge
  ``speedup_2_workers`` against it.

The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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


def _spin(n: int) -> float:
    t0 = time.perf_counter()
    s = 0
    for i in range(n):
        s += i * i
    return time.perf_counter() - t0


def ceiling(n: int = 4_000_000) -> float:
    """Throughput of 2 processes / 1 process on a CPU-bound loop (spawned, like the workers)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        pool.map(_spin, [1000, 1000])  # both started
        t0 = time.perf_counter()
        pool.apply(_spin, (n,))
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        pool.map(_spin, [n, n], chunksize=1)
        two = time.perf_counter() - t0
    return 2 * one / two


def one_run(cfg, kind: str, workers: int, tmp: Path, index: int) -> dict:
    from gp_loss.config import apply_overrides

    cfg = apply_overrides(cfg, [f"executor.kind={kind}", f"executor.workers={workers}"])
    done_at: list[tuple[float, int, float]] = []  # (time, steps, training seconds)
    real_complete = evo.Evolution._complete

    def complete(self, fut):
        real_complete(self, fut)
        res = fut.result()  # already finished: this only reads it
        done_at.append((time.perf_counter(), int(res.get("steps") or 0),
                        float(res.get("seconds") or 0.0)))

    evo.Evolution._complete = complete
    try:
        store = evo.start_run(tmp / f"run{index}-{kind}-w{workers}", cfg)
        # Built before the clock starts: the first build imports torch and sympy, once.
        search = evo.Evolution(store, cfg)
        t0 = time.perf_counter()
        result = search.run()
        wall = time.perf_counter() - t0
        rows = store.candidates()
        store.close()
    finally:
        evo.Evolution._complete = real_complete
    trained = [r for r in rows if r["status"] in ("evaluated", "failed")]
    n = len(done_at)
    assert n == len(trained) == cfg.search.initial, (n, len(trained), result)
    # Running rate: from the moment every worker has returned one result to the last result.
    first = min(workers, n - 1)
    span = done_at[-1][0] - done_at[first - 1][0]
    steps_in_span = sum(st for _, st, _ in done_at[first:])
    mean_steps = sum(st for _, st, _ in done_at) / n
    return {"kind": kind, "workers": workers, "candidates": n, "wall": wall,
            "per_hour": 3600 * n / wall,
            "steady_per_hour": 3600 * steps_in_span / span / mean_steps if span > 0 else None,
            "startup": done_at[0][0] - t0 - done_at[0][2],
            "surrogate_seconds": sum(r["seconds"] or 0.0 for r in trained),
            "steps": sum(int((r["result"] or {}).get("steps") or 0) for r in trained),
            "stop_reason": result["stop_reason"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=20,
                    help="initial candidates trained per run (search.initial)")
    ap.add_argument("--order", default="1,2,2,1",
                    help="worker counts of the runs, in order (interleave; default 1,2,2,1)")
    ap.add_argument("--kinds", default=None,
                    help="executor kinds to measure (default: process,ray; process alone "
                         "when Ray is not installed)")
    ap.add_argument("--config", default=None, help="config file (default: the built-in quick)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="further config overrides, applied last")
    args = ap.parse_args(argv)
    order = [int(w) for w in args.order.split(",")]
    if not {1, 2} <= set(order):
        ap.error("--order must contain both 1 and 2")
    if args.kinds is None:
        import importlib.util

        args.kinds = "process,ray" if importlib.util.find_spec("ray") else "process"
    kinds = [k.strip() for k in args.kinds.split(",")]
    if "process" not in kinds or not set(kinds) <= {"process", "ray"}:
        ap.error("--kinds: process, optionally with ray")

    cfg = load_config(args.config, [f"search.initial={args.candidates}", "search.children=0",
                                    "search.reference=[]", "search.seed_with=[]",
                                    "executor.kind=process", "executor.threads=1",
                                    "search.fitness_cache=off",  # every run trains them all
                                    *args.sets])
    print(f"{args.candidates} candidates per run ({cfg.surrogate.dataset}/{cfg.surrogate.model}, "
          f"{cfg.surrogate.steps} steps, pre-screen {cfg.surrogate.prescreen_steps}); runs with "
          f"{order} workers, executors {kinds}; {os.cpu_count()} cpus, load average "
          f"{_loadavg()}")
    runs, ceilings = [], []
    ray = None
    with tempfile.TemporaryDirectory(prefix="gp-loss-scaling-") as tmp:
        for i, workers in enumerate(order):
            for kind in kinds:
                if kind == "ray" and ray is None:
                    import ray

                    from gp_loss.execution.ray_backend import start_local

                    start_local(ray, num_cpus=2)
                ceilings.append(ceiling())
                print(f"  machine ceiling now: 2 processes give {ceilings[-1]:.2f}x one")
                r = one_run(cfg, kind, workers, Path(tmp), i)
                runs.append(r)
                steady = f"{r['steady_per_hour']:.0f}" if r["steady_per_hour"] else "n/a"
                print(f"  {kind}, {workers} worker(s): {r['candidates']} candidates in "
                      f"{r['wall']:.1f} s -> {r['per_hour']:.0f}/h whole run, {steady}/h "
                      f"running (start-up {r['startup']:.1f} s); {r['steps']} steps, surrogate "
                      f"{r['surrogate_seconds']:.1f} s summed; load average {_loadavg()}")
    if ray is not None:
        ray.shutdown()

    def median(workers, key, kind="process"):
        vals = [r[key] for r in runs if r["kind"] == kind and r["workers"] == workers and r[key]]
        return statistics.median(vals) if vals else None

    one, two = median(1, "per_hour"), median(2, "per_hour")
    one_s, two_s = median(1, "steady_per_hour"), median(2, "steady_per_hour")
    whole = two / one
    speedup = two_s / one_s
    startup = {w: median(w, "startup") for w in (1, 2)}
    ray_out = {}
    if "ray" in kinds:
        r1, r2 = median(1, "steady_per_hour", "ray"), median(2, "steady_per_hour", "ray")
        ray_speedup = r2 / r1
        ray_out = {
            "ray_speedup_2_workers": round(ray_speedup, 4),
            "ray_vs_process": round(ray_speedup / speedup, 4),
            "ray_speedup_whole_run": round(median(2, "per_hour", "ray")
                                           / median(1, "per_hour", "ray"), 4),
            "ray_startup_seconds": {str(w): round(median(w, "startup", "ray"), 2)
                                    for w in (1, 2)},
            "ray_candidates_per_hour_1": round(r1, 1),
            "ray_candidates_per_hour_2": round(r2, 1),
        }
        print(f"ray_speedup_2_workers {ray_speedup:.3f} while running; ray_vs_process "
              f"{ray_speedup / speedup:.3f} (goal >= 0.9: Ray within 10 % of the process pool)")
    full = 340  # evaluations of the quick config: 1 reference + 40 initial + 300 children (max)
    estimate = ((startup[1] + 3600 * full / one_s) / (startup[2] + 3600 * full / two_s))
    ceil = statistics.median(ceilings)
    print(f"speedup_2_workers {speedup:.3f} while running (goal >= 1.7); whole {args.candidates}-"
          f"candidate runs {whole:.3f} (start-up ~{startup[1]:.1f} s / {startup[2]:.1f} s); "
          f"projected to {full} evaluations {estimate:.3f}")
    print(f"machine ceiling (median) {ceil:.2f}: the search gets {speedup / ceil:.0%} of what "
          f"2 processes can get here now")
    out = {
        "speedup_2_workers": round(speedup, 4),
        "speedup_whole_run": round(whole, 4),
        "speedup_quick_estimate": round(estimate, 4),
        "startup_seconds": {str(w): round(v, 2) for w, v in startup.items()},
        "ceiling_2_procs": round(ceil, 4),
        "ceilings": [round(c, 3) for c in ceilings],
        "candidates_per_hour_1": round(one_s, 1),
        "candidates_per_hour_2": round(two_s, 1),
        **ray_out,
        "candidates_per_run": args.candidates,
        "order": order,
        "kinds": kinds,
        "runs": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}
                 for r in runs],
        "steps": cfg.surrogate.steps,
        "loadavg": _loadavg(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "python": platform.python_version(),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
