"""The loss domain, numerically: its points, a numpy evaluator of SymPy expressions, agreement.

``domain(per_sample)`` is the fixed grid every display decision is checked on (y in {0, 1}, p
log-spaced towards both ends and every 0.01 between; for the typed set one-hot rows and softmax
rows); ``near_zeros`` adds the points around each zero and pole of an expression's
p-dependent subexpressions (interior minima and maxima of |node|, zoomed in a fixed number of
rounds, at most ``MAX_ZEROS`` brackets). ``evaluate(expr, env)`` is a small numpy walker over
SymPy nodes (no lambdify: nothing is compiled; ``Unevaluable`` where a node has no numeric
form, ``FUNCS`` the functions it knows), and ``agree`` the one test of "equal on the domain":
relative ``RTOL``, floored per y value by ``local_scale``. Everything is a fixed computation on
fixed points, so what the display decides is a pure function of the expression.

Fed by ``ops.py`` (EPS, the protected functions, the typed reductions' numpy forms) and
``algebra.py`` (the opaque display functions); used by ``lowering.py`` (its decisions) and
``formula.py`` (its checks of the finished text). Display only: nothing here feeds a key.
"""
from __future__ import annotations

import math

import numpy as np
import sympy
from scipy import special as sps

from .algebra import kabs, kI0, kI1, kmax, kmin, ksig
from .ops import EPS, REDUCTIONS, plog, precip

RTOL = 1e-6          # what a shown formula promises (relative; see ``agree``)
FLOOR = 1e-6         # values below FLOOR * (largest value) count as that size (zero crossings)


class Unevaluable(Exception):
    """The walker met a node it has no numeric form for (e.g. a non-finite constant)."""


def _reduction(name, args, elem_shape):
    """A typed reduction; a constant argument stands for a whole (B, C) row block."""
    op = REDUCTIONS["sum" if name == "csum" else name]
    shape = np.broadcast_shapes(elem_shape, *[np.shape(x) for x in args])
    return op.numpy(*[np.broadcast_to(x, shape) for x in args])


def _fold(fn, args):
    out = args[0]
    for a in args[1:]:
        out = fn(out, a)
    return out


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


FUNCS = {
    sympy.exp: np.exp, sympy.log: np.log, sympy.sin: np.sin, sympy.cos: np.cos,
    sympy.sinh: np.sinh, sympy.cosh: np.cosh, sympy.tanh: np.tanh, sympy.asinh: np.arcsinh,
    sympy.atan: np.arctan, sympy.erf: sps.erf, sympy.erfc: sps.erfc, sympy.Abs: np.abs,
    kabs: np.abs, ksig: _sig, kI0: sps.i0, kI1: sps.i1,
    plog: lambda x: np.log(np.abs(x) + EPS), precip: lambda x: 1.0 / (x + EPS),
}
_NARY = {sympy.Max: np.maximum, kmax: np.maximum, sympy.Min: np.minimum, kmin: np.minimum,
         sympy.Add: np.add, sympy.Mul: np.multiply}
_TYPED = {"mse", "kl", "ce", "dot", "csum"}


def evaluate(expr, env: dict):
    """float64 values of ``expr`` with symbols bound by ``env`` (name -> array); numpy
    broadcasting rules; the typed reductions sum over the last axis."""
    return _values(expr, env)[expr]


def _values(expr, env: dict) -> dict:
    """Every node's value (node -> array) of ``expr`` under ``env``."""
    memo: dict = {}
    stack = [(expr, False)]
    elem_shape = np.shape(env.get("p", ()))
    with np.errstate(all="ignore"):
        while stack:
            node, ready = stack.pop()
            if node in memo:
                continue
            if node.is_Symbol:
                if node.name not in env:
                    raise Unevaluable(node.name)
                memo[node] = env[node.name]
            elif node.is_Number:
                memo[node] = float(node)
            elif node is sympy.E:
                memo[node] = math.e
            elif node is sympy.pi:
                memo[node] = math.pi
            elif not ready:
                stack.append((node, True))
                stack.extend((a, False) for a in node.args if a not in memo)
            else:
                memo[node] = _apply(node, [memo[a] for a in node.args], elem_shape)
    return memo


