"""Primitive sets: the data files in ``primitives/`` turned into DEAP typed primitive sets.

A set file (TOML, never executed) names its types, terminals, constants, which operations of
the table in ``ops.py`` it uses over which types, its size limits and its zoo of named
reference losses. ``load_pset(name_or_path)`` returns a :class:`PSet` wrapping a
``deap.gp.PrimitiveSetTyped``; trees (``trees.py``), the printer (``codegen.py``) and the
symbolic layer read everything they need from it.

An operation name may exist over several types (``add`` on Elem and on Sample in ``typed``):
DEAP needs unique names, so internally such overloads are called ``add_Elem``/``add_Sample``;
the text form and every printer show the plain name, and the parser resolves it by argument
types. A user adds a set by dropping a TOML file into ``primitives/`` (or passing its path, or
putting it in a folder listed in ``GP_LOSS_PSET_PATH``) without touching the engine.

Terminals are ``y`` (targets) and ``p`` (softmax), and for the ``reference`` set also ``logp``
(log-softmax of the logits) and ``inv_c`` (1/C): the printer knows how to supply each
(``TERMINALS``). ``[zoo_templates]`` entries give parametrised zoo names (``label_smoothing:0.2``)
expanded by ``trees.expand_template`` (a checked number pasted into the set's own text, then parsed).
A set with ``searchable = false`` (``reference``) holds baselines: ``search`` refuses it, and
``loss_pset`` lets ``train``/``compare``/``export`` find its zoo names whatever ``--pset`` says.
"""
from __future__ import annotations

import functools
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from deap import gp

from .. import shipped
from . import ops as prims


# Terminal name -> what it is; the printer (``codegen``) supplies each one.
TERMINALS = {"y": "targets (B, C)", "p": "softmax probabilities (B, C)",
             "logp": "log-softmax of the logits (B, C)", "inv_c": "1 / number of classes"}
PREDICTION_TERMINALS = frozenset({"p", "logp"})  # the terminals that depend on the logits
TEMPLATE_CALL = re.compile(r"^\s*([a-z_][a-z0-9_]*):([^\s:]+)\s*$")
REFERENCE_SET = "reference"


class PSetError(ValueError):
    """A primitive-set file is missing or malformed (one-line message)."""


@dataclass(frozen=True)
class PrimInfo:
    """What the engine knows about one DEAP primitive of a set."""

    internal: str          # DEAP's unique name
    display: str           # the name users write and printers show
    op: prims.Op
    in_types: tuple        # type names
    out: str


@dataclass
class PSet:
    name: str
    description: str
    deap: gp.PrimitiveSetTyped
    types: dict            # type name -> the class DEAP uses as that type
    root: str              # type name of the root
    class_sum: bool        # per-sample loss = class sum of the root (paper) or the root itself
    terminals: dict        # terminal name -> type name
    constants: tuple       # numeric constants the search may generate
    prims: dict            # internal name -> PrimInfo
    overloads: dict        # display name -> [internal names], in declaration order
    zoo: dict              # name -> expression text
    max_height: int
    max_size: int
    gen_min_height: int
    gen_max_height: int
    source: str = ""
    type_of: dict = field(default_factory=dict)  # type class -> type name
    searchable: bool = True
    templates: dict = field(default_factory=dict)  # name -> {text, param, default, min, max}

    def arities(self, display: str) -> set:
        return {len(self.prims[i].in_types) for i in self.overloads.get(display, ())}

    @property
    def root_type(self):
        return self.types[self.root]


def _resolve_path(name_or_path: str) -> Path:
    text = str(name_or_path)
    if text.endswith(".toml") or os.sep in text:
        path = Path(text)
        if not path.is_file():
            raise PSetError(f"primitive-set file not found: {text}")
        return path
    if not text.replace("_", "").replace("-", "").isalnum():
        raise PSetError(f"bad primitive-set name {text!r}")
    for folder in filter(None, os.environ.get("GP_LOSS_PSET_PATH", "").split(os.pathsep)):
        candidate = Path(folder) / f"{text}.toml"
        if candidate.is_file():
            return candidate
    builtin = shipped.files("gp_loss.builtin_psets") / f"{text}.toml"
    if builtin.is_file():
        return Path(str(builtin))
    raise PSetError(f"unknown primitive set {text!r}; available: {', '.join(available_psets())}")


