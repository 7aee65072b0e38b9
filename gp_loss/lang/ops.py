"""The operation table: every operation of the loss language, written exactly once.

Each entry carries the three forms the rest of the engine needs:

* ``torch``  -- a source template the printer (``codegen.py``) fills with argument names; the
  training loop and the exported file are both compiled from that text;
* ``sympy``  -- a function building the symbolic form (``symbolic.py``); the protected operations
  stay opaque (``plog``, ``precip``) so identities that eps makes false are never applied;
* ``numpy``  -- an independent float64 reference, used only as a test oracle.

Primitive *sets* (which of these operations, over which types) are declared as data in the
top-level ``primitives/`` folder and loaded by ``psets.py``; this module knows nothing of them.
Definitions follow DESIGN §3.3/§3.4 (the authors' published code): eps = 1e-7 where shown and
nowhere else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import sympy
from scipy import special as sps

EPS = 1e-7
LN10 = math.log(10.0)

# Opaque SymPy functions for the protected operations. They never evaluate symbolically, so
# e.g. plog(p**2) is never rewritten to 2*plog(p) (false under eps).


class plog(sympy.Function):
    """ln(|x| + eps)."""

    nargs = 1

    def _latex(self, printer):
        return r"\log{\left(%s \right)}" % printer._print(self.args[0])

    def _sympystr(self, printer):
        return "log(%s)" % printer._print(self.args[0])


class precip(sympy.Function):
    """1 / (x + eps)."""

    nargs = 1

    def _latex(self, printer):
        return r"\frac{1}{%s}" % printer._print(self.args[0])

    def _sympystr(self, printer):
        return "1/(%s)" % printer._print(self.args[0])


def _opaque_reduction(name: str):
    """Per-sample reductions of the typed set stay opaque in SymPy: one function per name."""
    return type(name, (sympy.Function,), {"nargs": (1, 2)})


@dataclass(frozen=True)
class Op:
    """One operation. ``kind``: 'elementwise' (any tensor shape) or 'reduction' ((B,C)... -> (B,)).

    ``scalar_ok[i]`` says whether argument i may be a plain Python float in the torch template
    (true for operator-based templates); otherwise the printer wraps a constant into a tensor.
    """

    name: str
    arity: int
    torch: str
    sympy: Callable
    numpy: Callable
    doc: str
    kind: str = "elementwise"
    scalar_ok: tuple = (False,)


def _sig(x):
    return 1.0 / (1.0 + sympy.exp(-x))


def _np_sig(x):
    return 1.0 / (1.0 + np.exp(-x))


_S = (True,)
_SS = (True, True)
_NN = (False, False)

_UNARY = [
    Op("neg", 1, "-{0}", lambda x: -x, lambda x: -x, "-x", scalar_ok=_S),
    Op("log", 1, "torch.log(torch.abs({0}) + EPS)", plog, lambda x: np.log(np.abs(x) + EPS),
       "ln(|x| + eps)"),
    Op("log10", 1, "torch.log(torch.abs({0}) + EPS) / LN10", lambda x: plog(x) / sympy.log(10),
       lambda x: np.log(np.abs(x) + EPS) / np.log(10.0), "ln(|x| + eps) / ln 10"),
    Op("exp", 1, "torch.exp({0})", sympy.exp, np.exp, "exp(x)"),
    Op("abs", 1, "torch.abs({0})", sympy.Abs, np.abs, "|x|"),
    Op("sigmoid", 1, "torch.sigmoid({0})", _sig, _np_sig, "1 / (1 + exp(-x))"),
    Op("inv1p", 1, "1.0 / (1.0 + torch.abs({0}))", lambda x: 1 / (1 + sympy.Abs(x)),
       lambda x: 1.0 / (1.0 + np.abs(x)), "1 / (1 + |x|)"),
    Op("softplus", 1, "torch.log(torch.abs(1.0 + torch.exp({0})) + EPS)",
       lambda x: plog(1 + sympy.exp(x)), lambda x: np.log(np.abs(1.0 + np.exp(x)) + EPS),
       "ln(|1 + exp(x)| + eps)"),
    Op("erf", 1, "torch.erf({0})", sympy.erf, sps.erf, "erf(x)"),
    Op("erfc", 1, "torch.erfc({0})", sympy.erfc, sps.erfc, "erfc(x)"),
    Op("sin", 1, "torch.sin({0})", sympy.sin, np.sin, "sin(x)"),
    Op("sinh", 1, "torch.sinh({0})", sympy.sinh, np.sinh, "sinh(x)"),
    Op("asinh", 1, "torch.asinh({0})", sympy.asinh, np.arcsinh, "asinh(x)"),
    Op("tanh", 1, "torch.tanh({0})", sympy.tanh, np.tanh, "tanh(x)"),
    Op("atan", 1, "torch.atan({0})", sympy.atan, np.arctan, "atan(x)"),
    Op("recip", 1, "1.0 / ({0} + EPS)", precip, lambda x: 1.0 / (x + EPS), "1 / (x + eps)",
       scalar_ok=_S),
    Op("i0", 1, "torch.special.i0({0})", lambda x: sympy.besseli(0, x), sps.i0,
       "modified Bessel I0(x)"),
    Op("i0e", 1, "torch.special.i0e({0})", lambda x: sympy.exp(-sympy.Abs(x)) * sympy.besseli(0, x),
       sps.i0e, "exp(-|x|) I0(x)"),
    Op("i1", 1, "torch.special.i1({0})", lambda x: sympy.besseli(1, x), sps.i1,
       "modified Bessel I1(x)"),
    Op("i1e", 1, "torch.special.i1e({0})", lambda x: sympy.exp(-sympy.Abs(x)) * sympy.besseli(1, x),
       sps.i1e, "exp(-|x|) I1(x)"),
    Op("relu", 1, "torch.relu({0})", lambda x: sympy.Max(x, 0), lambda x: np.maximum(x, 0.0),
       "max(x, 0)"),
    Op("negrelu", 1, "torch.clamp({0}, max=0.0)", lambda x: sympy.Min(x, 0),
       lambda x: np.minimum(x, 0.0), "min(x, 0)"),
    Op("square", 1, "torch.square({0})", lambda x: x**2, np.square, "x^2"),
    Op("sqrt", 1, "torch.sqrt(torch.abs({0}))", lambda x: sympy.sqrt(sympy.Abs(x)),
       lambda x: np.sqrt(np.abs(x)), "sqrt(|x|)"),
    Op("softsign", 1, "{0} / (1.0 + torch.abs({0}))", lambda x: x / (1 + sympy.Abs(x)),
       lambda x: x / (1.0 + np.abs(x)), "x / (1 + |x|)"),
    Op("dtanh", 1, "1.0 - torch.square(torch.tanh({0}))", lambda x: 1 - sympy.tanh(x) ** 2,
       lambda x: 1.0 - np.tanh(x) ** 2, "1 - tanh(x)^2"),
    Op("dsigmoid", 1, "torch.sigmoid({0}) * (1.0 - torch.sigmoid({0}))",
       lambda x: _sig(x) * (1 - _sig(x)), lambda x: _np_sig(x) * (1.0 - _np_sig(x)),
       "sigmoid(x) (1 - sigmoid(x))"),
]

_BINARY = [
    Op("add", 2, "{0} + {1}", lambda a, b: a + b, lambda a, b: a + b, "a + b", scalar_ok=_SS),
    Op("sub", 2, "{0} - {1}", lambda a, b: a - b, lambda a, b: a - b, "a - b", scalar_ok=_SS),
    Op("mul", 2, "{0} * {1}", lambda a, b: a * b, lambda a, b: a * b, "a * b", scalar_ok=_SS),
    Op("max", 2, "torch.maximum({0}, {1})", sympy.Max, np.maximum, "max(a, b)", scalar_ok=_NN),
    Op("min", 2, "torch.minimum({0}, {1})", sympy.Min, np.minimum, "min(a, b)", scalar_ok=_NN),
    Op("div", 2, "{0} / ({1} + EPS)", lambda a, b: a * precip(b), lambda a, b: a / (b + EPS),
       "a / (b + eps)", scalar_ok=_SS),
    Op("isru", 2, "{0} / torch.sqrt(1.0 + torch.square({1}))", lambda a, b: a / sympy.sqrt(1 + b**2),
       lambda a, b: a / np.sqrt(1.0 + b**2), "a / sqrt(1 + b^2)", scalar_ok=(True, False)),
]

# Reductions of the typed set (DESIGN §3.4): (B, C) arguments -> (B,) per-sample values.
_F_MSE, _F_KL, _F_CE, _F_DOT, _F_SUM = (_opaque_reduction(n) for n in ("mse", "kl", "ce", "dot", "csum"))


def _np_plog(x):
    return np.log(np.abs(x) + EPS)


_REDUCTIONS = [
    Op("mse", 2, "torch.square({0} - {1}).mean(dim=1)", _F_MSE,
       lambda a, b: np.mean((a - b) ** 2, axis=1), "mean_c (a - b)^2", kind="reduction",
       scalar_ok=_NN),
    Op("kl", 2, "({0} * (torch.log(torch.abs({0}) + EPS) - torch.log(torch.abs({1}) + EPS))).sum(dim=1)",
       _F_KL, lambda a, b: np.sum(a * (_np_plog(a) - _np_plog(b)), axis=1),
       "sum_c a (ln(|a| + eps) - ln(|b| + eps))", kind="reduction", scalar_ok=_NN),
    Op("ce", 2, "-({0} * torch.log(torch.abs({1}) + EPS)).sum(dim=1)", _F_CE,
       lambda a, b: -np.sum(a * _np_plog(b), axis=1), "-sum_c a ln(|b| + eps)", kind="reduction",
       scalar_ok=_NN),
    Op("dot", 2, "({0} * {1}).sum(dim=1)", _F_DOT, lambda a, b: np.sum(a * b, axis=1),
       "sum_c a b", kind="reduction", scalar_ok=_NN),
    Op("sum", 1, "{0}.sum(dim=1)", _F_SUM, lambda a: np.sum(a, axis=1), "sum_c x",
       kind="reduction"),
]

# Elementwise ops by name. Reductions live in their own table because `ce`/`mse` are also zoo
# names of the paper set; a primitive-set file says which table a name comes from.
ELEMENTWISE: dict[str, Op] = {op.name: op for op in _UNARY + _BINARY}
REDUCTIONS: dict[str, Op] = {op.name: op for op in _REDUCTIONS}
UNARY_NAMES = tuple(op.name for op in _UNARY)
BINARY_NAMES = tuple(op.name for op in _BINARY)

# Names the printed torch source may reference besides `torch` and `math`.
SOURCE_CONSTANTS = {"EPS": EPS, "LN10": LN10}


def lookup(name: str, table: str = "elementwise") -> Op:
    """The op called ``name`` in ``table`` ('elementwise' or 'reduction'); KeyError explains."""
    ops = ELEMENTWISE if table == "elementwise" else REDUCTIONS
    if name not in ops:
        known = ", ".join(sorted(ops))
        raise KeyError(f"no {table} operation named {name!r}; known: {known}. "
                       "To add one, add an Op entry (torch, sympy and numpy forms) in gp_loss/lang/ops.py")
    return ops[name]
