"""Benchmark P2: screening steps 1-3 on random candidates, and the novelty test's cost.

    .venv/bin/python analysis/bench_screen.py [--n 10000] [--seed 0] [--threads 1]

* ``n`` random ``paper`` trees (``variation.random_tree``, fixed seed) go through
  ``screen.screen`` (integrity check, dependence, finiteness: one compile + one evaluation
  each). Reported: the fraction rejected, counts by reason, and ms per candidate (the median
  over chunks of 250, so a burst of load elsewhere on the machine does not dominate; the plain
  mean is printed too).
* Novelty: an index of 100 "population" + 2000 "history" accepted candidates (random trees and
  mutants of the zoo, screened), then 300 children (mutants of members) are looked up: the
  canonical key (``symbolic.canonical_key``) plus ``NoveltyIndex.find``. Index entries are keyed
  by their text (the dict lookup costs the same whatever the key). ``novelty_ms`` = key +
  lookup per child; both parts are printed.
* The zoo (ce, baikal, focal, mse) must all pass: ``zoo_false_rejects``.

torch runs on ``--threads`` threads (default 1, as the search driver screens: tiny tensors,
where a second thread only adds hand-off cost). Last line: a JSON object.
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from gp_loss.lang import symbolic, trees, variation  # noqa: E402
from gp_loss.screen import integrity as screen  # noqa: E402
from gp_loss.screen import novelty  # noqa: E402
from gp_loss.lang.psets import load_pset  # noqa: E402

ZOO = ("ce", "baikal", "focal", "mse")


def bench_screen(ps, n, seed, chunk=250):
    rng = random.Random(seed)
    candidates = [variation.random_tree(ps, rng) for _ in range(n)]
    screen.screen(candidates[0], ps)  # build the probe batch, warm caches
    reasons = collections.Counter()
    chunk_ms, accepted = [], []
    total = 0.0
    for start in range(0, n, chunk):
        part = candidates[start:start + chunk]
        t0 = time.perf_counter()
        results = [screen.screen(t, ps) for t in part]
        dt = time.perf_counter() - t0
        total += dt
        chunk_ms.append(dt / len(part) * 1e3)
        for t, r in zip(part, results):
            reasons[r.reason] += 1
            if r.accepted:
                accepted.append((t, r))
    return reasons, statistics.median(chunk_ms), total / n * 1e3, accepted


def accepted_pool(ps, start, size, seed):
    """``size`` screened candidates: ``start`` plus mutants of the zoo and of what passed."""
    rng = random.Random(seed)
    pool = list(start)
    parents = [trees.parse(z, ps) for z in ZOO] + [t for t, _ in start]
    while len(pool) < size:
        child, _kind = variation.mutate(rng.choice(parents), ps, rng)
        if child is None:
            continue
        r = screen.screen(child, ps)
        if r.accepted:
            pool.append((child, r))
            parents.append(child)
    return pool


def bench_novelty(ps, pool, members=100, history=2000, queries=300, seed=1):
    rng = random.Random(seed)
    index = novelty.NoveltyIndex()
    for cid, (t, r) in enumerate(pool[:members + history]):
        index.add(cid, trees.to_text(t, ps), r.fingerprint)
    member_trees = [t for t, _ in pool[:members]]
    children = []
    while len(children) < queries:
        child, _kind = variation.mutate(rng.choice(member_trees), ps, rng)
        if child is None:
            continue
        r = screen.screen(child, ps)
        if r.accepted:
            children.append((child, r))
    key_s = find_s = 0.0
    found = 0
    for child, r in children:
        t0 = time.perf_counter()
        key = symbolic.canonical_key(child, ps, sign=r.sign)
        t1 = time.perf_counter()
        hit = index.find(key, r.fingerprint)
        t2 = time.perf_counter()
        key_s += t1 - t0
        find_s += t2 - t1
        found += hit is not None
    return len(index), key_s / queries * 1e3, find_s / queries * 1e3, found / queries


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--index", type=int, default=2100, help="population + history entries")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ps = load_pset("paper")
    wall = time.perf_counter()

    reasons, ms_median, ms_mean, accepted = bench_screen(ps, args.n, args.seed)
    rejected = sum(v for k, v in reasons.items() if k != screen.OK)
    print(f"screened {args.n} random candidates: {rejected / args.n:.1%} rejected; "
          f"{ms_median:.2f} ms/candidate (median of chunks; mean {ms_mean:.2f})")
    for reason, count in reasons.most_common():
        print(f"  {reason:26s} {count:6d}")

    zoo_rejects = [z for z in ZOO if not screen.screen(z, ps).accepted]
    print(f"zoo false rejections: {zoo_rejects or 'none'}")

    members = 100
    pool = accepted_pool(ps, accepted, args.index, args.seed + 1)
    size, key_ms, find_ms, hit_rate = bench_novelty(ps, pool, members, args.index - members)
    print(f"novelty vs an index of {size}: key {key_ms:.2f} ms + lookup {find_ms:.3f} ms per "
          f"child ({hit_rate:.0%} of mutant children found as duplicates)")
    print(f"wall {time.perf_counter() - wall:.0f} s, torch threads {args.threads}")
    print(json.dumps({
        "rejected_fraction": round(rejected / args.n, 4),
        "ms_per_candidate": round(ms_median, 3),
        "ms_per_candidate_mean": round(ms_mean, 3),
        "novelty_ms": round(key_ms + find_ms, 3),
        "novelty_key_ms": round(key_ms, 3),
        "novelty_lookup_ms": round(find_ms, 4),
        "novelty_index_size": size,
        "zoo_false_rejects": len(zoo_rejects),
        "rejected_by_reason": {k: v for k, v in sorted(reasons.items()) if k != screen.OK},
        "n": args.n,
        "threads": args.threads,
    }))


if __name__ == "__main__":
    main()
