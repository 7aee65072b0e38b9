"""The rules that stop a training run early; each returns its failure reason or None.

Fed by: `train.py`'s loop, with the run's settings, its start time and whether the loss may be
read at every step. Reasons: "nan_loss"/"inf_loss" (a non-finite loss), "timeout" (timeout_s of
wall clock since the start), "prescreen" (at prescreen_steps, the best training window so far
is below prescreen_min_acc), "early_stop" (at midrun_step, the latest window is below
midrun_min_acc).

On CPU a 0-d .item() is as cheap as any op and gives the exact failing step; on an accelerator
it would stall the queue, so the loss is tracked on the device and read at the next event step:
`latest` holds the latest loss until one is non-finite, then freezes there.
"""
from __future__ import annotations

import math
import time

import torch

__all__ = ["Rules", "Window", "non_finite"]


def non_finite(value: float):
    return None if math.isfinite(value) else "nan_loss" if math.isnan(value) else "inf_loss"


class Window:
    """Training accuracy over a window (the steps since the previous event), counted on the
    device; `close()` at an event sets `acc` (this window) and `best` (the best so far)."""

    def __init__(self, dev: torch.device):
        self.correct = torch.zeros((), dtype=torch.int64, device=dev)
        self.seen, self.acc, self.best = 0, 0.0, 0.0

    def add(self, logits: torch.Tensor, yb: torch.Tensor) -> None:
        self.correct += (logits.detach().argmax(1) == yb).sum()
        self.seen += yb.shape[0]

    def close(self) -> None:
        self.acc = self.correct.item() / self.seen
        self.best = max(self.best, self.acc)
        self.correct.zero_()
        self.seen = 0


class Rules:
    """`loss` at every step (before backward), `timed_out` after every step, `at_event` at the
    event steps; `event_steps()`: the steps a rule looks at (the loop makes them events)."""

    def __init__(self, cfg: dict, dev: torch.device, t0: float, check_each_step: bool):
        self.cfg, self.t0, self.check_each_step = cfg, t0, check_each_step
        self.prescreen, self.midrun = cfg["prescreen_steps"], cfg["midrun_step"]
        if self.prescreen >= cfg["steps"] and not cfg.get("_prescreen_run"):
            self.prescreen = 0  # at the last step it would only discard a fully trained candidate
        self.latest = torch.zeros((), device=dev)

    def event_steps(self) -> set:
        return {s for s in (self.prescreen, self.midrun) if 0 < s <= self.cfg["steps"]}

    def loss(self, loss: torch.Tensor):
        if self.check_each_step:
            return non_finite(loss.item())
        self.latest = torch.where(torch.isfinite(self.latest), loss.detach(), self.latest)
        return None

    def timed_out(self):
        timeout = self.cfg["timeout_s"]
        return "timeout" if timeout and time.perf_counter() - self.t0 > timeout else None

    def at_event(self, step: int, window: Window):
        """The deferred loss check, then (closing the window) the pre-screen and mid-run."""
        if not self.check_each_step and (reason := non_finite(self.latest.item())):
            return reason
        window.close()
        if step == self.prescreen and window.best < self.cfg["prescreen_min_acc"]:
            return "prescreen"
        if step == self.midrun and window.acc < self.cfg["midrun_min_acc"]:
            return "early_stop"
        return None