def _apply(node, args, elem_shape):
    func = node.func
    if func in _NARY:
        return _fold(_NARY[func], args)
    if func is sympy.Pow:
        base, exp = args
        return np.power(np.asarray(base, dtype=float), exp)
    if func in FUNCS:
        return FUNCS[func](*args)
    if func is sympy.besseli and node.args[0] in (0, 1):
        return (sps.i0 if node.args[0] == 0 else sps.i1)(args[1])
    name = type(node).__name__
    if name in _TYPED:
        return _reduction(name, args, elem_shape)
    raise Unevaluable(name)


# ----------------------------------------------------------------------------- the domain

def domain(per_sample: bool, classes: int = 4) -> dict:
    """The loss domain as arrays: class-sum sets take y in {0, 1} and p in [1e-4, 1 - 1e-4]
    (log-spaced towards both ends, and every 0.01 between); per-sample sets (typed) one-hot rows and softmax rows
    (fixed seed) whose entries span the same range."""
    half = np.geomspace(1e-4, 0.5, 48)
    p = np.unique(np.concatenate([half, 1.0 - half, np.linspace(0.01, 0.99, 99)]))
    if not per_sample:
        return {"y": np.concatenate([np.zeros_like(p), np.ones_like(p)]), "p": np.tile(p, 2)}
    rng = np.random.default_rng(0)
    z = rng.normal(0.0, 2.5, size=(96, classes))
    z[:8] *= 3.0                                     # confident rows
    e = np.exp(z - z.max(axis=1, keepdims=True))
    prob = np.clip(e / e.sum(axis=1, keepdims=True), 1e-4, 1 - 1e-4)
    prob /= prob.sum(axis=1, keepdims=True)
    y = np.eye(classes)[rng.integers(0, classes, size=96)]
    return {"y": y, "p": prob}


def agree(value, reference, rtol: float = RTOL, groups=None) -> bool:
    """``value`` equals ``reference`` wherever the reference is finite: |a - b| <= rtol *
    max(|b|, FLOOR * max|b|) (the floor keeps a zero crossing from demanding exactness).
    ``groups`` (the domain's y, same shape as the reference) takes the floor's max within each
    y value: the true-class and other-class terms train separately, so a huge y = 1 term must
    not hide an eps that moves the y = 0 term (1/p + 1e14*y)."""
    a = np.broadcast_to(np.asarray(value, dtype=float), np.shape(reference))
    b = np.asarray(reference, dtype=float)
    ok = np.isfinite(b)
    if not ok.any():
        return True
    g = None
    if groups is not None and np.shape(groups) == b.shape:
        g = np.asarray(groups)[ok]
    a, b = a[ok], b[ok]
    if not np.isfinite(a).all():
        return False
    return bool(np.all(np.abs(a - b) <= rtol * local_scale(b, g)))


def local_scale(b, groups=None):
    """max(|b|, FLOOR * max|b|), the max taken within each value of ``groups`` when given."""
    mag = np.abs(b)
    if groups is None:
        return np.maximum(mag, FLOOR * mag.max(initial=0))
    floor = np.zeros_like(mag)
    for gv in np.unique(groups):
        sel = groups == gv
        floor[sel] = FLOOR * mag[sel].max()
    return np.maximum(mag, floor)


# Around each point where a subexpression is zero, the decisions also look at these relative
# offsets: a rounded constant that moves a pole or a sign change, or a plain 1/x whose argument
# passes through 0, shows there -- between any fixed grid's points (tanh(1/(p - 0.731059)) is
# not tanh(1/(p - sigmoid(1))) for p between the two). Poles are zoomed in on the same way.
NEAR = (1e-12, 1e-10, 1e-8, 1e-6, 1e-4)
ZOOM_WIDTH, ZOOM_ROUNDS, MAX_ZEROS = 65, 10, 128   # 64**10: any bracket down to float spacing


