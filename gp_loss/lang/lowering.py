"""Display lowering: a SymPy expression with protected operations -> plain SymPy that equals it.

The key path keeps ``plog`` (ln(|x| + eps)) and ``precip`` (1/(x + eps)) opaque; a reader needs
plain mathematics. ``lower(expr, domain)`` writes each protected node either plainly (``log(x)``,
``1/x``) or with its eps shown (``log(x + 1e-07)``, ``1/(x + 1e-07)``), choosing the plain form
only when the *whole* expression then still agrees with the loss on the loss domain (y in
{0, 1}, p in [1e-4, 1 - 1e-4]; for the typed set one-hot rows and softmax rows). Constants
whose value eps decides (``1/(0 + eps)``) fold to their exact number. ``on_domain`` writes a
max, min or abs that the domain decides as the argument it equals; ``round_constants`` rounds
floats to the fewest digits (6, 10, 17) for which the expression still agrees.

Every decision is a fixed computation on fixed points, made with ``domain.py``'s evaluator,
points and agreement test, so the shown formula is a pure function of the expression -- never
of time or load.

Fed by ``domain.py``, ``ops.py`` (EPS, the protected functions) and ``algebra.py`` (the opaque
display functions); used by ``formula.py``.
"""
from __future__ import annotations

import math

import numpy as np
import sympy

from .algebra import nonneg, kabs, kmax, kmin
from .domain import FUNCS, RTOL, Unevaluable, agree, evaluate, near_zeros
from .ops import EPS, plog, precip

DECIDE_RTOL = 2e-7   # a plain form is chosen only with this margin, so RTOL holds everywhere
ROUNDED_RTOL = 1e-5  # a formula with 6-digit constants (the promise there is 2e-5)
MAX_DECISIONS = 48   # protected nodes beyond this many keep their eps form (bounded work)
_EPS = sympy.Float(EPS)


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
                and new.func in FUNCS:
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
