"""Population training (issue 14): K candidates trained at once as one grouped network.

``train_pack(loss_fns, surrogate, seeds, width=K)`` trains every candidate of the list, K at a
time, and returns one result per candidate, the same dict ``train.train_candidate`` returns
plus ``pack_k`` (the width it ran at). A step of the pack is one grouped forward and one
backward through ``pack.Pack`` for all K slots; everything else is per slot, exactly as a
candidate trained alone: its own seeded initial weights, batches, learning-rate schedule,
Adam state, stop rules, validation and test checkpoint (each slot is a ``train._Run``).
Validation runs through the pack too, in evaluation mode (each slot's own running statistics):
the slots that validate at one step share one grouped forward over the validation split. The
test accuracy of the best checkpoint is measured on the slot's own plain network.

What makes a result a function of (expression, settings, seed, K) only -- never of which
candidates share the pack or which slot it sits in (tests check it bit for bit):

- The pack always has width K. A slot with no candidate (a pack of fewer than K, or one whose
  candidate finished) is fed zeros and its outputs are ignored: the kernels, chosen by shape,
  are the same for every pack of width K.
- Every grouped layer keeps the slots apart (grouped convolutions, per-channel BatchNorm,
  batched matrix products), and the loss of each slot is computed on its own detached logits:
  its gradient w.r.t. those logits comes from ``torch.autograd.grad`` alone, so one slot's
  NaN or exception cannot reach another's, and the network's backward gets the K gradients
  stacked (zeros for empty slots).
- Slots of one seed that start together share one ``Batches`` stream (the batch is drawn,
  gathered and augmented once per step for all of them); that stream is the one each would
  draw alone.

A slot's life: the pre-screen, the mid-run rule, NaN/inf losses and exceptions end that
candidate alone with today's reasons; the others go on. A finished slot is refilled with the
next candidate of the list (when every stage has one image size: a refill restarts at stage 1,
and the input of all slots must have one shape); otherwise the next K start together when the
pack is empty. ``surrogate.timeout_s`` cannot be measured per slot: all the pack work of one
call (both phases of a separate pre-screen, any halving) has one deadline, N x timeout_s for
its N candidates (the time they would have had one after another), and the candidates still
unfinished then -- started or not -- are retried alone (K = 1, with the ordinary
per-candidate limit); a run where the limit fired depends on the machine's speed, as alone. An out-of-memory error in the pack's own step (not inside one
loss) retries its unfinished candidates in packs of half the width. Either way each result
says the width it ran at (``pack_k``).

A model the pack cannot serve (``pack.packable``) trains alone (K = 1; ``fallback_warned``).
torch.compile (``surrogate.compile``) applies to K = 1 only.
"""
from __future__ import annotations

import functools
import logging
import math
import time

import torch
import torch.nn.functional as F

from .batches import EVAL_CHUNK, Batches
from .data import load_splits, resolve_device
from .models import build_model
from .models import ALIASES
from .pack import PACKABLE, Pack
from .train import LossFn, _config, _Run, error_reason, mean_nll, train_candidate

__all__ = ["train_pack"]

log = logging.getLogger("gp_loss.surrogate")
_WARNED: set = set()


@functools.lru_cache(maxsize=64)
def packable_name(model: str) -> bool:
    """Whether the model called ``model`` (a ``surrogate.model`` value) can train in a pack.
    Cached: the driver asks for every candidate it submits, and building a model to look
    costs a millisecond (5 % of the driver's time in a quick search)."""
    try:
        net = build_model(ALIASES.get(model, model), 1, 2, 8)
    except Exception:  # an unknown name is the trainer's error to report, not ours
        return False
    return type(net) in PACKABLE


def effective_width(model: str, width: int) -> int:
    """The width candidates of ``model`` train at when ``width`` is asked for (a model the
    pack cannot serve: 1, said once per process -- whichever command asks)."""
    if width > 1 and not packable_name(model):
        fallback_warned(model)
        return 1
    return max(1, width)


def fallback_warned(model: str) -> None:
    """Say once per process that ``model`` trains alone."""
    if model not in _WARNED:
        _WARNED.add(model)
        log.warning("model %r cannot be packed: its candidates train one at a time (K = 1)",
                    model)