def available_psets() -> list:
    """Names of the sets shipped in ``primitives/``."""
    return sorted(p.name[:-5] for p in shipped.files("gp_loss.builtin_psets").iterdir()
                  if p.name.endswith(".toml"))


def _need(data: dict, key: str, kind, where: str):
    if key not in data:
        raise PSetError(f"{where}: missing key {key!r}")
    value = data[key]
    if not isinstance(value, kind):
        raise PSetError(f"{where}: {key!r} must be {getattr(kind, '__name__', kind)}")
    return value


@functools.lru_cache(maxsize=32)
def _load_cached(path_str: str) -> PSet:
    path = Path(path_str)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PSetError(f"{path}: cannot read primitive set: {exc}") from None
    where = str(path)
    name = _need(data, "name", str, where)
    type_names = _need(data, "types", list, where)
    root = _need(data, "root", str, where)
    terminals = _need(data, "terminals", dict, where)
    if root not in type_names:
        raise PSetError(f"{where}: root type {root!r} is not among types {type_names}")
    types = {t: type(t, (), {"__module__": "gp_loss.lang.psets"}) for t in type_names}
    term_names = list(terminals)
    if not term_names or not set(term_names) <= set(TERMINALS):
        # Terminal names are pasted into the generated source and the printer supplies each
        # from (targets, logits): nothing else may be a terminal.
        raise PSetError(f"{where}: terminals must be among {', '.join(TERMINALS)} "
                        f"(y and/or p for a search set); got {term_names}")
    for t_name, t_type in terminals.items():
        if t_type not in types:
            raise PSetError(f"{where}: terminal {t_name!r} has unknown type {t_type!r}")
    # Arguments of the DEAP set are the terminals y, p, ... (renamed ARGi), in file order.
    pset = gp.PrimitiveSetTyped(name, [types[terminals[t]] for t in term_names], types[root])
    pset.renameArguments(**{f"ARG{i}": t for i, t in enumerate(term_names)})

    entries = []  # (display, op, in_types, out)
    for t_name, names in data.get("elementwise", {}).items():
        if t_name not in types:
            raise PSetError(f"{where}: [elementwise] has unknown type {t_name!r}")
        for op_name in names:
            try:
                op = prims.lookup(op_name, "elementwise")
            except KeyError as exc:
                raise PSetError(f"{where}: {exc.args[0]}") from None
            entries.append((op_name, op, (t_name,) * op.arity, t_name))
    for red in data.get("reduction", []):
        rname = _need(red, "name", str, where)
        try:
            op = prims.lookup(rname, "reduction")
        except KeyError as exc:
            raise PSetError(f"{where}: {exc.args[0]}") from None
        args = tuple(_need(red, "args", list, where))
        out = _need(red, "returns", str, where)
        if len(args) != op.arity or any(a not in types for a in args) or out not in types:
            raise PSetError(f"{where}: reduction {rname!r} has a bad signature {args} -> {out}")
        entries.append((rname, op, args, out))
    if not entries:
        raise PSetError(f"{where}: the set has no operations")

    counts: dict = {}
    for display, *_ in entries:
        counts[display] = counts.get(display, 0) + 1
    infos, overloads = {}, {}
    for display, op, in_types, out in entries:
        internal = display if counts[display] == 1 else f"{display}_{'_'.join(dict.fromkeys(in_types + (out,)))}"
        if internal in infos:
            raise PSetError(f"{where}: operation {display!r} declared twice for {in_types}")
        infos[internal] = PrimInfo(internal, display, op, in_types, out)
        overloads.setdefault(display, []).append(internal)
        pset.addPrimitive(_never_called, [types[t] for t in in_types], types[out], name=internal)
    if set(overloads) & set(term_names):
        raise PSetError(f"{where}: a terminal shares its name with an operation")

    raw_constants = data.get("constants", [])
    if not all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c)
               for c in raw_constants):
        raise PSetError(f"{where}: constants must be finite numbers, got {raw_constants}")
    constants = tuple(float(c) for c in raw_constants)
    for value in constants:
        for t in types.values():
            # DEAP formats unnamed terminals with str(value); ints print as "1", "-1".
            pset.addTerminal(int(value) if value.is_integer() else value, t)
    # Every type must be able to end a branch at any depth, or DEAP's generator raises
    # "no terminal of type X" part-way through a search.
    for t_name, t in types.items():
        if not pset.terminals.get(t):
            raise PSetError(f"{where}: type {t_name!r} has no terminal or constant")

    limits = data.get("limits", {})
    gen = data.get("generation", {})
    zoo = dict(data.get("zoo", {}))
    if not all(isinstance(v, str) for v in zoo.values()):
        raise PSetError(f"{where}: [zoo] values must be expression strings")
    templates = {}
    for tname, spec in data.get("zoo_templates", {}).items():
        tw = f"{where}: [zoo_templates.{tname}]"
        text, param = _need(spec, "text", str, tw), _need(spec, "param", str, tw)
        bounds = [spec.get(k) for k in ("default", "min", "max")]
        if not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds) \
                or not bounds[1] <= bounds[0] < bounds[2] or "{" + param + "}" not in text:
            raise PSetError(f"{tw}: needs text with {{{param}}}, and min <= default < max")
        templates[tname] = {"text": text, "param": param, "default": float(bounds[0]),
                            "min": float(bounds[1]), "max": float(bounds[2])}
        zoo.setdefault(tname, fill_template(templates[tname], float(bounds[0])))
    clash = set(zoo) & (set(term_names) | set(overloads))
    if clash:
        # A zoo name is only recognised where it is not followed by '(' -- but a name that is
        # also an operation would still be confusing in error messages; the typed set's `ce`
        # reduction is fine because that set has no zoo.
        raise PSetError(f"{where}: zoo names clash with operations/terminals: {sorted(clash)}")
    return PSet(
        name=name, description=data.get("description", ""), deap=pset, types=types, root=root,
        class_sum=bool(data.get("class_sum", False)), terminals=dict(terminals),
        constants=constants, prims=infos, overloads=overloads, zoo=dict(zoo),
        max_height=int(limits.get("max_height", 8)), max_size=int(limits.get("max_size", 48)),
        gen_min_height=int(gen.get("min_height", 1)), gen_max_height=int(gen.get("max_height", 4)),
        source=where, type_of={v: k for k, v in types.items()},
        searchable=bool(data.get("searchable", True)), templates=templates,
    )


