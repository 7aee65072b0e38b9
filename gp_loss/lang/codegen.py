"""The one printer: tree -> PyTorch source. Training compiles it; ``export`` writes it to a file.

For a loss called NAME the printer emits

* ``NAME_per_sample(y, p)`` -- the per-sample loss (B,) from one-hot/soft targets ``y`` and
  probabilities ``p`` (both (B, C)), one SSA line per tree node (no deep nesting, so any tree
  within the limits compiles); for a class-sum set (``paper``) it ends with ``.sum(dim=1)``;
  for a set with the ``logp`` terminal (``reference``) it is ``NAME_per_sample(y, p, logp=None)``
  and ``NAME`` passes torch's log-softmax of the logits; ``inv_c`` is 1/C as a (B, C) tensor;
* ``NAME(logits, target)`` -- softmax in float32 or better, integer class indices or (B, C)
  soft targets, per-sample loss, batch mean, sign applied; its docstring holds the formula and,
  when the entry gives it (``export.make_entry`` does), the per-class form T(p_t) + sum O(p_c)
  with the sign applied, or why the set has none (the docstring is the only text it changes);
* ``class CamelName(torch.nn.Module)`` -- a wrapper.

``module_source`` joins several losses with a header (imports only ``torch`` and ``math``) and
a ``LOSSES`` dict; ``compile_loss`` compiles that very text for training. Only source produced
here is ever compiled: ``compile_printed`` accepts a :class:`PrintedSource`, never a plain str.
Fed by ``trees.py`` (parsed trees) and ``ops.py`` (the torch templates).
"""
from __future__ import annotations

import keyword
import re
import textwrap

from deap import gp

from ..version import __version__
from .psets import load_pset
from .trees import format_number, to_text, var_name

_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")

HEADER = '''"""Loss functions discovered/exported by gp-loss {version}.

Each NAME(logits, target) takes logits (B, C) and either integer class indices (B,) or (B, C)
target probabilities, applies softmax in float32 (or float64), and returns the batch-mean loss.
Protected operations use eps = 1e-7 exactly as in the search: log(x) = ln(|x| + eps),
recip(x) = 1/(x + eps), div(a, b) = a/(b + eps).
"""
import math

import torch

EPS = 1e-7
LN10 = math.log(10.0)
'''


class PrintedSource(str):
    """Source text produced by this module's printer (the only text we ever compile)."""


def check_name(name: str) -> str:
    if not _IDENT.match(name or "") or keyword.iskeyword(name) or name in ("torch", "math", "EPS", "LN10"):
        raise ValueError(f"bad loss name {name!r}: use lower-case letters, digits and '_' "
                         "(a Python identifier), e.g. my_loss")
    return name


def camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_") if part) or "Loss"


def _body_lines(tree, pset):
    """SSA lines computing the root; returns (lines, root_ref, root_is_float)."""
    # Walk the prefix list backwards: every node's arguments are then on top of the stack.
    # Stack entries: (reference, is a plain Python float, depends on y or p).
    lines, stack = [], []
    counter = 0
    for node in reversed(tree):
        if isinstance(node, gp.Primitive):
            info = pset.prims[node.name]
            args = [stack.pop() for _ in range(node.arity)]
            parts = []
            for k, (ref, is_float, has_var) in enumerate(args):
                if info.op.kind == "reduction" and not has_var:
                    # Reductions sum over the class axis: a constant argument must be (B, C).
                    ref = f"(torch.zeros_like(p) + {ref})"
                elif is_float and not info.op.scalar_ok[k]:
                    ref = f"p.new_tensor({ref})"  # torch functions need a tensor, 0-d is enough
                parts.append(ref)
            name = f"t{counter}"
            counter += 1
            lines.append(f"    {name} = {info.op.torch.format(*parts)}")
            # Stays a Python float only if no argument had to become a tensor.
            all_float = all(a[1] for a in args) and all(info.op.scalar_ok)
            stack.append((name, all_float, any(a[2] for a in args)))
        elif var_name(node, pset):
            stack.append((node.value, False, True))
        else:
            text = format_number(float(node.value))
            text = text if "." in text or "e" in text else text + ".0"
            stack.append((f"({text})" if text.startswith("-") else text, True, False))
    ref, is_float, _ = stack.pop()
    return lines, ref, is_float


def _doc_text(text: str) -> str:
    """``text`` safe inside a triple-quoted (non-raw) docstring."""
    return text.replace("\\", "\\\\").replace('"""', "'''")


def per_class_doc(per_class=None, per_class_reason=None) -> str:
    """Docstring lines (indented for ``NAME``) stating the per-class form, or why there is none;
    '' when neither is given. ``per_class`` is ``formula.per_class``'s dict, sign applied."""
    if per_class is not None:
        lines = ["Per class, with the sign applied (the loss minimised): a sample of true class t",
                 "costs T(p_t) + sum over the other classes c of O(p_c), where",
                 f"  true class:    T(p) = {per_class['target']}",
                 f"  other classes: O(p) = {per_class['other']}"]
        if per_class.get("constant_dropped"):
            lines.append("  (an additive constant dropped: it never changes training)")
    elif per_class_reason:
        lines = textwrap.wrap(f"Per-class form: none; {per_class_reason}.", 88)
    else:
        return ""
    return "".join(f"    {_doc_text(line)}\n" for line in lines) + "\n"