def train_pack(loss_fns: list[LossFn], surrogate: dict, seeds: list[int], *, width: int,
               device: str = "cpu", with_test: bool = False) -> list[dict]:
    """Train each ``loss_fns[i]`` with seed ``seeds[i]``, ``width`` at a time; one result each
    (``train_candidate``'s keys plus ``pack_k``). ``width`` 1 is exactly ``train_candidate``."""
    if len(loss_fns) != len(seeds):
        raise ValueError("one seed per loss")
    cfg = _config(surrogate)
    if effective_width(cfg["model"], width) == 1:
        return [{**train_candidate(fn, surrogate, seed=s, device=device, with_test=with_test),
                 "pack_k": 1} for fn, s in zip(loss_fns, seeds)]
    dev = torch.device(resolve_device(device))
    splits = load_splits(cfg["dataset"], data_root=cfg["data_root"], split_seed=cfg["split_seed"],
                         val_fraction=cfg["val_fraction"], test_fraction=cfg["test_fraction"],
                         train_fraction=cfg["train_fraction"], device=dev,
                         download=cfg["download"])
    results: list = [None] * len(loss_fns)
    spent = [0.0] * len(loss_fns)  # a slot's own wall seconds, pre-screen run included
    # One deadline for all the pack work of this call (both phases, any halving): the time
    # its candidates would have had one after another, N x timeout_s.
    deadline = (time.perf_counter() + cfg["timeout_s"] * len(loss_fns)
                if cfg["timeout_s"] > 0 else None)
    phases = [(cfg, with_test)]
    if cfg["prescreen_separate"] and cfg["prescreen_steps"] > 0:
        one = {"steps": cfg["prescreen_steps"],
               "image_size": cfg["prescreen_image_size"] or cfg["image_size"]}
        pre = {**cfg, **one, "augment": "none", "midrun_step": 0, "_prescreen_run": True,
               "stages": ({**cfg["stages"][0], **one},)}
        phases = [(pre, False), ({**cfg, "prescreen_steps": 0}, with_test)]
    for n, (phase_cfg, test) in enumerate(phases):
        last = n == len(phases) - 1
        todo = [i for i in range(len(loss_fns)) if results[i] is None]
        done, alone = _phase(todo, loss_fns, seeds, phase_cfg, splits, dev, test, width,
                             deadline)
        for i, res in done:
            spent[i] += res["seconds"]
            if last or res["status"] != "ok":  # a passed pre-screen goes on to the full run
                results[i] = {**res, "seconds": spent[i]}
        for i in alone:  # timed out in the pack, or out of memory down to width 2: alone
            res = train_candidate(loss_fns[i], surrogate, seed=seeds[i], device=device,
                                  with_test=with_test)
            results[i] = {**res, "pack_k": 1}
    return results


def _phase(todo, loss_fns, seeds, cfg, splits, dev, with_test, width, deadline):
    """Train ``todo`` in packs of ``width``: (finished (index, result) pairs, the indices to
    retry alone). An out-of-memory error in the pack's step retries its unfinished candidates
    at half the width (alone below 2); the finished ones keep their results."""
    run = _PackRun(todo, loss_fns, seeds, cfg, splits, dev, with_test, width, deadline)
    try:
        return run.run()
    except (MemoryError, torch.OutOfMemoryError):
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    finished = {i for i, _ in run.done}
    rest = [i for i in todo if i not in finished]
    if width // 2 < 2:
        return run.done, rest
    done, alone = _phase(rest, loss_fns, seeds, cfg, splits, dev, with_test, width // 2,
                         deadline)
    return run.done + done, alone


