"""Printed formulas are the loss (issue 12), at scale: N fixed-seed random trees per set plus
every candidate the shipped mnist5k run trained, checked with the test oracle
(tests/formula_oracle.py: the text parsed back by SymPy vs the op table's numpy references);
and the per-class form's length over the full formula's on the run's best 50 distinct
candidates. Prints a JSON object as its last line.

    .venv/bin/python analysis/bench_formula.py [--trees 10000] [--baseline DIR]
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

from gp_loss.lang import formula as F  # noqa: E402
from gp_loss.lang.psets import load_pset  # noqa: E402
from gp_loss.runs.store import RunStore  # noqa: E402
from gp_loss.lang.trees import parse  # noqa: E402
from gp_loss.lang.variation import random_tree  # noqa: E402


def _timed_failures(trees, pset, label):
    """The oracle's failures, one tree at a time, with progress on stderr and the slowest
    trees' seconds (formula, per-class form and the check together)."""
    from gp_loss.lang.trees import to_text
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


def _baseline_formulas(checkout, exprs):
    """The formula texts the version in ``checkout`` printed for ``exprs`` (a subprocess with
    that checkout first on the path)."""
    import os
    import subprocess
    code = ("import json, sys\n"
            "try:\n"   # the layout since the package redesign (issue 13) ...
            "    from gp_loss.lang.psets import load_pset\n"
            "    from gp_loss.lang.trees import parse\n"
            "    from gp_loss.lang.formula import formula\n"
            "except ImportError:\n"   # ... or the flat one of earlier checkouts
            "    from gp_loss.psets import load_pset\n"
            "    from gp_loss.trees import parse\n"
            "    from gp_loss.symbolic import formula\n"
            "pset = load_pset('paper')\n"
            "print(json.dumps([formula(parse(e, pset, max_height=10**4, "
            "max_size=10**4), pset) for e in json.load(sys.stdin)]))")
    env = dict(os.environ, PYTHONPATH=str(Path(checkout).resolve()))
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(exprs), env=env,
                          capture_output=True, text=True, check=True, cwd=checkout)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", type=int, default=10000)
    ap.add_argument("--baseline", metavar="DIR",
                    help="a checkout of the version before issue 12 (git worktree add DIR "
                         "084971c): the per-class length is also measured against its formulas")
    ap.add_argument("--per-class-only", action="store_true", help="skip the 10,000-tree check")
    args = ap.parse_args()
    out = {}
    for name in () if args.per_class_only else ("paper", "typed"):
        pset, rng = load_pset(name), random.Random(2026)
        trees = [random_tree(pset, rng, min_height=1, max_height=2 + i % 5)
                 for i in range(args.trees)]
        start = time.perf_counter()
        bad, slowest = _timed_failures(trees, pset, name)
        out[name] = {"trees": len(trees), "failures": len(bad), "examples": bad[:5],
                     "seconds": round(time.perf_counter() - start, 1), "slowest": slowest}
    pset = load_pset("paper")
    if not args.per_class_only:
        run = [parse(e, pset, max_height=10**4, max_size=10**4) for e in O.run_expressions()]
        bad, slowest = _timed_failures(run, pset, "mnist5k run")
        out["mnist5k_run"] = {"candidates": len(run), "failures": len(bad),
                              "examples": bad[:5], "slowest": slowest}
    with RunStore.open(O.RUN.parent, readonly=True) as store:
        rows = store.top(50)
    exprs = [r["expr"] for r in rows]
    old = _baseline_formulas(args.baseline, exprs) if args.baseline else None
    ratios, shorter, old_ratios, old_shorter = [], 0, [], 0
    for i, r in enumerate(rows):
        t = parse(r["expr"], pset, max_height=10**4, max_size=10**4)
        form = F.per_class(t, pset, sign=r["sign"] if r["sign"] in (1, -1) else 1)
        full = len(F.formula(t, pset))
        short = len(form["target"]) + len(form["other"])
        ratios.append(short / full)
        shorter += short < full
        if old:
            old_ratios.append(short / len(old[i]))
            old_shorter += short < len(old[i])
    out["per_class_length"] = {"candidates": len(rows), "vs": "today's formula text",
                               "median_ratio": round(statistics.median(ratios), 3),
                               "shorter": shorter}
    if old:
        out["per_class_length_vs_baseline"] = {
            "candidates": len(rows), "vs": f"the formula text of {args.baseline}",
            "median_ratio": round(statistics.median(old_ratios), 3), "shorter": old_shorter}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
