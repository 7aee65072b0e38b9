"""Symbolic layer: tree -> SymPy and the deterministic canonical key.

* ``to_sympy(tree, pset)`` -- the expression in symbols ``y`` (plain) and ``p`` (positive: p is
  a softmax output in (0, 1], so |p| = p, max(p, 0) = p, sqrt(p^2) = p hold). Protected
  operations stay opaque (``plog``, ``precip`` from ``ops.py``) so identities that eps
  makes false (log(p^2) vs 2 log(p), p/p = 1) are never applied.
* ``canonical_key(tree, pset, sign)`` -- equal keys imply the same candidate: the same oriented
  gradient on every valid input (DESIGN §5.4). Class-sum sets (``paper``): y is 0 or 1, so
  sum_c f(y_c, p_c) = g1(p_t) + sum_c g0(p_c) with g1 = f(1, .) - f(0, .), g0 = f(0, .); the key
  hashes sign*g1 without its constant and sign*g0 without its affine part (sum_c p_c = 1).
  ``typed``: each reduction becomes the same decomposition, written with opaque ``at_true(g)``
  (g(p_t)) and ``class_sum(g)`` (sum_c g(p_c); sum_c p_c = 1, sum_c 1 = C); the oriented root
  loses its constant terms. Both after ``algebra.normal_form`` (bounded expansion plus exact
  rewrites), on the key path's opaque functions (``kabs``, ``kmax``, ``ksig``, ``kerf``...,
  from ``algebra.py``); constant subtrees with transcendental values become symbols named by
  their exact text. Work is bounded by expression size, never by time; ``sympy.simplify`` is
  never called here.
* ``formula`` / ``latex`` / ``display_expr`` / ``per_class`` -- display only: ``formula.py``,
  which imports this module.

Fed by ``trees.py`` (parsed trees), ``ops.py`` (the SymPy forms) and ``algebra.py``;
used by ``screen.same``, the search's novelty index, ``formula.py``, ``simplify``/``show`` and
``export``.
"""
from __future__ import annotations

import hashlib
import math
from typing import NamedTuple

import numpy as np
import sympy
from deap import gp
from sympy.printing.repr import ReprPrinter

from .algebra import DISPLAY_FORMS, KEY_FORMS, P, add_terms, drop_free_terms, normal_form
from .ops import plog
from .psets import load_pset
from .trees import to_text, var_name

Y = sympy.Symbol("y")                  # one-hot target; substituted explicitly where used
C = sympy.Symbol("C", positive=True, integer=True)  # number of classes (typed set only)
_HEX = 24              # hex digits of sha256 in a key (96 bits)

# Key forms of the typed set: g(p_t) (a per-class function at the true class), sum_c g(p_c).
at_true, class_sum = sympy.Function("at_true"), sympy.Function("class_sum")


# ----------------------------------------------------------------------------- tree -> SymPy

def _number(value) -> sympy.Expr:
    """Exact: a float literal becomes the rational it stores, so no rounding ever merges keys."""
    if isinstance(value, int) or float(value).is_integer():
        return sympy.Integer(int(value))
    return sympy.Rational(float(value))


class _Val(NamedTuple):
    expr: sympy.Expr
    label: str | None = None    # constants only: text that fixes the value exactly
    fval: float | None = None   # constants only: float64 value (numpy reference ops)
    exact: sympy.Expr | None = None  # 'atoms_shown' constants: the exact value, unevaluated


# Ops that map rationals to rationals cheaply; other constant subtrees become atoms/floats.
_RATIONAL_OPS = frozenset({"neg", "add", "sub", "mul", "square", "abs", "relu", "negrelu", "max",
                           "min", "inv1p", "softsign"})


def _float(x) -> float:
    try:
        return float(x)
    except (OverflowError, TypeError, ValueError):
        return math.inf


