"""Display lowering: a SymPy expression with protected operations -> plain SymPy that equals it.

The key path keeps ``plog`` (ln(|x| + eps)) and ``precip`` (1/(x + eps)) opaque; a reader needs
plain mathematics. ``lower(expr, domain)`` writes each protected node either plainly (``log(x)``,
``1/x``) or with its eps shown (``log(x + 1e-07)``, ``1/(x + 1e-07)``), choosing the plain form
only when the *whole* expression then still agrees with the loss on the loss domain (y in
{0, 1}, p in [1e-4, 1 - 1e-4]; for the typed set one-hot rows and softmax rows). Constants
whose value eps decides (``1/(0 + eps)``) fold to their exact number. ``round_constants``
rounds floats to the fewest digits (6, 10, 17) for which the expression still agrees.

``evaluate(expr, env)`` is a small numpy walker over SymPy nodes (no lambdify: nothing is
compiled), used for those decisions; every decision is a fixed computation on a fixed grid,
so the shown formula is a pure function of the expression -- never of time or load.

Fed by ``ops.py`` (EPS, the protected functions, the typed reductions' numpy forms)
and ``algebra.py`` (the opaque display functions); used by ``formula.py``.
"""
from __future__ import annotations

import math

import numpy as np
import sympy
from scipy import special as sps

from .algebra import nonneg, kabs, kI0, kI1, kmax, kmin, ksig
from .ops import EPS, REDUCTIONS, plog, precip

RTOL = 1e-6          # what a shown formula promises (relative; see ``agree``)
DECIDE_RTOL = 2e-7   # a plain form is chosen only with this margin, so RTOL holds everywhere
ROUNDED_RTOL = 1e-5  # a formula with 6-digit constants (the promise there is 2e-5)
FLOOR = 1e-6         # values below FLOOR * (largest value) count as that size (zero crossings)
MAX_DECISIONS = 48   # protected nodes beyond this many keep their eps form (bounded work)
_EPS = sympy.Float(EPS)


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