def near_zeros(expr, dom: dict, capped: list | None = None) -> dict:
    """``dom`` (a class-sum domain: 1-D p, y in {0, 1} or absent) plus the points around each
    zero of a p-dependent subexpression of ``expr``: every interior minimum of |node| on the
    grid (a zero) and every interior maximum (a pole), zoomed in on (a fixed number of rounds
    and points: bounded work; ``capped``, when given, is told when MAX_ZEROS cut some off).
    Per-sample
    domains (rows) are returned as they are."""
    p = np.asarray(dom.get("p"))
    if p.ndim != 1 or not p.size:
        return dom
    grid = np.unique(p)
    lo_end, hi_end = grid[0], grid[-1]
    fixed = {k: v for k, v in dom.items() if k not in ("y", "p")}
    ys = np.unique(dom["y"]) if "y" in dom else [None]
    new_y, new_p = [], []
    for yv in ys:
        env = dict(fixed, p=grid, **({} if yv is None else {"y": np.float64(yv)}))
        try:
            roots = _zeros(expr, env, grid, capped)
        except Unevaluable:
            continue
        if not roots.size:
            continue
        extra = [roots] + [roots * (1 + s * r) for r in NEAR for s in (-1, 1)]
        pts = np.setdiff1d(np.clip(np.concatenate(extra), lo_end, hi_end), grid)
        new_p.append(pts)
        if yv is not None:
            new_y.append(np.full_like(pts, yv))
    if not new_p:
        return dom
    out = dict(dom, p=np.concatenate([p, *new_p]))
    if "y" in dom:
        out["y"] = np.concatenate([np.asarray(dom["y"], dtype=float), *new_y])
    return out


def _zeros(expr, env, grid, capped=None):
    brackets = []   # (node number, lo, hi)
    nodes = []
    for node, v in _values(expr, env).items():
        if np.shape(v) != grid.shape:
            continue
        a = np.abs(np.asarray(v, dtype=float))
        a[~np.isfinite(a)] = np.inf
        with np.errstate(all="ignore"):
            for sign, b in ((1, a), (-1, 1.0 / a)):   # zeros, then poles (maxima of |v|)
                mins = np.flatnonzero((b[1:-1] < b[:-2]) & (b[1:-1] <= b[2:])) + 1
                if mins.size:
                    nodes.append((node, sign))
                    brackets += [(len(nodes) - 1, grid[j - 1], grid[j + 1]) for j in mins]
    brackets = sorted(set(brackets))
    if len(brackets) > MAX_ZEROS and capped is not None:
        capped.append(len(brackets))   # some zeros were not looked at
    brackets = brackets[:MAX_ZEROS]
    if not brackets:
        return np.zeros(0)
    which = np.array([b[0] for b in brackets])
    lo = np.array([b[1] for b in brackets])
    hi = np.array([b[2] for b in brackets])
    t = np.linspace(0.0, 1.0, ZOOM_WIDTH)
    rows = np.arange(len(brackets))
    for _ in range(ZOOM_ROUNDS):
        pts = lo[:, None] + (hi - lo)[:, None] * t
        values = _values(expr, dict(env, p=pts.ravel()))
        best = np.zeros(len(brackets), dtype=int)
        for k in np.unique(which):
            sel = which == k
            node, sign = nodes[k]
            v = np.broadcast_to(np.asarray(values[node], dtype=float), pts.size)
            a = np.abs(v.reshape(pts.shape)[sel])
            a = np.where(np.isfinite(a), a, np.inf)
            best[sel] = (a if sign > 0 else -a).argmin(axis=1)
        mid = pts[rows, best]
        lo = pts[rows, np.maximum(best - 1, 0)]
        hi = pts[rows, np.minimum(best + 1, ZOOM_WIDTH - 1)]
    return mid
