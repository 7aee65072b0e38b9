"""The printed-formula oracle, shared by tests/test_formula.py and analysis/bench_formula.py.

A printed formula must be the loss: its text, parsed back by SymPy (``parse_expr`` with the
documented names of ``gp_loss.lang.formula.FUNCTIONS``), evaluated with SymPy's own numpy
translation, equals the tree evaluated with the op table's independent float64 numpy
references -- on y in {0, 1}, p in [1e-4, 1 - 1e-4] (paper) or one-hot and softmax rows (typed),
relative 1e-6, 2e-5 where the text shows a 6-digit constant, plus what moving p by 8 float
steps does to either (``slack``: float64 cannot pin a value closer than that near a pole or a
cancellation). Nothing here uses the display code's own evaluator (``domain.evaluate``).

Known limit: the formula is the exact mathematics of the tree; where float64 absorbs a term
(p + 1e20 - 1e20 computes 0) the text shows the mathematics (p) and this oracle says so.
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

from gp_loss.lang.formula import FUNCTIONS
from gp_loss.lang.ops import REDUCTIONS
from gp_loss.lang.trees import var_name

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


def node_values(tree, pset, y, p):
    """Every node's value (index in ``tree`` -> array) from the op table's numpy forms."""
    stack, values = [], {}
    with np.errstate(all="ignore"):
        for i in range(len(tree) - 1, -1, -1):
            node = tree[i]
            if isinstance(node, gp.Primitive):
                args = [stack.pop() for _ in range(node.arity)]
                args = [np.broadcast_to(a, np.shape(p)) if np.ndim(a) == 0 and
                        pset.prims[node.name].op.kind == "reduction" else a for a in args]
                stack.append(pset.prims[node.name].op.numpy(*args))
            elif var_name(node, pset):
                stack.append(y if var_name(node, pset) == "y" else p)
            else:
                stack.append(np.float64(node.value))
            values[i] = stack[-1]
    return values


def reference(tree, pset, y, p):
    """The loss per class (paper) or per sample (typed) from the op table's numpy forms."""
    value = node_values(tree, pset, y, p)[0]
    return np.broadcast_to(np.asarray(value, dtype=float), np.shape(p)[:1])


# Offsets (relative) at which a printed formula is checked around each point where one of the
# tree's subexpressions is zero or has a pole: a rounded constant that moves a pole or a sign
# change shows there, between any fixed grid's points (tanh(1/(p - 0.731059)) vs sigmoid(1)).
# Not closer than 1e-9: there p - c keeps only 7 of float64's digits, so SymPy's equal
# rearrangements (K*(p - c) read as K*p - K*c) legitimately differ at 1e-6.
NEAR = (1e-9, 1e-7, 1e-5, 1e-3)


def dense_points(tree, pset):
    """(y, p) for class-sum sets: a dense grid unlike the display's (2,001 even, 200 log-spaced
    at both ends, 500 fixed-seed uniform), plus points around each zero of a subexpression,
    found by zooming in on each interior minimum of |node| (and around each pole: maximum of
    |node|), on the tree's own nodes (numpy)."""
    lo, hi = 1e-4, 1 - 1e-4
    tail = np.geomspace(lo, 0.5, 100)
    grid = np.unique(np.concatenate([np.linspace(lo, hi, 2001), tail, 1 - tail,
                                     np.random.default_rng(12345).uniform(lo, hi, 500)]))
    ys, ps = [], []
    for yv in (0.0, 1.0):
        roots = _zeros(tree, pset, yv, grid)
        extra = [roots] + [roots * (1 + s * r) for r in NEAR for s in (-1, 1)]
        p = np.unique(np.clip(np.concatenate([grid, *extra]), lo, hi))
        ys.append(np.full_like(p, yv))
        ps.append(p)
    return np.concatenate(ys), np.concatenate(ps)


def _zeros(tree, pset, yv, grid, width=65, rounds=10, most=256):
    brackets = []   # (node index, lo, hi)
    for i, v in node_values(tree, pset, np.float64(yv), grid).items():
        if np.shape(v) != grid.shape:
            continue
        a = np.abs(np.asarray(v, dtype=float))
        a[~np.isfinite(a)] = np.inf
        with np.errstate(all="ignore"):
            for sign, b in ((1, a), (-1, 1.0 / a)):   # zeros and poles (maxima of |v|)
                mins = np.flatnonzero((b[1:-1] < b[:-2]) & (b[1:-1] <= b[2:])) + 1
                brackets += [(i, sign, grid[j - 1], grid[j + 1]) for j in mins]
    brackets = sorted(set(brackets))[:most]
    if not brackets:
        return np.zeros(0)
    node = np.array([b[0] for b in brackets])
    sign = np.array([b[1] for b in brackets])
    lo = np.array([b[2] for b in brackets])
    hi = np.array([b[3] for b in brackets])
    t = np.linspace(0.0, 1.0, width)
    for _ in range(rounds):
        pts = lo[:, None] + (hi - lo)[:, None] * t
        values = node_values(tree, pset, np.float64(yv), pts.ravel())
        best = np.zeros(len(brackets), dtype=int)
        for i in np.unique(node):
            rows = node == i
            a = np.abs(np.broadcast_to(values[i], pts.ravel().shape).reshape(pts.shape)[rows])
            a = np.where(np.isfinite(a), a, np.inf)
            best[rows] = np.where(sign[rows, None] > 0, a, -a).argmin(axis=1)
        idx = np.arange(len(brackets))
        lo, hi = pts[idx, np.maximum(best - 1, 0)], pts[idx, np.minimum(best + 1, width - 1)]
        mid = pts[idx, best]
    return mid


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


