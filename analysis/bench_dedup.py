"""Benchmark P3: dedup recall and false merges of ``screen.same`` on the project's equivalence set.

    .venv/bin/python analysis/bench_dedup.py [--set tests/equivalence_set.toml]

Every labelled pair (``a``, ``b``, ``same``, ``why``; optional ``pset``, default ``paper``) is
tested three ways: the canonical key alone (each side oriented by its integrity sign), the
gradient fingerprint alone, and ``same`` (either). ``recall`` = labelled-same pairs that
``same`` detects; ``false_merges`` = labelled-different pairs it calls the same; the key-only
and fingerprint-only figures show what each half contributes. Every miss and false merge is
printed with its ``why``. Last line: a JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gp_loss.screen import integrity as screen  # noqa: E402


def load_pairs(path):
    """The labelled pairs: every array of tables in the file whose entries have a, b, same."""
    data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    pairs = []
    for value in data.values():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            pairs.extend(v for v in value if {"a", "b", "same"} <= set(v))
    return pairs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default=str(ROOT / "tests" / "equivalence_set.toml"))
    args = ap.parse_args(argv)
    pairs = load_pairs(args.set)
    counts = {"same_pairs": 0, "different_pairs": 0, "detected": 0, "false_merges": 0,
              "key_detected": 0, "key_false_merges": 0, "fp_detected": 0, "fp_false_merges": 0}
    screen.key_and_fingerprint("ce", "paper")  # imports torch and sympy, builds the probe batch
    t0 = time.perf_counter()
    for pair in pairs:
        pset = pair.get("pset", "paper")
        _, ka, fa = screen.key_and_fingerprint(pair["a"], pset)
        _, kb, fb = screen.key_and_fingerprint(pair["b"], pset)
        by_key, by_fp = ka == kb, screen.fingerprints_match(fa, fb)
        said = by_key or by_fp
        label = bool(pair["same"])
        if label:
            counts["same_pairs"] += 1
            counts["detected"] += said
            counts["key_detected"] += by_key
            counts["fp_detected"] += by_fp
        else:
            counts["different_pairs"] += 1
            counts["false_merges"] += said
            counts["key_false_merges"] += by_key
            counts["fp_false_merges"] += by_fp
        if said != label:
            what = "MISSED" if label else "FALSE MERGE"
            print(f"{what}: {pair['a']}  vs  {pair['b']}  [{pset}; key {by_key}, "
                  f"fingerprint {by_fp}] -- {pair.get('why', '')}")
    seconds = time.perf_counter() - t0
    n_same = max(counts["same_pairs"], 1)
    print(f"{len(pairs)} pairs ({counts['same_pairs']} same, {counts['different_pairs']} "
          f"different) in {seconds:.1f} s: recall {counts['detected']}/{counts['same_pairs']}, "
          f"false merges {counts['false_merges']}; key alone {counts['key_detected']}, "
          f"fingerprint alone {counts['fp_detected']}")
    print(json.dumps({
        "recall": round(counts["detected"] / n_same, 4),
        "false_merges": counts["false_merges"],
        "key_recall": round(counts["key_detected"] / n_same, 4),
        "fingerprint_recall": round(counts["fp_detected"] / n_same, 4),
        "key_false_merges": counts["key_false_merges"],
        "fingerprint_false_merges": counts["fp_false_merges"],
        "pairs": len(pairs),
        "same_pairs": counts["same_pairs"],
        "different_pairs": counts["different_pairs"],
        "seconds": round(seconds, 2),
    }))


if __name__ == "__main__":
    main()