def _constant(info, vals, mode):
    """A constant subtree. SymPy's auto-evaluation of transcendental constants can take seconds
    (evalf inside Abs/Max sign checks), so unless ``mode`` is 'exact' they become a real symbol
    named by their exact text ('atoms', for keys) or a 6-digit float ('float', for display)."""
    op, exprs = info.op, [v.expr for v in vals]
    with np.errstate(all="ignore"):
        fval = _float(op.numpy(*[np.float64(v.fval) for v in vals]))
    if op.name in _RATIONAL_OPS and all(e.is_Rational and _small(e) for e in exprs):
        r = op.sympy(*exprs)
        if r.is_Rational:
            if mode == "float":
                return _Val(_shown(r, fval), repr(fval), fval)
            return _Val(r, _label(r), _float(r), r)
    label = f"{info.display}({', '.join(v.label for v in vals)})"
    if mode == "float":   # an overflowed constant is +-oo (min(oo, x) = x); NaN is nan
        if math.isnan(fval):
            return _Val(sympy.nan, label, fval)
        return _Val(sympy.Float(fval) if math.isfinite(fval) else sympy.oo * int(math.copysign(1, fval)),
                    label, fval)
    exact = None
    if mode == "atoms_shown" and all(v.exact is not None for v in vals):
        # SymPy's exact value of the constant (tanh(1), sqrt(2)/2): evaluated only on rational
        # arguments, unevaluated above transcendental ones (their exact evaluation -- evalf
        # inside sign checks of exp(exp(exp(e))) -- can take minutes).
        form = DISPLAY_FORMS.get(op.name, op.sympy)
        args = [v.exact for v in vals]
        if all(e.is_Rational and _small(e) for e in args):
            exact = form(*args)
        else:
            with sympy.evaluate(False):
                exact = form(*args)
    return _Val(sympy.Symbol(label, real=True), label, fval, exact)


def _small(r) -> bool:
    """Exact arithmetic only below this size (nested squares double the digits each level)."""
    return max(abs(r.p), r.q).bit_length() <= 1 << 16


def _label(r) -> str:
    """Exact text of a rational (a hash of it when huge: str() of ints over 4300 digits fails)."""
    if max(abs(r.p), r.q).bit_length() < 4096:
        return str(r)
    return "q" + hashlib.sha256(f"{r.p:x}/{r.q:x}".encode()).hexdigest()


def _shown(r, fval):
    """A rational constant for display: small ones exact (1/10 for 0.1), others as floats
    (full precision: the display rounds them only where the value allows)."""
    if not r.is_Integer:
        r = sympy.Rational(repr(fval)) if math.isfinite(fval) else r
    if max(abs(r.p), r.q) <= 10**6:
        return r
    return sympy.Float(fval) if math.isfinite(fval) else sympy.Symbol(repr(fval))


def _leaf(node, pset, y, mode):
    name = var_name(node, pset)
    if name == "p":
        return _Val(P)
    if name == "y":
        return _Val(Y) if y is None else _Val(sympy.Integer(y), str(y), float(y), sympy.Integer(y))
    if name == "logp":  # log-softmax: exactly log p (no eps), unlike the protected log
        return _Val(sympy.log(P))
    if name == "inv_c":
        return _Val(1 / C)
    if name:
        return _Val(sympy.Symbol(name))
    r = _number(node.value)
    if mode == "float":
        return _Val(_shown(r, float(node.value)), repr(float(node.value)), float(node.value))
    if mode == "atoms_shown" and not r.is_Integer:   # 0.1 reads 1/10 (the same double)
        decimal = sympy.Rational(repr(float(node.value)))
        r = decimal if float(decimal) == float(node.value) else r
    return _Val(r, _label(r), float(node.value), r)


# One op applied to the same SymPy arguments gives the same expression. The key's build
# ('atoms') keeps its memo across calls, because a child shares all but one path of its tree
# with its parent and the canonical key is most of the search driver's time; the display's
# builds keep theirs per call (they may run beside ``sympy.evaluate(False)`` code). Bounded.
_KEY_MEMO: dict = {}
_KEY_MEMO_MAX = 50_000