# mpmath retries give up (NaN) on arguments beyond 2**(2**14) in size, where the work is no
# longer bounded: sin(exp(exp(15))) needs millions of digits of pi, exp(exp(exp(15))) an
# exponent of millions of digits (exp(-sinh(1e4)), an argument of 2**14427, is still cheap).
_MPMATH_LIMITS = {name: 2**14 for name in ("exp", "sinh", "cosh", "sin", "cos", "tan",
                                           "besseli")}


def _bounded_mpmath(mpmath):
    """mpmath's functions, refusing arguments beyond ``_MPMATH_LIMITS`` (bounded work, not a
    clock)."""
    def guard(fn, bits):
        def call(*args):
            for a in args:
                if isinstance(a, (mpmath.mpf, mpmath.mpc)) and a != 0 and mpmath.mag(a) > bits:
                    raise OverflowError("argument too large for a bounded retry")
            return fn(*args)
        return call
    return {n: guard(getattr(mpmath, n), bits) for n, bits in _MPMATH_LIMITS.items()}


MPMATH_POINTS = 300   # at most this many points of one formula are recomputed with mpmath


def printed_values(text, y, p, want=None, nonfinite_only=False, rtol=1e-6):
    """The printed formula's values (numpy); where they are not finite or differ from
    ``want`` by more than ``rtol``, recomputed with mpmath at 30 digits (exp(-x)*i1(x) overflows in float64 for
    large x, yet is the value the loss computes)."""
    expr = _parse(text)
    fn = sympy.lambdify((_Y, _P), expr, modules=_numpy_modules(np.shape(p)))
    with np.errstate(all="ignore"):
        got = np.array(np.broadcast_to(np.asarray(fn(y, p), dtype=float), np.shape(p)[:1]))
    if want is None or np.ndim(p) != 1:
        return got
    ok = np.isfinite(want)
    redo = ok & ~np.isfinite(got)
    if not nonfinite_only and ok.any():   # and where float64 missed the tolerance (cancellation)
        scale = _scale(want, ok, y)
        with np.errstate(all="ignore"):
            redo |= ok & (np.abs(got - want) > rtol * scale)
    if redo.any():
        import mpmath
        slow = sympy.lambdify((_Y, _P), expr, modules=[_bounded_mpmath(mpmath), "mpmath"])
        todo = np.flatnonzero(redo)
        if todo.size > MPMATH_POINTS:   # bounded work: an even, fixed sample of them is
            keep = todo[np.linspace(0, todo.size - 1, MPMATH_POINTS).astype(int)]
            skip = np.setdiff1d(todo, keep)
            got[skip] = want[skip]     # ... recomputed; the rest are not judged
            todo = keep
        with mpmath.workdps(30):
            for i in todo:
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


def _scale(b, ok, y=None):
    """|b|, floored at 1e-6 of the largest finite |b| -- within each y value when ``y`` has
    b's shape (the two classes' terms train separately: a huge y = 1 term does not excuse an
    error in the y = 0 term). Independent of gp_loss.lang.lowering's own check."""
    mag = np.where(ok, np.abs(b), 0.0)
    floor = np.full_like(mag, 1e-6 * mag.max(initial=0))
    if y is not None and np.shape(y) == np.shape(b):
        y = np.asarray(y)
        for v in np.unique(y):
            sel = y == v
            floor[sel] = 1e-6 * mag[sel].max(initial=0)
    return np.maximum(np.maximum(mag, floor), 1e-300)


ULPS = 8   # the loss and the text may differ by what moving p by this many float steps does


def slack(values, y, p, center):
    """Per point, how much ``values(y, p)`` moves when p moves ULPS float steps either way
    (inf where that reaches a non-finite value: a pole within float spacing; 0 where
    ``center`` itself is not finite). Float64 cannot
    pin a value more closely than that, in the loss or in its text: a pole placed by
    sigmoid(1) - 1e-7 (1e17 in one, inf in the other), sin(sinh(log(...))) at 1e15."""
    out = np.zeros(np.shape(p)[:1])
    if np.ndim(p) != 1 or not np.size(p):
        return out
    for s in (-1, 1):
        q = p * (1 + s * ULPS * 2.0 ** -52)
        with np.errstate(all="ignore"):
            moved = np.asarray(values(y, q), dtype=float)
            d = np.abs(moved - center)
        d[~np.isfinite(moved)] = np.inf
        out = np.maximum(out, np.where(np.isfinite(center), d, 0.0))
    return out


