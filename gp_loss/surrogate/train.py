"""Training loop with the candidate loss injected; returns a small metrics dict.

Fed by: `fitness.py` (a loss compiled from our printer's source, the `surrogate` section of the
evaluation config as a plain dict, the run's seed), and by `train`/`compare` on the command line.
Uses `data.load_splits` for the tensors and `models.build_model` for the network.

The loop is airbench-style: every split lives on the device as one tensor, a batch is an index
slice of a per-epoch permutation, and nothing syncs with the device except at the few
"event" steps (evaluation, pre-screen, mid-run check). The search trains thousands of small
candidates, so per-step Python and dispatch overhead is the cost that matters. The caller
chooses the torch thread count (a search worker should use 1: the models are too small to
gain from more, and spinning OpenMP threads slow everything on a shared 2-core machine).

Hyperparameters (the defaults of `config.SurrogateConfig`, the one definition and check) and why:

  dataset "digits", model "tiny"  real data, ~1.3 s per candidate on one CPU thread.
  steps 400                ~21 epochs of digits at batch 64: cross-entropy reaches ~0.97 val
                           accuracy (best of the run), short of saturation, so losses that
                           learn more slowly still score lower.
  batch_size 64            the paper's scored surrogate batch size.
  lr 2e-3                  Adam peak; above the paper's 1e-3 because the run is 20x shorter.
  warmup_fraction 0.1      the paper's shape: 800 warm-up steps of 8000, then cosine to 0.
  eval_every 0             = once per epoch of the training split (the paper: each epoch).
  train/val/test_fraction  1.0 / 0.15 / 0.15: a fixed stratified split; test is for reporting.
  split_seed 0             the split is a property of the run, not of the candidate's seed.
  prescreen_steps 100,     the paper's pre-screen (best training accuracy < 0.35 fails), at a
  prescreen_min_acc 0.35   quarter of the budget: hopeless losses stop after 1/4 of the cost.
                           It only stops a run before its last step (prescreen_steps >= steps:
                           off; a candidate that trained fully is scored, never discarded).
  midrun_step 0 (off),     the paper's mid-run rule (training accuracy < 0.22 stops the run);
  midrun_min_acc 0.22      off by default because 400 steps are short already.
  timeout_s 0 (none)       a wall-clock guard for pathological candidates on shared machines.
  weight_decay 0.0         the paper uses Adam without weight decay.
  image_size 0, augment    native size, no augmentation: the CPU surrogate. The paper's GPU
  "none"                   surrogate resizes to 80 px and uses RandAugment(2, 5) per image
                           (`augment.py`); validation/test images are only resized.
  prescreen_separate       False: the pre-screen is the first `prescreen_steps` of the run
                           itself. True (the paper): a separate run of prescreen_steps at
                           prescreen_image_size (0 = image_size) without augmentation, fresh
                           model and same seed, with its own warm-up/cosine schedule over those
                           steps; only a candidate that passes it gets the full run.
  amp "auto", compile      CUDA only: bf16 autocast of the network (the loss always sees float32
  False                    logits: eps = 1e-7 vanishes in bf16), channels_last, and optionally
                           torch.compile of the network, once per process and model shape
                           (`_COMPILED`): candidates reuse it with fresh weights loaded, so a
                           new loss never recompiles. Never on CPU, which stays deterministic.
  download False           torchvision datasets are read from data_root, never fetched unasked.

Validation NLL: each evaluation also computes the mean negative log-likelihood of the
network's softmax on the validation split (float64, the same for every candidate loss: it
measures the network, not the loss it was trained with); the value at the best-accuracy
checkpoint is returned as `val_nll`, the search's tie-break between equal fitnesses (lower
wins). It costs one log-softmax per evaluation and, on CPU, is as reproducible as the rest.

Training accuracy is counted over "windows" (the steps since the previous event); the
pre-screen compares the best window so far with its threshold, the mid-run rule the latest
window, like the Keras epoch accuracies of the authors' code.

Progressive learning (PAPER-NOTES §5), the private key `stages` that `eliminate.py` sets: dicts
of `steps` and optional `image_size`, `randaugment_magnitude`, `dropout` (missing: the run's
value; dropout: the model's own). One warm-up/cosine schedule spans sum(steps); each boundary
changes the train and val/test size, the magnitude (> 10 extrapolates, as the paper's 12 and 15)
and every nn.Dropout's p; each stage ends with a validation at its size. Fitness is the best over
all stages; test_acc is that checkpoint's, at its stage's size. A separate pre-screen uses stage
1's dropout and size (prescreen_image_size wins). Without `stages` the run is one stage.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import time
from typing import Callable

import torch

from ..config import SurrogateConfig, check_stages
from .augment import augment_batch, resize
from .data import load_splits, resolve_device
from .models import build_model
from ..errors import describe

__all__ = ["train_candidate", "lr_schedule"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_EVAL_CHUNK = 4096  # bounds activation memory when a split is evaluated in one go
# Device types where reading the loss every step is cheap (no asynchronous queue to stall).
_SYNC_EACH_STEP = {"cpu"}


def _config(surrogate) -> dict:
    """The settings one training uses: ``surrogate`` (a ``config.SurrogateConfig``, or a dict of
    its fields -- unknown keys are ignored: the evaluation config may carry settings for other
    stages) checked by ``SurrogateConfig``, the one validation; complete ``stages`` (one without
    the key), steps = their total, stage 1's size/magnitude."""
    extra = {}
    if not isinstance(surrogate, SurrogateConfig):
        extra = dict(surrogate or {})
        known = {f.name for f in dataclasses.fields(SurrogateConfig)}
        surrogate = SurrogateConfig(**{k: v for k, v in extra.items() if k in known})
    cfg = dataclasses.asdict(surrogate)
    base = {"image_size": cfg["image_size"], "randaugment_magnitude": cfg["randaugment_magnitude"],
            "dropout": None}  # None: the model's own rates
    stages = check_stages(extra.get("stages") or [])
    cfg["stages"] = tuple({**base, **st} for st in stages) or ({**base, "steps": cfg["steps"]},)
    if stages:
        cfg.update(steps=sum(st["steps"] for st in stages),
                   **{k: cfg["stages"][0][k] for k in ("image_size", "randaugment_magnitude")})
    return cfg


