"""What a user reads: the formula of a loss, its LaTeX, and its per-class form.

* ``display_expr(tree, pset)`` -- the SymPy expression shown: the tree with constant subtrees
  folded (float64, protected ops included), the protected operations lowered to plain
  mathematics where the value agrees and with their eps shown where it does not
  (``lowering.py``), a bounded tidy-up (``factor_terms``, chosen by size), floats at the fewest
  digits that keep it equal to the loss. Every step is bounded by expression size: the text is
  a pure function of (expression, set, version), never of time or machine load.
* ``formula`` / ``latex`` -- that one expression through SymPy's own printers, whose precedence
  is right by construction; only names change (``kabs`` -> ``abs``, ``ksig`` -> ``sigmoid``,
  ``kI0`` -> ``i0`` ...: ``FUNCTIONS`` says what each shown name means, for parsing it back).
* ``per_class(tree, pset, sign)`` -- a ``paper`` loss per sample is T(p_t) + sum_{c != t} O(p_c)
  with T(p) = f(1, p) and O(p) = f(0, p): each shown in the one symbol p, y-only parts folded
  to numbers, an additive constant dropped (said so). ``None`` (with ``per_class_reason``) for
  sets whose loss is not a class sum of y and p (the typed set's reductions).

Display only: nothing here feeds a key or a decision. Fed by ``symbolic`` (tree -> SymPy),
``lowering`` and ``domain`` (its points and agreement test); used by ``simplify``/``show``
(``report.py``, ``render.py``), ``eliminate`` and ``export``.
"""
from __future__ import annotations

import math
import sys

import sympy
from sympy.printing.latex import LatexPrinter
from sympy.printing.str import StrPrinter

from .algebra import P, kabs
from .domain import RTOL, Unevaluable, agree, domain, evaluate, near_zeros
from .lowering import EXACT_EPS, bottom_up, lower, on_domain, round_constants
from .psets import load_pset
from .symbolic import is_unusable, build_bindings, to_sympy
from .trees import to_text

TIDY_MAX_OPS = 60   # factor_terms is tried on shown expressions at most this large

# Shown name -> what it means, as SymPy: ``sympy.parse_expr(text, local_dict=FUNCTIONS)``
# reads a shown formula back (the README lists these names).
FUNCTIONS = {
    "abs": sympy.Abs, "max": sympy.Max, "min": sympy.Min,
    "sigmoid": sympy.Lambda(sympy.Symbol("x"), 1 / (1 + sympy.exp(-sympy.Symbol("x")))),
    "i0": sympy.Lambda(sympy.Symbol("x"), sympy.besseli(0, sympy.Symbol("x"))),
    "i1": sympy.Lambda(sympy.Symbol("x"), sympy.besseli(1, sympy.Symbol("x"))),
}
_NAMES = {"kabs": "abs", "kmax": "max", "kmin": "min", "ksig": "sigmoid", "kI0": "i0",
          "kI1": "i1", "csum": "sum"}
_LATEX = {"kabs": r"\left|%s\right|", "kmax": r"\max\left(%s\right)",
          "kmin": r"\min\left(%s\right)", "ksig": r"\sigma\left(%s\right)",
          "kI0": r"I_{0}\left(%s\right)", "kI1": r"I_{1}\left(%s\right)",
          "csum": r"\sum_{c} \left(%s\right)"}


