"""Trees: the safe text <-> tree layer (random trees and mutations: ``variation.py``).

Text is prefix notation, DEAP style (``neg(mul(y, log(p)))``). ``parse`` is a small iterative
tokenizer/parser -- no ``eval``/``exec``, no ``gp.compile``/``PrimitiveTree.from_string`` -- so
hostile input (5,000 levels of nesting, megabytes of text) is refused with a one-line
:class:`ParseError` instead of a ``RecursionError`` or code execution. Names overloaded over
several types (the ``typed`` set) are resolved by argument types. ``to_text`` prints a tree
back; parse(to_text(t)) == t for every tree.

Fed by ``psets.py``; used by ``variation``, ``codegen``, ``symbolic``, ``screen`` and the search.
"""
from __future__ import annotations

import difflib
import math
import re

from deap import gp

from ..errors import InputError
from .psets import TEMPLATE_CALL, PSet, load_pset
from .psets import fill_template
from .psets import format_number  # noqa: F401 - also this module's name for it

MAX_TEXT = 100_000  # characters; far above any tree within the size limits

_TOKEN = re.compile(r"\s*(?:(?P<num>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
                    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<punct>[(),]))", re.ASCII)
_NONFINITE = {"inf", "infinity", "nan"}


class ParseError(ValueError):
    """Bad expression text (one-line message; the CLI maps it to exit code 2)."""


def _tokens(text: str):
    pos, n = 0, len(text)
    while True:
        while pos < n and text[pos].isspace():
            pos += 1
        if pos >= n:
            return
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ParseError(f"unexpected character {text[pos]!r} at position {pos}")
        kind = m.lastgroup
        yield kind, m.group(kind), pos
        pos = m.end()


def expand_template(text: str, pset: "PSet") -> str:
    """``NAME:VALUE`` for a ``[zoo_templates]`` name of ``pset`` -> its expression text (the
    value checked to be a number in [min, max)); any other text unchanged."""
    m = TEMPLATE_CALL.match(text) if isinstance(text, str) else None
    if m is None or m.group(1) not in pset.templates:
        return text
    t = pset.templates[m.group(1)]
    try:
        value = float(m.group(2))
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and t["min"] <= value < t["max"]):
        raise ParseError(f"{m.group(1)}:{m.group(2)}: {t['param']} must be a number in "
                         f"[{t['min']:g}, {t['max']:g})")
    return fill_template(t, value)


class _Node:
    __slots__ = ("kind", "name", "value", "pos", "nargs")

    def __init__(self, kind, name, value, pos):
        self.kind, self.name, self.value, self.pos, self.nargs = kind, name, value, pos, 0