def per_sample_source(tree, pset="paper", name="loss") -> str:
    """Source of ``NAME_per_sample`` alone: the first part of ``function_source``'s text."""
    pset = load_pset(pset)
    text = to_text(tree, pset)
    lines, ref, is_float = _body_lines(tree, pset)
    has_terminal = any(var_name(n, pset) for n in tree)
    if pset.class_sum:
        if not has_terminal:  # a constant expression: broadcast before the class sum
            ref = f"torch.zeros_like(p) + {ref}"
        final = f"({ref}).sum(dim=1)" if not _simple(ref) else f"{ref}.sum(dim=1)"
    else:
        # A Sample-typed root that involves y or p went through a reduction, so it is (B,).
        final = ref if has_terminal else f"p.new_zeros(p.shape[0]) + {ref}"
    body = "\n".join(lines)
    used = {var_name(n, pset) for n in tree} - {None}
    args, doc, prelude = "y, p", "from targets y and probabilities p, both (B, C)", ""
    if "logp" in pset.terminals:  # the reference set: the exact log-softmax comes in
        args = "y, p, logp=None"
        doc = ("from targets y, probabilities p\n    and their log-softmax logp (all (B, C); "
               "logp = log(p) when not given)")
        if "logp" in used:
            prelude += "    if logp is None:\n        logp = torch.log(p)\n"
    if "inv_c" in used:
        prelude += "    inv_c = torch.full_like(p, 1.0 / p.shape[1])\n"
    return f'''

def {name}_per_sample({args}):
    """Per-sample loss (B,) of `{text}`{chr(10) + "   " if "logp" in pset.terminals else ""} {doc}."""
{prelude}{body + chr(10) if body else ""}    return {final}
'''


def function_source(tree, pset="paper", name="loss", sign=1, formula=None, per_class=None,
                    per_class_reason=None) -> str:
    """Source of ``NAME_per_sample``, ``NAME`` and the ``CamelName`` module for one tree.
    ``per_class``/``per_class_reason`` (sign applied) only add docstring lines."""
    pset = load_pset(pset)
    check_name(name)
    if sign not in (1, -1):
        raise ValueError("sign must be +1 or -1")
    text = to_text(tree, pset)
    doc_formula = _doc_text(formula or text)
    doc_per_class = per_class_doc(per_class, per_class_reason)
    sign_word = "+1" if sign == 1 else "-1 (the expression is negated)"
    mean = "per_sample.mean()" if sign == 1 else "-per_sample.mean()"
    cls = camel(name)
    # the reference set's logp: torch's exact log-softmax of the logits, not log(p)
    logp = ", torch.log_softmax(z, dim=1)" if "logp" in pset.terminals else ""
    return per_sample_source(tree, pset, name) + f'''

def {name}(logits, target):
    """{doc_formula}

{doc_per_class}    Expression: {text}
    Sign: {sign_word}. Softmax inside (float32 or better); target: class indices (B,) or
    probabilities (B, C). Returns the mean over the batch.
    """
    z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    p = torch.softmax(z, dim=1)
    if target.dim() == 1:
        y = torch.nn.functional.one_hot(target, p.shape[1]).to(p.dtype)
    else:
        y = target.to(p.dtype)
    per_sample = {name}_per_sample(y, p{logp})
    return {mean}


class {cls}(torch.nn.Module):
    """torch.nn.Module wrapper of `{name}`: {text}"""

    def forward(self, logits, target):
        return {name}(logits, target)
'''


def _simple(ref: str) -> bool:
    return bool(re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", ref))


def module_source(entries) -> PrintedSource:
    """Full module text for ``entries``: iterable of dicts with tree, pset, name, sign, formula
    (optional per_class, per_class_reason: docstring lines only)."""
    parts, names = [HEADER.format(version=__version__)], []
    for e in entries:
        name = check_name(e["name"])
        if name in names:
            raise ValueError(f"duplicate loss name {name!r}")
        names.append(name)
        parts.append(function_source(e["tree"], e.get("pset", "paper"), name,
                                     e.get("sign", 1), e.get("formula"), e.get("per_class"),
                                     e.get("per_class_reason")))
    parts.append("\n\n# Losses in rank order.\nLOSSES = {\n"
                 + "".join(f"    {n!r}: {n},\n" for n in names) + "}\n")
    return PrintedSource("".join(parts))


def compile_printed(source: PrintedSource, filename="<gp-loss>") -> dict:
    """Compile printer output into a fresh namespace. Refuses anything but :class:`PrintedSource`."""
    if type(source) is not PrintedSource:
        raise TypeError("only source produced by gp_loss.lang.codegen may be compiled")
    namespace: dict = {"__name__": "gp_loss_generated"}
    # Safe: the text was generated by this module from a parsed tree; names come from the op
    # table and literals are printed floats, so no user text reaches the compiler.
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102
    return namespace


def compile_loss(tree, pset="paper", sign=1, name="loss"):
    """(loss(logits, target), per_sample(y, p)) compiled from the printed source of ``tree``."""
    ns = compile_printed(module_source([{"tree": tree, "pset": pset, "name": name, "sign": sign}]))
    return ns[name], ns[f"{name}_per_sample"]


def compile_per_sample(tree, pset="paper", name="loss"):
    """``NAME_per_sample(y, p)`` alone, compiled from the header and the printer's text of that
    function (the same lines ``compile_loss`` and an exported file hold): what the screen runs
    on thousands of proposals, without compiling the batch-mean wrapper and module each time."""
    check_name(name)
    ns = compile_printed(PrintedSource(HEADER.format(version=__version__)
                                       + per_sample_source(tree, pset, name)))
    return ns[f"{name}_per_sample"]
