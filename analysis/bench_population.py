"""P14: population training -- what packs of K candidates (``surrogate/packtrain.py``) buy.

Three figures, in one run (the machine is noisy: only ratios measured together mean much):

1. **Trainer**: candidates per hour at each K of ``--ks``, per case. The candidates are real
   ones: the first ``--candidates`` evaluated or failed losses of the shipped mnist5k search
   (``results/mnist5k/run``: what a search actually trains, pre-screen failures included),
   trained with ``fitness.evaluate_pack`` exactly as a search worker does (one call per K, the
   whole list, refilled as slots finish). Cases: digits/tiny with the CPU default's surrogate
   (``search_runs/quick.toml``) and mnist5k/tiny with ``search_runs/mnist5k.toml``'s (fewer
   candidates and, with ``--mnist-steps``, fewer steps: it is 10x dearer), plus resnet9v2 on
   digits at ``--resnet-steps`` when the pack can serve it. Repetitions interleave the Ks.
   ``speedup`` = candidates/hour at K / at K = 1, medians.
2. **Identity and drift**: ``identical`` -- at every K > 1 the candidates, trained again in
   reverse order (every one with other neighbours, most in other slots and refill positions),
   give the same result, field for field; ``max_dval_vs_k1`` -- the largest |delta val_acc|
   between K = 1 and the best K over the digits candidates (>= 50 by default).
3. **Whole search** (``--search``): the CPU default (quick.toml, 2 process workers) cut to
   ``--children`` children, at K = 1 and at the default K (``executor.candidates_per_worker``),
   wall seconds and candidates per hour
   (the search's own counts; a different K trains different children, so this is the whole
   engine's throughput, not the same work timed twice).

    .venv/bin/python analysis/bench_population.py [--ks 1 2 4 8 16] [--reps 1] [--search]

The last line printed is one JSON object: ``speedup_best``, ``best_k``, ``identical``,
``max_dval_vs_k1`` (digits/tiny), per-case figures, and ``search`` when run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("status", "reason", "val_acc", "val_nll", "test_acc", "steps", "weights_hash")


def candidates(n: int) -> list[tuple[str, int, int]]:
    db = ROOT / "results" / "mnist5k" / "run" / "run.sqlite"
    con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    rows = con.execute("SELECT expr, sign FROM candidates WHERE status IN ('evaluated', "
                       "'failed') AND phase IN ('initial', 'child') ORDER BY id").fetchall()
    con.close()
    return [(e, 0, s or 1) for e, s in rows[:n]]


def surrogate(config: str, **over) -> dict:
    from gp_loss.config import load_config

    return {**asdict(load_config(ROOT / "search_runs" / config).surrogate), "device": "cpu",
            **over}


def trainer_case(name, items, sur, ks, reps):
    from gp_loss.surrogate.fitness import evaluate_pack

    evaluate_pack(items[:2], "paper", {**sur, "steps": 20}, width=max(ks))  # warm-up
    times = {k: [] for k in ks}
    results = {}
    for _ in range(reps):
        for k in ks:
            t0 = time.perf_counter()
            results[k] = evaluate_pack(items, "paper", sur, width=k)
            times[k].append(time.perf_counter() - t0)
    per_hour = {k: 3600 * len(items) / statistics.median(v) for k, v in times.items()}
    out = {"case": name, "candidates": len(items), "steps": sur["steps"],
           "per_hour": {str(k): round(v) for k, v in per_hour.items()},
           "speedup": {str(k): round(v / per_hour[1], 3) for k, v in per_hour.items()}}
    best = max(ks, key=lambda k: per_hour[k])
    identical = True
    for k in ks:
        if k == 1:
            continue
        again = evaluate_pack(items[::-1], "paper", sur, width=k)[::-1]
        identical &= all(tuple(a[f] for f in FIELDS) == tuple(b[f] for f in FIELDS)
                         for a, b in zip(results[k], again))
    out.update(best_k=best, identical=identical, max_dval_vs_k1=max(
        abs((a["val_acc"] or 0.0) - (b["val_acc"] or 0.0))
        for a, b in zip(results[1], results[best])),
        status_changed_vs_k1=sum(a["status"] != b["status"]
                                 for a, b in zip(results[1], results[best])))
    print(json.dumps(out), flush=True)
    return out


def whole_search(k: int, children: int, initial: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "gp_loss", "-q", "search", "--run-dir", f"{tmp}/run",
               "--set", f"search.children={children}", "--set", f"search.initial={initial}",
               "--set", "search.fitness_cache=off", "--set", "search.max_minutes=0",
               "--set", f"executor.candidates_per_worker={k}"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        con = sqlite3.connect(f"{tmp}/run/run.sqlite")
        trained, steps = con.execute(
            "SELECT count(*), sum(json_extract(result_json, '$.steps')) FROM candidates "
            "WHERE status IN ('evaluated', 'failed')").fetchone()
        engine = con.execute("SELECT sum(engine_seconds) FROM candidates").fetchone()[0]
        con.close()
    out = {"k": k, "wall_s": round(wall, 1), "trained": trained, "steps": steps,
           "trained_per_hour": round(3600 * trained / wall),
           "steps_per_s": round(steps / wall, 1), "engine_share": round(engine / wall, 4)}
    print(json.dumps({"search": out}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--candidates", type=int, default=56)
    ap.add_argument("--mnist-candidates", type=int, default=16)
    ap.add_argument("--mnist-steps", type=int, default=200)
    ap.add_argument("--resnet-steps", type=int, default=60)
    ap.add_argument("--search", action="store_true", help="also time whole searches")
    ap.add_argument("--children", type=int, default=120)
    ap.add_argument("--initial", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if 1 not in args.ks:
        args.ks = [1] + args.ks
    torch.set_num_threads(args.threads)
    from gp_loss.surrogate.packtrain import packable_name

    items = candidates(max(args.candidates, args.mnist_candidates))
    cases = [trainer_case("digits/tiny", items[:args.candidates], surrogate("quick.toml"),
                          args.ks, args.reps),
             trainer_case("mnist5k/tiny", items[:args.mnist_candidates],
                          surrogate("mnist5k.toml", steps=args.mnist_steps), args.ks,
                          args.reps)]
    if packable_name("resnet9v2"):
        cases.append(trainer_case("digits/resnet9v2", items[:args.mnist_candidates],
                                  surrogate("quick.toml", model="resnet9v2",
                                            steps=args.resnet_steps,
                                            prescreen_steps=args.resnet_steps // 3),
                                  args.ks, args.reps))
    head = cases[0]
    out = {"machine": f"{platform.machine()} {os.cpu_count()} cpus, torch "
                      f"{torch.__version__}, {args.threads} thread(s)",
           "best_k": head["best_k"], "speedup_best": head["speedup"][str(head["best_k"])],
           "identical": all(c["identical"] for c in cases),
           "max_dval_vs_k1": head["max_dval_vs_k1"], "cases": cases}
    if args.search:
        from gp_loss.config.sections import ExecutorConfig

        default_k = ExecutorConfig().candidates_per_worker
        base = whole_search(1, args.children, args.initial)
        packed = whole_search(default_k, args.children, args.initial)
        out["search"] = {"k1": base, "default_k": packed,
                         "speedup_trained_per_hour": round(packed["trained_per_hour"]
                                                           / base["trained_per_hour"], 3),
                         "speedup_steps_per_s": round(packed["steps_per_s"]
                                                      / base["steps_per_s"], 3)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
