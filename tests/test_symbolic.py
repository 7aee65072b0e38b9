"""Symbolic layer: canonical keys (determinism, recall, no false merges), formulas, LaTeX.

The equivalence set (tests/equivalence_set.toml) is checked three ways: its labels against
float64 autograd through the printer's compiled per-sample function, its recorded integrity
signs against ``screen.integrity``, and the canonical key against the labels.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import numpy as np
import pytest
import sympy

from gp_loss.lang import formula as F
from gp_loss.lang import symbolic as S
from gp_loss.lang.ops import plog
from gp_loss.lang.psets import load_pset
from gp_loss.lang.trees import parse, to_text
from gp_loss.lang.variation import mutate, random_tree

ROOT = Path(__file__).resolve().parents[1]
PAIRS = tomllib.loads((ROOT / "tests" / "equivalence_set.toml").read_text())["pair"]


def _key(text, pset="paper", sign=1):
    return S.canonical_key(parse(text, pset), pset, sign)


def _pair_keys(pair):
    pset = pair.get("pset", "paper")
    return (_key(pair["a"], pset, pair["sign_a"]), _key(pair["b"], pset, pair["sign_b"]))


# ----------------------------------------------------------------------------- the set itself

def test_set_format():
    assert len(PAIRS) >= 40
    for pair in PAIRS:
        assert {"a", "b", "same", "why", "sign_a", "sign_b"} <= set(pair), pair
        assert pair["sign_a"] in (1, -1) and pair["sign_b"] in (1, -1)
    kinds = {pair.get("pset", "paper") for pair in PAIRS}
    assert kinds == {"paper", "typed"}
    assert sum(p["same"] for p in PAIRS) >= 20 and sum(not p["same"] for p in PAIRS) >= 20


def _probes():
    """Two blocks (C = 10, 100): near-uniform to confident logit rows, and rows with some
    p ~ 1e-30 where the true class is right or wrong."""
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(1)
    out = []
    for c in (10, 100):
        scales = torch.tensor([0.01, 1.0, 3.0, 10.0], dtype=torch.float64).repeat_interleave(12)
        z = torch.randn(len(scales) + 4, c, generator=g, dtype=torch.float64)
        z[:len(scales)] *= scales[:, None]
        z[len(scales):, 0] += 69.0
        t = torch.randint(0, c, (len(z),), generator=g)
        t[len(scales):] = torch.tensor([0, 1, 0, 2])
        out.append((z, t))
    return out


def _oriented_grad(text, pset, sign, probes):
    import torch

    from gp_loss.lang.codegen import compile_loss
    _loss, per_sample = compile_loss(parse(text, pset), pset, 1, "f")
    grads = []
    for z, t in probes:
        z = z.clone().requires_grad_(True)
        y = torch.nn.functional.one_hot(t, z.shape[1]).to(z.dtype)
        value = per_sample(y, torch.softmax(z, dim=1)).sum()
        g = torch.autograd.grad(value, z, allow_unused=True)[0] if value.requires_grad else None
        grads.append(np.zeros(tuple(z.shape)) if g is None else g.numpy())
    return sign * np.concatenate([g.ravel() for g in grads])


@pytest.fixture
def one_thread():
    """Tiny tensors: torch's thread pool only costs time (a busy 2-core machine)."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_set_labels_hold_numerically(one_thread):
    """Each label by the definition: same oriented gradient (float64 autograd) or clearly not."""
    probes = _probes()
    for pair in PAIRS:
        pset = pair.get("pset", "paper")
        ga = _oriented_grad(pair["a"], pset, pair["sign_a"], probes)
        gb = _oriented_grad(pair["b"], pset, pair["sign_b"], probes)
        finite = np.isfinite(ga) & np.isfinite(gb)
        scale = max(np.abs(ga[finite]).max(), np.abs(gb[finite]).max(), 1e-300)
        rel = np.abs(ga[finite] - gb[finite]).max() / scale
        if pair["same"]:
            assert rel < 1e-9, (pair, rel)
        else:
            assert rel > 1e-3, (pair, rel)


def test_set_signs_match_integrity():
    screen = pytest.importorskip("gp_loss.screen.integrity")
    for pair in PAIRS:
        pset = load_pset(pair.get("pset", "paper"))
        for side in ("a", "b"):
            result = screen.integrity(parse(pair[side], pset), pset)
            sign = result.sign if result.accepted else 1
            assert sign == pair[f"sign_{side}"], (pair[side], result.reason, sign)


# ----------------------------------------------------------------------------- keys on the set

def test_no_false_merges_on_the_set():
    merged = [p for p in PAIRS if not p["same"] and len(set(_pair_keys(p))) == 1]
    assert merged == []


def test_key_recall_on_the_set():
    same = [p for p in PAIRS if p["same"]]
    missed = [(p["a"], p["b"]) for p in same if len(set(_pair_keys(p))) != 1]
    recall = 1 - len(missed) / len(same)
    print(f"key-only recall {recall:.3f} ({len(same) - len(missed)}/{len(same)})")
    assert missed == []


# ----------------------------------------------------------------------------- keys