def _float_text(value: float) -> str:
    """The shortest text that reads back as the float shown (rounding happened before)."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") and "e" not in text else text


class _Str(StrPrinter):
    def _print_Float(self, expr):
        return _float_text(expr)

    def _print_Function(self, expr):
        name = _NAMES.get(type(expr).__name__)
        if name is None:
            return super()._print_Function(expr)
        return f"{name}({', '.join(self._print(a) for a in expr.args)})"


def _structural_fraction(expr, exact=False):
    """SymPy's ``fraction`` for printing, decided by structure only: a factor goes below the
    bar when its exponent is a negative number (SymPy's own asks ``is_negative`` and
    ``is_constant`` of symbolic exponents such as exp(-atan(sin(p) + tanh(asinh(p)))),
    which ran ``simplify`` for minutes inside the LaTeX printer)."""
    numer, denom = [], []
    for term in sympy.Mul.make_args(expr):
        if term.is_commutative and (term.is_Pow or isinstance(term, sympy.exp)):
            base, ex = term.as_base_exp()
            if ex.is_Number and ex < 0:
                denom.append(base if ex == -1 else sympy.Pow(base, -ex))
                continue
        elif term.is_Rational and not term.is_Integer:
            if term.p != 1:
                numer.append(sympy.Integer(term.p))
            denom.append(sympy.Integer(term.q))
            continue
        numer.append(term)
    return sympy.Mul(*numer, evaluate=False), sympy.Mul(*denom, evaluate=False)


class _Latex(LatexPrinter):
    def doprint(self, expr):
        simplify_module = sys.modules["sympy.simplify"]   # (sympy.simplify is the function)
        saved = simplify_module.fraction
        simplify_module.fraction = _structural_fraction   # read by LatexPrinter._print_Mul
        try:
            return super().doprint(expr)
        finally:
            simplify_module.fraction = saved

    def _print_Float(self, expr):
        mantissa, _, power = _float_text(expr).partition("e")
        return mantissa if not power else r"%s \cdot 10^{%d}" % (mantissa, int(power))

    def _print_Function(self, expr, exp=None):
        form = _LATEX.get(type(expr).__name__)
        if form is None:
            return super()._print_Function(expr, exp)
        text = form % ", ".join(self._print(a) for a in expr.args)
        return text if exp is None else r"%s^{%s}" % (text, exp)


_TEXT, _TEX = _Str({"order": None}), _Latex()
# Exact texts print terms as built: ordering them would evaluate exact constants numerically
# (SymPy sorts number-like factors by value), which can run for minutes.
_EXACT_TEXT = _Str({"order": "none"})


def _rank(expr):
    try:
        text = sympy.srepr(expr)
    except ValueError:   # an integer too long to print
        return (float("inf"), 0, "")
    return (sympy.count_ops(expr), len(text), text)


def _tidy(expr):
    """A bounded tidy-up: common factors pulled out when that is shorter (deterministic)."""
    if sympy.count_ops(expr) > TIDY_MAX_OPS:
        return expr
    return min([expr, sympy.factor_terms(expr)], key=_rank)


def _present(raw, dom):
    """(plain expression equal to ``raw`` on ``dom``, whether it shows 6-digit constants)."""
    if raw.has(sympy.nan):   # every op propagates NaN: a NaN constant makes the loss NaN
        return sympy.nan, False
    raw = on_domain(raw, dom)
    dom = near_zeros(raw, dom)
    try:
        reference = evaluate(raw, dom)
    except Unevaluable:
        return lower(raw, dom), False
    low = lower(raw, dom)
    shown = _tidy(low)
    if shown is not low:
        try:
            if not agree(evaluate(shown, dom), reference, RTOL / 2, dom.get("y")):
                shown = low    # the tidy form loses digits here (cancellation): keep the lowered
        except Unevaluable:
            shown = low
    try:
        return round_constants(shown, reference, dom)
    except Unevaluable:
        return shown, False


_SHOWN: dict = {}


def _memo(key, make):
    if key not in _SHOWN:
        if len(_SHOWN) >= 1024:
            _SHOWN.clear()
        _SHOWN[key] = make()
    return _SHOWN[key]


def display_expr(tree, pset="paper") -> sympy.Expr:
    """The expression ``formula`` and ``latex`` print (plain SymPy equal to the loss)."""
    pset = load_pset(pset)

    def make():
        raw = to_sympy(tree, pset, constants="float")
        return _present(raw, domain(per_sample=not pset.class_sum))[0]
    return _memo(("full", pset.source, pset.name, to_text(tree, pset)), make)


def _print(printer, tree, pset):
    pset = load_pset(pset)
    try:
        return printer.doprint(display_expr(tree, pset))
    except (ValueError, TypeError, ArithmeticError, RecursionError, NotImplementedError):
        return to_text(tree, pset)   # e.g. an integer too long to print: show the expression


def formula(tree, pset="paper") -> str:
    """Readable formula: per class (``paper``, e.g. ``-y*log(p + 1e-07)``) or per sample
    (``typed``); equal to the loss on its domain (y in {0, 1}, p in [1e-4, 1 - 1e-4])."""
    return _print(_TEXT, tree, pset)


def latex(tree, pset="paper") -> str:
    """LaTeX of the same expression."""
    return _print(_TEX, tree, pset)


# ----------------------------------------------------------------------------- per-class form

def per_class_reason(pset="paper"):
    """Why a set has no per-class form (None when it has one)."""
    pset = load_pset(pset)
    if not pset.class_sum:
        return (f"the {pset.name!r} set's loss is a per-sample expression (its reductions act "
                "on whole rows), not a class sum of one function of (y, p)")
    if not {"y", "p"} <= set(pset.terminals):
        return f"the {pset.name!r} set's terminals are not y and p"
    return None


def _top_terms(expr):
    """Additive terms, through numeric factors (2*(p + 1) when SymPy kept it so)."""
    out = []
    for term in sympy.Add.make_args(expr):
        coeff, rest = term.as_coeff_Mul()
        if rest.is_Add and coeff.is_finite:
            out += [coeff * t for t in _top_terms(rest)]
        else:
            out.append(term)
    return out


def _nonfinite_constant(expr) -> bool:
    return expr.has(sympy.nan, sympy.oo, -sympy.oo, sympy.zoo)


def _signed(sign, expr):
    """``sign * expr`` with the sign taken into each term (-(a + b) reads -a - b)."""
    return expr if sign == 1 else sympy.Add(*[-t for t in sympy.Add.make_args(expr)])


def _drop_constant(expr):
    if _nonfinite_constant(expr):   # NaN or an overflowed constant: nothing to drop
        return expr, False
    terms = _top_terms(expr)
    keep = [t for t in terms if t.has(P)]
    return sympy.Add(*keep), len(keep) != len(terms) and expr != 0


def _one_class(expr_float, expr_exact, dom, dom_exact):
    body, dropped = _drop_constant(expr_float)
    shown, _ = _present(body, dom)
    exact = expr_exact
    if exact is not None and shown is sympy.nan:
        exact = sympy.nan
    elif exact is not None:
        exact = _drop_constant(exact)[0]
        # Unevaluated: SymPy's own evaluation of exact forms can run for minutes (sinh's
        # realness check on an exact argument ran 100 s of polynomial gcds on one candidate).
        with sympy.evaluate(False):
            exact = on_domain(exact, dom_exact)
            exact = lower(exact, near_zeros(exact, dom_exact), eps=EXACT_EPS)
        exact = _fold_rationals(exact)
    return shown, exact, dropped


def _nonfinite(value):
    return sympy.nan if math.isnan(value) else sympy.oo if value > 0 else -sympy.oo


def _exact_constants(expr, forms):
    """``expr`` with each constant symbol replaced by its exact value (protected ops in it
    read plainly where that keeps its value, as in ``lower``), unevaluated, for printing."""
    with sympy.evaluate(False):
        swap = {s: _fold_rationals(lower(forms[s], {}, eps=EXACT_EPS))
                for s in expr.free_symbols if s in forms}
        return _fold_rationals(expr.xreplace(swap)) if swap else expr


def _fold_rationals(expr):
    """Sums, products and integer powers of rationals evaluated (0 + 1/10000000 reads
    1/10000000); everything else left as it stands (unevaluated)."""
    def rule(node, args):
        small = [a for a in args if a.is_Rational and max(abs(a.p), a.q).bit_length() < 256]
        if node.func in (kabs, sympy.Abs) and small:
            return abs(args[0])
        if node.func is sympy.Pow and len(small) == 2 and args[1].is_Integer:
            with sympy.evaluate(True):
                return node.func(*args)
        if node.func in (sympy.Add, sympy.Mul) and small:
            with sympy.evaluate(True):
                number = node.func(*small)
            rest = [a for a in args if a not in small]
            unit = 0 if node.func is sympy.Add else 1
            if node.func is sympy.Mul and number == 0:
                rest = []
            keep = [number] if number != unit or not rest else []
            terms = keep + rest if node.func is sympy.Mul else rest + keep   # 2*p, p + 1/10
            return terms[0] if len(terms) == 1 else node.func(*terms, evaluate=False)
        return node.func(*args, evaluate=False) if args != list(node.args) else node
    return bottom_up(expr, rule)


EXACT_MAX_SIZE = 60   # target_exact/other_exact are computed exactly up to this tree size


def per_class(tree, pset="paper", sign: int = 1):
    """``{target, other, target_latex, other_latex, target_exact, other_exact,
    constant_dropped}`` (the per-sample loss = target at p_t + sum over the other classes of
    other at p_c, times ``sign``), or None when the set has no per-class form."""
    pset = load_pset(pset)
    if per_class_reason(pset) is not None:
        return None

    def make():
        f1, f0 = build_bindings(tree, pset, ys=(1, 0), constants="float")
        # Exact texts: rational constants exact, others symbols while lowering decides (SymPy's
        # exact evaluation of transcendental constants can run for minutes), then shown as
        # their exact value, unevaluated (sigmoid(1), not 0.731059); a constant the loss
        # computes as NaN or +-inf (float64 overflow) is that.
        labels: dict = {}
        forms: dict = {}
        exact = [None, None]
        if len(tree) <= EXACT_MAX_SIZE:
            try:
                exact = build_bindings(tree, pset, ys=(1, 0), constants="atoms_shown", labels=labels,
                              exact=forms)
                worst = {sympy.Symbol(k, real=True): _nonfinite(v) for k, v in labels.items()
                         if not math.isfinite(v)}
                exact = [None if is_unusable(e) else _signed(sign, e.xreplace(worst)) for e in exact]
            except (ValueError, TypeError, ArithmeticError, RecursionError):
                exact = [None, None]
        p_only = {"p": domain(per_sample=False)["p"]}
        p_exact = dict(p_only, **labels)
        out, dropped = {}, False
        for side, fl, ex in (("target", f1, exact[0]), ("other", f0, exact[1])):
            shown, exact_shown, d = _one_class(_signed(sign, fl), ex, p_only, p_exact)
            dropped |= d
            out[side] = _TEXT.doprint(shown)
            out[f"{side}_latex"] = _TEX.doprint(shown)
            out[f"{side}_exact"] = _EXACT_TEXT.doprint(_exact_constants(exact_shown, forms)) \
                if exact_shown is not None else out[side]
        out["constant_dropped"] = bool(dropped)
        return out

    try:
        return dict(_memo(("class", pset.source, pset.name, to_text(tree, pset), int(sign)), make))
    except (ValueError, TypeError, ArithmeticError, RecursionError, NotImplementedError):
        return None


def per_class_text(form: dict) -> str:
    """One line for tables: ``true class: T | other classes: O`` (+ note on the constant)."""
    return f"true class: {form['target']} | other classes: {form['other']}"