def lr_schedule(lr: float, steps: int, warmup_fraction: float) -> list[float]:
    """The paper's shape, one value per step: linear warm-up to `lr` over the first
    warmup_fraction*steps steps, then half a cosine down to 0 at `steps`."""
    warm = int(round(warmup_fraction * steps))
    out = []
    for s in range(steps):
        if s < warm:
            out.append(lr * (s + 1) / warm)
        else:
            out.append(lr * 0.5 * (1.0 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    return out


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, fast=None,
              with_nll: bool = False):
    """Accuracy of ``model`` on (x, y); with ``with_nll`` the pair (accuracy, mean negative
    log-likelihood of its softmax in float64, None if not finite)."""
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    nll = torch.zeros((), dtype=torch.float64, device=x.device)
    for i in range(0, x.shape[0], _EVAL_CHUNK):
        xb = x[i:i + _EVAL_CHUNK]
        if fast is not None:
            xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=fast["amp"]):
                logits = model(xb)
        else:
            logits = model(xb)
        correct += (logits.argmax(1) == y[i:i + _EVAL_CHUNK]).sum()
        if with_nll:
            nll += torch.nn.functional.cross_entropy(logits.double(), y[i:i + _EVAL_CHUNK],
                                                     reduction="sum")
    model.train()
    acc = correct.item() / max(1, x.shape[0])
    if not with_nll:
        return acc
    value = nll.item() / max(1, x.shape[0])
    return acc, (value if math.isfinite(value) else None)


# Resized validation/test splits, per process: resized once, not at every evaluation. The key
# holds the source tensor itself, so its id cannot be reused while the entry lives.
_RESIZED: dict = {}


