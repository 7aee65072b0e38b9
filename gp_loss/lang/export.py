"""Export losses to files: a standalone PyTorch module, LaTeX, SymPy source or JSON.

Everything is written from a list of *entries* -- dicts ``{name, tree, pset, sign, formula,
per_class, per_class_reason}`` (plus optional ``expr``, ``fitness``, ``candidate_id``,
``seeds``, ``run``) -- so the two front ends share one writer and every format reads the same
entry. ``per_class`` is ``formula.per_class`` with the entry's sign applied (the loss that is
minimised: T(p_t) + sum over c != t of O(p_c)), or None with ``per_class_reason``:

* ``expr_entries`` -- expressions typed by a user (``gp-loss export --expr baikal``);
* ``runs.export.run_entries`` -- the best candidates of a run store (``gp-loss export RUN_DIR
  --top K``), named ``rank1`` ... ``rankK`` in rank order, with the run (folder, creation
  time) and each candidate's id and fitness recorded (comments; ``run`` in JSON).

The ``python`` format is exactly the text of ``codegen.module_source`` -- the printer that
training compiles -- so what trains is what exports (a run's export adds comment lines only);
it imports only ``torch`` and ``math`` and carries the simplified formula
(``formula.formula``) and the per-class form in each docstring; ``latex`` shows the per-class
form under each formula, ``json`` carries ``per_class`` and ``per_class_reason``. Fed by ``trees``
(parsed trees), ``codegen`` and ``formula``; the sign is the caller's (the integrity check's
``screen.integrity.sign_of``, passed in); a run's entries come from ``runs/export.py``.
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path

from deap import gp

from ..errors import InputError
from ..version import __version__
from . import codegen
from .psets import load_pset, loss_pset
from .trees import as_tree, to_text, var_name

FORMATS = ("python", "latex", "sympy", "json")
SUFFIXES = {"python": ".py", "latex": ".tex", "sympy": ".py", "json": ".json"}


def check_name(name: str) -> str:
    try:
        return codegen.check_name(name)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def check_sign(sign) -> int:
    if sign not in (1, -1):
        raise InputError(f"sign must be +1 or -1, got {sign!r}")
    return int(sign)


def default_name(expr, pset) -> str:
    """The zoo name when ``expr`` is one (``baikal``), else ``loss``."""
    pset = load_pset(pset)
    if not isinstance(expr, str):
        return "loss"
    text = expr.strip()
    if text in pset.zoo:
        return text
    if text.split(":", 1)[0] in pset.templates:  # label_smoothing:0.2 -> label_smoothing_0_2
        return re.sub(r"[^a-z0-9_]", "_", text.lower())
    return "loss"


def per_class_of(tree, pset, sign) -> tuple:
    """(``formula.per_class`` with ``sign`` applied, None; or None, why there is none)."""
    from . import formula as _formula
    pset = load_pset(pset)
    reason = _formula.per_class_reason(pset)
    if reason is not None:
        return None, reason
    try:
        form = _formula.per_class(tree, pset, sign=sign)
    except Exception:  # noqa: BLE001 - a display nicety must never stop an export
        form = None
    if form is None:
        return None, "no per-class form could be derived for this expression"
    return form, None


def make_entry(expr, pset="paper", name=None, *, sign: int, formula=None, **extra) -> dict:
    """One entry from expression text or a tree, oriented by ``sign`` (+1 or -1: the caller
    decides, usually ``screen.integrity.sign_of``; the language sits below the screen);
    ``formula`` None: the simplified formula (``formula.formula``). The entry also holds
    ``per_class`` (sign applied) and ``per_class_reason`` (:func:`per_class_of`)."""
    pset = load_pset(pset)
    tree = as_tree(expr, pset)
    name = check_name(default_name(expr, pset) if name is None else name)
    if formula is None:
        from . import formula as formula_mod
        formula = formula_mod.formula(tree, pset)
    sign = check_sign(sign)
    form, reason = per_class_of(tree, pset, sign)
    return {"name": name, "tree": tree, "pset": pset, "sign": sign,
            "formula": str(formula), "expr": to_text(tree, pset), "per_class": form,
            "per_class_reason": reason, **extra}


def expr_entries(exprs, pset="paper", names=None, *, sign_of) -> list:
    """Entries for user expressions, each oriented by ``sign_of(tree, pset)`` (the integrity
    check's ``screen.integrity.sign_of``, passed in by the caller). Default names: the zoo
    name, else ``loss`` -- numbered (``loss1``, ``loss2``...) when several would share it."""
    exprs = list(exprs)
    if not exprs:
        raise InputError("nothing to export: give at least one expression")
    # each expression's own set: a reference loss name (ce_torch, ...) exports with any pset
    psets = [loss_pset(e, pset) if isinstance(e, str) else load_pset(pset) for e in exprs]
    if names is None:
        names = [default_name(e, ps) for e, ps in zip(exprs, psets)]
        if len(exprs) > 1:
            counts = {n: names.count(n) for n in names}
            seen: dict = {}
            for i, n in enumerate(names):
                if counts[n] > 1:
                    seen[n] = seen.get(n, 0) + 1
                    names[i] = f"{n}{seen[n]}"
    _unique(names)
    entries = []
    for expr, name, pset in zip(exprs, names, psets):  # in turn: the first bad one is the error
        tree = as_tree(expr, pset)
        name = check_name(name)
        entries.append(make_entry(tree, pset, name=name, sign=sign_of(tree, pset)))
    return entries


def run_lines(entries) -> list:
    """Lines recording the run that entries come from (none for --expr entries), for the
    comments or docstring of each format; one physical line each, whatever the path holds."""
    run = next((e["run"] for e in entries if e.get("run")), None)
    if run is None:
        return []
    lines = [f"Exported from the run in {run['dir']} (created {run['created']}).",
             f"Fitness = best validation accuracy of the search's surrogate "
             f"({run['surrogate']});", "the mean over seeds where re-evaluated."]
    if any(e.get("elimination_score") is not None for e in entries):
        lines.append("Ranked by the run's finished elimination (score = its last round's mean "
                     "validation accuracy).")
    for e in entries:
        seeds = f", mean of {e['seeds']} seeds" if e.get("seeds", 1) > 1 else ""
        score = (f", elimination score {e['elimination_score']:.4f}"
                 if e.get("elimination_score") is not None else "")
        lines.append(f"  {e['name']}: candidate #{e['candidate_id']}, fitness "
                     f"{e['fitness']:.4f}{seeds}{score}")
    return [" ".join(line.splitlines()) for line in lines]


def _unique(names):
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"duplicate loss name(s): {', '.join(dup)}; give distinct --name values")


# ----------------------------------------------------------------------------- formats

def render(entries, fmt: str = "python") -> str:
    """The text of ``entries`` in format ``fmt`` (one of :data:`FORMATS`)."""
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    _unique([e["name"] for e in entries])
    return {"python": _python, "latex": _latex, "sympy": _sympy, "json": _json}[fmt](entries)


def _python(entries) -> str:
    text = str(codegen.module_source(entries))
    notes = run_lines(entries)
    if notes:  # comments only, after the header docstring: the code is the printer's
        head, sep, rest = text.partition("\nimport math\n")
        text = head + "\n" + "".join(f"# {line}\n" for line in notes) + sep + rest
    return text


def _json(entries) -> str:
    from . import formula as formula_mod
    from . import symbolic
    losses = []
    for e in entries:
        item = {"name": e["name"], "expr": e["expr"], "pset": e["pset"].name, "sign": e["sign"],
                "formula": e["formula"], "latex": formula_mod.latex(e["tree"], e["pset"]),
                "key": symbolic.canonical_key(e["tree"], e["pset"], sign=e["sign"]),
                "per_class": e.get("per_class"), "per_class_reason": e.get("per_class_reason")}
        for extra in ("fitness", "candidate_id"):
            if e.get(extra) is not None:
                item[extra] = e[extra]
        losses.append(item)
    out = {"gp_loss_version": __version__, "losses": losses}
    run = next((e["run"] for e in entries if e.get("run")), None)
    if run is not None:
        out["run"] = run
    return json.dumps(out, indent=2) + "\n"


def _latex(entries) -> str:
    from . import formula as formula_mod
    lines = [f"% Losses exported by gp-loss {__version__}. y: one-hot target, p: softmax of the "
             "logits; log and 1/x are protected with eps = 1e-7.",
             "% Batch loss: mean over the batch of the per-sample loss below."]
    if any(e.get("per_class") for e in entries):
        lines.append("% Per class (sign applied: the loss minimised), a sample of true class t "
                     "costs T(p_t) + sum over the other classes c of O(p_c).")
    lines += [f"% {line}" for line in run_lines(entries)] + [r"\begin{align}"]
    rows = []   # (row, trailing comment)
    for e in entries:
        body = formula_mod.latex(e["tree"], e["pset"])
        sign = "-" if e["sign"] == -1 else ""
        total = rf"\sum_{{c}} \left[ {body} \right]" if e["pset"].class_sum else body
        name = e["name"].replace("_", r"\_")
        form = e.get("per_class")
        why = e.get("per_class_reason")
        rows.append((rf"\ell_{{\mathrm{{{name}}}}}(y, p) &= {sign}{total}", f"% {e['expr']}"
                     + (f"; no per-class form: {why}" if form is None and why else "")))
        if form is not None:
            rows.append((rf"T_{{\mathrm{{{name}}}}}(p) &= {form['target_latex']} "
                         r"\quad \text{true class}", ""))
            rows.append((rf"O_{{\mathrm{{{name}}}}}(p) &= {form['other_latex']} "
                         r"\quad \text{other classes}", ""))
            if form.get("constant_dropped"):
                rows.append((r"&\quad \text{(an additive constant dropped: it never changes "
                             r"training)}", ""))
    for i, (row, comment) in enumerate(rows):
        end = r" \\" if i < len(rows) - 1 else ""
        lines.append(row + end + (f"  {comment}" if comment else ""))
    lines.append(r"\end{align}")
    return "\n".join(lines) + "\n"


def _sympy_expr(tree, pset, symbols):
    """The exact SymPy form of ``tree`` with eps explicit (protected ops spelled out)."""
    import sympy
    from .ops import plog, precip
    eps = symbols["eps"]
    stack = []
    for node in reversed(tree):
        if isinstance(node, gp.Primitive):
            args = [stack.pop() for _ in range(node.arity)]
            stack.append(pset.prims[node.name].op.sympy(*args))
        elif var_name(node, pset):
            stack.append(symbols[var_name(node, pset)])
        else:
            value = float(node.value)
            stack.append(sympy.Integer(int(value)) if value.is_integer() and abs(value) < 1e15
                         else sympy.Float(repr(value), 17))
    expr = stack.pop()
    return expr.replace(plog, lambda x: sympy.log(sympy.Abs(x) + eps)) \
               .replace(precip, lambda x: 1 / (x + eps))


def _sympy(entries) -> str:
    import sympy
    symbols = {"y": sympy.Symbol("y", real=True), "p": sympy.Symbol("p", real=True),
               "eps": sympy.Symbol("eps", positive=True)}
    # the reference set: logp is the exact log-softmax, log(p); inv_c is 1/C
    symbols["logp"] = sympy.log(symbols["p"])
    symbols["inv_c"] = 1 / sympy.Symbol("C", positive=True, integer=True)
    out = [f'"""Losses exported by gp-loss {__version__} as SymPy expressions.',
           "",
           "Each entry is an expression in the target y and the probability p. For a class-sum",
           "set (paper) it is elementwise: the per-sample loss is the sum over classes; for the",
           "typed set it is the per-sample loss itself (reductions mse, kl, ce, dot, csum are",
           "left as opaque functions over the class axis). Batch loss: SIGN * batch mean.",
           "eps is symbolic here; gp-loss uses eps = 1e-7 (EPS_VALUE).",
           '"""',
           *(f"# {line}" for line in run_lines(entries)),
           "from sympy import *  # noqa: F401,F403 - the expressions below use SymPy's names",
           "",
           'y, p = symbols("y p", real=True)',
           'eps = Symbol("eps", positive=True)',
           "EPS_VALUE = 1e-7",
           ]
    if any("inv_c" in e["pset"].terminals for e in entries):
        out.append('C = Symbol("C", positive=True, integer=True)  # number of classes')
    if any(not e["pset"].class_sum for e in entries):
        out.append('mse, kl, ce, dot, csum = (Function(n) for n in ("mse", "kl", "ce", "dot", "csum"))')
    # Entries go into a dict, not module variables: a loss called `log` must not shadow SymPy's.
    out += ["", "# name -> (expression, sign), in rank order.", "LOSSES = {}"]
    for e in entries:
        expr = _sympy_expr(e["tree"], e["pset"], symbols)
        out += [f"# {e['expr']}  (set {e['pset'].name})",
                f"LOSSES[{e['name']!r}] = ({sympy.sstr(expr, full_prec=True)}, {e['sign']})"]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- writing