def build_bindings(tree, pset, ys=(None,), reduce=None, constants="exact", labels=None,
                   exact=None):
    """Iterative post-order build, once per binding of y in ``ys`` (None: the symbol y).

    ``reduce(name, args)`` (args: per-argument lists of one expression per binding) replaces
    the opaque reductions (key path of the typed set). Returns one expression per binding.
    ``labels`` (a dict), when given, receives each constant symbol's name -> float64 value;
    ``exact`` (a dict) its exact value, unevaluated ('atoms_shown').
    """
    stack = []
    memo = _KEY_MEMO if constants == "atoms" else {}
    if len(memo) > _KEY_MEMO_MAX:
        memo.clear()
    forms = {"atoms": KEY_FORMS, "float": DISPLAY_FORMS,
             "atoms_shown": DISPLAY_FORMS}.get(constants, {})
    for node in reversed(tree):
        if not isinstance(node, gp.Primitive):
            stack.append([_leaf(node, pset, y, constants) for y in ys])
            continue
        info = pset.prims[node.name]
        args = [stack.pop() for _ in range(node.arity)]
        if info.op.kind == "reduction":
            if reduce is not None:
                value = _Val(reduce(info.op.name, [[v.expr for v in a] for a in args]))
                stack.append([value] * len(ys))
            else:
                stack.append([_Val(info.op.sympy(*[a[i].expr for a in args])) for i in range(len(ys))])
            continue
        out = []
        for i in range(len(ys)):
            vals = [a[i] for a in args]
            if constants != "exact" and all(v.label is not None for v in vals):
                out.append(_constant(info, vals, constants))
                if labels is not None and out[-1].expr.is_Symbol:
                    labels[out[-1].expr.name] = out[-1].fval
                    if exact is not None and out[-1].exact is not None:
                        exact[out[-1].expr] = out[-1].exact
                continue
            key = (info.op.name, tuple(v.expr for v in vals))
            if key not in memo:   # bindings, and a child and its parent, share subtrees
                form = forms.get(info.op.name, info.op.sympy)
                memo[key] = _Val(form(*key[1]))
            out.append(memo[key])
        stack.append(out)
    return [v.expr for v in stack.pop()]


def to_sympy(tree, pset="paper", constants: str = "exact") -> sympy.Expr:
    """The tree as a SymPy expression in ``y`` and ``p`` (typed reductions stay opaque).

    ``constants``: 'exact' applies every op's SymPy form (SymPy may spend seconds evaluating a
    bloated transcendental constant); 'atoms' turns non-rational constant subtrees into real
    symbols named by their text; 'float' into float64 values (display); 'atoms_shown' as
    'atoms' but with the display's readable forms (``formula.per_class``'s exact text).
    """
    return build_bindings(tree, load_pset(pset), constants=constants)[0]


# ----------------------------------------------------------------------------- typed reductions

def _split(g):
    """Additive terms of normalised ``g`` as (p-free coefficient, p-dependent factor)."""
    return [t.as_independent(P, as_Add=False) for t in add_terms(normal_form(g))]


def _at_true(g):
    return sympy.Add(*[c if d == 1 else c * at_true(d) for c, d in _split(g)])


def _class_sum(g):   # sum_c 1 = C, sum_c p_c = 1
    return sympy.Add(*[c * C if d == 1 else c if d == P else c * class_sum(d) for c, d in _split(g)])


