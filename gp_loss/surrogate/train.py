"""Training loop with the candidate loss injected; returns a small metrics dict.

Fed by: `fitness.py` (a loss compiled from our printer's source, the `surrogate` section of the
evaluation config as a plain dict, the run's seed), and by `train`/`compare` on the command line.
Uses `data.load_splits` for the tensors, `models.build_model` for the network,
`batches.Batches` for the training batches (and `batches.resized` for the val/test splits at
a stage's size) and `stops.Rules` for the rules that end a run early.

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

import numpy as np
import torch

from ..config import SurrogateConfig, check_stages
from .batches import EVAL_CHUNK, Batches, resized
from .data import load_splits, resolve_device
from .models import build_model
from .stops import Rules, Window
from ..errors import describe

__all__ = ["train_candidate", "lr_schedule"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

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


def _logits(model: torch.nn.Module, xb: torch.Tensor, fast) -> torch.Tensor:
    """float32 logits of ``model`` on ``xb``; with ``fast`` (CUDA) channels_last and, if
    ``fast["amp"]``, bf16 autocast of the network (the loss always sees float32)."""
    if fast is None:
        return model(xb)
    with torch.autocast(xb.device.type, dtype=torch.bfloat16, enabled=fast["amp"]):
        logits = model(xb.contiguous(memory_format=torch.channels_last))
    return logits.float()


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, fast=None,
              with_nll: bool = False):
    """Accuracy of ``model`` on (x, y); with ``with_nll`` the pair (accuracy, mean negative
    log-likelihood of its softmax in float64, None if not finite)."""
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    nll = torch.zeros((), dtype=torch.float64, device=x.device)
    for i in range(0, x.shape[0], EVAL_CHUNK):
        logits = _logits(model, x[i:i + EVAL_CHUNK], fast)
        correct += (logits.argmax(1) == y[i:i + EVAL_CHUNK]).sum()
        if with_nll:
            nll += torch.nn.functional.cross_entropy(logits.double(), y[i:i + EVAL_CHUNK],
                                                     reduction="sum")
    model.train()
    acc = correct.item() / max(1, x.shape[0])
    if not with_nll:
        return acc
    return acc, mean_nll(nll.item(), max(1, x.shape[0]))


ECE_BINS = 15


@torch.no_grad()
def checkpoint_metrics(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, fast=None
                       ) -> dict:
    """What ``compare`` reports of a checkpoint on (x, y) (the test split): ``test_acc`` (the
    same chunks and argmax as ``_accuracy``, so the same value), ``ece`` (expected calibration
    error of the softmax's top probability, ``ECE_BINS`` equal-width bins over [0, 1]) and
    ``test_correct`` (which images it got right: a hex bitmask, image i = bit i, for the
    bootstrap over test images) of ``n_test`` images."""
    model.eval()
    hits, confs = [], []
    for i in range(0, x.shape[0], EVAL_CHUNK):
        logits = _logits(model, x[i:i + EVAL_CHUNK], fast)
        hits.append(logits.argmax(1) == y[i:i + EVAL_CHUNK])
        confs.append(torch.softmax(logits.double(), dim=1).amax(1))
    model.train()
    n = max(1, x.shape[0])
    hit = torch.cat(hits).cpu() if hits else torch.zeros(0, dtype=torch.bool)
    conf = torch.cat(confs).cpu() if confs else torch.zeros(0, dtype=torch.float64)
    ece = 0.0
    if hit.numel():
        which = torch.clamp((conf * ECE_BINS).ceil().long() - 1, 0, ECE_BINS - 1)
        for b in range(ECE_BINS):
            m = which == b
            if m.any():
                ece += m.sum().item() / n * abs(hit[m].double().mean().item()
                                                 - conf[m].mean().item())
    packed = np.packbits(hit.numpy(), bitorder="little").tobytes()
    bits = int.from_bytes(packed, "little")  # image i = bit i
    return {"test_acc": int(hit.sum()) / n, "ece": ece,
            "test_correct": format(bits, "x"), "n_test": int(hit.numel())}


def mean_nll(total: float, n: int):
    """A validation's mean NLL from its float64 sum over ``n`` images; None if not finite."""
    value = total / n
    return value if math.isfinite(value) else None


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
    it; None before any evaluation: the search's tie-break, lower wins), test_acc (accuracy of
    the best-val checkpoint, only with with_test, else None), train_acc (latest training
    window), steps (steps run), seconds, device, weights_hash (digest of the final weights)}.
    Failure reasons: "nan_loss", "inf_loss", "prescreen", "early_stop", "timeout" (`stops.py`),
    "out_of_memory", "error: <Type>: <message>" (`error_reason`). On CPU the result is
    bit-for-bit reproducible for a seed (same torch build and thread count).
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


def _run(model, loss_fn, splits, cfg, seed, dev, with_test, t0) -> dict:
    """Train to the last step or the first stop reason: the one place where a run ends."""
    run = _Run(model, loss_fn, splits, cfg, seed, dev, with_test, t0)
    reason = None
    while reason is None and run.step < run.steps:
        reason = run.train_step() or run.rules.timed_out() or run.event()
    return run.result("ok" if reason is None else "failed", reason)


