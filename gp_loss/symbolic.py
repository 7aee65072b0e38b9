"""Symbolic layer: tree -> SymPy, the deterministic canonical key, readable formulas.

* ``to_sympy(tree, pset)`` -- the expression in symbols ``y`` (plain) and ``p`` (positive: p is
  a softmax output in (0, 1], so |p| = p, max(p, 0) = p, sqrt(p^2) = p hold). Protected
  operations stay opaque (``plog``, ``precip`` from ``primitives.py``) so identities that eps
  makes false (log(p^2) vs 2 log(p), p/p = 1) are never applied.
* ``canonical_key(tree, pset, sign)`` -- equal keys imply the same candidate: the same oriented
  gradient on every valid input (DESIGN §5.4). Class-sum sets (``paper``): y is 0 or 1, so
  sum_c f(y_c, p_c) = g1(p_t) + sum_c g0(p_c) with g1 = f(1, .) - f(0, .), g0 = f(0, .); the key
  hashes sign*g1 without its constant and sign*g0 without its affine part (sum_c p_c = 1).
  ``typed``: each reduction becomes the same decomposition, written with opaque ``at_true(g)``
  (g(p_t)) and ``class_sum(g)`` (sum_c g(p_c); sum_c p_c = 1, sum_c 1 = C); the oriented root
  loses its constant terms. Both after ``normal_form``: a bounded expansion (``MAX_TERMS``)
  plus exact rewrites (|x| and max/min decided on p in [0, 1], odd/even functions, sigmoid(-x)
  = 1 - sigmoid(x), tanh = 2 sigmoid(2x) - 1, A/(1 + A) = 1 - 1/(1 + A), ...). The key path uses
  its own opaque SymPy functions (``kabs``, ``kmax``, ``ksig``, ``kerf``...) because SymPy's
  assumption queries on Abs/Max/besseli can take seconds, and turns constant subtrees with
  transcendental values into symbols named by their exact text. Work is bounded by expression
  size, never by time; ``sympy.simplify`` is never called there.
* ``formula`` / ``latex`` -- display only: ``simplify`` when the expression is small, under a
  time budget (SIGALRM, main thread only), else the raw form. ``log``, ``div`` and ``recip``
  shown there are the protected forms: ln(|x| + eps), a/(b + eps), 1/(x + eps); constants with
  transcendental values are shown to 6 digits.

Fed by ``trees.py`` (parsed trees) and ``primitives.py`` (the SymPy forms); used by
``screen.same``, the search's novelty index, ``simplify``/``show`` and ``export``.
"""
from __future__ import annotations

import hashlib
import math
import signal
import threading
from typing import NamedTuple

import numpy as np
import sympy
from deap import gp
from sympy.printing.latex import LatexPrinter
from sympy.printing.str import StrPrinter

from .primitives import EPS, plog, precip
from .psets import load_pset
from .trees import to_text, var_name

P = sympy.Symbol("p", positive=True)   # softmax output: in (0, 1]
Y = sympy.Symbol("y")                  # one-hot target; substituted explicitly where used
C = sympy.Symbol("C", positive=True, integer=True)  # number of classes (typed set only)
MAX_TERMS = 256       # expansion of one node is skipped when it would exceed this many terms
SIMPLIFY_MAX_OPS = 20  # display: sympy.simplify only on expressions at most this large
_HEX = 24              # hex digits of sha256 in a key (96 bits)
_EPS = sympy.Rational(EPS)  # the exact double the printed code uses


# Key forms of the typed set: g(p_t) (a per-class function at the true class), sum_c g(p_c).
at_true, class_sum = sympy.Function("at_true"), sympy.Function("class_sum")


def _nonneg(x) -> bool:
    """Structurally >= 0 for every real value of the symbols (every expression here is real)."""
    if x.is_Number:
        return x >= 0
    if x == P or isinstance(x, (kabs, sympy.exp, ksig, kI0)):
        return True
    if isinstance(x, kmax):
        return any(_nonneg(a) for a in x.args)
    if isinstance(x, kmin):
        return all(_nonneg(a) for a in x.args)
    if x.is_Pow:
        return (x.exp.is_Integer and x.exp.is_even) or _nonneg(x.base)
    if x.is_Mul or x.is_Add:
        return all(_nonneg(a) for a in x.args)
    return False


