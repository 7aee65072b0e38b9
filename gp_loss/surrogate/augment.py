"""Batched, per-image data augmentation and resizing on the training device.

Fed by: `train.py`, with a batch of images in [0, 1] (B, C, H, W) already on the device and an
explicit `torch.Generator` on that device seeded from the training seed (so CPU runs are
bit-for-bit reproducible and no augmentation draw touches the global RNG).
Feeds: the network, after `train.py` re-standardises the batch.

Why not `torchvision.transforms.v2.RandAugment` itself: on a batched tensor it draws ONE
operation and magnitude sign for the whole batch per call, while the paper draws per image.
Grouping images by drawn operation would cost ~2 x 14 x 2 small calls per step. Instead every
operation of torchvision's RandAugment space is written here with per-image parameters:
all geometric ops (shear, translate, rotate) of a round become one per-image affine matrix and
a single `grid_sample` (nearest, zero fill, as torchvision), and the colour ops are computed for
the whole batch and selected per image with `torch.where`. A step therefore costs a fixed
handful of kernels and never syncs with the device.

RandAugment space and magnitudes follow torchvision's `RandAugment._augmentation_space` with
`num_bins=31` (bins 0..30): shear 0..0.3, translate 0..150/331 of the side, rotate 0..30 deg,
brightness/colour/contrast/sharpness factor 1 +/- 0..0.9, posterize 8..4 bits, solarize
threshold 1..0, plus identity, autocontrast, equalize; signed ops get a random sign per image.
Magnitude mapping: the paper's 0-10 scale maps linearly onto the bins,
    bin = round(m_paper / 10 * 30)    (paper's 5 -> bin 15, i.e. half of each op's range),
and every image draws `ops` operations (with replacement) uniformly from the 14.

`flipcrop`: per-image horizontal flip (p = 0.5) and random crop with zero padding of
round(side / 8) pixels (4 px at 32 px), as one integer-shift affine `grid_sample`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import AUGMENTS

__all__ = ["AUGMENTS", "resize", "flipcrop", "randaugment", "augment_batch", "magnitude_bin",
           "RA_OPS"]

RA_OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness",
          "color", "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")
_GEOMETRIC = (1, 2, 3, 4, 5)
_NUM_BINS = 31


def magnitude_bin(m_paper: float) -> int:
    """The paper's 0-10 magnitude -> torchvision's bin index in 0..30."""
    return int(round(float(m_paper) / 10.0 * (_NUM_BINS - 1)))


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize to size x size (antialiased when shrinking); identity at the same size."""
    if size <= 0 or (x.shape[-2] == size and x.shape[-1] == size):
        return x
    shrink = size < x.shape[-2] or size < x.shape[-1]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=shrink)


