"""The printed-formula oracle, shared by tests/test_formula.py and analysis/bench_formula.py.

A printed formula must be the loss: its text, parsed back by SymPy (``parse_expr`` with the
documented names of ``gp_loss.formula.FUNCTIONS``), evaluated with SymPy's own numpy
translation, equals the tree evaluated with the op table's independent float64 numpy
references -- on y in {0, 1}, p in [1e-4, 1 - 1e-4] (paper) or one-hot and softmax rows (typed),
relative 1e-6, 2e-5 where the text shows a 6-digit constant. Nothing here uses the display
code's own evaluator (``lowering.evaluate``).
"""
from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import numpy as np
import sympy
from deap import gp
from scipy import special as sps
from sympy.parsing.sympy_parser import parse_expr

from gp_loss.formula import FUNCTIONS
from gp_loss.primitives import REDUCTIONS
from gp_loss.trees import var_name

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "results" / "mnist5k" / "run" / "run.sqlite"
_NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?:e[-+]?\d+)?")


def points(per_sample: bool):
    half = np.geomspace(1e-4, 0.5, 48)
    p = np.unique(np.concatenate([half, 1.0 - half, np.linspace(0.01, 0.99, 99)]))
    if not per_sample:
        return np.concatenate([np.zeros_like(p), np.ones_like(p)]), np.tile(p, 2)
    rng = np.random.default_rng(0)          # one-hot rows, softmax rows (some confident)
    z = rng.normal(0.0, 2.5, size=(96, 4))
    z[:8] *= 3.0
    e = np.exp(z - z.max(axis=1, keepdims=True))
    prob = np.clip(e / e.sum(axis=1, keepdims=True), 1e-4, 1 - 1e-4)
    prob /= prob.sum(axis=1, keepdims=True)
    return np.eye(4)[rng.integers(0, 4, size=96)], prob


def reference(tree, pset, y, p):
    """The loss per class (paper) or per sample (typed) from the op table's numpy forms."""
    stack = []
    with np.errstate(all="ignore"):
        for node in reversed(tree):
            if isinstance(node, gp.Primitive):
                args = [stack.pop() for _ in range(node.arity)]
                args = [np.broadcast_to(a, np.shape(p)) if np.ndim(a) == 0 and
                        pset.prims[node.name].op.kind == "reduction" else a for a in args]
                stack.append(pset.prims[node.name].op.numpy(*args))
            elif var_name(node, pset):
                stack.append(y if var_name(node, pset) == "y" else p)
            else:
                stack.append(np.float64(node.value))
    return np.broadcast_to(np.asarray(stack.pop(), dtype=float), np.shape(p)[:1])


_Y, _P = sympy.Symbol("y"), sympy.Symbol("p")
_TYPED_NAMES = {"csum": "sum"}


def _parse(text):
    local = dict(FUNCTIONS, y=_Y, p=_P, E=sympy.E)
    for name in ("mse", "kl", "ce", "dot"):
        local[name] = sympy.Function(name)
    local["sum"] = sympy.Function("csum")
    return parse_expr(text, local_dict=local)


def _numpy_modules(elem_shape):
    """numpy forms for lambdify; a reduction's constant argument fills a (B, C) block."""
    def reduction(op):
        def apply(*a):
            shape = np.broadcast_shapes(elem_shape, *[np.shape(v) for v in a])
            return op.numpy(*[np.broadcast_to(x, shape) for x in a])
        return apply
    mods = {name: reduction(REDUCTIONS[_TYPED_NAMES.get(name, name)])
            for name in ("mse", "kl", "ce", "dot", "csum")}
    mods["besseli"] = sps.iv
    return [mods, "scipy", "numpy"]


def printed_values(text, y, p, want=None, nonfinite_only=False):
    """The printed formula's values (numpy); where they are not finite or differ from
    ``want``, recomputed with mpmath at 30 digits (exp(-x)*i1(x) overflows in float64 for
    large x, yet is the value the loss computes)."""
    expr = _parse(text)
    fn = sympy.lambdify((_Y, _P), expr, modules=_numpy_modules(np.shape(p)))
    with np.errstate(all="ignore"):
        got = np.array(np.broadcast_to(np.asarray(fn(y, p), dtype=float), np.shape(p)[:1]))
    if want is None or np.ndim(p) != 1:
        return got
    redo = np.isfinite(want) & ~np.isfinite(got) if nonfinite_only else \
        np.isfinite(want) & ~np.isclose(got, want, rtol=1e-7, atol=0)
    if redo.any():
        import mpmath
        slow = sympy.lambdify((_Y, _P), expr, modules="mpmath")
        with mpmath.workdps(30):
            for i in np.flatnonzero(redo):
                try:
                    value = complex(slow(mpmath.mpf(float(y[i])), mpmath.mpf(float(p[i]))))
                    got[i] = value.real if abs(value.imag) <= 1e-12 * abs(value) else np.nan
                except (ValueError, TypeError, ZeroDivisionError, OverflowError):
                    got[i] = np.nan
    return got