def _scan(text: str, pset: PSet, max_height: int, max_size: int, zoo_depth: int = 0) -> list:
    """Text -> flat prefix list of untyped nodes, checking syntax, names, arity and limits."""
    if not isinstance(text, str):
        raise ParseError("expression must be text")
    if len(text) > MAX_TEXT:
        raise ParseError(f"expression too long ({len(text)} characters; limit {MAX_TEXT})")
    nodes, stack = [], []  # stack: indices of open calls
    expect_operand, toks = True, _tokens(text)
    pending = None
    while True:
        tok = pending if pending is not None else next(toks, None)
        pending = None
        if tok is None:
            break
        kind, val, pos = tok
        if expect_operand:
            depth = len(stack)
            if depth > max_height:
                raise ParseError(f"expression deeper than the limit of {max_height} levels")
            if kind == "num":
                number = float(val)
                if not math.isfinite(number):
                    raise ParseError(f"non-finite literal {val!r} at position {pos}")
                if number == 0.0 and any(ch in "123456789" for ch in val.lower().split("e")[0]):
                    raise ParseError(f"literal {val!r} at position {pos} underflows to 0")
                nodes.append(_Node("lit", None, number, pos))
                expect_operand = False
            elif kind == "name":
                low = val.lower()
                if low in _NONFINITE:
                    raise ParseError(f"non-finite literal {val!r} at position {pos}")
                if val != low:
                    raise ParseError(f"unknown name {val!r} at position {pos} (names are lower case)")
                nxt = next(toks, None)
                if nxt is not None and nxt[0] == "punct" and nxt[1] == "(":
                    if val not in pset.overloads:
                        if val in pset.zoo or val in pset.terminals:
                            raise ParseError(f"{val!r} at position {pos} takes no arguments "
                                             f"(write {val}, not {val}(...))")
                        raise ParseError(_unknown(val, pos, pset, call=True))
                    nodes.append(_Node("call", val, None, pos))
                    stack.append(len(nodes) - 1)
                    expect_operand = True
                else:
                    pending = nxt
                    if val in pset.terminals:
                        nodes.append(_Node("term", val, None, pos))
                    elif val in pset.zoo and zoo_depth == 0:
                        sub = _scan(pset.zoo[val], pset, max_height, max_size, zoo_depth + 1)
                        nodes.extend(sub)
                    elif val in pset.overloads:
                        raise ParseError(f"{val!r} at position {pos} is an operation and needs arguments: {val}(...)")
                    else:
                        raise ParseError(_unknown(val, pos, pset, call=False))
                    expect_operand = False
            else:
                what = "end of text" if val is None else repr(val)
                raise ParseError(f"expected an expression at position {pos}, found {what}")
        else:
            if kind != "punct" or val == "(":
                if not stack:
                    raise ParseError(f"trailing text at position {pos}: {val!r}")
                raise ParseError(f"expected ',' or ')' at position {pos}, found {val!r}")
            if not stack:
                extra = " (unbalanced parentheses)" if val == ")" else ""
                raise ParseError(f"trailing text at position {pos}: {val!r}{extra}")
            call = nodes[stack[-1]]
            call.nargs += 1
            if val == ",":
                expect_operand = True
            else:
                stack.pop()
                arities = pset.arities(call.name)
                if call.nargs not in arities:
                    want = " or ".join(str(a) for a in sorted(arities))
                    raise ParseError(f"wrong arity: {call.name!r} at position {call.pos} takes {want} "
                                     f"argument{'s' if want != '1' else ''}, got {call.nargs}")
        if len(nodes) > max_size:
            raise ParseError(f"expression larger than the limit of {max_size} nodes")
    if not nodes:
        raise ParseError("empty expression")
    if stack:
        raise ParseError(f"unbalanced parentheses: {len(stack)} unclosed '('")
    if expect_operand:
        raise ParseError("expression ends where an argument was expected")
    return nodes


def _unknown(name, pos, pset, call):
    known = sorted(pset.overloads) + sorted(pset.terminals) + sorted(pset.zoo)
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    what = "operation" if call else "name"
    return f"unknown {what} {name!r} at position {pos}{hint}"


def _children(nodes):
    """Index lists of each node's children in a prefix list (iterative)."""
    kids = [[] for _ in nodes]
    stack = []
    for i, node in enumerate(nodes):
        if stack:
            kids[stack[-1]].append(i)
            while stack and len(kids[stack[-1]]) == nodes[stack[-1]].nargs:
                stack.pop()
        if node.kind == "call":
            stack.append(i)
    return kids