class _PackRun:
    """One pack of ``width`` slots working through ``todo``; ``run()`` returns
    (finished (index, result) pairs, indices left unfinished by the pack's time limit)."""

    def __init__(self, todo, loss_fns, seeds, cfg, splits, dev, with_test, width, deadline):
        self.queue, self.loss_fns, self.seeds = list(todo), loss_fns, seeds
        self.cfg, self.splits, self.dev, self.with_test, self.width = cfg, splits, dev, with_test, width
        self.size = cfg["image_size"] or splits.image_size
        sizes = {st["image_size"] or splits.image_size for st in cfg["stages"]}
        self.refill = len(sizes) == 1
        # per slot: None (empty) or [index, _Run, cohort]; the slot's own cfg has no time limit
        self.slot_cfg = {**cfg, "timeout_s": 0.0}
        self.slots: list = [None] * width
        placeholders = [self._net(0) for _ in range(width)]  # until the slots are filled
        self.pack = Pack([net for net, _ in placeholders])
        self.opt = PackAdam(self.pack.parameters(), cfg["weight_decay"])
        self.gens = [gen for _, gen in placeholders]  # per slot: its dropout stream
        self.fast = None
        if dev.type == "cuda":
            self.fast = {"amp": cfg["amp"] == "bf16" or (cfg["amp"] == "auto"
                                                         and torch.cuda.is_bf16_supported())}
        self.deadline = deadline  # perf_counter time (None: no limit)
        self.done: list = []
        self.pstep = 0  # pack steps so far: a cohort is (seed, the pack step it started at)
        self.cohorts: dict = {}

    def _net(self, seed: int):
        """A fresh network from ``seed``, as ``train._seeded_run`` builds it (same weights),
        and the slot's dropout generator: the global RNG's state right after the build, the
        stream a candidate trained alone draws its dropout masks from."""
        fork_devices = [self.dev.index or 0] if self.dev.type == "cuda" else []
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(seed)
            net = build_model(self.cfg["model"], self.splits.in_channels,
                              self.splits.num_classes, self.size).to(self.dev)
            gen = torch.Generator(self.dev)
            gen.set_state(torch.cuda.get_rng_state(self.dev) if self.dev.type == "cuda"
                          else torch.get_rng_state())
        if self.dev.type == "cuda":
            net = net.to(memory_format=torch.channels_last)
        return net, gen

    def _start(self, k: int) -> None:
        i = self.queue.pop(0)
        seed = self.seeds[i]
        net, self.gens[k] = self._net(seed)
        run = _Run(net, self.loss_fns[i], self.splits, self.slot_cfg, seed, self.dev,
                   self.with_test, time.perf_counter())
        cohort = (seed, self.pstep)
        if cohort not in self.cohorts:
            self.cohorts[cohort] = Batches(self.splits, self.slot_cfg, seed, self.dev)
        run.batches = self.cohorts[cohort]
        self.pack.replace(k, net)
        self.opt.reset(k)
        self.slots[k] = [i, run, cohort, 0.0]  # 0.0: the slot's share of the wall so far

    def _fill(self) -> None:
        empty = [k for k, s in enumerate(self.slots) if s is None]
        if not self.refill and len(empty) < self.width:
            return  # stages change the image size: the next ones start together
        for k in empty:
            if self.queue:
                self._start(k)

    def _finish(self, k: int, status: str, reason) -> None:
        i, run, cohort, spent = self.slots[k]
        self.slots[k] = None
        t = time.perf_counter()
        res = run.result(status, reason)
        res["seconds"] = spent + time.perf_counter() - t
        res["pack_k"] = self.width
        self.done.append((i, res))
        if not any(s is not None and s[2] == cohort for s in self.slots):
            del self.cohorts[cohort]

    def run(self):
        self._fill()
        while any(s is not None for s in self.slots):
            self._step()
            self.pstep += 1
            self._fill()
            if self.deadline is not None and time.perf_counter() > self.deadline:
                left = [s[0] for s in self.slots if s is not None] + self.queue
                return self.done, left
        return self.done, []

    def _step(self) -> None:
        """One step of every candidate in the pack. A slot is charged its share of the
        shared work (the step's wall time / the candidates in it) and its own events (so
        the seconds of a pack's results add up to its wall time)."""
        t = time.perf_counter()
        active = [(k, s[1]) for k, s in enumerate(self.slots) if s is not None]
        drawn: dict = {}
        batch = {}
        for k, run in active:
            cohort = self.slots[k][2]
            if cohort not in drawn:
                drawn[cohort] = run.batches.next(run.stages.size, run.stages.magnitude)
            run.group["lr"] = run.lrs[run.step]
            run.step += 1
            batch[k] = drawn[cohort]
        like = batch[active[0][0]][0]
        x = torch.stack([batch[k][0] if k in batch else torch.zeros_like(like)
                         for k in range(self.width)])
        logits = self._logits(x)
        grads, failed = [None] * self.width, []
        for k, run in active:
            yb = batch[k][1]
            lk = logits[k].detach().requires_grad_(True)
            try:
                loss = run.loss_fn(lk, yb)
                reason = run.rules.loss(loss)
                if reason is None and not loss.requires_grad:
                    loss.backward()  # raises what a candidate trained alone raises
                if reason is None:
                    grads[k], = torch.autograd.grad(loss, lk)
            except Exception as exc:  # one candidate's loss fails: that candidate alone
                reason = error_reason(exc)
            if reason is not None:
                failed.append((k, reason))
                continue
            run.window.add(lk, yb)
        live = [(k, run) for k, run in active if grads[k] is not None]
        if live:
            zero = torch.zeros_like(logits[0])
            logits.backward(torch.stack([g if g is not None else zero for g in grads]))
            lrs, steps = [0.0] * self.width, [1] * self.width  # lr 0: the slot stands still
            for k, run in live:
                lrs[k], steps[k] = run.group["lr"], run.step
            self.opt.step(lrs, steps)
        else:
            self.opt.zero_grad()
        share = (time.perf_counter() - t) / len(active)
        for k, _ in active:
            self.slots[k][3] += share
        # Only now, after the backward: a failed candidate's result may load its best
        # checkpoint into its slot (with_test), which writes memory the graph still held.
        # Its row stood still in the step (learning rate 0), so its weights are those of its
        # last good step, as when it trains alone.
        for k, reason in failed:
            self._finish(k, "failed", reason)
        t = time.perf_counter()
        due, checked = [], []
        for k, run in live:
            reason, validate = run.event_checks()
            if reason is not None:
                self._finish(k, "failed", reason)
                continue
            checked.append((k, run))
            if validate:
                due.append((k, run))
        if due:  # the slots validating at this step, in one grouped evaluation
            scores = self._validate(due[0][1])
            for k, run in due:
                run.record_validation(*scores[k])
        share = (time.perf_counter() - t) / max(1, len(checked))
        for k, run in checked:
            self.slots[k][3] += share
            run.stages.advance(run.step)
            if run.step >= run.steps:
                self._finish(k, "ok", None)

    @torch.no_grad()
    def _validate(self, run) -> list:
        """(accuracy, NLL) of every slot on the validation split at ``run``'s stage size (one
        size for all slots that run together), through the pack in evaluation mode: one
        grouped forward per chunk for the K slots, whichever of them asked. A slot's figures
        depend on its own weights and K alone, as in training; the NLL is float64, None if
        not finite, as ``train._accuracy`` computes it for a candidate alone."""
        x, y = run.stages.x_val, run.splits.y_val
        chunk = max(1, EVAL_CHUNK // self.width)  # the same activation memory as alone
        correct = torch.zeros(self.width, dtype=torch.int64, device=x.device)
        nll = torch.zeros(self.width, dtype=torch.float64, device=x.device)
        self.pack.eval()
        for i in range(0, x.shape[0], chunk):
            xb, yb = x[i:i + chunk], y[i:i + chunk]
            logits = self._logits(xb.expand(self.width, *xb.shape))  # (K, n, classes)
            correct += (logits.argmax(2) == yb).sum(1)
            nll += F.cross_entropy(logits.double().flatten(0, 1), yb.repeat(self.width),
                                   reduction="none").view(self.width, -1).sum(1)
        self.pack.train()
        n = max(1, x.shape[0])
        return [(c / n, mean_nll(v, n)) for c, v in zip(correct.tolist(), nll.tolist())]

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast is None:
            return self.pack(x, self.gens)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.fast["amp"]):
            out = self.pack(x, self.gens)
        return out.float()