def shows_six_digits(text) -> bool:
    """Whether the text shows a constant rounded to 6 significant digits (5 when the sixth
    was a zero: 1.1752 is 1.17520)."""
    for m in _NUMBER.finditer(text):
        digits = m.group(1).replace(".", "").lstrip("0").rstrip("0")
        if len(digits) in (5, 6):
            return True
    return False


def mismatch(a, b, rtol):
    """None when ``a`` equals ``b`` where ``b`` is finite (relative ``rtol``; values under 1e-6
    of the largest count as that size), else a short description."""
    ok = np.isfinite(b)
    if not ok.any():
        return None
    if not np.isfinite(a[ok]).all():
        return "printed formula not finite where the loss is"
    scale = np.maximum(np.maximum(np.abs(b[ok]), 1e-6 * np.abs(b[ok]).max()), 1e-300)
    err = np.abs(a[ok] - b[ok]) / scale
    return None if err.max() <= rtol else f"relative error {err.max():.3g}"


def check_text(text, tree, pset, y, p):
    """None when the printed ``text`` is the loss ``tree`` on the domain, else why not."""
    want = reference(tree, pset, y, p)
    try:
        got = printed_values(text, y, p, want)
    except Exception as exc:  # noqa: BLE001 - a formula that does not parse back is a failure
        return f"does not parse back: {type(exc).__name__}: {exc}"
    return mismatch(got, want, 2e-5 if shows_six_digits(text) else 1e-6)


def check_per_class(form, tree, pset, sign=1):
    """The per-class texts: sign*f(1, p) and sign*f(0, p) up to the dropped constants."""
    _y, p = points(False)
    p = np.unique(p)
    problems = []
    for side, yv in (("target", 1.0), ("other", 0.0)):
        want = sign * reference(tree, pset, np.full_like(p, yv), p)
        got = printed_values(form[side], np.zeros_like(p), p, want,
                             nonfinite_only=form["constant_dropped"])
        rtol = 2e-5 if shows_six_digits(form[side]) else 1e-6
        if form["constant_dropped"]:
            # Up to an additive constant: want - got is constant, to rtol of the larger scale
            # (after a constant is dropped, values near zero say nothing about the rest).
            ok = np.isfinite(want)
            if not np.isfinite(got[ok]).all():
                problems.append(f"{side}: not finite where the loss is")
                continue
            d = (want - got)[ok]
            scale = max(np.abs(want[ok]).max(initial=0), np.abs(got[ok]).max(initial=0), 1e-300)
            spread = np.abs(d - np.median(d)).max(initial=0) / scale
            if spread > rtol:
                problems.append(f"{side}: not a constant apart (spread {spread:.3g})")
            continue
        bad = mismatch(got, want, rtol)
        if bad:
            problems.append(f"{side}: {bad}")
    return "; ".join(problems) or None


def failures(trees, pset):
    """Each tree whose printed formula or per-class form is not its loss, with why."""
    from gp_loss import formula as F
    from gp_loss.trees import to_text
    y, p = points(not pset.class_sum)
    bad = []
    for t in trees:
        text = F.formula(t, pset)
        why = check_text(text, t, pset, y, p)
        if why is None and pset.class_sum:
            form = F.per_class(t, pset)
            why = "no per-class form" if form is None else check_per_class(form, t, pset)
        if why:
            bad.append(f"{to_text(t, pset)} -> {text}: {why}")
    return bad


def run_expressions(limit=None):
    """The distinct expressions the shipped mnist5k run trained (evaluated or reused)."""
    con = sqlite3.connect(f"file:{RUN}?mode=ro&immutable=1", uri=True)
    try:
        rows = con.execute("SELECT DISTINCT expr FROM candidates WHERE status IN "
                           "('evaluated', 'reused') ORDER BY expr").fetchall()
    finally:
        con.close()
    exprs = [r[0] for r in rows]
    return exprs[:limit] if limit else exprs