def _affine(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Sample x at m @ [u, v, 1] for each output pixel; m (B, 2, 3) in pixel units with the
    origin at the image centre. Nearest neighbour, zero fill (torchvision's RandAugment)."""
    b, _, h, w = x.shape
    to_norm = x.new_tensor([2.0 / w, 2.0 / h]).view(1, 2, 1)
    from_norm = x.new_tensor([w / 2.0, h / 2.0]).view(1, 1, 2)
    theta = torch.cat([m[:, :, :2] * to_norm * from_norm, m[:, :, 2:] * to_norm], dim=2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def flipcrop(x: torch.Tensor, gen: torch.Generator, pad: int = -1) -> torch.Tensor:
    """Per-image random horizontal flip and random crop with zero padding `pad` (default
    round(side / 8))."""
    b, _, h, w = x.shape
    pad = max(1, round(min(h, w) / 8)) if pad < 0 else pad
    r = torch.rand(b, 3, generator=gen, device=x.device)
    flip = torch.where(r[:, 0] < 0.5, -1.0, 1.0).to(x.dtype)
    shift = torch.floor(r[:, 1:] * (2 * pad + 1)) - pad  # integers in [-pad, pad]
    m = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)
    m[:, 0, 0] = flip
    m[:, 1, 1] = 1.0
    m[:, :, 2] = shift.to(x.dtype)
    return _affine(x, m)


def _grey(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 3:
        return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    return x.mean(1, keepdim=True)


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (f * a + (1.0 - f) * b).clamp_(0.0, 1.0)


def _sharp_blur(x: torch.Tensor) -> torch.Tensor:
    """torchvision's sharpness reference: 3x3 smoothing kernel, border pixels unchanged."""
    c = x.shape[1]
    k = x.new_tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    blurred = F.conv2d(x, k.expand(c, 1, 3, 3), groups=c)
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = blurred
    return out


def _equalize(x: torch.Tensor) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF  # histograms per image and channel

    return TF.equalize(x)


def _round(x: torch.Tensor, op: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    """Apply op[i] with signed magnitude mag[i] (in the op's own units) to image i."""
    b, c, h, w = x.shape
    dt = x.dtype
    # --- geometric ops: one affine per image (identity for the rest) ---
    m = torch.zeros(b, 2, 3, dtype=dt, device=x.device)
    m[:, 0, 0] = 1.0
    m[:, 1, 1] = 1.0
    is_ = [(op == k) for k in range(len(RA_OPS))]
    # shear about the top-left corner, as torchvision's RandAugment (center=[0, 0])
    m[:, 0, 1] = torch.where(is_[1], mag, 0.0)
    m[:, 0, 2] = torch.where(is_[1], mag * h / 2.0, 0.0)
    m[:, 1, 0] = torch.where(is_[2], mag, 0.0)
    m[:, 1, 2] = torch.where(is_[2], mag * w / 2.0, 0.0)
    m[:, 0, 2] += torch.where(is_[3], mag, 0.0)  # translations arrive in pixels
    m[:, 1, 2] += torch.where(is_[4], mag, 0.0)
    ang = torch.where(is_[5], mag, 0.0) * (math.pi / 180.0)
    cos, sin = torch.cos(ang), torch.sin(ang)
    rot = is_[5]
    m[:, 0, 0] = torch.where(rot, cos, m[:, 0, 0])
    m[:, 0, 1] = torch.where(rot, -sin, m[:, 0, 1])
    m[:, 1, 0] = torch.where(rot, sin, m[:, 1, 0])
    m[:, 1, 1] = torch.where(rot, cos, m[:, 1, 1])
    x = _affine(x, m)
    # --- colour ops: computed for the batch, selected per image ---
    f = (1.0 + mag).view(b, 1, 1, 1)
    sel = [s.view(b, 1, 1, 1) for s in is_]
    grey = _grey(x)
    out = x
    out = torch.where(sel[6], (x * f).clamp(0.0, 1.0), out)
    out = torch.where(sel[7], _blend(x, grey.expand_as(x), f), out)
    out = torch.where(sel[8], _blend(x, grey.mean((2, 3), keepdim=True).expand_as(x), f), out)
    out = torch.where(sel[9], _blend(x, _sharp_blur(x), f), out)
    level = mag.view(b, 1, 1, 1)  # posterize: bits; solarize: threshold
    drop = torch.exp2(8.0 - level)  # posterize: keep the top `bits` bits of the 8-bit value
    q = torch.floor(torch.floor(x * 255.0 + 0.5) / drop) * drop / 255.0
    out = torch.where(sel[10], q, out)
    out = torch.where(sel[11], torch.where(x >= level, 1.0 - x, x), out)
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    span = hi - lo
    auto = torch.where(span > 0, (x - lo) / span.clamp_min(1e-12), x)
    out = torch.where(sel[12], auto, out)
    # on the CPU skip the costly histogram when no image drew it (the check is free there)
    if x.device.type != "cpu" or bool((op == 13).any()):
        out = torch.where(sel[13], _equalize(x), out)
    return out.clamp_(0.0, 1.0)


def randaugment(x: torch.Tensor, gen: torch.Generator, ops: int = 2,
                magnitude: float = 5.0) -> torch.Tensor:
    """RandAugment drawn per image: `ops` rounds, each image draws one of `RA_OPS` uniformly
    and a sign; `magnitude` on the paper's 0-10 scale (see `magnitude_bin`)."""
    b, _, h, w = x.shape
    frac = magnitude_bin(magnitude) / (_NUM_BINS - 1)  # position in each op's range
    # per-op magnitude at that bin, in the op's own units (torchvision's linspace values)
    table = x.new_tensor([0.0, 0.3 * frac, 0.3 * frac, 150.0 / 331.0 * frac,
                          150.0 / 331.0 * frac, 30.0 * frac, 0.9 * frac, 0.9 * frac, 0.9 * frac,
                          0.9 * frac, float(8 - int(round(magnitude_bin(magnitude) / 7.5))),
                          1.0 - frac, 0.0, 0.0])
    signed = x.new_tensor([0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    for _ in range(ops):
        op = torch.randint(0, len(RA_OPS), (b,), generator=gen, device=x.device)
        sign = torch.where(torch.rand(b, generator=gen, device=x.device) < 0.5, -1.0, 1.0)
        mag = table[op] * torch.where(signed[op], sign.to(x.dtype), 1.0)
        mag = torch.where((op == 3) | (op == 4), mag * torch.where(op == 3, w, h), mag)
        x = _round(x, op, mag)
    return x


def augment_batch(x: torch.Tensor, kind: str, gen: torch.Generator, *, ops: int = 2,
                  magnitude: float = 5.0) -> torch.Tensor:
    """x in [0, 1] -> augmented x in [0, 1] (same shape, device, dtype)."""
    if kind == "none":
        return x
    if kind == "flipcrop":
        return flipcrop(x, gen)
    if kind == "randaugment":
        return randaugment(x, gen, ops, magnitude)
    raise ValueError(f"unknown augmentation {kind!r}; use one of {', '.join(AUGMENTS)}")
