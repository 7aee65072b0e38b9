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
4. novelty: ``fingerprint``, ``same`` (the probe and the row test: ``fingerprint.py``);
   ``NoveltyIndex`` and the paper's optional phenotype filter (``phenotype``,
   ``near_duplicate``) live in ``novelty.py``.

Everything runs the printer's compiled ``NAME_per_sample`` (what trains) in float64, compiled
once per tree. For a class-sum set (``paper``) the expression is elementwise, so the sweep and
the probe go through ONE forward/backward as a column (N, 1); other sets (``typed``) take one
call per block.

The fingerprint and the per-row test ``same`` uses: ``fingerprint.py``.

Fed by ``codegen.compile_loss`` and ``trees``; ``symbolic.canonical_key`` for ``same``. Used by
the CLI (check, same), the protocol and the search loop (``evolution``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..lang.psets import PREDICTION_TERMINALS, load_pset
from ..lang.trees import var_name
from .fingerprint import (SWEEP_ROWS, fingerprints_match, from_grads, probe,
                          rows_match_many, run_probe, split)

MID_ROWS = (490, 509)  # inclusive: an extremum here (true-class probability ~0.5) is rejected
MAX_ZERO_DIFFS = 10

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

# ----------------------------------------------------------------------------- evaluation

def _tree_of(expr, pset):
    from ..lang.trees import parse
    return parse(expr, pset) if isinstance(expr, str) else expr


def _evaluate(tree, pset, gate=None):
    """(tree, pset, curve, values, grads): parse if text, compile once (the printer's own
    ``NAME_per_sample``: what is screened is what trains), run once (values and grads None
    when ``gate(curve)`` is false: see ``run_probe``)."""
    from ..lang.codegen import compile_per_sample
    pset = load_pset(pset)
    tree = _tree_of(tree, pset)
    return (tree, pset) + run_probe(compile_per_sample(tree, pset), pset, gate)


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


def sign_of(tree, pset="paper") -> int:
    """The orientation the integrity check gives ``tree`` (+1 or -1; +1 when it rejects or
    cannot even evaluate it): the sign an export or a compiled loss applies by default."""
    try:
        result = integrity(tree, pset)
    except (RuntimeError, ArithmeticError, TypeError):  # cannot even be evaluated: rejected
        return 1
    return int(result.sign) if result.accepted and result.sign in (1, -1) else 1


def integrity(tree, pset="paper") -> Integrity:
    """The paper's integrity check (DESIGN §5.1) on the raw per-sample output of ``tree``."""
    curve = _evaluate(tree, pset)[2]
    return Integrity(*judge_curve(curve), curve)


# ----------------------------------------------------------------------------- steps 2-3

def _ignores_target(fp) -> bool:
    """Every logit row has the same gradient under both of its targets."""
    pr = probe()
    g, s = split(fp)
    return bool(rows_match_many(fp, np.concatenate([g[pr.swap], s[pr.row_swap]])))


def _steps_2_3(values, fp):
    """Reason for the first failing check of steps 2-3 (in DESIGN order), or None."""
    g, s = split(fp)
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
    return _steps_2_3(values, from_grads(grads, 1))


def screen(tree, pset="paper") -> ScreenResult:
    """Steps 1-3 in order (one compile, one evaluation); the fingerprint when accepted."""
    pset = load_pset(pset)
    tree = _tree_of(tree, pset)  # bad text raises ParseError (bad input, not a rejection)
    if not any(var_name(node, pset) in PREDICTION_TERMINALS for node in tree):
        # Without p the sweep (fixed y, varying p) is flat or non-finite: rejected either way,
        # so skip compiling it -- most random initial trees are like this.
        return ScreenResult(False, "integrity_constant", 1, None, np.full(SWEEP_ROWS, np.nan))
    try:
        _, _, curve, values, grads = _evaluate(tree, pset, gate=lambda c: judge_curve(c)[0])
    except (RuntimeError, ValueError, TypeError, ArithmeticError):
        return ScreenResult(False, "eval_error", 1, None, np.full(SWEEP_ROWS, np.nan))
    accepted, reason, sign = judge_curve(curve)
    if not accepted:  # the probe blocks were not run (step 1 decides first)
        return ScreenResult(False, reason, 1, None, curve)
    fp = from_grads(grads, sign)
    reason = _steps_2_3(values, fp)
    if reason is not None:
        return ScreenResult(False, reason, sign, None, curve)
    return ScreenResult(True, OK, sign, fp, curve)


# ----------------------------------------------------------------------------- step 4: novelty

def fingerprint(tree, pset="paper", sign: int = 1) -> np.ndarray:
    """Flat float64: ``sign`` x d(sum of per-sample losses)/d logits on the probe rows (C = 10
    block, then C = 100 block; rounding-noise rows exactly 0), then one rounding scale per row
    (sum_c p_c |dL/dp_c|), which the comparison needs."""
    return from_grads(_evaluate(tree, pset)[4], sign)


def key_and_fingerprint(tree, pset="paper"):
    """(integrity sign, canonical key, fingerprint), compiling once; what ``same`` compares."""
    from ..lang.symbolic import canonical_key
    tree, pset, curve, _, grads = _evaluate(tree, pset)
    sign = judge_curve(curve)[2]
    return sign, canonical_key(tree, pset, sign=sign), from_grads(grads, sign)


def same(a, b, pset="paper") -> bool:
    """DESIGN §5.4: equal canonical keys (each oriented by its integrity sign, +1 when
    rejected) or matching fingerprints. ``a``, ``b``: trees or expression text."""
    pset = load_pset(pset)
    _, ka, fa = key_and_fingerprint(a, pset)
    _, kb, fb = key_and_fingerprint(b, pset)
    return ka == kb or fingerprints_match(fa, fb)
