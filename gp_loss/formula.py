"""Display of a candidate: readable formula, LaTeX, the expression shown (time-budgeted).

* ``display_expr(tree, pset, budget_s)`` -- ``sympy.simplify`` when the expression is small
  (at most ``SIMPLIFY_MAX_OPS`` operations) and its result is shorter, else the raw form; under
  a time budget (SIGALRM, main thread only), the raw form when it runs out. Cached when final.
* ``formula`` / ``latex`` -- that expression printed. ``log``, ``div`` and ``recip`` shown there
  are the protected forms: ln(|x| + eps), a/(b + eps), 1/(x + eps) (protected reciprocals go
  below the fraction bar); constants with transcendental values are shown to 6 digits; the key
  path's opaque functions are named back (``kabs`` -> abs, ``ksig`` -> sigmoid...).

Display only: nothing here feeds a key or a decision. Fed by ``symbolic.to_sympy`` (with
``constants='float'``) and ``primitives.py`` (``precip``); ``symbolic`` re-exports ``formula``,
``latex`` and ``display_expr``. Used by ``simplify``/``show`` (``report.py``) and ``export``,
for the few rows they display (the search itself stores no formulas).
"""
from __future__ import annotations

import math
import signal
import threading

import sympy
from sympy.printing.latex import LatexPrinter
from sympy.printing.str import StrPrinter

from .primitives import precip
from .psets import load_pset
from .symbolic import _bad, to_sympy
from .trees import to_text

SIMPLIFY_MAX_OPS = 20  # display: sympy.simplify only on expressions at most this large


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
        return "1/" + self.parenthesize(expr.args[0], 50)  # a product below the bar: (..)

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
        return f"{top}/{self.parenthesize(sympy.Mul(*den), 50)}"  # strict=False: a*b -> (a*b)


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