def _resized(x: torch.Tensor, size: int) -> torch.Tensor:
    if size <= 0 or (x.shape[-1] == size and x.shape[-2] == size):
        return x
    key = (id(x), size)
    hit = _RESIZED.get(key)
    if hit is None or hit[0] is not x:
        if len(_RESIZED) >= 8:
            _RESIZED.clear()
        # chunked: a whole split at 80 px would need a second full-size temporary
        out = torch.cat([resize(x[i:i + _EVAL_CHUNK], size)
                         for i in range(0, x.shape[0], _EVAL_CHUNK)])
        hit = _RESIZED[key] = (x, out)
    return hit[1]


# torch.compile'd networks, one per (model, input shape, classes, device) per process.
_COMPILED: dict = {}


def _network(cfg: dict, splits, size: int, dev: torch.device) -> torch.nn.Module:
    """A freshly initialised network (from the current, seeded RNG). With compile on CUDA the
    process's compiled module is reused, with the fresh weights loaded into it."""
    model = build_model(cfg["model"], splits.in_channels, splits.num_classes, size).to(dev)
    if dev.type != "cuda":
        return model
    model = model.to(memory_format=torch.channels_last)
    if not cfg["compile"]:
        return model
    key = (cfg["model"], splits.in_channels, splits.num_classes, size, str(dev))
    if key not in _COMPILED:
        # static shapes: the train batch and the eval chunks each compile once (dynamic
        # shapes hit an inductor assertion in torch 2.11 on this model)
        _COMPILED[key] = (model, torch.compile(model, dynamic=False))
    else:
        _COMPILED[key][0].load_state_dict(model.state_dict())
        for a, b in zip(_dropouts(_COMPILED[key][0]), _dropouts(model)):  # stages change p
            a.p = b.p
    return _COMPILED[key][1]


def error_reason(exc: BaseException) -> str:
    """A failed evaluation's reason: "out_of_memory" (the device's memory is freed for the next
    candidate) or "error: <Type>: <first line>"."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return "out_of_memory"
    return "error: " + describe(exc, 193)


def _make_optimizer(model: torch.nn.Module, cfg: dict, dev: torch.device):
    # The fused kernel does Adam for all parameters in one call: on CPU the per-parameter
    # for-loop implementation costs about as much as the tiny model's forward pass.
    params = list(model.parameters())
    try:
        return torch.optim.Adam(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                                fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device/dtype without a fused kernel
        return torch.optim.Adam(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])


def train_candidate(loss_fn: LossFn, surrogate: dict, *, seed: int = 0, device: str = "cpu",
                    with_test: bool = False) -> dict:
    """Train the surrogate with `loss_fn(logits, target_int64) -> scalar` and score it.

    Returns {status: "ok"|"failed", reason: None|str, fitness: best val acc (0.0 before any
    evaluation), val_acc (same), val_nll (mean negative log-likelihood of the network's
    softmax on the validation split at that best-accuracy checkpoint, the first one to reach
    it; None before any evaluation: the search's tie-break, lower wins), test_acc (accuracy of the best-val checkpoint, only with
    with_test, else None), train_acc (latest training window), steps (steps run), seconds,
    device, weights_hash (digest of the final weights)}. Failure reasons: "nan_loss",
    "inf_loss", "prescreen", "early_stop", "timeout", "error: <Type>: <message>". On CPU the
    result is bit-for-bit reproducible for a seed (same torch build and thread count).
    A bad config (unknown dataset/model, impossible fractions) raises ValueError: that is the
    caller's error, not the candidate's.
    """
    t0 = time.perf_counter()
    cfg = _config(surrogate)
    dev = torch.device(resolve_device(device))
    splits = load_splits(cfg["dataset"], data_root=cfg["data_root"], split_seed=cfg["split_seed"],
                         val_fraction=cfg["val_fraction"], test_fraction=cfg["test_fraction"],
                         train_fraction=cfg["train_fraction"], device=dev,
                         download=cfg["download"])
    if cfg["prescreen_separate"] and cfg["prescreen_steps"] > 0:
        one = {"steps": cfg["prescreen_steps"],
               "image_size": cfg["prescreen_image_size"] or cfg["image_size"]}
        pre = {**cfg, **one, "augment": "none", "midrun_step": 0, "_prescreen_run": True,
               "stages": ({**cfg["stages"][0], **one},)}
        result = _seeded_run(loss_fn, splits, pre, seed, dev, False, t0)
        if result["status"] != "ok":
            result["seconds"] = time.perf_counter() - t0
            return result
        cfg = {**cfg, "prescreen_steps": 0}
    result = _seeded_run(loss_fn, splits, cfg, seed, dev, with_test, t0)
    result["seconds"] = time.perf_counter() - t0
    return result


def _seeded_run(loss_fn, splits, cfg, seed, dev, with_test, t0) -> dict:
    # Forking the RNG makes initial weights (and any dropout) a function of `seed` alone,
    # whatever ran before in this process, and leaves the caller's RNG state untouched.
    fork_devices = [dev.index or 0] if dev.type == "cuda" else []
    size = cfg["image_size"] or splits.image_size
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model = _network(cfg, splits, size, dev)
        return _run(model, loss_fn, splits, cfg, seed, dev, with_test, t0)


def _dropouts(model: torch.nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]


def _enter_stage(st: dict, dropouts: list, base_p: list, native: int) -> tuple[int, float]:
    """Set the stage's dropout rates; return its image size and RandAugment magnitude."""
    for m, p in zip(dropouts, base_p):
        m.p = p if st["dropout"] is None else st["dropout"]
    return st["image_size"] or native, st["randaugment_magnitude"]