def _reduce_onehot(name, args):
    """A reduction with one-hot y, as at_true/class_sum of functions of p alone.

    ``args``: per argument, its value with y = 1 and with y = 0."""
    forms = {"mse": lambda a, b: (a - b) ** 2, "kl": lambda a, b: a * (plog(a) - plog(b)),
             "ce": lambda a, b: -a * plog(b), "dot": lambda a, b: a * b, "sum": lambda a: a}
    e1 = forms[name](*[a[0] for a in args])
    e0 = forms[name](*[a[1] for a in args])
    total = _at_true(e1 - e0) + _class_sum(e0)
    return total / C if name == "mse" else total


# ----------------------------------------------------------------------------- the key

def is_unusable(expr) -> bool:
    return expr.has(sympy.zoo, sympy.oo, -sympy.oo, sympy.nan)


class _MemoRepr(ReprPrinter):
    """``sympy.srepr``'s printer, with each subexpression's text kept across calls: a child's
    normal form shares most subterms with its parent's, and the text of a node is a function of
    the node alone (equal SymPy objects print alike), so the digests are srepr's own."""

    def _print(self, expr, **kwargs):
        if kwargs or not isinstance(expr, sympy.Basic):
            return super()._print(expr, **kwargs)
        text = _SREPR_MEMO.get(expr)
        if text is None:
            text = super()._print(expr)
            if len(_SREPR_MEMO) >= _KEY_MEMO_MAX:
                _SREPR_MEMO.clear()
            _SREPR_MEMO[expr] = text
        return text


_SREPR_MEMO: dict = {}
_REPR = _MemoRepr()


def _srepr(expr) -> str:
    return _REPR.doprint(expr)


def _digest(pset, *parts) -> str:
    payload = "\n".join(parts).encode("utf-8")
    return f"{pset.name}:{hashlib.sha256(payload).hexdigest()[:_HEX]}"


def _key_of(tree, pset, sign):
    if pset.class_sum and {"y", "p"} <= set(pset.terminals):
        f1, f0 = build_bindings(tree, pset, ys=(1, 0), constants="atoms")
        g1 = drop_free_terms(normal_form(sign * (f1 - f0)), affine=False)
        g0 = drop_free_terms(normal_form(sign * f0), affine=True)
        if is_unusable(g1) or is_unusable(g0):
            return None
        if g1 == 0 and g0 == 0:
            return f"{pset.name}:constant"
        return _digest(pset, "g1", _srepr(g1), "g0", _srepr(g0))
    onehot = {"y", "p"} <= set(pset.terminals) and not pset.class_sum
    if onehot:
        root = build_bindings(tree, pset, ys=(1, 0), reduce=_reduce_onehot, constants="atoms")[0]
    else:
        root = build_bindings(tree, pset, constants="atoms")[0]
    if is_unusable(root):
        return None
    root = drop_free_terms(normal_form(sign * root), affine=False, onehot=onehot)
    if root == 0:
        return f"{pset.name}:constant"
    return _digest(pset, "root", _srepr(root))


_CACHE: dict = {}
_CACHE_MAX = 8192


def _key_guarded(tree, pset, sign, text):
    try:
        key = _key_of(tree, pset, sign)
    except (ValueError, TypeError, ArithmeticError, RecursionError, NotImplementedError):
        key = None
    # Fallback when the algebra cannot be trusted: the exact text only matches itself.
    return key or _digest(pset, "text", text, str(sign))


def canonical_key(tree, pset="paper", sign: int = 1) -> str:
    """Deterministic key: equal keys => same oriented gradient on every valid input.

    ``sign`` is the integrity check's orientation (+1 when it rejected). Constant losses all
    get ``"<pset>:constant"``. Cached per (set, expression text, sign) within a process.
    """
    pset = load_pset(pset)
    if sign not in (1, -1):
        raise ValueError("sign must be +1 or -1")
    text = to_text(tree, pset)
    cache_key = (pset.source, pset.name, text, int(sign))
    key = _CACHE.get(cache_key)
    if key is None:
        key = _key_guarded(tree, pset, int(sign), text)
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.clear()   # simple and deterministic; keys are cheap to recompute
        _CACHE[cache_key] = key
    return key
