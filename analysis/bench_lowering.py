"""P6: the printer's lowered loss vs the same formula hand-written in torch (forward + backward).

For each loss (ce, baikal, focal and two random trees of the paper set) and each batch shape
(256 x 10, 256 x 100, float32, CPU) it times ``loss(logits, target).backward()`` for the
function compiled from ``codegen`` (exactly what training runs and ``export`` writes) and for a
hand-written torch version of the same formula (checked to give the same value first).
Repetitions are interleaved in a shuffled order and the medians compared, so drift of a noisy
machine hits both sides alike. Last line: a JSON object with ``vs_handwritten`` (geometric mean
over all cases of median lowered time / median hand-written time; goal <= 1.10), its worst case
and per-case figures.

    PYTHONPATH=. python analysis/bench_lowering.py [--reps 31] [--inner 50] [--threads 1]
                                                   [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import gp_loss  # noqa: E402
from gp_loss.lang import codegen  # noqa: E402

EPS = 1e-7

# Two random trees of the paper set, from variation.random_tree(paper, random.Random(SEED),
# min_height=4, max_height=5): the first seeds whose tree has 14-22 nodes and passes screening.
RAND43 = "mul(sqrt(inv1p(mul(-1, y))), div(add(sqrt(-1), dtanh(p)), exp(inv1p(y))))"
RAND53 = "mul(div(max(isru(1, -1), log(y)), sin(square(p))), i0(exp(sin(y))))"


def _prep(logits, target):
    p = torch.softmax(logits, dim=1)
    y = F.one_hot(target, p.shape[1]).to(p.dtype)
    return y, p


def ce_hand(logits, target):
    y, p = _prep(logits, target)
    return -(y * torch.log(p + EPS)).sum(1).mean()


def baikal_hand(logits, target):
    y, p = _prep(logits, target)
    return (y / (p + EPS) - torch.log(p + EPS)).sum(1).mean()


def focal_hand(logits, target):
    y, p = _prep(logits, target)
    return -((1 - p) ** 2 * y * torch.log(p + EPS)).sum(1).mean()


def rand43_hand(logits, target):          # integrity sign -1
    y, p = _prep(logits, target)
    f = torch.sqrt(1 / (1 + y)) * ((2 - torch.tanh(p) ** 2) / (torch.exp(1 / (1 + y)) + EPS))
    return -f.sum(1).mean()


_ISRU = 1 / math.sqrt(2.0)


def rand53_hand(logits, target):          # integrity sign +1
    y, p = _prep(logits, target)
    f = (torch.clamp(torch.log(y + EPS), min=_ISRU) / (torch.sin(p * p) + EPS)
         * torch.special.i0(torch.exp(torch.sin(y))))
    return f.sum(1).mean()


CASES = [("ce", "ce", ce_hand), ("baikal", "baikal", baikal_hand),
         ("focal", "focal", focal_hand), ("rand43", RAND43, rand43_hand),
         ("rand53", RAND53, rand53_hand)]
SHAPES = [(256, 10), (256, 100)]


def _time(fn, logits, target, inner):
    sync = torch.cuda.synchronize if logits.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(inner):
        logits.grad = None
        fn(logits, target).backward()
    sync()
    return (time.perf_counter() - start) / inner


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=31)
    ap.add_argument("--inner", type=int, default=50)
    # One thread by default: tensors this small gain nothing from intra-op threads, and on a
    # shared 2-core machine a second thread mostly adds scheduling noise.
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu (the reported figure) or cuda")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    order = random.Random(0)

    lowered = {}
    for name, expr, hand in CASES:
        sign = gp_loss.sign_of(expr)
        lowered[name] = codegen.compile_loss(gp_loss.parse(expr), "paper", sign=sign, name=name)[0]

    results = []
    for b, c in SHAPES:
        logits = torch.randn(b, c, device=args.device, requires_grad=True)
        target = torch.randint(0, c, (b,), device=args.device)
        jobs = []
        for name, _expr, hand in CASES:
            ours, theirs = lowered[name](logits, target), hand(logits, target)
            if not torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6):
                raise SystemExit(f"{name}: lowered {ours.item()} != hand-written {theirs.item()}")
            for _ in range(3):                                            # warm-up
                _time(lowered[name], logits, target, 5), _time(hand, logits, target, 5)
            jobs += [(name, "lowered", lowered[name]), (name, "hand", hand)]
        times = {(n, k): [] for n, k, _ in jobs}
        for _ in range(args.reps):
            order.shuffle(jobs)
            for name, kind, fn in jobs:
                times[(name, kind)].append(_time(fn, logits, target, args.inner))
        for name, _expr, _hand in CASES:
            low = statistics.median(times[(name, "lowered")])
            hand = statistics.median(times[(name, "hand")])
            results.append({"loss": name, "shape": f"{b}x{c}", "lowered_us": round(low * 1e6, 1),
                            "handwritten_us": round(hand * 1e6, 1), "ratio": round(low / hand, 3)})
            print(f"{name:8s} {b}x{c:<4d} lowered {low * 1e6:8.1f} us  hand-written "
                  f"{hand * 1e6:8.1f} us  ratio {low / hand:.3f}", flush=True)

    ratios = [r["ratio"] for r in results]
    summary = {
        "bench": "lowering",
        "vs_handwritten": round(math.exp(statistics.fmean(math.log(r) for r in ratios)), 3),
        "vs_handwritten_max": max(ratios),
        "goal": 1.10,
        "cases": results,
        "reps": args.reps, "inner": args.inner, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "device": args.device,
        "machine": (torch.cuda.get_device_name() if args.device.startswith("cuda") else
                    f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads"),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
