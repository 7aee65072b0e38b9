"""Screening a candidate before any training (DESIGN §5), cheapest first, plus novelty.

1. ``integrity``: the paper's check on the float64 two-class sweep (raw output, no sign), with
   DESIGN's two departures (sign from the overall shape; sign changes counted linearly, not
   cyclically). Zero differences take the sign of the one before; *leading* zeros (a plateau at
   row 0) take the sign of the first non-zero difference, so they never add a change.
2. dependence: the gradient w.r.t. the logits is not zero ("no_gradient") and changes with the
   targets ("ignores_target"); 3. finite per-sample value and gradient ("non_finite_value",
   "non_finite_grad"). Both on the probe batch: C = 10 rows at logit scales 1, 3, 10 and 0.01
   (near uniform), confident rows (a logit +69: p ~ 1e-30, right or wrong) and graded rows (true
   class at p ~ 0.3 ... 1 - 1e-8; above 1 - eps the protected log changes sign); C = 100 rows
   alike; every logit row twice, under two targets; fixed seed.
4. novelty: ``fingerprint``, ``same``; ``NoveltyIndex`` and the paper's optional phenotype
   filter (``phenotype``, ``near_duplicate``) live in ``novelty.py``, re-exported here.

Everything runs the printer's compiled ``NAME_per_sample`` (what trains) in float64, compiled
once per tree. For a class-sum set (``paper``) the expression is elementwise, so the sweep and
the probe go through ONE forward/backward as a column (N, 1); other sets (``typed``) take one
call per block.

Fingerprint: sign x d(sum of per-sample losses)/d logits on the probe rows, flat, then one
rounding scale per row, s_r = sum_c p_c |dL/dp_c|. ``same``'s norm, for every probe row r:
``||a_r - b_r||_2 <= RTOL max(||a_r||_2, ||b_r||_2) + ZERO_TOL max(s_a,r, s_b,r)``. Per row,
because a whole-vector norm lets rows with huge gradients (p near eps under 1/p) hide O(1)
differences elsewhere; the s term because softmax's backward p (g - sum_c p_c g_c) cancels, so
a row that is mathematically ~0 (a confident right answer; the constant sum_c p_c) comes out as
noise ~1e-16 s_r. Rows below ZERO_TOL s_r are set to exactly 0; an all-zero gradient part is a
constant loss, the same only as another constant.

Fed by ``codegen.compile_loss`` and ``trees``; ``symbolic.canonical_key`` for ``same``. Used by
the CLI (check, same), ``novelty.py`` and the search loop (``evolution``); ``NoveltyIndex``,
``phenotype`` and ``near_duplicate`` come from ``novelty.py`` on first access (it imports
this module).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..lang.ops import EPS
from ..lang.psets import load_pset
from ..lang.trees import var_name

RTOL = 1e-6          # relative tolerance of ``same`` on fingerprints (per probe row)
ZERO_TOL = 1e-9      # a row below ZERO_TOL * sum_c p_c |dL/dp_c| is rounding noise: zero
SWEEP_ROWS = 1000
MID_ROWS = (490, 509)  # inclusive: an extremum here (true-class probability ~0.5) is rejected
MAX_ZERO_DIFFS = 10
PROBE_SEED = 20240313

# Stable rejection reasons (counted by reason in the run store).
REASONS = ("integrity_non_finite", "integrity_mid_extremum", "integrity_constant",
           "integrity_plateau", "integrity_turning_points", "no_gradient", "ignores_target",
           "non_finite_value", "non_finite_grad", "eval_error")
OK = "ok"


@dataclass(frozen=True, eq=False)
class Integrity:
    """Step 1's verdict. ``sign`` is +1 when rejected; ``curve`` the raw sweep L (1000,)."""

    accepted: bool
    reason: str
    sign: int
    curve: np.ndarray


@dataclass(frozen=True, eq=False)
class ScreenResult:
    """Steps 1-3. ``fingerprint`` (oriented by ``sign``) is set only when accepted."""

    accepted: bool
    reason: str
    sign: int
    fingerprint: np.ndarray | None
    curve: np.ndarray


# ----------------------------------------------------------------------------- the inputs

class _Probe:
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


def _probe() -> _Probe:
    global _PROBE
    if _PROBE is None:
        _PROBE = _Probe()
    return _PROBE


# ----------------------------------------------------------------------------- evaluation

