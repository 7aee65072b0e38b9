#!/usr/bin/env bash
# Time ONE candidate (cross-entropy) of the paper's surrogate at full fidelity on a CUDA card:
# search_runs/paper.toml as is -- separate pre-screen of 800 steps at 32 px, then ResNet9V2 at
# 80 px with RandAugment(2, 5), batch 64, 8000 steps, validation every 100 steps on the 5,000
# held-out images. Prints the card, seconds per candidate, images/s and peak GPU memory; the last
# line is a JSON object (the benchmark convention of DESIGN §8). Takes well under 8 minutes.
#
#   analysis/gpu_check.sh [DATA_ROOT] [--steps N] [--device D] [--compile] [--images N]
#
# DATA_ROOT: a folder holding CIFAR-10 in torchvision's layout
# (ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}). Without one, a synthetic
# CIFAR-shaped set is written to a temp dir in that same layout (50,000 training images, i.e. the
# paper's 45,000 / 5,000 split, and 10,000 test images, 32x32x3 uint8) so the timing is still
# meaningful; its images are random noise plus a per-class pattern, so it can be learnt.
# --steps N  scales the run down for a smoke test (pre-screen and mid-run check at N/10,
#            validation every N/80 steps), e.g. on a CPU: analysis/gpu_check.sh --steps 16
#            --device cpu --images 2000
# --compile  also torch.compile the network (once per process; the warm-up pays for it).
# The pass thresholds are set to 0 so the run always goes the full length: the figure is the
# cost of a candidate that passes (the common case for cross-entropy, and the expensive one).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi

DATA_ROOT=""
STEPS=8000
DEVICE=auto
COMPILE=false
IMAGES=50000
while [[ $# -gt 0 ]]; do
    case "$1" in
        --steps) STEPS="$2"; shift 2 ;;
        --device) DEVICE="$2"; shift 2 ;;
        --compile) COMPILE=true; shift ;;
        --images) IMAGES="$2"; shift 2 ;;
        --data-root) DATA_ROOT="$2"; shift 2 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
        *) DATA_ROOT="$1"; shift ;;
    esac
done

echo "== card"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
else
    echo "nvidia-smi not found"
fi

SYNTH=""
if [[ -z "$DATA_ROOT" ]]; then
    SYNTH="$(mktemp -d "${TMPDIR:-/tmp}/gp_loss_synth_cifar.XXXXXX")"
    trap 'rm -rf "$SYNTH"' EXIT
    DATA_ROOT="$SYNTH"
fi

cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" - "$DATA_ROOT" "$STEPS" "$DEVICE" "$COMPILE" "$IMAGES" "${SYNTH:+synthetic}" <<'PY'
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

root, steps, device, compile_, images = sys.argv[1], int(sys.argv[2]), sys.argv[3], \
    sys.argv[4] == "true", int(sys.argv[5])
synthetic = len(sys.argv) > 6 and sys.argv[6] == "synthetic"


if synthetic:
    from analysis import synth_cifar

    t = time.perf_counter()
    synth_cifar.write(Path(root), images, max(images // 5, 10))
    synth_cifar.trust_files()
    print(f"== synthetic CIFAR-10 ({images} train images) written to {root} in "
          f"{time.perf_counter() - t:.1f}s")

from gp_loss.config import load_config
from gp_loss.surrogate.data import load_splits, resolve_device
from gp_loss.surrogate.fitness import evaluate

sets = [f"surrogate.data_root={root}", f"surrogate.device={device}",
        f"surrogate.compile={'true' if compile_ else 'false'}",
        "surrogate.prescreen_min_acc=0", "surrogate.midrun_min_acc=0"]
if steps != 8000:
    tenth = max(1, steps // 10)
    sets += [f"surrogate.steps={steps}", f"surrogate.prescreen_steps={tenth}",
             f"surrogate.midrun_step={tenth}", f"surrogate.eval_every={max(1, steps // 80)}"]
cfg = load_config("search_runs/paper.toml", sets)
sur = asdict(cfg.surrogate)
sur["device"] = dev = resolve_device(sur["device"])
cuda = dev.startswith("cuda")
card = torch.cuda.get_device_name(dev) if cuda else "cpu (no CUDA device)"
print(f"== device {dev}: {card}; torch {torch.__version__}")

# Data loading is a once-per-worker cost (cached), not a per-candidate one: load it first.
t = time.perf_counter()
splits = load_splits(sur["dataset"], data_root=sur["data_root"], split_seed=sur["split_seed"],
                     val_fraction=sur["val_fraction"], test_fraction=sur["test_fraction"],
                     train_fraction=sur["train_fraction"], device=dev)
print(f"== data: {splits.x_train.shape[0]} train / {splits.x_val.shape[0]} val images, "
      f"loaded in {time.perf_counter() - t:.1f}s")

# Warm-up candidate: CUDA context, cuDNN autotuning, kernel caches (and compilation with
# --compile) -- what the first candidate of a worker pays once.
warm = {**sur, "steps": max(2, steps // 40), "prescreen_steps": max(1, steps // 400),
        "midrun_step": 0, "eval_every": max(1, steps // 80)}
t = time.perf_counter()
r = evaluate("ce", "paper", warm, seed=0, sign=1)
print(f"== warm-up ({warm['steps']} steps): {time.perf_counter() - t:.1f}s, status {r['status']}"
      + (f" ({r['reason']})" if r["status"] != "ok" else ""))

if cuda:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
t = time.perf_counter()
res = evaluate("ce", "paper", sur, seed=0, sign=1)
if cuda:
    torch.cuda.synchronize()
seconds = time.perf_counter() - t
bs = sur["batch_size"]
pre_steps = sur["prescreen_steps"] if sur["prescreen_separate"] else 0
train_images = (sur["steps"] + pre_steps) * bs
peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
out = {
    "card": card, "device": dev, "synthetic_data": synthetic, "compile": compile_,
    "status": res["status"], "reason": res.get("reason"),
    "steps": sur["steps"], "prescreen_steps": pre_steps, "image_size": sur["image_size"],
    "seconds_per_candidate": round(seconds, 2),
    "train_images_per_s": round(train_images / seconds, 1),
    "peak_gpu_mib": None if peak is None else round(peak, 1),
    "val_acc": res.get("val_acc"), "torch": torch.__version__,
}
print(f"== one paper-surrogate candidate (ce): {seconds:.1f} s; "
      f"{out['train_images_per_s']:.0f} training images/s "
      f"({train_images} images incl. the {pre_steps}-step pre-screen, validation passes inside); "
      f"peak GPU memory {'n/a' if peak is None else f'{peak:.0f} MiB'}; status {res['status']}; "
      f"val_acc {res.get('val_acc')}")
print(json.dumps(out))
PY