def _run(model, loss_fn, splits, cfg, seed, dev, with_test, t0) -> dict:
    x_train, y_train, native = splits.x_train, splits.y_train, splits.image_size
    ends = list(itertools.accumulate(st["steps"] for st in cfg["stages"]))
    dropouts = _dropouts(model)
    base_p = [m.p for m in dropouts]
    stage, stage_end = 0, ends[0]
    size, magnitude = _enter_stage(cfg["stages"][0], dropouts, base_p, native)
    x_val, best_size = _resized(splits.x_val, size), size
    # Resize/augment only when asked: the default (CPU, native size) path stays a bare slice.
    transform = cfg["augment"] != "none" or any((st["image_size"] or native) != native
                                                for st in cfg["stages"])
    if transform:
        c = splits.in_channels
        mean = torch.tensor(splits.mean, device=dev).view(1, c, 1, 1)
        std = torch.tensor(splits.std, device=dev).view(1, c, 1, 1)
        aug_gen = torch.Generator(device=dev).manual_seed(seed + 104729)  # own stream
    fast = None
    if dev.type == "cuda":
        fast = {"amp": cfg["amp"] == "bf16" or (cfg["amp"] == "auto"
                                                and torch.cuda.is_bf16_supported())}
    n = x_train.shape[0]
    if n == 0:
        raise ValueError("the training split is empty (train_fraction too small?)")
    bs = min(cfg["batch_size"], n)
    per_epoch = n // bs  # the remainder is dropped: constant batch size keeps BN statistics even
    steps = cfg["steps"]
    eval_every = cfg["eval_every"] or per_epoch
    lrs = lr_schedule(cfg["lr"], steps, cfg["warmup_fraction"])
    opt = _make_optimizer(model, cfg, dev)
    group = opt.param_groups[0]
    # The batch order depends on the seed only, so every candidate of a run sees the same batches.
    gen = torch.Generator().manual_seed(seed)
    prescreen, midrun = cfg["prescreen_steps"], cfg["midrun_step"]
    if prescreen >= steps and not cfg.get("_prescreen_run"):
        prescreen = 0  # at the last step it would only discard a fully trained candidate
    timeout = cfg["timeout_s"]
    events = sorted({s for s in range(eval_every, steps + 1, eval_every)} | {steps}
                    | {s for s in (prescreen, midrun) if 0 < s <= steps} | set(ends))
    events.append(steps + 1)  # sentinel: never reached
    ev_i = 0
    # On CPU a 0-d .item() is as cheap as any op and gives the exact failing step; on an
    # accelerator it would stall the queue, so the loss is tracked on-device and checked at
    # events: `first_bad` holds the latest loss until one is non-finite, then freezes there.
    check_each_step = dev.type in _SYNC_EACH_STEP
    first_bad = torch.zeros((), device=dev)

    correct = torch.zeros((), dtype=torch.int64, device=dev)
    seen = 0
    best_val = -1.0
    best_nll = None  # validation NLL at the best-accuracy checkpoint: the tie-break
    best_state = None
    train_acc = best_train = 0.0
    status, reason = "ok", None
    perm = torch.empty(0, dtype=torch.int64)
    pos = per_epoch  # forces a fresh permutation at step 0
    model.train()
    step = 0
    while step < steps:
        if pos == per_epoch:
            perm = torch.randperm(n, generator=gen)[: per_epoch * bs].view(per_epoch, bs).to(dev)
            pos = 0
        idx = perm[pos]
        pos += 1
        xb, yb = x_train.index_select(0, idx), y_train.index_select(0, idx)
        if transform:
            if cfg["augment"] == "none":
                xb = resize(xb, size)  # linear: commutes with the standardisation
            else:
                xb = resize((xb * std + mean).clamp_(0.0, 1.0), size)
                xb = augment_batch(xb, cfg["augment"], aug_gen, ops=cfg["randaugment_ops"],
                                   magnitude=magnitude)
                xb = (xb - mean) / std
        group["lr"] = lrs[step]
        step += 1
        if fast is not None:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=fast["amp"]):
                logits = model(xb.contiguous(memory_format=torch.channels_last))
            logits = logits.float()  # the candidate loss runs in float32
        else:
            logits = model(xb)
        opt.zero_grad(set_to_none=True)
        try:
            loss = loss_fn(logits, yb)
            if check_each_step:
                value = loss.item()
                if not math.isfinite(value):
                    status, reason = "failed", "nan_loss" if math.isnan(value) else "inf_loss"
                    break
            else:
                first_bad = torch.where(torch.isfinite(first_bad), loss.detach(), first_bad)
            loss.backward()
        except Exception as exc:  # a candidate's loss may fail in any way; the search goes on
            status, reason = "failed", error_reason(exc)
            break
        opt.step()
        correct += (logits.detach().argmax(1) == yb).sum()
        seen += bs
        if timeout and time.perf_counter() - t0 > timeout:
            status, reason = "failed", "timeout"
            break
        if step != events[ev_i]:
            continue
        # --- event step: the only place the loop waits for the device ---
        ev_i += 1
        if not check_each_step:
            value = first_bad.item()
            if not math.isfinite(value):
                status, reason = "failed", "nan_loss" if math.isnan(value) else "inf_loss"
                break
        train_acc = correct.item() / seen
        best_train = max(best_train, train_acc)
        correct.zero_()
        seen = 0
        if step == prescreen and best_train < cfg["prescreen_min_acc"]:
            status, reason = "failed", "prescreen"
            break
        if step == midrun and train_acc < cfg["midrun_min_acc"]:
            status, reason = "failed", "early_stop"
            break
        if (step % eval_every == 0 or step == stage_end) and not cfg.get("_prescreen_run"):
            val, nll = _accuracy(model, x_val, splits.y_val, fast, True)  # (acc, NLL)
            if val > best_val:
                best_val, best_size, best_nll = val, size, nll
                if with_test:
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if step == stage_end and step < steps:  # progressive learning: the next stage
            stage += 1
            stage_end = ends[stage]
            size, magnitude = _enter_stage(cfg["stages"][stage], dropouts, base_p, native)
            x_val = _resized(splits.x_val, size)

    weights_hash = _weights_hash(model)  # the final weights, before a checkpoint is restored
    test_acc = None
    if with_test and best_state is not None:
        model.load_state_dict(best_state)
        test_acc = _accuracy(model, _resized(splits.x_test, best_size), splits.y_test, fast)
    fitness = max(best_val, 0.0)
    return {
        "status": status, "reason": reason, "fitness": fitness, "val_acc": fitness,
        "val_nll": best_nll, "test_acc": test_acc, "train_acc": train_acc, "steps": step, "seconds": 0.0,
        "device": str(dev), "weights_hash": weights_hash,
    }


def _weights_hash(model: torch.nn.Module) -> str:
    """Short digest of the final weights and buffers, for bit-for-bit reproducibility checks."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
