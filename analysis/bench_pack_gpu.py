"""P14 on a GPU: the paper surrogate's seconds per candidate at K = 1 and in packs of K.

One short prepared run for a lent card (15 minutes in all, start-up included). The surrogate
is ``search_runs/paper.toml`` as is (ResNet9V2, 80 px, RandAugment(2, 5), batch 64, bf16 on a
card that has it), scaled to ``--steps`` with every proportion of the real 8,000-step
candidate kept: the separate pre-screen and the mid-run check at steps/10, validation on the
5,000 held-out images every steps/80. For each K of ``--ks`` (ascending) it trains K
cross-entropy candidates of one seed (a search's children share seed 0, so they share batches)
once to warm up (cuDNN autotuning for that width), then again timed; seconds per candidate =
wall / K x 8000 / steps. The pass thresholds are 0, so every candidate runs the full length.
A K whose pack runs out of memory is reported (the trainer halves such a pack; here we stop)
and the larger Ks are skipped.

    .venv/bin/python analysis/bench_pack_gpu.py [--data-root DIR] [--steps 400]
        [--ks 1 8 16 32 64] [--device auto] [--images 50000]

Without ``--data-root`` (CIFAR-10 in torchvision's layout) a synthetic CIFAR-shaped set is
written to a temp dir (``synth_cifar.py``). Without a CUDA device and without ``--device`` it
says so and stops (``make bench`` runs every ``bench_*.py``). CPU smoke test:
``--device cpu --steps 16 --images 2000 --ks 1 2``. The last line is one JSON object:
``card``, per K ``s_per_candidate_8000``, ``peak_gpu_mib``, ``speedup`` vs K = 1, and
``best_k``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-root", default="")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--images", type=int, default=50000)
    args = ap.parse_args()
    ks = sorted(set(args.ks) | {1})

    from gp_loss.config import load_config
    from gp_loss.surrogate.data import load_splits, resolve_device
    from gp_loss.surrogate.fitness import evaluate_pack

    if args.device == "auto" and not torch.cuda.is_available():
        # make bench runs every bench_*.py: on a machine without a card this one says so
        print("no CUDA device: nothing to time (--device cpu --steps 16 --images 2000 "
              "--ks 1 2 is the smoke test)")
        print(json.dumps({"card": None, "skipped": "no CUDA device"}))
        return
    tmp = None
    root = args.data_root
    if not root:
        from analysis import synth_cifar

        tmp = tempfile.TemporaryDirectory()
        root = tmp.name
        synth_cifar.write(Path(root), args.images, max(args.images // 5, 10))
        synth_cifar.trust_files()
    tenth = max(1, args.steps // 10)
    sets = [f"surrogate.data_root={root}", f"surrogate.device={args.device}",
            "surrogate.prescreen_min_acc=0", "surrogate.midrun_min_acc=0",
            f"surrogate.steps={args.steps}", f"surrogate.prescreen_steps={tenth}",
            f"surrogate.midrun_step={tenth}", f"surrogate.eval_every={max(1, args.steps // 80)}"]
    sur = asdict(load_config(ROOT / "search_runs" / "paper.toml", sets).surrogate)
    sur["device"] = dev = resolve_device(sur["device"])
    cuda = dev.startswith("cuda")
    card = torch.cuda.get_device_name(dev) if cuda else "cpu (no CUDA device)"
    print(f"== {card}; torch {torch.__version__}; {args.steps} steps, extrapolated to 8000",
          flush=True)
    load_splits(sur["dataset"], data_root=sur["data_root"], split_seed=sur["split_seed"],
                val_fraction=sur["val_fraction"], test_fraction=sur["test_fraction"],
                train_fraction=sur["train_fraction"], device=dev)  # cached for the runs
    warm = {**sur, "steps": max(4, args.steps // 20), "prescreen_steps": 2, "midrun_step": 0}
    rows = {}
    for k in ks:
        items = [("neg(mul(y, log(p)))", 0, 1)] * k
        try:
            evaluate_pack(items, "paper", warm, width=k)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            res = evaluate_pack(items, "paper", sur, width=k)
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t
        except torch.OutOfMemoryError as exc:
            rows[k] = {"error": f"out of memory: {exc}"[:200]}
            print(json.dumps({"k": k, **rows[k]}), flush=True)
            break
        packs = sorted({r["pack_k"] for r in res})
        rows[k] = {"wall_s": round(wall, 2),
                   "s_per_candidate_8000": round(wall / k * 8000 / args.steps, 2),
                   "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)
                   if cuda else None,
                   "ran_at_k": packs, "status": sorted({r["status"] for r in res}),
                   "val_acc": res[0].get("val_acc")}
        print(json.dumps({"k": k, **rows[k]}), flush=True)
    ok = {k: r for k, r in rows.items() if "s_per_candidate_8000" in r}
    base = ok[1]["s_per_candidate_8000"]
    for r in ok.values():
        r["speedup"] = round(base / r["s_per_candidate_8000"], 3)
    best = min(ok, key=lambda k: ok[k]["s_per_candidate_8000"])
    print(json.dumps({"card": card, "device": dev, "synthetic_data": not args.data_root,
                      "steps_timed": args.steps, "best_k": best,
                      "s_per_candidate_8000_k1": base,
                      "s_per_candidate_8000_best": ok[best]["s_per_candidate_8000"],
                      "speedup_best": ok[best]["speedup"], "ks": {str(k): r for k, r in
                                                                   rows.items()},
                      "torch": torch.__version__}))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
