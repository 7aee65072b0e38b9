"""P4: throughput of the surrogate training loop (gp_loss.surrogate.train) against two references.

Fed by: nothing but the package (digits, the default `surrogate` settings). Run by `make bench`.

- `vs_minimal_loop`: our `train_candidate` (LR schedule, accuracy tracking, failure checks,
  per-epoch validation, result dict) vs a bare hand-written loop doing the same training work:
  per-epoch permutation, index the batch, forward, cross-entropy, backward, Adam step, with the
  same model, optimizer settings, batch size and step count. Goal >= 0.95.
- `vs_dataloader`: our loop vs the textbook `DataLoader(TensorDataset, shuffle=True)` loop on
  the same model and optimizer. Goal >= 2.

With `--device cuda` our loop and the minimal loop keep the data on the GPU, while the
DataLoader loop does what the textbook does: CPU tensors, each batch copied to the GPU.

Also reported: `batching_vs_dataloader`, the data path alone (our index slices of a per-epoch
permutation vs iterating the DataLoader, no training). The loop-level ratios are bounded by
the model's own step time (Amdahl): on a 1-thread CPU the tiny CNN's forward/backward costs
several times what either data path costs, so `vs_dataloader` stays far below the data-path
ratio there.

Images/s = steps * batch_size / wall seconds of the whole call (model construction included
for every variant; ours also validates each epoch). The `*_cpu_time` ratios use process CPU
time instead, which moves less when other jobs share the cores. Variants are interleaved and
medians taken, because the machines are shared and noisy. The last line printed is one JSON
object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from gp_loss.surrogate.data import load_splits, resolve_device
from gp_loss.surrogate.models import build_model
from gp_loss.config import SurrogateConfig  # noqa: E402
from gp_loss.surrogate.train import _make_optimizer, train_candidate


def _fresh(cfg: dict, splits, seed: int, device: str):
    torch.manual_seed(seed)
    model = build_model(cfg["model"], splits.in_channels, splits.num_classes, splits.image_size)
    model = model.to(device)
    return model, _make_optimizer(model, cfg, torch.device(device))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def ours(cfg: dict, splits, seed: int, device: str) -> None:
    r = train_candidate(F.cross_entropy, cfg, seed=seed, device=device)
    assert r["status"] == "ok", r


def minimal(cfg: dict, splits, seed: int, device: str) -> None:
    model, opt = _fresh(cfg, splits, seed, device)
    splits = splits.to(device)
    x, y, bs, steps = splits.x_train, splits.y_train, cfg["batch_size"], cfg["steps"]
    gen = torch.Generator().manual_seed(seed)
    model.train()
    done = 0
    while done < steps:
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(min(x.shape[0] // bs, steps - done)):
            idx = perm[i * bs:(i + 1) * bs].to(x.device)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
    _sync(device)


def dataloader(cfg: dict, splits, seed: int, device: str) -> None:
    model, opt = _fresh(cfg, splits, seed, device)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(splits.x_train, splits.y_train), batch_size=cfg["batch_size"],
                        shuffle=True, drop_last=True, generator=gen)
    model.train()
    done = 0
    while done < cfg["steps"]:
        for xb, yb in loader:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done == cfg["steps"]:
                break
    _sync(device)


def timed(fn, *args) -> tuple[float, float]:
    """(wall, process CPU) seconds of one whole call, model construction included for all
    variants. CPU time is the steadier figure when other jobs share the cores."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - w0, time.process_time() - c0


def batching_seconds(cfg: dict, splits, steps: int) -> tuple[float, float]:
    """(ours, DataLoader) seconds to produce `steps` batches on the CPU, no training."""
    x, y, bs = splits.x_train, splits.y_train, cfg["batch_size"]
    per_epoch = x.shape[0] // bs
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    done = 0
    while done < steps:
        perm = torch.randperm(x.shape[0], generator=gen)[:per_epoch * bs].view(per_epoch, bs)
        for i in range(min(per_epoch, steps - done)):
            xb, yb = x.index_select(0, perm[i]), y.index_select(0, perm[i])
            done += 1
    t_ours = time.perf_counter() - t0
    loader = DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True, drop_last=True)
    t0 = time.perf_counter()
    done = 0
    while done < steps:
        for xb, yb in loader:
            done += 1
            if done == steps:
                break
    return t_ours, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions (median taken)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a worker uses 1)")
    ap.add_argument("--steps", type=int, default=SurrogateConfig().steps)
    ap.add_argument("--model", default=SurrogateConfig().model)
    ap.add_argument("--dataset", default=SurrogateConfig().dataset)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    args = ap.parse_args()
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    # Pre-screen off: the reference loops cannot fail, ours must run the same number of steps.
    cfg = {**dataclasses.asdict(SurrogateConfig()), "steps": args.steps, "model": args.model,
           "dataset": args.dataset, "prescreen_steps": 0}
    splits = load_splits(cfg["dataset"])
    variants = {"ours": ours, "minimal": minimal, "dataloader": dataloader}
    for fn in variants.values():  # warm-up: oneDNN kernel creation, caches, allocator
        fn({**cfg, "steps": 30}, splits, 0, device)
    secs: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(args.reps):
        order = list(variants) if rep % 2 == 0 else list(reversed(variants))
        for k in order:
            wall, proc = timed(variants[k], cfg, splits, rep, device)
            secs[k].append(wall)
            cpu[k].append(proc)
    batching = [batching_seconds(cfg, splits.to("cpu"), cfg["steps"]) for _ in range(args.reps)]
    batch_ratio = statistics.median(d / o for o, d in batching)
    images = cfg["steps"] * cfg["batch_size"]
    med = {k: statistics.median(v) for k, v in secs.items()}
    ips = {k: images / s for k, s in med.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    for k in variants:
        print(f"{k:10s} median {med[k]:.3f} s per {cfg['steps']} steps  {ips[k]:8.0f} images/s  "
              f"(runs: {', '.join(f'{s:.3f}' for s in secs[k])}; CPU s median {cpu_med[k]:.3f})")
    out = {
        "vs_minimal_loop": round(ips["ours"] / ips["minimal"], 3),
        "vs_dataloader": round(ips["ours"] / ips["dataloader"], 3),
        "images_per_s": round(ips["ours"], 1),
        "images_per_s_minimal_loop": round(ips["minimal"], 1),
        "images_per_s_dataloader": round(ips["dataloader"], 1),
        "batching_vs_dataloader": round(batch_ratio, 1),
        "vs_minimal_loop_cpu_time": round(cpu_med["minimal"] / cpu_med["ours"], 3),
        "vs_dataloader_cpu_time": round(cpu_med["dataloader"] / cpu_med["ours"], 3),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "seconds_per_candidate": round(med["ours"], 3),
        "dataset": cfg["dataset"], "model": cfg["model"], "steps": cfg["steps"],
        "batch_size": cfg["batch_size"], "threads": args.threads, "reps": args.reps,
        "device": device, "torch": torch.__version__,
        "machine": (torch.cuda.get_device_name() if device.startswith("cuda")
                    else platform.processor() or platform.machine()),
    }
    print(f"ours vs minimal loop: {out['vs_minimal_loop']:.3f} (goal >= 0.95); "
          f"vs DataLoader: {out['vs_dataloader']:.3f} (goal >= 2); "
          f"data path alone vs DataLoader: {out['batching_vs_dataloader']:.1f}x")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