def parse(text: str, pset="paper", *, max_height=None, max_size=None) -> gp.PrimitiveTree:
    """Expression text (or a zoo name) -> ``deap.gp.PrimitiveTree``; raises :class:`ParseError`."""
    pset = load_pset(pset)
    max_height = pset.max_height if max_height is None else max_height
    max_size = pset.max_size if max_size is None else max_size
    nodes = _scan(expand_template(text, pset), pset, max_height, max_size)
    kids = _children(nodes)
    all_types = set(pset.types)
    # Bottom-up: the set of types each node can have.
    possible = [None] * len(nodes)
    for i in range(len(nodes) - 1, -1, -1):
        node = nodes[i]
        if node.kind == "lit":
            possible[i] = all_types
        elif node.kind == "term":
            possible[i] = {pset.terminals[node.name]}
        else:
            outs = {pset.prims[k].out for k in pset.overloads[node.name]
                    if _fits(pset.prims[k].in_types, [possible[c] for c in kids[i]])}
            if not outs:
                raise ParseError(_type_error(pset, node, [possible[c] for c in kids[i]]))
            possible[i] = outs
    if pset.root not in possible[0]:
        got = " or ".join(sorted(possible[0]))
        raise ParseError(f"type error: the expression must be of type {pset.root}, got {got}")
    # Top-down: pick the overload that yields the expected type.
    chosen = [None] * len(nodes)
    expected = [None] * len(nodes)
    expected[0] = pset.root
    for i, node in enumerate(nodes):
        want = expected[i]
        if node.kind == "call":
            for k in pset.overloads[node.name]:
                info = pset.prims[k]
                if info.out == want and _fits(info.in_types, [possible[c] for c in kids[i]]):
                    chosen[i] = pset.deap.mapping[k]
                    for c, t in zip(kids[i], info.in_types):
                        expected[c] = t
                    break
        elif node.kind == "term":
            chosen[i] = pset.deap.mapping[node.name]
        else:
            chosen[i] = constant(pset, node.value, want)
    tree = gp.PrimitiveTree(chosen)
    if tree.height > max_height:  # zoo expansion can add depth after the scan
        raise ParseError(f"expression deeper than the limit of {max_height} levels")
    return tree



def as_tree(expr, pset="paper") -> gp.PrimitiveTree:
    """Expression text (or a zoo name) parsed, or a ``PrimitiveTree`` passed through; anything
    else is an ``InputError``. What every API function and exporter accepts as an expression."""
    if isinstance(expr, str):
        return parse(expr, pset)
    if isinstance(expr, gp.PrimitiveTree):
        return expr
    raise InputError(f"expected expression text or a PrimitiveTree, got {type(expr).__name__}")

def _fits(in_types, child_sets):
    return len(in_types) == len(child_sets) and all(t in s for t, s in zip(in_types, child_sets))


def _type_error(pset, node, child_sets):
    sigs = "; ".join("(" + ", ".join(pset.prims[k].in_types) + ")" for k in pset.overloads[node.name])
    got = ", ".join("/".join(sorted(s)) for s in child_sets)
    return f"type error: {node.name!r} at position {node.pos} takes {sigs}, got ({got})"


def constant(pset: PSet, value: float, type_name: str) -> gp.Terminal:
    """The set's own constant terminal when it has one, else a literal terminal."""
    t = pset.types[type_name]
    for term in pset.deap.terminals[t]:
        if isinstance(term, gp.Terminal) and isinstance(term.value, (int, float)) \
                and float(term.value) == value:
            return term
    lit = int(value) if float(value).is_integer() and abs(value) < 1e15 else float(value)
    return gp.Terminal(lit, False, t)


def var_name(node, pset: PSet):
    """'y'/'p' for a variable terminal (DEAP keeps renamed arguments in ``.value``), else None."""
    if isinstance(node, gp.Terminal) and isinstance(node.value, str) and node.value in pset.terminals:
        return node.value
    return None


def display_name(pset: PSet, node) -> str:
    if isinstance(node, gp.Primitive):
        return pset.prims[node.name].display
    var = var_name(node, pset)
    return var if var else format_number(float(node.value))


def to_text(tree, pset="paper") -> str:
    """Tree -> canonical text (plain names, ``", "`` separators). Iterative."""
    pset = load_pset(pset)
    out, stack = [], []  # stack: remaining argument counts of open calls
    for node in tree:
        if stack:
            if stack[-1][1] > 0:
                out.append(", ")
            stack[-1][1] += 1
        if isinstance(node, gp.Primitive):
            out.append(display_name(pset, node) + "(")
            stack.append([node.arity, 0])
        else:
            out.append(display_name(pset, node))
        while stack and stack[-1][1] == stack[-1][0]:
            out.append(")")
            stack.pop()
    return "".join(out)


def canonical_text(text: str, pset="paper") -> str:
    """Parse and print back: the normal textual form of an expression (zoo names expanded)."""
    return to_text(parse(text, pset), pset)