class kabs(sympy.Function):
    """|x| on real expressions without SymPy's assumption queries (which can take 100s of ms)."""

    nargs = 1
    is_extended_real = True
    is_extended_nonnegative = True

    def _eval_power(self, e):
        if e.is_Integer and e.is_even:   # |x|^2k = x^2k for real x
            return self.args[0] ** e
        return None

    @classmethod
    def eval(cls, x):
        if x.is_Number:
            return abs(x)
        if isinstance(x, kabs) or _nonneg(x):
            return x
        if x.could_extract_minus_sign():
            return cls(-x)
        s = _linear_unit_sign(x)
        if s:
            return s * x
        if x.is_Mul:
            pos = [f for f in x.args if _nonneg(f)]
            if pos:
                return sympy.Mul(*pos) * cls(sympy.Mul(*[f for f in x.args if not _nonneg(f)]))
        return None


class ksig(sympy.Function):
    """sigmoid(x), with sigmoid(-x) written 1 - sigmoid(x) so both spellings meet (key form)."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x == 0:
            return sympy.Rational(1, 2)
        if x.could_extract_minus_sign():
            return 1 - cls(-x)
        return None


class _MinMax(sympy.Function):
    """max/min(a, b) without assumption queries; arguments in a canonical order."""

    nargs = 2
    is_max = True

    @classmethod
    def eval(cls, a, b):
        if a == b:
            return a
        if a.is_Number and b.is_Number:
            return max(a, b) if cls.is_max else min(a, b)
        s = _linear_unit_sign(a - b)   # p <= 1 decides e.g. max(1, p) = 1
        if not s and b == 0 and _nonneg(a):
            s = 1
        if not s and a == 0 and _nonneg(b):
            s = -1
        if s:
            return a if (s > 0) == cls.is_max else b
        if sympy.default_sort_key(b) < sympy.default_sort_key(a):
            return cls(b, a)
        return None


kmax = type("kmax", (_MinMax,), {"__module__": __name__})
kmin = type("kmin", (_MinMax,), {"__module__": __name__, "is_max": False})


def _parity_function(name, odd: bool, at_zero):
    """An opaque odd/even function (SymPy's own erf, besseli... run costly real/imag queries)."""

    def eval(cls, x):
        if x == 0:
            return sympy.Integer(at_zero)
        if x.could_extract_minus_sign():
            return -cls(-x) if odd else cls(-x)
        return None

    return type(name, (sympy.Function,), {"nargs": 1, "eval": classmethod(eval),
                                          "__module__": __name__})


kerf, ksin, ksinh, kasinh, katan, kI1 = (_parity_function(n, True, 0) for n in (
    "kerf", "ksin", "ksinh", "kasinh", "katan", "kI1"))
kI0 = _parity_function("kI0", False, 1)

# The key path's forms of the ops SymPy would otherwise run assumption queries on.
_KEY_FORMS = {
    "erf": kerf,
    "erfc": lambda x: 1 - kerf(x),
    "sin": ksin,
    "sinh": ksinh,
    "asinh": kasinh,
    "atan": katan,
    "i0": kI0,
    "i1": kI1,
    "abs": kabs,
    "relu": lambda x: kmax(x, 0),
    "negrelu": lambda x: kmin(x, 0),
    "max": kmax,
    "min": kmin,
    "sqrt": lambda x: sympy.sqrt(kabs(x)),
    "inv1p": lambda x: 1 / (1 + kabs(x)),
    "softsign": lambda x: x / (1 + kabs(x)),
    "i0e": lambda x: sympy.exp(-kabs(x)) * kI0(x),
    "i1e": lambda x: sympy.exp(-kabs(x)) * kI1(x),
    "sigmoid": lambda x: ksig(x),
    "dsigmoid": lambda x: ksig(x) * (1 - ksig(x)),
    "tanh": lambda x: 2 * ksig(2 * x) - 1,                 # tanh(x) = 2 sigmoid(2x) - 1
    "dtanh": lambda x: 1 - (2 * ksig(2 * x) - 1) ** 2,
}
# Display uses the cheap, readable ones of these (the printers below name them back).
_DISPLAY_FORMS = {k: _KEY_FORMS[k] for k in (
    "abs", "relu", "negrelu", "max", "min", "sqrt", "inv1p", "softsign", "i0", "i1", "i0e", "i1e",
    "sigmoid", "dsigmoid")}


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
            return _Val(r, _label(r), _float(r))
    label = f"{info.display}({', '.join(v.label for v in vals)})"
    if mode == "float" and math.isfinite(fval):
        return _Val(sympy.Float(fval, 6), label, fval)
    return _Val(sympy.Symbol(label, real=True), label, fval)


def _small(r) -> bool:
    """Exact arithmetic only below this size (nested squares double the digits each level)."""
    return max(abs(r.p), r.q).bit_length() <= 1 << 16


def _label(r) -> str:
    """Exact text of a rational (a hash of it when huge: str() of ints over 4300 digits fails)."""
    if max(abs(r.p), r.q).bit_length() < 4096:
        return str(r)
    return "q" + hashlib.sha256(f"{r.p:x}/{r.q:x}".encode()).hexdigest()


def _shown(r, fval):
    """A rational constant for display: small ones exact (1/10 for 0.1), others 6 digits."""
    if not r.is_Integer:
        r = sympy.Rational(repr(fval)) if math.isfinite(fval) else r
    if max(abs(r.p), r.q) <= 10**6:
        return r
    return sympy.Float(fval, 6) if math.isfinite(fval) else sympy.Symbol(repr(fval))


def _leaf(node, pset, y, mode):
    name = var_name(node, pset)
    if name == "p":
        return _Val(P)
    if name == "y":
        return _Val(Y) if y is None else _Val(sympy.Integer(y), str(y), float(y))
    if name:
        return _Val(sympy.Symbol(name))
    r = _number(node.value)
    if mode == "float":
        return _Val(_shown(r, float(node.value)), repr(float(node.value)), float(node.value))
    return _Val(r, _label(r), float(node.value))


def _walk(tree, pset, ys=(None,), reduce=None, constants="exact"):
    """Iterative post-order build, once per binding of y in ``ys`` (None: the symbol y).

    ``reduce(name, args)`` (args: per-argument lists of one expression per binding) replaces
    the opaque reductions (key path of the typed set). Returns one expression per binding.
    """
    stack, memo = [], {}
    forms = {"atoms": _KEY_FORMS, "float": _DISPLAY_FORMS}.get(constants, {})
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
                continue
            key = (info.op.name, tuple(v.expr for v in vals))
            if key not in memo:   # bindings often share subtrees (no y below)
                form = forms.get(info.op.name, info.op.sympy)
                memo[key] = _Val(form(*key[1]))
            out.append(memo[key])
        stack.append(out)
    return [v.expr for v in stack.pop()]


def to_sympy(tree, pset="paper", constants: str = "exact") -> sympy.Expr:
    """The tree as a SymPy expression in ``y`` and ``p`` (typed reductions stay opaque).

    ``constants``: 'exact' applies every op's SymPy form (SymPy may spend seconds evaluating a
    bloated transcendental constant); 'atoms' turns non-rational constant subtrees into real
    symbols named by their text; 'float' into 6-digit floats (display).
    """
    return _walk(tree, load_pset(pset), constants=constants)[0]


# ----------------------------------------------------------------------------- bounded normal form

def _terms(e):
    return sympy.Add.make_args(e)


def _distribute(factors):
    """Product of sums as one expanded sum, or None when it would exceed MAX_TERMS."""
    if math.prod(len(_terms(f)) for f in factors) > MAX_TERMS:
        return None
    acc = [sympy.Integer(1)]
    for f in factors:
        acc = [a * t for a in acc for t in _terms(f)]
    return sympy.Add(*acc)


def _linear_unit_sign(e):
    """+1 / -1 when ``e`` = a + b*p (rational a, b) is >= 0 / <= 0 on all of [0, 1], else 0."""
    a = b = sympy.Integer(0)
    for term in _terms(e):
        coeff, dep = term.as_independent(P, as_Add=False)
        if not coeff.is_Rational:
            return 0
        if dep == 1:
            a += coeff
        elif dep == P:
            b += coeff
        else:
            return 0
    lo, hi = a, a + b   # a linear function's extremes on [0, 1] are at the ends
    if lo >= 0 and hi >= 0:
        return 1
    if lo <= 0 and hi <= 0:
        return -1
    return 0


def _rebuild(node, args):
    """One node of the normal form from normalised arguments (every rewrite is exact)."""
    if node.is_Add:
        return sympy.Add(*args)
    if node.is_Mul:
        m = sympy.Mul(*args)
        if m.is_Mul and any(f.is_Add for f in m.args):
            m = _distribute(m.args) or m
        return sympy.Add(*[_proper(t) for t in _terms(m)])
    if node.is_Pow:
        m = sympy.Pow(*args)
        if m.is_Pow and m.exp == -1 and m.base.is_Add and len(m.base.args) == 2 \
                and sympy.Integer(1) in m.base.args:
            other = m.base - 1
            if isinstance(other, sympy.exp):             # 1/(1 + exp(t)) = sigmoid(-t)
                return ksig(-other.args[0])
        if m.is_Pow and m.base.is_Add and m.exp.is_Integer and abs(m.exp) >= 2:
            n, k = int(abs(m.exp)), len(m.base.args)
            if math.comb(n + k - 1, k - 1) <= MAX_TERMS:
                full = sympy.expand_multinomial(sympy.Pow(m.base, n), deep=False)
                return full if m.exp > 0 else sympy.Pow(full, -1)
        return m
    func = node.func
    if func is plog:   # ln(||x|| + eps) = ln(|-x| + eps) = ln(|x| + eps)
        (x,) = args
        x = x.args[0] if isinstance(x, kabs) else x
        return plog(-x if x.could_extract_minus_sign() else x)
    if func is sympy.exp and isinstance(args[0], plog):   # exp(ln(|x| + eps)) = |x| + eps
        return kabs(args[0].args[0]) + _EPS
    return func(*args)


def _proper(term, steps: int = 4):
    """A/(1 + A) -> 1 - 1/(1 + A) (repeatedly, at most ``steps`` times): e.g. softsign(p) =
    p/(1 + p) and 1 - inv1p(p) meet. Returns a sum."""
    out, todo = [], [term]
    while todo:
        t = todo.pop()
        if steps <= 0 or not t.is_Mul:
            out.append(t)
            continue
        for f in t.args:
            if f.is_Pow and f.exp == -1 and f.base.is_Add and sympy.Integer(1) in f.base.args:
                a = f.base - 1
                rest = [g for g in t.args if g is not f]
                need = list(sympy.Mul.make_args(a))
                if a.is_Add or a.as_coeff_Mul()[0] != 1 or any(n not in rest for n in need):
                    continue
                for n in need:
                    rest.remove(n)
                q = sympy.Mul(*rest)
                steps -= 1
                todo.extend([q, -q * f])
                break
        else:
            out.append(t)
    return sympy.Add(*out)


def normal_form(expr) -> sympy.Expr:
    """Bounded expansion plus a few exact rewrites, bottom-up and iterative; deterministic."""
    expr = sympy.sympify(expr)
    memo = {}
    stack = [(expr, False)]
    while stack:
        node, ready = stack.pop()
        if node in memo:
            continue
        if not node.args or node.is_Atom:
            memo[node] = node
        elif ready:
            memo[node] = _rebuild(node, [memo[a] for a in node.args])
        else:
            stack.append((node, True))
            stack.extend((a, False) for a in node.args if a not in memo)
    return memo[expr]


def _drop(expr, affine: bool, onehot: bool = True):
    """Drop additive terms free of p (and c*p when ``affine``: sum_c p_c = 1).

    Without the one-hot reading (a user set whose terminals are not y and p) only terms free
    of every symbol are constants."""
    keep = []
    for term in _terms(expr):
        if not (term.has(P) if onehot else term.free_symbols):
            continue
        if affine and term.as_independent(P, as_Add=False)[1] == P:
            continue
        keep.append(term)
    return sympy.Add(*keep)


# ----------------------------------------------------------------------------- typed reductions

def _split(g):
    """Additive terms of normalised ``g`` as (p-free coefficient, p-dependent factor)."""
    return [t.as_independent(P, as_Add=False) for t in _terms(normal_form(g))]


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

def _bad(expr) -> bool:
    return expr.has(sympy.zoo, sympy.oo, -sympy.oo, sympy.nan)


def _digest(pset, *parts) -> str:
    payload = "\n".join(parts).encode("utf-8")
    return f"{pset.name}:{hashlib.sha256(payload).hexdigest()[:_HEX]}"


def _key_of(tree, pset, sign):
    if pset.class_sum and {"y", "p"} <= set(pset.terminals):
        f1, f0 = _walk(tree, pset, ys=(1, 0), constants="atoms")
        g1 = _drop(normal_form(sign * (f1 - f0)), affine=False)
        g0 = _drop(normal_form(sign * f0), affine=True)
        if _bad(g1) or _bad(g0):
            return None
        if g1 == 0 and g0 == 0:
            return f"{pset.name}:constant"
        return _digest(pset, "g1", sympy.srepr(g1), "g0", sympy.srepr(g0))
    onehot = {"y", "p"} <= set(pset.terminals) and not pset.class_sum
    if onehot:
        root = _walk(tree, pset, ys=(1, 0), reduce=_reduce_onehot, constants="atoms")[0]
    else:
        root = _walk(tree, pset, constants="atoms")[0]
    if _bad(root):
        return None
    root = _drop(normal_form(sign * root), affine=False, onehot=onehot)
    if root == 0:
        return f"{pset.name}:constant"
    return _digest(pset, "root", sympy.srepr(root))


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


# ----------------------------------------------------------------------------- display

def _precip_split(expr):
    """Numerator and denominator of a product whose protected reciprocals go below the bar."""
    num, den = [], []
    for f in expr.as_ordered_factors():
        if isinstance(f, precip):
            den.append(f.args[0])
        elif f.is_Pow and isinstance(f.base, precip) and f.exp.is_Integer and f.exp > 0:
            den.append(f.base.args[0] ** f.exp)
        else:
            num.append(f)
    return num, den


_NAMES = {"kabs": "abs", "kmax": "max", "kmin": "min", "ksig": "sigmoid", "kI0": "i0", "kI1": "i1",
          "csum": "sum", "class_sum": "sum"}


class _Str(StrPrinter):
    def _print_precip(self, expr):
        return "1/" + self.parenthesize(expr.args[0], 50, strict=True)

    def _print_Float(self, expr):
        return format(float(expr), ".6g")

    def _print_Function(self, expr):
        name = _NAMES.get(type(expr).__name__)
        if name is None:
            return super()._print_Function(expr)
        return f"{name}({', '.join(self._print(a) for a in expr.args)})"

    def _print_Mul(self, expr):
        num, den = _precip_split(expr)
        if not den:
            return super()._print_Mul(expr)
        if expr.could_extract_minus_sign():
            return "-" + self._print(-expr)
        top = self.parenthesize(sympy.Mul(*num), 50) if num else "1"
        return f"{top}/{self.parenthesize(sympy.Mul(*den), 50, strict=True)}"


class _Latex(LatexPrinter):
    def _print_precip(self, expr):
        return r"\frac{1}{%s}" % self._print(expr.args[0])

    def _print_Float(self, expr):
        mantissa, _, power = format(float(expr), ".6g").partition("e")
        return mantissa if not power else r"%s \cdot 10^{%d}" % (mantissa, int(power))

    def _print_Function(self, expr, exp=None):
        args = ", ".join(self._print(a) for a in expr.args)
        form = {"kabs": r"\left|%s\right|", "kmax": r"\max\left(%s\right)",
                "kmin": r"\min\left(%s\right)", "ksig": r"\sigma\left(%s\right)",
                "kI0": r"I_{0}\left(%s\right)", "kI1": r"I_{1}\left(%s\right)"}.get(type(expr).__name__)
        if form is None:
            return super()._print_Function(expr, exp)
        text = form % args
        return text if exp is None else r"%s^{%s}" % (text, exp)

    def _print_csum(self, expr, exp=None):
        arg = expr.args[0]
        body = self._print(arg)
        return r"\sum_{c} " + (body if arg.is_Atom else r"\left(%s\right)" % body)

    def _print_Mul(self, expr):
        num, den = _precip_split(expr)
        if not den:
            return super()._print_Mul(expr)
        if expr.could_extract_minus_sign():
            return "- " + self._print(-expr)
        top = self._print(sympy.Mul(*num)) if num else "1"
        return r"\frac{%s}{%s}" % (top, self._print(sympy.Mul(*den)))


class _Timeout(BaseException):
    """Raised by the display budget's alarm (BaseException so SymPy cannot swallow it)."""


def _budgeted(fn, budget_s):
    """fn() under a SIGALRM budget, or None (timeout; not the main thread; a timer in use)."""
    if budget_s is None or budget_s <= 0 or not hasattr(signal, "setitimer") \
            or threading.current_thread() is not threading.main_thread() \
            or signal.getitimer(signal.ITIMER_REAL)[0] > 0:
        return None

    def _alarm(signum, frame):
        raise _Timeout()

    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, budget_s)
        try:
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Timeout:
        return None
    finally:
        signal.signal(signal.SIGALRM, previous)