def test_key_shape_and_cache():
    k = _key("ce")
    assert k.startswith("paper:") and len(k) == len("paper:") + 24
    assert _key("neg(mul(y, log(p)))") == k == _key("ce")
    with pytest.raises(ValueError):
        S.canonical_key(parse("ce"), "paper", 0)


def test_orientation():
    assert _key("mul(y, log(p))", sign=-1) == _key("ce")
    assert _key("mul(y, log(p))") != _key("ce")
    assert _key("ce", sign=-1) != _key("ce")


def test_constant_losses_share_one_key():
    for text in ("add(p, 1)", "sin(y)", "p", "y", "mul(exp(y), 2)", "sub(mul(y, p), mul(p, y))",
                 "add(max(y, p), mul(y, p))"):
        assert _key(text) == _key(text, sign=-1) == "paper:constant", text
    assert _key("mul(y, p)") != "paper:constant"
    assert _key("square(p)") != "paper:constant"   # sum_c p^2 is not constant


def test_protected_identities_are_not_applied():
    assert S.to_sympy(parse("ce"), "paper") == -S.Y * plog(S.P)
    assert _key("mul(y, log(square(p)))") != _key("mul(y, mul(2, log(p)))")
    assert _key("mul(y, recip(mul(p, p)))") != _key("mul(y, mul(recip(p), recip(p)))")
    assert _key("mul(y, div(p, p))") != _key("y")
    assert _key("mul(y, mul(p, 0.1))") != _key("mul(y, mul(p, 0.1000000000000001))")  # exact


def test_exact_identities_are_applied():
    same = [("mul(y, square(sqrt(p)))", "mul(y, p)"), ("mul(y, abs(neg(p)))", "mul(y, p)"),
            ("mul(y, log(abs(sub(p, 1))))", "mul(y, log(sub(1, p)))"),
            ("mul(mul(y, max(p, 1)), log(p))", "mul(y, log(p))"),
            ("mul(y, min(p, 1))", "mul(y, p)"),
            ("mul(y, inv1p(exp(neg(p))))", "mul(y, sigmoid(p))"),
            ("mul(y, sinh(tanh(neg(p))))", "neg(mul(y, sinh(tanh(p))))")]
    for a, b in same:
        assert _key(a) == _key(b), (a, b)


def test_typed_keys():
    assert _key("ce(y, p)", "typed").startswith("typed:")
    assert _key("dot(1, 1)", "typed") == "typed:constant"           # = C
    assert _key("log(sum(p))", "typed") == "typed:constant"         # = ln(1 + eps)
    assert _key("kl(y, p)", "typed") == _key("ce(y, p)", "typed")
    assert _key("mse(y, p)", "typed") != _key("dot(sub(y, p), sub(y, p))", "typed")
    assert _key("mse(y, p)", "typed") == _key("mse(p, y)", "typed")
    assert _key("neg(dot(y, log(p)))", "typed") != _key("ce")     # the set name is part of it


def test_key_deterministic_across_processes_and_hash_seeds():
    """The one subprocess test: keys and formulas under two PYTHONHASHSEEDs."""
    script = (
        "import json, random, sys\n"
        "from gp_loss.lang import formula as F, symbolic as S\n"
        "from gp_loss.lang.trees import parse\nfrom gp_loss.lang.variation import random_tree\n"
        "out = []\n"
        "for name, n in (('paper', 100), ('typed', 40)):\n"
        "    rng = random.Random(7)\n"
        "    for _ in range(n):\n"
        "        t = random_tree(name, rng)\n"
        "        out.append(S.canonical_key(t, name, 1))\n"
        "        out.append(S.canonical_key(t, name, -1))\n"
        "for z in ('ce', 'baikal', 'focal', 'mse'):\n"
        "    out.append(F.formula(parse(z), 'paper'))\n"
        "print(json.dumps(out))\n")
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(ROOT)))
             for seed in ("1", "4242")]   # run side by side
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0] == results[1]
    assert len(set(results[0])) > 50


def test_equal_keys_mean_equal_gradients_on_random_trees(one_thread):
    """No false merge among random trees and zoo mutants (numeric check of every key group)."""
    probes = _probes()
    pset = load_pset("paper")
    rng = random.Random(2024)
    trees = [random_tree(pset, rng) for _ in range(120)]
    for zoo in ("ce", "baikal", "focal", "mse"):
        t = parse(zoo, pset)
        for _ in range(40):
            child, _kind = mutate(t, pset, rng)
            if child is not None:
                trees.append(child)
                t = child if rng.random() < 0.7 else t
    groups: dict = {}
    for t in trees:
        groups.setdefault(S.canonical_key(t, pset, 1), {})[to_text(t, pset)] = t
    merged = 0
    for key, members in groups.items():
        texts = sorted(members)
        grads = [_oriented_grad(x, pset, 1, probes) for x in texts]
        if key == "paper:constant":
            for x, g in zip(texts, grads):
                finite = np.isfinite(g)
                assert not finite.any() or np.abs(g[finite]).max() < 1e-6, x
            continue
        merged += len(texts) - 1
        for x, g in zip(texts[1:], grads[1:]):
            finite = np.isfinite(g) & np.isfinite(grads[0])
            scale = max(np.abs(g[finite]).max(initial=0), np.abs(grads[0][finite]).max(initial=0))
            assert np.abs(g[finite] - grads[0][finite]).max(initial=0) <= 1e-7 * scale + 1e-12, \
                (texts[0], x)
    assert merged > 0   # the check above saw some merges


