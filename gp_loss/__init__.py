"""gp-loss: discover loss functions for image classifiers by genetic programming.

The Python API; the ``gp-loss`` command line (``cli/``) is a thin layer over it::

    import gp_loss
    gp_loss.check("neg(mul(y, log(p)))")        # {'accepted': True, 'reason': ..., 'sign': 1}
    gp_loss.same("mul(y, log(p))", "ce")         # True: same oriented gradient
    gp_loss.simplify("baikal")["formula"]
    loss = gp_loss.compile_loss("baikal")        # loss(logits, target) -> scalar tensor
    gp_loss.export(["ce", "baikal"], "losses.py")

Expressions are text (``neg(mul(y, log(p)))``, a zoo name such as ``baikal``) or parsed
``deap.gp.PrimitiveTree`` objects; ``pset`` is a set name (``paper``, ``typed``), a ``.toml``
path or a loaded :class:`~gp_loss.lang.psets.PSet`. Heavy modules (torch, sympy, deap) are imported
on first use, so ``import gp_loss`` and ``gp-loss --help`` stay fast.
"""
from __future__ import annotations

import importlib

from .errors import InputError
from .version import __version__

__all__ = [
    "__version__", "InputError", "parse", "to_text", "check", "sign_of", "same", "simplify",
    "to_source", "compile_loss", "export", "load_pset", "available_psets", "random_tree",
    "mutate", "ParseError", "PSetError", "ZOO", "EPS",
]


# name -> (module, attribute), resolved on first access by the module ``__getattr__``.
_LAZY = {
    "ParseError": ("lang.trees", "ParseError"),
    "random_tree": ("lang.variation", "random_tree"),
    "mutate": ("lang.variation", "mutate"),
    "PSetError": ("lang.psets", "PSetError"),
    "load_pset": ("lang.psets", "load_pset"),
    "available_psets": ("lang.psets", "available_psets"),
    "EPS": ("lang.ops", "EPS"),
}


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    if name == "ZOO":
        # The paper set's reference losses, name -> expression text (a fresh copy each time).
        return dict(_pset("paper").zoo)
    raise AttributeError(f"module 'gp_loss' has no attribute {name!r}")


def _pset(pset):
    from .lang.psets import load_pset
    return load_pset(pset)


def _pset_for(expr, pset):
    """``expr``'s set: ``pset``, or ``reference`` for its zoo names (``ce_torch``, ...)."""
    from .lang.psets import loss_pset
    return loss_pset(expr, pset) if isinstance(expr, str) else _pset(pset)


def _tree(expr, pset):
    """Text -> parsed tree; a tree passes through unchanged (``lang.trees.as_tree``)."""
    from .lang.trees import as_tree
    return as_tree(expr, pset)


def parse(text: str, pset="paper"):
    """Expression text (or a zoo name) -> ``deap.gp.PrimitiveTree``; raises ``ParseError``."""
    from .lang.trees import parse as _parse
    return _parse(text, pset)


def to_text(tree, pset="paper") -> str:
    """Tree (or text) -> canonical expression text, e.g. ``neg(mul(y, log(p)))``."""
    from .lang.trees import to_text as _to_text
    pset = _pset(pset)
    return _to_text(_tree(tree, pset), pset)


def check(expr, pset="paper") -> dict:
    """Screen an expression before any training (DESIGN §5 steps 1-3: the paper's integrity
    check, dependence on p and y, finiteness): ``{'accepted', 'reason', 'sign'}``. The sign is
    the one the integrity check chose (+1 when it rejected)."""
    from .screen import integrity as screen
    pset = _pset(pset)
    result = screen.screen(_tree(expr, pset), pset)
    sign = result.sign if result.sign in (1, -1) else 1
    return {"accepted": bool(result.accepted), "reason": str(result.reason or ""), "sign": int(sign)}


def sign_of(expr, pset="paper") -> int:
    """The orientation the integrity check gives ``expr`` (+1 or -1; +1 when it rejects)."""
    from .screen import integrity as screen
    pset = _pset(pset)
    return screen.sign_of(_tree(expr, pset), pset)


def same(a, b, pset="paper") -> bool:
    """True when ``a`` and ``b`` are the same candidate: equal canonical keys or the same
    oriented gradient on the probe batch (DESIGN §5.4). The test the search uses."""
    from .screen import integrity as screen
    pset = _pset(pset)
    return bool(screen.same(_tree(a, pset), _tree(b, pset), pset))


def simplify(expr, pset="paper") -> dict:
    """``{'expr', 'formula', 'latex', 'key', 'per_class', 'per_class_reason'}``: canonical
    text, the readable formula and its LaTeX (equal to the loss on its domain; a pure function
    of the expression), the deterministic canonical key (oriented by the sign of the integrity
    check, so two expressions that are ``same`` by algebra share it), and the per-class form
    (``T(p_t) + sum_{c != t} O(p_c)``, the expression as written: no sign applied; None with
    the reason where the set has none). The same keys as ``gp-loss simplify --json``."""
    from .lang import formula as _formula
    from .lang import symbolic
    from .lang.trees import to_text as _to_text
    pset = _pset(pset)
    tree = _tree(expr, pset)
    return {
        "expr": _to_text(tree, pset),
        "formula": _formula.formula(tree, pset),
        "latex": _formula.latex(tree, pset),
        "key": symbolic.canonical_key(tree, pset, sign=sign_of(tree, pset)),
        "per_class": _formula.per_class(tree, pset),
        "per_class_reason": _formula.per_class_reason(pset),
    }


def export(exprs, path, pset="paper", names=None, fmt: str = "python") -> list:
    """Write the expressions ``exprs`` (texts, zoo names or trees) to ``path`` as one file of
    ``fmt``: ``python`` (standalone PyTorch, the printer's code), ``latex``, ``sympy`` or
    ``json`` -- what ``gp-loss export --expr`` writes. Returns the entries written."""
    from .lang import export as _export
    from .screen import integrity as screen
    return _export.export_exprs(exprs, path, pset, names, fmt, sign_of=screen.sign_of)


def to_source(expr, name: str = "loss", pset="paper", sign=None, formula=None) -> str:
    """The standalone PyTorch module ``gp-loss export`` writes for one expression (imports only
    torch and math). ``sign`` None: decided by the integrity check. ``formula`` None: the
    simplified formula goes in the docstring."""
    from .lang import export as _export
    pset = _pset_for(expr, pset)
    tree = _tree(expr, pset)
    name = _export.check_name(_export.default_name(expr, pset) if name is None else name)
    sign = sign_of(tree, pset) if sign is None else sign
    entry = _export.make_entry(tree, pset, name=name, sign=sign, formula=formula)
    return _export.render([entry], "python")


def compile_loss(expr, pset="paper", sign=None, name: str = "loss"):
    """``loss(logits, target) -> scalar tensor`` compiled from the printer's source for ``expr``
    (exactly the code ``export`` writes). ``sign`` None: decided by the integrity check."""
    from .lang import codegen
    from .lang import export as _export
    pset = _pset_for(expr, pset)
    tree = _tree(expr, pset)
    sign = sign_of(tree, pset) if sign is None else _export.check_sign(sign)
    loss, _per_sample = codegen.compile_loss(tree, pset, sign=sign, name=_export.check_name(name))
    return loss