def _run(per_sample, pset):
    """(sweep L (1000,), probe per-sample values (rows,), [dL/dp (R, C) per probe block])."""
    pr = _probe()
    torch = pr.torch
    if pset.class_sum:  # elementwise, then a class sum: everything in one column, one pass
        calls = [(pr.col_y, pr.col_p)]
    else:
        calls = [(pr.t_sweep_y, pr.sweep_p)] + [(torch.from_numpy(y), p) for _, y, p in pr.blocks]
    outs, grads = [], []
    for y, p_np in calls:
        p = torch.from_numpy(p_np).requires_grad_(True)
        out = per_sample(y, p)
        if tuple(out.shape) != (p.shape[0],):
            raise RuntimeError(f"per-sample output of shape {tuple(out.shape)}, not ({p.shape[0]},)")
        outs.append(out.detach().numpy())
        grads.append(_grad(torch, out, p))
    if pset.class_sum:
        shapes = [(SWEEP_ROWS, 2)] + [y.shape for _, y, _ in pr.blocks]
        ends = np.cumsum([0] + [a * b for a, b in shapes])
        cuts = list(zip(ends, ends[1:], shapes))
        with np.errstate(all="ignore"):  # inf - inf -> nan is a finding, not a warning
            outs = [outs[0][i:j].reshape(shape).sum(axis=1) for i, j, shape in cuts]
        grads = [grads[0][i:j].reshape(shape) for i, j, shape in cuts]
    return outs[0], np.concatenate(outs[1:]), grads[1:]


def _tree_of(expr, pset):
    from ..lang.trees import parse
    return parse(expr, pset) if isinstance(expr, str) else expr


def _evaluate(tree, pset):
    """(tree, pset, curve, values, grads): parse if text, compile once (the printer's own
    ``NAME_per_sample``: what is screened is what trains), run once."""
    from ..lang.codegen import compile_loss
    pset = load_pset(pset)
    tree = _tree_of(tree, pset)
    return (tree, pset) + _run(compile_loss(tree, pset)[1], pset)


def _grad(torch, out, p):
    if not out.requires_grad:  # no path from p to the output
        return np.zeros(tuple(p.shape))
    (g,) = torch.autograd.grad(out.sum(), p, allow_unused=True)
    return np.zeros(tuple(p.shape)) if g is None else g.numpy()


def _fingerprint(grads, sign):
    """dL/dp blocks -> [sign * dL/dz (softmax backward, as autograd does it), row scales]."""
    pr = _probe()
    gz, scale = [], []
    with np.errstate(all="ignore"):
        for (_c, _y, p), g in zip(pr.blocks, grads):
            gz.append((p * (g - (p * g).sum(axis=1, keepdims=True))).ravel())
            scale.append((p * np.abs(g)).sum(axis=1))
        gz, scale = np.concatenate(gz), np.concatenate(scale)
        noise = _row_norms(gz) <= ZERO_TOL * scale
    gz[noise[pr.row_of]] = 0.0
    return np.concatenate([sign * gz, scale])


# ----------------------------------------------------------------------------- step 1

def judge_curve(curve) -> tuple:
    """(accepted, reason, sign) for a raw sweep curve, exactly as DESIGN §5.1 states."""
    L = np.asarray(curve, dtype=np.float64)
    if not np.all(np.isfinite(L)):
        return False, "integrity_non_finite", 1
    lo, hi = MID_ROWS
    if lo <= int(np.argmin(L)) <= hi or lo <= int(np.argmax(L)) <= hi:
        return False, "integrity_mid_extremum", 1
    d = np.diff(L)
    if np.all(d > 0):
        return True, OK, 1
    if np.all(d < 0):
        return True, OK, -1
    zero = d == 0
    if zero.all():
        return False, "integrity_constant", 1
    if int(zero.sum()) > MAX_ZERO_DIFFS:
        return False, "integrity_plateau", 1
    s = np.sign(d)
    first = int(np.flatnonzero(~zero)[0])
    s[:first] = s[first]                                        # leading zeros: first run's sign
    s = s[np.maximum.accumulate(np.where(s == 0, 0, np.arange(len(s))))]  # others: previous sign
    changes = int(np.count_nonzero(s[1:] != s[:-1]))
    if changes == 0:
        return True, OK, 1 if s[0] > 0 else -1
    if changes == 1:
        return True, OK, 1 if s[0] < 0 else -1      # U (decreasing first): +1; cap: -1
    return False, "integrity_turning_points", 1


def integrity(tree, pset="paper") -> Integrity:
    """The paper's integrity check (DESIGN §5.1) on the raw per-sample output of ``tree``."""
    curve = _evaluate(tree, pset)[2]
    return Integrity(*judge_curve(curve), curve)


# ----------------------------------------------------------------------------- steps 2-3

