"""The text <-> tree layer: round trips, malformed input, literals, typed overloads, mutations.

Everything here is pure parsing/printing (no torch, no sympy), so it runs in well under a
second per test. Seeds go through ``random.Random``; the global RNG must stay untouched.
"""
import random

import pytest
from deap import gp
from hypothesis import HealthCheck, given, settings, strategies as st

from gp_loss.lang.psets import load_pset
from gp_loss.lang.trees import MAX_TEXT, ParseError, parse, to_text
from gp_loss.lang.variation import MUTATIONS, mutate, random_tree

PSETS = ("paper", "typed")
SETTINGS = settings(max_examples=150, derandomize=True, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _sig(tree):
    """A comparable form of a tree: (name, value, return type) per node."""
    return [(n.name, getattr(n, "value", None), n.ret) for n in tree]


def _roundtrip(tree, pset):
    text = to_text(tree, pset)
    again = parse(text, pset)
    assert _sig(again) == _sig(tree), text
    assert to_text(again, pset) == text
    return text


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("name", PSETS)
@SETTINGS
@given(seed=st.integers(0, 2**32 - 1))
def test_random_trees_round_trip(name, seed):
    pset = load_pset(name)
    rng = random.Random(seed)
    tree = random_tree(pset, rng)
    assert len(tree) <= pset.max_size and tree.height <= pset.max_height
    _roundtrip(tree, pset)


@pytest.mark.parametrize("name", PSETS)
def test_many_seeded_trees_and_mutants_round_trip(name):
    pset = load_pset(name)
    rng = random.Random(12345)
    for _ in range(300):
        tree = random_tree(pset, rng)
        _roundtrip(tree, pset)
        child, kind = mutate(tree, pset, rng)
        assert kind in MUTATIONS
        if child is not None:
            # Re-parsing type-checks the mutant too (typed set: every node well typed).
            _roundtrip(child, pset)


@pytest.mark.parametrize("name", PSETS)
def test_trees_at_the_limits_round_trip(name):
    pset = load_pset(name)
    rng = random.Random(7)
    for _ in range(50):
        tree = random_tree(pset, rng, min_height=pset.max_height - 2,
                           max_height=pset.max_height - 1)
        if len(tree) <= pset.max_size:
            _roundtrip(tree, pset)


def test_whitespace_is_free():
    assert _sig(parse(" neg ( mul(y,log( p ) ) )\n")) == _sig(parse("neg(mul(y, log(p)))"))


# ----------------------------------------------------------------------------- malformed input

MALFORMED = [
    "foo(p)",              # unknown operation
    "q",                   # unknown name
    "Log(p)",              # names are lower case
    "log(p, y)",           # wrong arity
    "add(p)",              # wrong arity
    "log()",
    "log",                 # operation without arguments
    "y(p)",                # terminal called
    "log(p",               # unbalanced
    "log(p))",             # unbalanced
    "((p))",
    "log(p) y",            # trailing text
    "log(p)(",
    "p;",
    "1.5.2",
    "",                    # empty
    "   \n\t",
    "inf", "nan", "-inf", "Infinity", "1e999", "-1e999", "mul(y, nan)", "add(p, 1e400)",
    "mul(y,,p)", "mul(y, p,)", ",", ")", "add(y p)",
    "__import__('os')", "p.__class__", "lambda: 0", "exec(p)",
    "neg(" * 9 + "p" + ")" * 9,                       # deeper than 8
    "neg(" * 5000 + "p" + ")" * 5000,                  # 5,000 levels: no RecursionError
    "(" * 5000,
    "add(" * 5000 + "p" + ", p)" * 5000,
    "p" + " " * 1_000_000,                              # 1 MB
    "add(p, " * 200_000 + "p" + ")" * 200_000,
]


@pytest.mark.parametrize("name", PSETS)
@pytest.mark.parametrize("text", MALFORMED, ids=lambda t: repr(t[:30]) + f"[{len(t)}]")
def test_malformed_input_raises_parse_error(name, text):
    with pytest.raises(ParseError) as info:
        parse(text, name)
    message = str(info.value)
    assert message and "\n" not in message and len(message) < 300


def test_too_large():
    # A balanced binary tree: 63 nodes, height 5 -- within the height limit, over the size limit.
    def full(h):
        return "p" if h == 0 else f"add({full(h - 1)}, {full(h - 1)})"
    assert len(parse(full(4))) == 31
    with pytest.raises(ParseError, match="larger"):
        parse(full(5))


def test_height_limit_is_inclusive():
    assert parse("neg(" * 8 + "p" + ")" * 8).height == 8


def test_deep_nesting_parses_iteratively_with_raised_limits():
    tree = parse("neg(" * 5000 + "p" + ")" * 5000, max_height=10**6, max_size=10**6)
    assert len(tree) == 5001
    assert to_text(tree).count("neg(") == 5000


def test_text_limit_and_non_text():
    with pytest.raises(ParseError, match="too long"):
        parse("p" * (MAX_TEXT + 1))
    for bad in (None, 3, b"p", ["p"]):
        with pytest.raises(ParseError):
            parse(bad)


def test_typed_errors():
    for text in ("ce(sum(p), sum(y))",        # a reduction given Sample arguments
                 "add(y, sum(p))",            # mixed types
                 "mul(y, p)",                 # root must be a Sample
                 "sum(sum(p))",
                 "ce",                        # in typed, ce is a reduction, not a zoo name
                 "baikal"):
        with pytest.raises(ParseError):
            parse(text, "typed")


# ----------------------------------------------------------------------------- literals

@pytest.mark.parametrize("literal,printed", [("0.5", "0.5"), ("2", "2"), ("-3.25", "-3.25"),
                                             ("2.0", "2"), ("1e-3", "0.001"), ("0.1", "0.1"),
                                             ("-.5", "-0.5"), ("+7", "7"), ("1e20", "1e+20")])
def test_user_literals_are_kept_exactly(literal, printed):
    tree = parse(f"mul({literal}, p)")
    assert tree[1].value == float(literal)
    assert to_text(tree) == f"mul({printed}, p)"
    assert parse(to_text(tree))[1].value == float(literal)


def test_set_constants_are_the_sets_own_terminals():
    pset = load_pset("paper")
    own = [t for t in pset.deap.terminals[pset.root_type] if not isinstance(t.value, str)]
    tree = parse("add(1, mul(-1, p))")
    assert tree[1] in own and tree[3] in own


# ----------------------------------------------------------------------------- typed overloads

def test_typed_overloads_resolved_by_argument_types():
    pset = load_pset("typed")
    tree = parse("add(ce(y, p), mse(y, p))", pset)
    assert [n.name for n in tree] == ["add_Sample", "ce", "ARG0", "ARG1", "mse", "ARG0", "ARG1"]
    assert to_text(tree, pset) == "add(ce(y, p), mse(y, p))"
    tree = parse("sum(add(y, log(p)))", pset)
    assert [n.name for n in tree][:3] == ["sum", "add_Elem", "ARG0"]
    assert tree[3].name == "log_Elem"
    # Constants take the type their context needs.
    sample = parse("add(1, sum(p))", pset)
    assert pset.type_of[sample[1].ret] == "Sample"
    elem = parse("sum(add(1, p))", pset)
    assert pset.type_of[elem[2].ret] == "Elem"
    assert pset.type_of[parse("neg(-1)", pset)[1].ret] == "Sample"


def test_zoo_names_expand_in_paper():
    paper = load_pset("paper")
    for name, text in paper.zoo.items():
        assert _sig(parse(name)) == _sig(parse(text))
    assert to_text(parse("ce")) == "neg(mul(y, log(p)))"
    assert to_text(parse("add(ce, mse)")) == "add(neg(mul(y, log(p))), square(sub(y, p)))"
    with pytest.raises(ParseError):
        parse("ce(y, p)", "paper")
    with pytest.raises(ParseError, match="deeper"):
        parse("neg(" * 5 + "focal" + ")" * 5)   # expansion counts toward the height limit


# ----------------------------------------------------------------------------- mutations

@pytest.mark.parametrize("name", PSETS)
def test_mutations_respect_limits(name):
    pset = load_pset(name)
    rng = random.Random(3)
    for kind in MUTATIONS:
        tree = random_tree(pset, rng)
        for _ in range(200):
            child, used = mutate(tree, pset, rng, weights={kind: 1.0})
            assert used == kind
            if child is None:
                tree = random_tree(pset, rng)
                continue
            assert len(child) <= pset.max_size and child.height <= pset.max_height
            _roundtrip(child, pset)
            tree = child


def _lineage(pset, seed, steps=60):
    rng = random.Random(seed)
    tree = random_tree(pset, rng)
    texts = [to_text(tree, pset)]
    for _ in range(steps):
        child, kind = mutate(tree, pset, rng)
        texts.append(f"{kind}:{to_text(child, pset) if child is not None else None}")
        tree = child if child is not None else random_tree(pset, rng)
    return texts


@pytest.mark.parametrize("name", PSETS)
def test_a_seed_reproduces_the_sequence_and_global_rng_is_untouched(name):
    pset = load_pset(name)
    random.seed(999)
    before = random.getstate()
    first = _lineage(pset, 42)
    parse(first[0], pset)
    assert random.getstate() == before
    assert _lineage(pset, 42) == first
    assert _lineage(pset, 43) != first
    assert random.getstate() == before


def test_trees_are_deap_primitive_trees():
    assert isinstance(parse("ce"), gp.PrimitiveTree)