def mismatch(a, b, rtol, y=None, allowed=None):
    """None when ``a`` equals ``b`` where ``b`` is finite (relative ``rtol``; values under 1e-6
    of the largest -- of the same y, when given -- count as that size; ``allowed``: (the
    loss's, the text's) ``slack`` per point, added to the tolerance), else a short description."""
    ok = np.isfinite(b)
    if not ok.any():
        return None
    own, text = (np.zeros_like(b), np.zeros_like(b)) if allowed is None else allowed
    scale = _scale(b, ok, y)[ok]
    own = own[ok]
    # The text's own slack never excuses more than the loss's (a pole the loss lacks, just
    # off a grid point, must not pass because the text blows up next to it).
    extra = own + np.minimum(text[ok], own + rtol * scale)
    # A pole: within ULPS steps the loss itself moves by more than its size (floored as above,
    # so a zero of the loss is not a pole).
    pole = (own > 0) & (own >= scale)
    if not (np.isfinite(a[ok]) | pole).all():
        return "printed formula not finite where the loss is"
    with np.errstate(all="ignore"):
        err = np.abs(a[ok] - b[ok])
    bad = (err > rtol * scale + extra) & ~pole
    worst = (err / scale)[bad].max(initial=0)
    return None if not bad.any() else f"relative error {worst:.3g}"


def _conditioning(text, tree, pset, y, p, got, want, sign=1):
    """(``slack`` of the loss, that of the printed text) at each point."""
    return (slack(lambda yy, q: sign * reference(tree, pset, yy, q), y, p, want),
            slack(lambda yy, q: printed_values(text, yy, q), y, p, got))


def check_text(text, tree, pset, y, p):
    """None when the printed ``text`` is the loss ``tree`` on the domain, else why not."""
    want = reference(tree, pset, y, p)
    rtol = 2e-5 if shows_six_digits(text) else 1e-6
    try:
        got = printed_values(text, y, p, want, rtol=rtol)
    except Exception as exc:  # noqa: BLE001 - a formula that does not parse back is a failure
        return f"does not parse back: {type(exc).__name__}: {exc}"
    if mismatch(got, want, rtol, y if np.ndim(p) == 1 else None) is None:
        return None
    return mismatch(got, want, rtol, y if np.ndim(p) == 1 else None,
                    _conditioning(text, tree, pset, y, p, got, want))


def check_per_class(form, tree, pset, sign=1, p=None):
    """The per-class texts: sign*f(1, p) and sign*f(0, p) up to the dropped constants."""
    p = np.unique(points(False)[1] if p is None else p)
    problems = []
    for side, yv in (("target", 1.0), ("other", 0.0)):
        want = sign * reference(tree, pset, np.full_like(p, yv), p)
        rtol = 2e-5 if shows_six_digits(form[side]) else 1e-6
        got = printed_values(form[side], np.zeros_like(p), p, want,
                             nonfinite_only=form["constant_dropped"], rtol=rtol)
        if form["constant_dropped"]:
            # Up to an additive constant: want - got is constant, to rtol of the larger scale
            # (after a constant is dropped, values near zero say nothing about the rest).
            ok = np.isfinite(want)
            if not ok.any():   # the loss is nowhere finite: nothing to compare
                continue
            if not np.isfinite(got[ok]).all():
                problems.append(f"{side}: not finite where the loss is")
                continue
            d = want[ok] - got[ok]
            scale = max(np.abs(want[ok]).max(initial=0), np.abs(got[ok]).max(initial=0), 1e-300)
            spread = np.abs(d - np.median(d)).max(initial=0) / scale
            if spread > rtol:
                problems.append(f"{side}: not a constant apart (spread {spread:.3g})")
            continue
        bad = mismatch(got, want, rtol)
        if bad:   # the per-class text has no y: evaluating it at y = yv changes nothing
            bad = mismatch(got, want, rtol, allowed=_conditioning(
                form[side], tree, pset, np.full_like(p, yv), p, got, want, sign))
        if bad:
            problems.append(f"{side}: {bad}")
    return "; ".join(problems) or None


def failures(trees, pset):
    """Each tree whose printed formula or per-class form is not its loss, with why."""
    from gp_loss.lang import formula as F
    from gp_loss.lang.trees import to_text
    y, p = points(not pset.class_sum)
    bad = []
    for t in trees:
        if pset.class_sum:
            y, p = dense_points(t, pset)
        text = F.formula(t, pset)
        why = check_text(text, t, pset, y, p)
        if why is None and pset.class_sum:
            form = F.per_class(t, pset)
            why = "no per-class form" if form is None else check_per_class(form, t, pset, p=p)
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