class PackAdam:
    """Adam over a pack's stacked parameters (``Pack.parameters()``, ``(K, ...)`` each), every
    slot at its own learning rate and step count: ``torch.optim.Adam``'s update (L2 weight
    decay added to the gradient, bias-corrected moments, betas 0.9 and 0.999, eps 1e-8, the
    optimizer a candidate alone gets from ``train._make_optimizer``) in one set of elementwise
    operations for all K rows -- row k's update reads row k alone, so a slot's weights never
    depend on its neighbours. A slot at learning rate 0 stands still. Replaces K optimizer
    calls per step (8 % of a tiny pack's time on the CPU, with their ``zero_grad``)."""

    BETAS, EPS = (0.9, 0.999), 1e-8

    def __init__(self, params: list, weight_decay: float = 0.0):
        self.params, self.weight_decay = params, weight_decay
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    def reset(self, k: int) -> None:
        """Slot k starts afresh (a refill): no moments."""
        for m, v in zip(self.m, self.v):
            m[k].zero_()
            v[k].zero_()

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lrs: list, steps: list) -> None:
        """One Adam step of every slot: ``lrs[k]`` its learning rate, ``steps[k]`` its step
        count including this one (for the bias corrections); the gradients are cleared."""
        (b1, b2), k = self.BETAS, len(lrs)
        p0 = self.params[0]
        step_size = torch.tensor([lr / (1 - b1 ** n) for lr, n in zip(lrs, steps)],
                                 dtype=p0.dtype).to(p0.device, non_blocking=True)
        bc2_sqrt = torch.tensor([math.sqrt(1 - b2 ** n) for n in steps],
                                dtype=p0.dtype).to(p0.device, non_blocking=True)
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad
            if g is None:
                continue
            if self.weight_decay:
                g = g.add(p, alpha=self.weight_decay)
            shape = (k,) + (1,) * (p.dim() - 1)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / bc2_sqrt.view(shape)).add_(self.EPS)
            p.addcdiv_(m * step_size.view(shape), denom, value=-1)
        self.zero_grad()
