"""Exact SymPy algebra of the canonical key: opaque functions and the bounded normal form.

* Opaque functions ``kabs``, ``kmax``/``kmin``, ``ksig``, ``kerf``, ``ksin``, ``ksinh``,
  ``kasinh``, ``katan``, ``kI0``, ``kI1``: SymPy's own Abs/Max/erf/besseli run assumption
  queries that can take seconds; these evaluate only exact, cheap identities (|x| and max/min
  decided on p in [0, 1], odd/even functions, sigmoid(-x) = 1 - sigmoid(x)). ``KEY_FORMS`` maps
  op names to them (tanh = 2 sigmoid(2x) - 1, ...); ``DISPLAY_FORMS`` is the readable subset the
  display uses (``formula.py``'s printers name them back).
* ``normal_form(expr)``: a bounded expansion (``MAX_TERMS``) plus exact rewrites (1/(1 + exp(t))
  = sigmoid(-t), A/(1 + A) = 1 - 1/(1 + A), ln(||x|| + eps) = ln(|x| + eps), ...), bottom-up and
  iterative; deterministic. Work is bounded by expression size, never by time.
* ``drop_free_terms``: additive terms that cannot change the oriented gradient (p-free terms; c*p when
  sum_c p_c = 1).

``P`` is the softmax-output symbol (positive: p in (0, 1], so |p| = p, max(p, 0) = p hold). The
protected operations stay opaque (``plog``, ``precip``), so identities that eps makes false are
never applied.

Fed by ``ops.py`` (``EPS``, ``plog``); used by ``symbolic.py`` (tree -> SymPy, keys).
"""
from __future__ import annotations

import math

import sympy

from .ops import EPS, plog

P = sympy.Symbol("p", positive=True)   # softmax output: in (0, 1]
MAX_TERMS = 256       # expansion of one node is skipped when it would exceed this many terms
_EPS = sympy.Rational(EPS)  # the exact double the printed code uses


def _neg(x):
    """-x, with a sum negated term by term: where -x of a sum would stay (-1)*(sum) (SymPy's
    ``distribute(False)``), both claim a minus sign to extract and the parity rules below
    would flip between them endlessly."""
    return sympy.Add(*[-t for t in x.args]) if x.is_Add else -x


def nonneg(x) -> bool:
    """Structurally >= 0 for every real value of the symbols (every expression here is real)."""
    if x.is_Number:
        return x >= 0
    if x == P or isinstance(x, (kabs, sympy.exp, ksig, kI0)):
        return True
    if isinstance(x, _ODD_INCREASING):   # odd and increasing: >= 0 exactly where x >= 0
        return nonneg(x.args[0])
    if isinstance(x, kmax):
        return any(nonneg(a) for a in x.args)
    if isinstance(x, kmin):
        return all(nonneg(a) for a in x.args)
    if x.is_Pow:
        return (x.exp.is_Integer and x.exp.is_even) or nonneg(x.base)
    if x.is_Mul or x.is_Add:
        return all(nonneg(a) for a in x.args)
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
        if isinstance(x, kabs) or nonneg(x):
            return x
        if x.could_extract_minus_sign():
            return cls(_neg(x))
        s = _linear_unit_sign(x)
        if s:
            return s * x
        if x.is_Mul:
            pos = [f for f in x.args if nonneg(f)]
            if pos:
                return sympy.Mul(*pos) * cls(sympy.Mul(*[f for f in x.args if not nonneg(f)]))
        return None


class ksig(sympy.Function):
    """sigmoid(x), with sigmoid(-x) written 1 - sigmoid(x) so both spellings meet (key form)."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x == 0:
            return sympy.Rational(1, 2)
        if x.could_extract_minus_sign():
            return 1 - cls(_neg(x))
        return None


class _MinMax(sympy.Function):
    """max/min(a, b) without assumption queries; arguments in a canonical order."""

    nargs = 2
    is_max = True

    @classmethod
    def eval(cls, a, b):
        if a is sympy.nan or b is sympy.nan:   # as torch.maximum/minimum: NaN propagates
            return sympy.nan
        if a == b:
            return a
        if a.is_Number and b.is_Number:
            return max(a, b) if cls.is_max else min(a, b)
        for x, other in ((a, b), (b, a)):    # display only: an overflowed constant
            if x in (sympy.oo, -sympy.oo):
                return x if (x == sympy.oo) == cls.is_max else other
        s = _linear_unit_sign(a - b)   # p <= 1 decides e.g. max(1, p) = 1
        if not s and b == 0 and nonneg(a):
            s = 1
        if not s and a == 0 and nonneg(b):
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
            return -cls(_neg(x)) if odd else cls(_neg(x))
        return None

    return type(name, (sympy.Function,), {"nargs": 1, "eval": classmethod(eval),
                                          "__module__": __name__})


kerf, ksin, ksinh, kasinh, katan, kI1 = (_parity_function(n, True, 0) for n in (
    "kerf", "ksin", "ksinh", "kasinh", "katan", "kI1"))
kI0 = _parity_function("kI0", False, 1)
# (SymPy's own sinh, tanh, atan, asinh, erf appear in display expressions.)
_ODD_INCREASING = (kerf, ksinh, kasinh, katan, kI1, sympy.sinh, sympy.tanh, sympy.atan,
                   sympy.asinh, sympy.erf)

# The key path's forms of the ops SymPy would otherwise run assumption queries on.
KEY_FORMS = {
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
# Display uses the cheap, readable ones of these (formula.py's printers name them back).
DISPLAY_FORMS = {k: KEY_FORMS[k] for k in (
    "abs", "relu", "negrelu", "max", "min", "sqrt", "inv1p", "softsign", "i0", "i1", "i0e", "i1e",
    "sigmoid", "dsigmoid")}


# ----------------------------------------------------------------------------- bounded normal form

def add_terms(e):
    return sympy.Add.make_args(e)


def _distribute(factors):
    """Product of sums as one expanded sum, or None when it would exceed MAX_TERMS."""
    if math.prod(len(add_terms(f)) for f in factors) > MAX_TERMS:
        return None
    acc = [sympy.Integer(1)]
    for f in factors:
        acc = [a * t for a in acc for t in add_terms(f)]
    return sympy.Add(*acc)


def _linear_unit_sign(e):
    """+1 / -1 when ``e`` = a + b*p (rational a, b) is >= 0 / <= 0 on all of [0, 1], else 0."""
    a = b = sympy.Integer(0)
    for term in add_terms(e):
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
        return sympy.Add(*[_proper(t) for t in add_terms(m)])
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
        return plog(_neg(x) if x.could_extract_minus_sign() else x)
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
    expr = sympy.sympify(expr, strict=True)  # never parse strings
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


def drop_free_terms(expr, affine: bool, onehot: bool = True):
    """Drop additive terms free of p (and c*p when ``affine``: sum_c p_c = 1).

    Without the one-hot reading (a user set whose terminals are not y and p) only terms free
    of every symbol are constants."""
    keep = []
    for term in add_terms(expr):
        if not (term.has(P) if onehot else term.free_symbols):
            continue
        if affine and term.as_independent(P, as_Add=False)[1] == P:
            continue
        keep.append(term)
    return sympy.Add(*keep)