_FUNCS = {
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
    if func in _FUNCS:
        return _FUNCS[func](*args)
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


def bottom_up(expr, rule):
    """``expr`` rebuilt from its leaves up: ``rule(node, args)`` (args: the node's arguments,
    already rebuilt) gives each inner node's replacement; atoms stay. Shared subtrees once."""
    memo: dict = {}
    for node in sympy.postorder_traversal(expr):
        if node not in memo:
            memo[node] = node if node.is_Atom or not node.args else \
                rule(node, [memo[a] for a in node.args])
    return memo[expr]


# ----------------------------------------------------------------------------- the domain decides

MAX_DECIDED = 64   # max/min/abs nodes looked at, at most (bounded work)
_MAXES = (kmax, sympy.Max)
_MINMAX = (kmax, sympy.Max, kmin, sympy.Min)


def on_domain(expr, dom: dict):
    """``expr`` with each max/min/abs that the (class-sum) domain decides written as the
    argument it always equals: on p in [1e-4, 1 - 1e-4], min(1, sin(p)) is sin(p), abs(sin(p))
    is sin(p), max(0, exp(-p)*i1(p)) is exp(-p)*i1(p). Decided on the grid plus the points
    around each zero of the difference (``near_zeros``), so a crossing between grid points
    keeps the node. Per-sample domains (rows) are left alone."""
    if np.ndim(dom.get("p")) != 1:
        return expr
    budget = [MAX_DECIDED]

    def rule(node, args):
        new = node if args == list(node.args) else node.func(*args)
        if (new.func in _MINMAX or new.func in (kabs, sympy.Abs)) and new.free_symbols \
                and budget[0] > 0:
            budget[0] -= 1
            new = _decided(new, dom)
        return new
    return bottom_up(expr, rule)


def _decided(node, dom):
    if node.func in (kabs, sympy.Abs):
        x = node.args[0]
        s = _sign_on(x, dom)
        return x if s > 0 else -x if s < 0 else node
    if len(node.args) != 2:
        return node
    a, b = node.args
    s = _sign_on(a - b, dom)          # +1: a >= b everywhere on the domain
    if s == 0:
        return node
    return a if (s > 0) == (node.func in _MAXES) else b


def _sign_on(x, dom) -> int:
    """+1 when ``x`` >= 0 on the domain, -1 when <= 0, 0 when neither (or not finite)."""
    try:
        capped: list = []
        values = np.asarray(evaluate(x, near_zeros(x, dom, capped)), dtype=float)
        if capped:   # more zeros than were looked at: a crossing may hide among them
            return 0
    except Unevaluable:
        return 0
    if not np.all(np.isfinite(values)):
        return 0
    return 1 if np.all(values >= 0) else -1 if np.all(values <= 0) else 0


# ----------------------------------------------------------------------------- lowering

def _eps_form(node, arg, eps):
    if node.func is plog:
        return sympy.log((arg if nonneg(arg) else kabs(arg)) + eps)
    return 1 / (arg + eps)


def _plain_form(node, arg):
    if node.func is plog:
        return sympy.log(arg if nonneg(arg) else kabs(arg))
    return 1 / arg


def _protected_nodes(expr):
    """Distinct protected nodes, innermost first (a deterministic order)."""
    seen, out = set(), []
    for node in sympy.postorder_traversal(expr):
        if node.func in (plog, precip) and node not in seen:
            seen.add(node)
            out.append(node)
    return out


def _rebuild(expr, plain: set, eps=_EPS):
    """``expr`` with each protected node in its plain (in ``plain``) or eps form; numbers of
    protected functions (and of opaque functions SymPy leaves unevaluated) are folded."""
    def rule(node, args):
        if node.func in (plog, precip):
            arg = args[0]
            if arg.is_Float or (arg.is_Number and eps.is_Float):
                return sympy.Float(float(evaluate(node.func(arg), {})))
            return _plain_form(node, arg) if node in plain else _eps_form(node, arg, eps)
        new = node.func(*args)
        if eps.is_Float and new.args and all(a.is_Number for a in new.args) \
                and new.func in _FUNCS:
            value = float(evaluate(new, {}))
            new = sympy.Float(value) if math.isfinite(value) else new
        return new
    return bottom_up(expr, rule)


def _plain_finite(node, plain, dom, eps) -> bool:
    """Whether the plain form's argument, as it would be shown (``plain``: the nodes already
    read plainly), is never 0 on ``dom`` where it is finite (so 1/x and log(|x|) are finite
    wherever the protected form is)."""
    try:
        arg = np.asarray(evaluate(_rebuild(node.args[0], plain, eps), dom), dtype=float)
    except Unevaluable:
        return False
    return not np.any(arg[np.isfinite(arg)] == 0)


EXACT_EPS = sympy.Rational(1, 10**7)   # eps as the exact decimal (exact per-class texts)


def lower(expr, dom: dict, eps=_EPS):
    """Plain SymPy equal to ``expr`` on ``dom``: protected nodes read plainly where the whole
    expression still agrees (within DECIDE_RTOL), with their eps otherwise (``eps``: the
    float 1e-07, or EXACT_EPS to keep exact constants exact)."""
    try:
        reference = evaluate(expr, dom)
    except Unevaluable:
        return _rebuild(expr, set(), eps)
    plain: set = set()
    for node in _protected_nodes(expr)[:MAX_DECISIONS]:
        if not _plain_finite(node, plain, dom, eps):
            continue   # 1/0 or log(0) on the domain: a reader would see an infinite
        trial = plain | {node}
        try:
            ok = agree(evaluate(_rebuild(expr, trial, eps), dom), reference, DECIDE_RTOL,
                       dom.get("y"))
        except Unevaluable:
            ok = False
        if ok:
            plain = trial
    return _rebuild(expr, plain, eps)


def _short(f, digits: int):
    value = float(format(float(f), f".{digits}g"))
    if value.is_integer() and abs(value) < 1e15:
        return sympy.Integer(int(value))
    return sympy.Float(value)


def _significant(value) -> int:
    if value.is_Integer:
        return len(str(abs(int(value))).rstrip("0"))
    mantissa = repr(float(value)).partition("e")[0]
    return len(mantissa.replace("-", "").replace(".", "").lstrip("0").rstrip("0"))


MAX_ROUNDED = 24   # constants rounded one by one up to this many (else all at once)


def round_constants(expr, reference, dom: dict):
    """(``expr`` with each float at 6, 10 or 17 significant digits -- the fewest for which the
    expression still agrees with ``reference``, decided constant by constant in a fixed order
    --, whether a 5-6 digit constant is shown). Integral values become integers (``1*p`` reads
    ``p``). A constant that places a zero or a pole (p - sigmoid(1) under 1/x) keeps all its
    digits while its neighbours may read short."""
    floats = sorted(expr.atoms(sympy.Float), key=sympy.default_sort_key)
    if not floats:
        return expr, False
    groups = [[f] for f in floats] if len(floats) <= MAX_ROUNDED else [floats]
    chosen = {f: _short(f, 17) for f in floats}

    def visible(swap):
        return any(_significant(g) >= 5 and _significant(g) <= 6 and float(g) != float(f)
                   for f, g in swap.items())

    def fits(swap):
        # The looser promise holds only where the text shows that it rounded (5-6 digits
        # visible); 1.0000001 rounded to 1 must meet the full one.
        try:
            value = evaluate(expr.xreplace(swap), dom)
        except Unevaluable:
            return False
        return agree(value, reference, ROUNDED_RTOL if visible(swap) else RTOL / 2,
                     dom.get("y"))

    for group in groups:
        for digits in (6, 10):
            trial = {**chosen, **{f: _short(f, digits) for f in group}}
            if all(float(trial[f]) == float(f) for f in group) or fits(trial):
                chosen = trial
                break
    return expr.xreplace(chosen), visible(chosen)