class _Stages:
    """Progressive learning: the current stage's image `size`, RandAugment `magnitude`, dropout
    and validation split `x_val`; `advance(step)` enters the next stage at a boundary."""

    def __init__(self, model, cfg: dict, splits):
        self.specs, self.native, self.x_val_native = cfg["stages"], splits.image_size, splits.x_val
        self.ends = list(itertools.accumulate(st["steps"] for st in self.specs))
        self.dropouts = _dropouts(model)
        self.base_p = [m.p for m in self.dropouts]
        self.i = -1
        self._enter()

    def _enter(self) -> None:
        self.i += 1
        st = self.specs[self.i]
        for m, p in zip(self.dropouts, self.base_p):
            m.p = p if st["dropout"] is None else st["dropout"]
        self.end = self.ends[self.i]
        self.size, self.magnitude = st["image_size"] or self.native, st["randaugment_magnitude"]
        self.x_val = resized(self.x_val_native, self.size)

    def advance(self, step: int) -> None:
        if step == self.end and step < self.ends[-1]:  # the last stage's end is the run's
            self._enter()


class _Run:
    """One training's state. Its steps (`train_step`, `rules.timed_out`, `event`) each return
    a stop reason (the run fails with it) or None; `_run` stops at the first reason."""

    def __init__(self, model, loss_fn, splits, cfg, seed, dev, with_test, t0):
        self.model, self.loss_fn, self.splits, self.cfg = model, loss_fn, splits, cfg
        self.with_test, self.dev = with_test, dev
        self.stages = _Stages(model, cfg, splits)
        self.batches = Batches(splits, cfg, seed, dev)
        self.fast = None
        if dev.type == "cuda":
            self.fast = {"amp": cfg["amp"] == "bf16" or (cfg["amp"] == "auto"
                                                         and torch.cuda.is_bf16_supported())}
        self.steps = steps = cfg["steps"]
        self.eval_every = every = cfg["eval_every"] or self.batches.per_epoch
        self.lrs = lr_schedule(cfg["lr"], steps, cfg["warmup_fraction"])
        self.opt = _make_optimizer(model, cfg, dev)
        self.group = self.opt.param_groups[0]
        self.rules = Rules(cfg, dev, t0, check_each_step=dev.type in _SYNC_EACH_STEP)
        self.window = Window(dev)
        self.events = ({s for s in range(every, steps + 1, every)} | {steps}
                       | self.rules.event_steps() | set(self.stages.ends))
        self.best_val, self.best_nll, self.best_state = -1.0, None, None  # nll: the tie-break
        self.best_size = self.stages.size
        self.val_curve: list = []  # [step, validation accuracy] at each validation
        self.step = 0
        model.train()

    def next_batch(self):
        """The next training batch (x, y); sets this step's learning rate and counts it."""
        xb, yb = self.batches.next(self.stages.size, self.stages.magnitude)
        self.group["lr"] = self.lrs[self.step]
        self.step += 1
        return xb, yb

    def train_step(self):
        """The next batch, forward, loss, backward and Adam step; a failing loss's reason."""
        xb, yb = self.next_batch()
        logits = _logits(self.model, xb, self.fast)
        self.opt.zero_grad(set_to_none=True)
        try:
            loss = self.loss_fn(logits, yb)
            if reason := self.rules.loss(loss):
                return reason
            loss.backward()
        except Exception as exc:  # a candidate's loss may fail in any way; the search goes on
            return error_reason(exc)
        self.opt.step()
        self.window.add(logits, yb)
        return None

    def event(self):
        """At an event step, the only place the loop waits for the device: the stop rules,
        then validation (each `eval_every` steps and at each stage's end), the next stage."""
        reason, due = self.event_checks()
        if due:
            self.record_validation(*_accuracy(self.model, self.stages.x_val, self.splits.y_val,
                                              self.fast, True))
        if reason is None:
            self.stages.advance(self.step)
        return reason

    def event_checks(self):
        """The first half of `event`: (a stop reason or None, whether validation is due now).
        The pack trainer validates its slots together between the two halves."""
        if self.step not in self.events:
            return None, False
        if reason := self.rules.at_event(self.step, self.window):
            return reason, False
        due = (self.step % self.eval_every == 0 or self.step == self.stages.end) \
            and not self.cfg.get("_prescreen_run")
        return None, due

    def record_validation(self, val: float, nll) -> None:
        """A validation's accuracy and NLL: the best checkpoint so far if it is better."""
        self.val_curve.append([self.step, val])
        if val > self.best_val:
            self.best_val, self.best_size, self.best_nll = val, self.stages.size, nll
            if self.with_test:
                self.best_state = {k: v.detach().clone()
                                   for k, v in self.model.state_dict().items()}

    def result(self, status: str, reason) -> dict:
        weights_hash = _weights_hash(self.model)  # the final weights, before a checkpoint loads
        test_acc, extra = None, {}
        if self.best_state is not None:  # only with_test
            self.model.load_state_dict(self.best_state)
            extra = checkpoint_metrics(self.model, resized(self.splits.x_test, self.best_size),
                                       self.splits.y_test, self.fast)
            test_acc = extra.pop("test_acc")
            # the checkpoint on its own (un-augmented) training images: train_test_gap
            extra["checkpoint_train_acc"] = _accuracy(
                self.model, resized(self.splits.x_train, self.best_size), self.splits.y_train,
                self.fast)
        if self.with_test:
            extra["val_curve"] = self.val_curve
        fitness = max(self.best_val, 0.0)
        return {
            "status": status, "reason": reason, "fitness": fitness, "val_acc": fitness,
            "val_nll": self.best_nll, "test_acc": test_acc, "train_acc": self.window.acc,
            "steps": self.step, "seconds": 0.0, "device": str(self.dev),
            "weights_hash": weights_hash, **extra,
        }


def _weights_hash(model: torch.nn.Module) -> str:
    """Short digest of the final weights and buffers, for bit-for-bit reproducibility checks."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
