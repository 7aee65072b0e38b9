"""The probe and the fingerprint: the fixed inputs every screen runs on, and the row test that
decides when two gradients are the same (``integrity.py`` and ``novelty.py`` both use it).

Fingerprint: sign x d(sum of per-sample losses)/d logits on the probe rows, flat, then one
rounding scale per row, s_r = sum_c p_c |dL/dp_c|. The norm, for every probe row r:
``||a_r - b_r||_2 <= RTOL max(||a_r||_2, ||b_r||_2) + ZERO_TOL max(s_a,r, s_b,r)``. Per row,
because a whole-vector norm lets rows with huge gradients (p near eps under 1/p) hide O(1)
differences elsewhere; the s term because softmax's backward p (g - sum_c p_c g_c) cancels, so
a row that is mathematically ~0 (a confident right answer; the constant sum_c p_c) comes out as
noise ~1e-16 s_r. Rows below ZERO_TOL s_r are set to exactly 0; an all-zero gradient part is a
constant loss, the same only as another constant.

The probe batch: the float64 two-class sweep (SWEEP_ROWS rows) and two blocks of logit rows
(C = 10 and C = 100; every logit row twice, under two targets; fixed seed PROBE_SEED).
"""
from __future__ import annotations

import numpy as np

from ..lang.ops import EPS

RTOL = 1e-6          # relative tolerance of ``same`` on fingerprints (per probe row)
ZERO_TOL = 1e-9      # a row below ZERO_TOL * sum_c p_c |dL/dp_c| is rounding noise: zero
SWEEP_ROWS = 1000
PROBE_SEED = 20240313


class Probe:
    """The fixed inputs (built once per process; torch imported lazily)."""

    def __init__(self):
        import torch
        self.torch = torch
        rng = np.random.default_rng(PROBE_SEED)
        q = np.linspace(EPS, 1.0 - EPS, SWEEP_ROWS)
        self.sweep_p = np.stack([q, 1.0 - q], axis=1)
        self.sweep_y = np.tile([0.0, 1.0], (SWEEP_ROWS, 1))
        # (C, y (R, C), p (R, C)); rows [:R/2] and [R/2:] share logits, targets differ.
        self.blocks = [self._block(rng, 10, [1, 1, 1, 3, 3, 0.01, 0.01, 10], right=1, wrong=1,
                                   graded=[0.3, 0.45, 0.6, 0.75, 0.85, 0.93, 0.98, 0.995, 0.9995,
                                           1 - 1e-6, 1 - 1e-8]),
                       self._block(rng, 100, [2, 0.01], right=1, wrong=0, graded=[0.5, 0.9])]
        self.rows = sum(y.shape[0] for _, y, _ in self.blocks)
        self.size = sum(y.size for _, y, _ in self.blocks)
        row_of, swap, row_swap, at, row = [], [], [], 0, 0
        for c, y, _ in self.blocks:
            r, half = y.shape[0], y.shape[0] // 2
            row_of.extend(np.repeat(np.arange(row, row + r), c))
            # The same logits under the other target.
            other = np.concatenate([np.arange(half, r), np.arange(half)])
            swap.extend((at + other[:, None] * c + np.arange(c)).ravel())
            row_swap.extend(row + other)
            at, row = at + r * c, row + r
        self.row_of = np.array(row_of)
        self.row_start = np.flatnonzero(np.diff(self.row_of, prepend=-1))  # rows are contiguous
        self.swap = np.array(swap)
        self.row_swap = np.array(row_swap)
        # Column-vector inputs for class-sum sets: the sweep, then each block, flattened.
        self.col_y = torch.from_numpy(np.concatenate(
            [self.sweep_y.ravel()] + [y.ravel() for _, y, _ in self.blocks])[:, None].copy())
        self.col_p = np.concatenate(
            [self.sweep_p.ravel()] + [p.ravel() for _, _, p in self.blocks])[:, None].copy()
        self.t_sweep_y = torch.from_numpy(self.sweep_y.copy())

    @staticmethod
    def _block(rng, c, scales, right, wrong, graded):
        z = [rng.standard_normal(c) * s for s in scales]
        t = list(rng.integers(0, c, size=len(scales)))
        for k in range(right + wrong):  # one class 69 ahead: the others get p ~ 1e-30
            lead = int(rng.integers(0, c))
            row = rng.standard_normal(c)
            row[lead] += 69.0
            z.append(row)
            t.append(lead if k < right else (lead + 1 + int(rng.integers(0, c - 1))) % c)
        for u in graded:  # the true class at probability ~u: covers the middle of (0, 1)
            u *= 1.0 + 0.01 * rng.uniform(-1, 1) * (1 - u)
            row, k = rng.standard_normal(c), int(rng.integers(0, c))
            rest = np.exp(np.delete(row, k)).sum()
            row[k] = np.log(u / (1.0 - u) * rest)
            z.append(row)
            t.append(k)
        z, t = np.array(z), np.array(t)
        t2 = (t + 1 + rng.integers(0, c - 1, size=len(t))) % c  # a different target per row
        z, tt = np.concatenate([z, z]), np.concatenate([t, t2])
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return c, np.eye(c)[tt], e / e.sum(axis=1, keepdims=True)