def _rank(expr):
    try:
        text = sympy.srepr(expr)
    except ValueError:   # an integer too long to print
        return (math.inf, 0, "")
    return (sympy.count_ops(expr), len(text), text)


def _display(tree, pset, budget_s):
    """(expression to show, whether it is final: not cut short by the budget or a thread)."""
    raw = to_sympy(tree, pset, constants="float")
    if sympy.count_ops(raw) > SIMPLIFY_MAX_OPS:
        return raw, True
    simple = _budgeted(lambda: sympy.simplify(raw), budget_s)
    if simple is None or _bad(simple):
        return raw, simple is not None
    return min([raw, simple], key=_rank), True


def display_expr(tree, pset="paper", budget_s: float = 1.0) -> sympy.Expr:
    """The expression to show: ``simplify``'s result when the expression is small (at most
    SIMPLIFY_MAX_OPS operations) and it is shorter, else the raw form. Chosen by size, so the
    result is deterministic unless the budget runs out (then the raw form is shown).

    Cached per (set, expression, budget) when final, so ``formula`` and ``latex`` agree."""
    pset = load_pset(pset)
    key = (pset.source, pset.name, to_text(tree, pset), budget_s)
    if key in _SHOWN:
        return _SHOWN[key]
    expr, final = _display(tree, pset, budget_s)
    if final:
        if len(_SHOWN) >= 1024:
            _SHOWN.clear()
        _SHOWN[key] = expr
    return expr


_SHOWN: dict = {}


def _show(printer, tree, pset, budget_s):
    pset = load_pset(pset)
    try:
        return printer.doprint(display_expr(tree, pset, budget_s))
    except (ValueError, TypeError, ArithmeticError, RecursionError, NotImplementedError):
        return to_text(tree, pset)   # e.g. an integer too long to print: show the expression


def formula(tree, pset="paper", budget_s: float = 1.0) -> str:
    """Readable per-class formula (paper) or per-sample formula (typed), e.g. ``-y*log(p)``."""
    return _show(_Str({"order": None}), tree, pset, budget_s)


def latex(tree, pset="paper", budget_s: float = 1.0) -> str:
    """LaTeX of the same formula."""
    return _show(_Latex(), tree, pset, budget_s)