def write(entries, path, fmt: str = "python") -> str:
    """Render ``entries`` and write them to ``path`` atomically ('-': standard output)."""
    text = render(entries, fmt)
    if str(path) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return text
    path = Path(path)
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is a directory")
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: folder {path.parent} does not exist")
    tmp = None
    try:
        # Write beside the target and rename, so a reader never sees half a file.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; an exported file is meant to be shared
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
    return text


def export_exprs(exprs, path, pset="paper", names=None, fmt: str = "python", *,
                 sign_of) -> list:
    """Write one or several expressions to ``path`` ('-' = stdout) as a ``python`` module (the
    printer's source), ``latex``, ``sympy`` or ``json``. ``exprs``: one expression or a list;
    ``names``: default the zoo name, else ``loss`` (``loss1``, ``loss2``... for several).
    ``sign_of``: as for :func:`expr_entries`. Returns the entries written (the API's
    ``gp_loss.export(exprs, path, ...)``)."""
    if isinstance(exprs, (str, gp.PrimitiveTree)):
        exprs = [exprs]
    if isinstance(names, str):
        names = [names]
    exprs = list(exprs)
    if names is not None and len(names) != len(exprs):
        raise InputError(f"{len(names)} names for {len(exprs)} expressions")
    entries = expr_entries(exprs, pset, None if names is None else list(names),
                           sign_of=sign_of)
    write(entries, path, fmt)
    return entries
