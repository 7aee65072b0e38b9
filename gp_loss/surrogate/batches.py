"""What the network is fed: the training batch stream and the val/test splits at a stage's size.

Fed by: `train.py`, with the `data.Splits` already on the device, the run's settings and seed.
Uses `augment.py` to resize and augment batches on the device.

A batch is an index slice of a per-epoch permutation drawn from a CPU generator seeded with the
run's seed only, so every candidate of a run sees the same batches; the remainder of an epoch
is dropped (a constant batch size keeps the BatchNorm statistics even). Resizing and
augmentation happen only when asked (`augment` other than "none", or a stage at another size):
the default path (CPU, native size) stays a bare slice. Augmentation draws from its own device
generator (seed + 104729), never from the global RNG.
"""
from __future__ import annotations

import torch

from .augment import augment_batch, resize

__all__ = ["Batches", "resized", "EVAL_CHUNK"]

EVAL_CHUNK = 4096  # bounds activation memory when a split is resized or evaluated in one go


class Batches:
    """``next(size, magnitude)``: the next training batch (x, y), at that image size and
    RandAugment magnitude; ``batch_size`` and ``per_epoch`` (batches per epoch)."""

    def __init__(self, splits, cfg: dict, seed: int, dev: torch.device):
        self.x, self.y, native = splits.x_train, splits.y_train, splits.image_size
        self.n = self.x.shape[0]
        if self.n == 0:
            raise ValueError("the training split is empty (train_fraction too small?)")
        self.batch_size = min(cfg["batch_size"], self.n)
        self.per_epoch = self.n // self.batch_size
        self.augment, self.ops = cfg["augment"], cfg["randaugment_ops"]
        self.transform = self.augment != "none" or any((st["image_size"] or native) != native
                                                       for st in cfg["stages"])
        if self.transform:
            c = splits.in_channels
            self.mean = torch.tensor(splits.mean, device=dev).view(1, c, 1, 1)
            self.std = torch.tensor(splits.std, device=dev).view(1, c, 1, 1)
            self.aug_gen = torch.Generator(device=dev).manual_seed(seed + 104729)  # own stream
        self.gen = torch.Generator().manual_seed(seed)
        self.dev = dev
        self.perm = torch.empty(0, dtype=torch.int64)
        self.pos = self.per_epoch  # forces a fresh permutation at the first batch

    def next(self, size: int, magnitude: float) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos == self.per_epoch:
            drawn = torch.randperm(self.n, generator=self.gen)[: self.per_epoch * self.batch_size]
            self.perm = drawn.view(self.per_epoch, self.batch_size).to(self.dev)
            self.pos = 0
        idx = self.perm[self.pos]
        self.pos += 1
        xb, yb = self.x.index_select(0, idx), self.y.index_select(0, idx)
        if self.transform:
            if self.augment == "none":
                xb = resize(xb, size)  # linear: commutes with the standardisation
            else:
                xb = resize((xb * self.std + self.mean).clamp_(0.0, 1.0), size)
                xb = augment_batch(xb, self.augment, self.aug_gen, ops=self.ops,
                                   magnitude=magnitude)
                xb = (xb - self.mean) / self.std
        return xb, yb


# Resized validation/test splits, per process: resized once, not at every evaluation. The key
# holds the source tensor itself, so its id cannot be reused while the entry lives.
_RESIZED: dict = {}


def resized(x: torch.Tensor, size: int) -> torch.Tensor:
    """The split ``x`` at ``size`` px (itself at its own size or with size 0), cached."""
    if size <= 0 or (x.shape[-1] == size and x.shape[-2] == size):
        return x
    key = (id(x), size)
    hit = _RESIZED.get(key)
    if hit is None or hit[0] is not x:
        if len(_RESIZED) >= 8:
            _RESIZED.clear()
        # chunked: a whole split at 80 px would need a second full-size temporary
        out = torch.cat([resize(x[i:i + EVAL_CHUNK], size)
                         for i in range(0, x.shape[0], EVAL_CHUNK)])
        hit = _RESIZED[key] = (x, out)
    return hit[1]