def _split(fp):
    n = _probe().size
    return fp[..., :n], fp[..., n:]


def _row_norms(g):
    """Euclidean norm of every probe row of a flat gradient (or of each of a stack of them)."""
    return np.sqrt(np.add.reduceat(g * g, _probe().row_start, axis=-1))


def _rows_match_many(stack, b):
    """The per-row test of the module docstring: each finite fingerprint of ``stack`` vs ``b``."""
    (ga, sa), (gb, sb) = _split(stack), _split(b)
    with np.errstate(all="ignore"):
        diff = _row_norms(ga - gb)
        bound = RTOL * np.maximum(_row_norms(ga), _row_norms(gb)) + ZERO_TOL * np.maximum(sa, sb)
    return np.all(diff <= bound, axis=-1)


def _ignores_target(fp) -> bool:
    """Every logit row has the same gradient under both of its targets."""
    pr = _probe()
    g, s = _split(fp)
    return bool(_rows_match_many(fp, np.concatenate([g[pr.swap], s[pr.row_swap]])))


def _steps_2_3(values, fp):
    """Reason for the first failing check of steps 2-3 (in DESIGN order), or None."""
    g, s = _split(fp)
    if not np.any(g):  # NaN counts as non-zero here; step 3 reports it
        return "no_gradient"
    finite = bool(np.all(np.isfinite(fp)))
    if finite and _ignores_target(fp):
        return "ignores_target"
    if not np.all(np.isfinite(values)):
        return "non_finite_value"
    if not finite:
        return "non_finite_grad"
    return None


def probe_reason(tree, pset="paper"):
    """Steps 2-3 alone (no integrity check): the rejection reason, or None if they pass."""
    _, _, _, values, grads = _evaluate(tree, pset)
    return _steps_2_3(values, _fingerprint(grads, 1))


def screen(tree, pset="paper") -> ScreenResult:
    """Steps 1-3 in order (one compile, one evaluation); the fingerprint when accepted."""
    pset = load_pset(pset)
    tree = _tree_of(tree, pset)  # bad text raises ParseError (bad input, not a rejection)
    if not any(var_name(node, pset) == "p" for node in tree):
        # Without p the sweep (fixed y, varying p) is flat or non-finite: rejected either way,
        # so skip compiling it -- most random initial trees are like this.
        return ScreenResult(False, "integrity_constant", 1, None, np.full(SWEEP_ROWS, np.nan))
    try:
        _, _, curve, values, grads = _evaluate(tree, pset)
    except (RuntimeError, ValueError, TypeError, ArithmeticError):
        return ScreenResult(False, "eval_error", 1, None, np.full(SWEEP_ROWS, np.nan))
    accepted, reason, sign = judge_curve(curve)
    if not accepted:
        return ScreenResult(False, reason, 1, None, curve)
    fp = _fingerprint(grads, sign)
    reason = _steps_2_3(values, fp)
    if reason is not None:
        return ScreenResult(False, reason, sign, None, curve)
    return ScreenResult(True, OK, sign, fp, curve)


# ----------------------------------------------------------------------------- step 4: novelty

def fingerprint(tree, pset="paper", sign: int = 1) -> np.ndarray:
    """Flat float64: ``sign`` x d(sum of per-sample losses)/d logits on the probe rows (C = 10
    block, then C = 100 block; rounding-noise rows exactly 0), then one rounding scale per row
    (sum_c p_c |dL/dp_c|), which the comparison needs."""
    return _fingerprint(_evaluate(tree, pset)[4], sign)


def is_constant(fp) -> bool:
    """Zero gradient on every probe row: a constant loss."""
    return not np.any(_split(np.asarray(fp))[0])


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
    return bool(_rows_match_many(a, b))


def key_and_fingerprint(tree, pset="paper"):
    """(integrity sign, canonical key, fingerprint), compiling once; what ``same`` compares."""
    from ..lang.symbolic import canonical_key
    tree, pset, curve, _, grads = _evaluate(tree, pset)
    sign = judge_curve(curve)[2]
    return sign, canonical_key(tree, pset, sign=sign), _fingerprint(grads, sign)


def same(a, b, pset="paper") -> bool:
    """DESIGN §5.4: equal canonical keys (each oriented by its integrity sign, +1 when
    rejected) or matching fingerprints. ``a``, ``b``: trees or expression text."""
    pset = load_pset(pset)
    _, ka, fa = key_and_fingerprint(a, pset)
    _, kb, fb = key_and_fingerprint(b, pset)
    return ka == kb or fingerprints_match(fa, fb)