# ----------------------------------------------------------------------------- bounded work

def test_bloated_trees_complete():
    """Nested squares at the limits, huge literals, big random trees: keys and formulas return
    (how fast is a benchmark's business)."""
    pset = load_pset("paper")
    texts = ["square(square(square(square(square(square(add(p, log(p))))))))",
             "square(square(square(square(square(square(square(add(1e300, p))))))))",
             "mul(square(square(square(add(add(p, y), add(log(p), exp(p)))))), "
             "square(square(square(add(add(p, y), add(sin(p), exp(y)))))))",
             "sqrt(square(sqrt(square(sqrt(square(sqrt(add(1e-300, 0.1))))))))"]
    trees = [parse(x, pset) for x in texts]
    rng = random.Random(5)
    while len(trees) < 8:
        t = random_tree(pset, rng, min_height=6, max_height=8)
        if len(t) >= 30:
            trees.append(t)
    for t in trees:
        for sign in (1, -1):
            assert S.canonical_key(t, pset, sign).startswith("paper:")
        assert isinstance(F.formula(t, pset), str)
        assert isinstance(F.latex(t, pset), str)


# ----------------------------------------------------------------------------- display

def test_zoo_formulas():
    """Protected ops show their eps where it changes the value on the domain (issue 12)."""
    assert F.formula(parse("ce")) == "-y*log(p + 1e-07)"
    assert F.formula(parse("baikal")) == "y/(p + 1e-07) - log(p + 1e-07)"
    assert F.formula(parse("focal")) == "-y*(1 - p)**2*log(p + 1e-07)"
    assert F.formula(parse("mse")) == "(-p + y)**2"
    assert F.formula(parse("mul(exp(-1), mul(y, log(p)))")) == "0.367879*y*log(p + 1e-07)"
    assert F.formula(parse("mul(0.1, mul(y, log(p)))")) == "y*log(p + 1e-07)/10"
    assert F.formula(parse("mul(y, sigmoid(neg(p)))")) == "y*(1 - sigmoid(p))"
    assert F.formula(parse("add(mul(y, log(p)), mul(y, log(p)))")) == "2*y*log(p + 1e-07)"
    assert F.formula(parse("ce(y, p)", "typed"), "typed") == "ce(y, p)"
    assert F.formula(parse("sum(mul(y, p))", "typed"), "typed") == "sum(p*y)"


def test_latex():
    assert F.latex(parse("ce")) == r"- y \log{\left(p + 1 \cdot 10^{-7} \right)}"
    assert F.latex(parse("baikal")) == \
        r"\frac{y}{p + 1 \cdot 10^{-7}} - \log{\left(p + 1 \cdot 10^{-7} \right)}"
    assert r"\left|" in F.latex(parse("mul(y, abs(sub(p, y)))"))
    assert F.latex(parse("sum(p)", "typed"), "typed") == r"\sum_{c} \left(p\right)"
    for zoo in ("focal", "mse"):
        text = F.latex(parse(zoo))
        assert text.count("{") == text.count("}")


def test_formula_off_the_main_thread_is_the_same_text():
    from gp_loss.lang import formula as fmt
    want = F.formula(parse("focal"))
    fmt._SHOWN.clear()
    out = []
    worker = threading.Thread(target=lambda: out.append(F.formula(parse("focal"))))
    worker.start()
    worker.join()
    assert out == [want]


def test_to_sympy_modes():
    tree = parse("mul(erf(1), mul(y, log(p)))")
    exact = S.to_sympy(tree)
    assert exact == sympy.erf(1) * S.Y * plog(S.P)
    atoms = S.to_sympy(tree, constants="atoms")
    assert sympy.Symbol("erf(1)", real=True) in atoms.free_symbols
    assert S.to_sympy(tree, constants="float").has(sympy.Float)


@pytest.mark.parametrize("expr, shown", [
    ("div(p, mul(exp(y), y))", "p/(y*exp(y) + 1e-07)"),
    ("div(p, i1e(y))", "p/(1e-07 + exp(-y)*i1(y))"),      # abs(y) is y: y in {0, 1}
    ("recip(mul(exp(y), p))", "1/(p*exp(y) + 1e-07)"),
    ("div(add(p, y), y)", "(p + y)/(y + 1e-07)"),
    ("div(p, mul(y, y))", "p/(y**2 + 1e-07)"),
    ("div(p, sqrt(neg(inv1p(y))))", "p*sqrt(y + 1)"),
])
def test_a_product_below_the_bar_is_parenthesized(expr, shown):
    """The display formula must read as the loss: p/(y*exp(y)), never p/y*exp(y)."""
    from gp_loss.lang import formula as fmt
    assert str(fmt.formula(parse(expr, "paper"), "paper")) == shown