_PROBE = None


def probe() -> Probe:
    global _PROBE
    if _PROBE is None:
        _PROBE = Probe()
    return _PROBE


def run_probe(per_sample, pset, gate=None):
    """(sweep L (1000,), probe per-sample values (rows,), [dL/dp (R, C) per probe block]).

    The sweep runs first, without a graph (its gradient is never used). ``gate(curve)``, when
    given, decides whether the probe blocks are worth running: when it says no, the values and
    gradients come back as None (the integrity check has already rejected the tree, and most
    screened trees end there). A set whose loss is a class sum runs everything in one pass.
    """
    pr = probe()
    torch = pr.torch
    if pset.class_sum:  # elementwise, then a class sum: everything in one column, one pass
        calls = [(pr.col_y, pr.col_p)]
    else:
        with torch.no_grad():
            sweep = _per_sample(per_sample, pr.t_sweep_y, torch.from_numpy(pr.sweep_p))
        if gate is not None and not gate(sweep):
            return sweep, None, None
        calls = [(torch.from_numpy(y), p) for _, y, p in pr.blocks]
    outs, grads = [], []
    for y, p_np in calls:
        p = torch.from_numpy(p_np).requires_grad_(True)
        out = per_sample(y, p)
        _check_shape(out, p)
        outs.append(out.detach().numpy())
        grads.append(grad(torch, out, p))
    if not pset.class_sum:
        return sweep, np.concatenate(outs), grads
    shapes = [(SWEEP_ROWS, 2)] + [y.shape for _, y, _ in pr.blocks]
    ends = np.cumsum([0] + [a * b for a, b in shapes])
    cuts = list(zip(ends, ends[1:], shapes))
    with np.errstate(all="ignore"):  # inf - inf -> nan is a finding, not a warning
        outs = [outs[0][i:j].reshape(shape).sum(axis=1) for i, j, shape in cuts]
    grads = [grads[0][i:j].reshape(shape) for i, j, shape in cuts]
    return outs[0], np.concatenate(outs[1:]), grads[1:]


def _check_shape(out, p):
    if tuple(out.shape) != (p.shape[0],):
        raise RuntimeError(f"per-sample output of shape {tuple(out.shape)}, not ({p.shape[0]},)")


def _per_sample(per_sample, y, p):
    out = per_sample(y, p)
    _check_shape(out, p)
    return out.numpy()


def grad(torch, out, p):
    if not out.requires_grad:  # no path from p to the output
        return np.zeros(tuple(p.shape))
    (g,) = torch.autograd.grad(out.sum(), p, allow_unused=True)
    return np.zeros(tuple(p.shape)) if g is None else g.numpy()


def from_grads(grads, sign):
    """dL/dp blocks -> [sign * dL/dz (softmax backward, as autograd does it), row scales]."""
    pr = probe()
    gz, scale = [], []
    with np.errstate(all="ignore"):
        for (_c, _y, p), g in zip(pr.blocks, grads):
            gz.append((p * (g - (p * g).sum(axis=1, keepdims=True))).ravel())
            scale.append((p * np.abs(g)).sum(axis=1))
        gz, scale = np.concatenate(gz), np.concatenate(scale)
        noise = row_norms(gz) <= ZERO_TOL * scale
    gz[noise[pr.row_of]] = 0.0
    return np.concatenate([sign * gz, scale])


def split(fp):
    n = probe().size
    return fp[..., :n], fp[..., n:]


def row_norms(g):
    """Euclidean norm of every probe row of a flat gradient (or of each of a stack of them)."""
    return np.sqrt(np.add.reduceat(g * g, probe().row_start, axis=-1))


def rows_match_many(stack, b):
    """The per-row test of the module docstring: each finite fingerprint of ``stack`` vs ``b``."""
    (ga, sa), (gb, sb) = split(stack), split(b)
    with np.errstate(all="ignore"):
        diff = row_norms(ga - gb)
        bound = RTOL * np.maximum(row_norms(ga), row_norms(gb)) + ZERO_TOL * np.maximum(sa, sb)
    return np.all(diff <= bound, axis=-1)


def is_constant(fp) -> bool:
    """Zero gradient on every probe row: a constant loss."""
    return not np.any(split(np.asarray(fp))[0])


def fingerprints_match(a, b) -> bool:
    """The fingerprint half of ``same`` (per-row RTOL, module docstring); a constant matches
    only a constant; a fingerprint with non-finite entries only an identical one."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return False
    if is_constant(a) or is_constant(b):
        return is_constant(a) and is_constant(b)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return np.array_equal(a, b, equal_nan=True)
    return bool(rows_match_many(a, b))