def format_number(value: float) -> str:
    """Literal text that parses back to exactly ``value`` (integers print without '.0')."""
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def fill_template(template: dict, value: float) -> str:
    """A template's text with its parameter replaced by ``value``, printed as a literal."""
    return template["text"].replace("{" + template["param"] + "}", format_number(value))


def loss_pset(text: str, pset="paper") -> "PSet":
    """The set an expression or zoo name given to ``train``/``compare``/``export`` belongs to:
    ``pset``, unless ``text`` names a zoo loss of the ``reference`` set (``ce_torch``,
    ``label_smoothing``, ``label_smoothing:0.2``) that ``pset`` does not have."""
    ps = load_pset(pset)
    name = text.strip().split(":", 1)[0] if isinstance(text, str) else None
    if name and name not in ps.zoo and name not in ps.templates:
        ref = load_pset(REFERENCE_SET)
        if name in ref.zoo or name in ref.templates:
            return ref
    return ps


def _never_called(*_args):  # pragma: no cover - trees are printed to source, never called
    raise RuntimeError("gp-loss never evaluates DEAP primitives directly")


def load_pset(name_or_path="paper") -> PSet:
    """Load a primitive set by name (``paper``, ``typed``, a user set) or by .toml path."""
    if isinstance(name_or_path, PSet):
        return name_or_path
    return _load_cached(str(_resolve_path(name_or_path)))
