"""Printed formulas are the loss (issue 12), at scale: N fixed-seed random trees per set plus
every candidate the shipped mnist5k run trained, checked with the test oracle
(tests/formula_oracle.py: the text parsed back by SymPy vs the op table's numpy references);
and the per-class form's length over the full formula's on the run's best 50 distinct
candidates. Prints a JSON object as its last line.

    .venv/bin/python analysis/bench_formula.py [--trees 10000]
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import formula_oracle as O  # noqa: E402

from gp_loss import formula as F  # noqa: E402
from gp_loss.psets import load_pset  # noqa: E402
from gp_loss.store import RunStore  # noqa: E402
from gp_loss.trees import parse, random_tree  # noqa: E402


def _timed_failures(trees, pset, label):
    """The oracle's failures, one tree at a time, with progress on stderr and the slowest
    trees' seconds (formula, per-class form and the check together)."""
    from gp_loss.trees import to_text
    bad, times = [], []
    for i, t in enumerate(trees, 1):
        faulthandler.dump_traceback_later(120)   # a stack on stderr if one tree hangs
        start = time.perf_counter()
        bad += O.failures([t], pset)
        times.append((time.perf_counter() - start, to_text(t, pset)))
        if i % 500 == 0 or i == len(trees):
            print(f"{label}: {i}/{len(trees)}, {len(bad)} failures", file=sys.stderr, flush=True)
    faulthandler.cancel_dump_traceback_later()
    times.sort(reverse=True)
    return bad, [{"seconds": round(s, 2), "expr": e} for s, e in times[:3]]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", type=int, default=10000)
    args = ap.parse_args()
    out = {}
    for name in ("paper", "typed"):
        pset, rng = load_pset(name), random.Random(2026)
        trees = [random_tree(pset, rng, min_height=1, max_height=2 + i % 5)
                 for i in range(args.trees)]
        start = time.perf_counter()
        bad, slowest = _timed_failures(trees, pset, name)
        out[name] = {"trees": len(trees), "failures": len(bad), "examples": bad[:5],
                     "seconds": round(time.perf_counter() - start, 1), "slowest": slowest}
    pset = load_pset("paper")
    run = [parse(e, pset, max_height=10**4, max_size=10**4) for e in O.run_expressions()]
    bad, slowest = _timed_failures(run, pset, "mnist5k run")
    out["mnist5k_run"] = {"candidates": len(run), "failures": len(bad), "examples": bad[:5],
                          "slowest": slowest}
    with RunStore.open(O.RUN.parent, readonly=True) as store:
        rows = store.top(50)
    ratios, shorter = [], 0
    for r in rows:
        t = parse(r["expr"], pset, max_height=10**4, max_size=10**4)
        form = F.per_class(t, pset, sign=r["sign"] if r["sign"] in (1, -1) else 1)
        full = len(F.formula(t, pset))
        short = len(form["target"]) + len(form["other"])
        ratios.append(short / full)
        shorter += short < full
    out["per_class_length"] = {"candidates": len(rows), "median_ratio": round(
        statistics.median(ratios), 3), "shorter": shorter}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
