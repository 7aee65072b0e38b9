"""Screening (DESIGN §5): integrity check, dependence, finiteness, fingerprints, ``same``,
the novelty index and the phenotype filter."""
from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from gp_loss.screen import integrity as screen
from gp_loss.screen import fingerprint, novelty
from gp_loss.lang.trees import parse

EQUIVALENCE_SET = Path(__file__).with_name("equivalence_set.toml")

CE = "neg(mul(y, log(p)))"
U_SHAPE = "mul(y, square(sub(p, 0.8)))"              # (0.2 - q)^2: minimum at row ~200
SHORT_PLATEAU = "mul(sub(1, y), add(min(p, 0.3), relu(sub(p, 0.305))))"  # flat for ~5 rows
LONG_PLATEAU = "mul(sub(1, y), add(min(p, 0.3), relu(sub(p, 0.35))))"    # flat for ~50 rows
OVERFLOW_ON_PROBE = "mul(y, exp(mul(-45, log(p))))"  # finite at p >= 1e-7, inf at p ~ 1e-30


def _diffs(expr):
    return np.diff(screen.integrity(expr).curve)


# ----------------------------------------------------------------------------- step 1

@pytest.mark.parametrize("expr, sign", [
    (CE, 1),
    ("mul(y, log(p))", -1),
    (U_SHAPE, 1),
    (f"neg({U_SHAPE})", -1),
    (SHORT_PLATEAU, 1),
    ("mse", 1),
])
def test_integrity_accepts(expr, sign):
    r = screen.integrity(expr)
    assert (r.accepted, r.reason, r.sign) == (True, screen.OK, sign)
    assert r.curve.shape == (1000,) and r.curve.dtype == np.float64


@pytest.mark.parametrize("expr, reason", [
    ("y", "integrity_constant"),
    ("1", "integrity_constant"),
    ("square(sub(p, 0.5))", "integrity_mid_extremum"),
    ("mul(y, sin(mul(p, 7)))", "integrity_turning_points"),
    (LONG_PLATEAU, "integrity_plateau"),
    ("mul(y, exp(div(1, p)))", "integrity_non_finite"),
])
def test_integrity_rejects(expr, reason):
    r = screen.integrity(expr)
    assert (r.accepted, r.reason, r.sign) == (False, reason, 1)


def test_integrity_shapes_are_what_the_cases_claim():
    d = _diffs(U_SHAPE)
    assert d[0] < 0 and d[-1] > 0 and 100 < np.argmin(screen.integrity(U_SHAPE).curve) < 300
    d = _diffs("mul(y, sin(mul(p, 7)))")
    assert np.count_nonzero(np.diff(np.sign(d))) == 2
    d = _diffs(SHORT_PLATEAU)
    assert 1 <= np.count_nonzero(d == 0) <= 10 and np.all(d >= 0)
    assert np.count_nonzero(_diffs(LONG_PLATEAU) == 0) > 10
    assert screen.integrity("square(sub(p, 0.5))").curve.argmin() in range(490, 510)


def test_integrity_sweep_is_the_papers():
    # The raw output of cross-entropy on the sweep: -ln(1 - q + eps) with q = linspace(eps, 1-eps).
    q = np.linspace(1e-7, 1 - 1e-7, 1000)
    expected = -np.log(np.abs(1.0 - q) + 1e-7)
    np.testing.assert_allclose(screen.integrity(CE).curve, expected, rtol=1e-12)


def _curve(*pieces):
    return np.concatenate([np.asarray(p, dtype=np.float64) for p in pieces])


def test_judge_curve_rules_on_synthetic_curves():
    up = np.arange(1000.0)
    assert screen.judge_curve(up) == (True, "ok", 1)
    assert screen.judge_curve(-up) == (True, "ok", -1)
    assert screen.judge_curve(np.full(1000, np.nan)) == (False, "integrity_non_finite", 1)
    # Increasing with a plateau early on (the authors' code took the sign from the third
    # difference, i.e. from inside the plateau, and flipped this curve).
    plateau = _curve([0, 1, 2], [2] * 5, np.arange(3, 995))
    assert len(plateau) == 1000 and screen.judge_curve(plateau) == (True, "ok", 1)
    # Leading zeros take the first run's sign: no extra change.
    assert screen.judge_curve(_curve([5] * 4, 5 + np.arange(1, 997))) == (True, "ok", 1)
    assert screen.judge_curve(_curve([5] * 4, 5 - np.arange(1, 997))) == (True, "ok", -1)
    # A zero difference right at the turning point is filled from the one before: one change.
    u = _curve(np.arange(300, 0, -1), [0, 0], np.arange(1, 699))
    assert len(u) == 1000 and screen.judge_curve(u) == (True, "ok", 1)
    assert screen.judge_curve(-u) == (True, "ok", -1)
    # Two turning points whose first and last runs share a sign: counted linearly that is 2
    # changes (reject); the authors' cyclic count also gave 2 and accepted it.
    two = _curve(np.arange(0, 200), 200 - np.arange(1, 601) / 10, 140 + np.arange(1, 201))
    assert len(two) == 1000 and screen.judge_curve(two) == (False, "integrity_turning_points", 1)
    # More than 10 zero differences: plateau; 10 exactly is fine.
    assert screen.judge_curve(_curve(np.arange(500), [499] * 11, 500 + np.arange(489)))[1] == \
        "integrity_plateau"
    assert screen.judge_curve(_curve(np.arange(500), [499] * 10, 500 + np.arange(490)))[0]
    # An extremum in rows 490-509 (inclusive) is rejected; at 489 or 510 it is not.
    for row, ok in ((489, True), (490, False), (509, False), (510, True)):
        v = np.abs(np.arange(1000.0) - row) * np.where(np.arange(1000) < row, 1.0, 3.0)
        v[-1] = v.max() + 1  # the maximum at the end, the minimum at `row`
        assert screen.judge_curve(v)[0] is ok, row


# ----------------------------------------------------------------------------- steps 2-3

@pytest.mark.parametrize("expr, reason", [
    ("add(y, log(p))", "ignores_target"),   # 1 + sum_c log p_c
    ("log(p)", "ignores_target"),
    ("y", "no_gradient"),
    ("add(y, p)", "no_gradient"),           # sum_c p_c = 1: rounding noise only
    ("sub(p, p)", "no_gradient"),
    (OVERFLOW_ON_PROBE, "non_finite_value"),
    (f"add({CE}, sqrt(sub(p, p)))", "non_finite_grad"),  # value 0, gradient nan at 0
    (CE, None),
    ("baikal", None),
])
def test_dependence_and_finiteness(expr, reason):
    assert screen.probe_reason(expr) == reason


@pytest.mark.parametrize("expr, reason", [
    (OVERFLOW_ON_PROBE, "non_finite_value"),
    (f"add({CE}, sqrt(sub(p, p)))", "non_finite_grad"),
])
def test_screen_runs_steps_in_order(expr, reason):
    assert screen.integrity(expr).accepted  # passes step 1 ...
    r = screen.screen(expr)
    assert (r.accepted, r.reason, r.fingerprint) == (False, reason, None)  # ... not step 3


@pytest.mark.parametrize("name", ["ce", "baikal", "focal", "mse"])
def test_zoo_is_accepted(name):
    r = screen.screen(name)
    assert (r.accepted, r.reason, r.sign) == (True, "ok", 1)
    np.testing.assert_array_equal(r.fingerprint, screen.fingerprint(name, "paper", 1))


def test_screen_rejects_with_integrity_reason_and_sign_plus_one():
    r = screen.screen("mul(y, sin(mul(p, 7)))")
    assert (r.accepted, r.reason, r.sign, r.fingerprint) == \
        (False, "integrity_turning_points", 1, None)
    assert all(reason in screen.REASONS for reason in
               ("integrity_constant", "no_gradient", "ignores_target", "non_finite_value"))


def test_probe_batch_covers_scales_and_class_counts():
    pr = fingerprint.probe()
    ps = [p for _, _, p in pr.blocks]
    assert [p.shape[1] for p in ps] == [10, 100]
    assert min(p.min() for p in ps) < 1e-29                                  # confident rows
    assert any((p.max(axis=1) - p.min(axis=1) < 1e-3).any() for p in ps)     # near uniform
    assert all(np.allclose(p.sum(axis=1), 1.0) for p in ps)


def test_fingerprint_is_deterministic_and_oriented():
    a = screen.fingerprint(CE)
    np.testing.assert_array_equal(a, screen.fingerprint(parse(CE, "paper")))
    b = screen.fingerprint("mul(y, log(p))", sign=-1)
    assert screen.fingerprints_match(a, b)
    g, _ = fingerprint.split(a)
    # Cross-entropy's gradient w.r.t. the logits is p - y (up to eps): check a C=10 row.
    _, y, p = fingerprint.probe().blocks[0]
    p_true = p[0][y[0] > 0]
    np.testing.assert_allclose(g[:10], (p[0] - y[0]) * p_true / (p_true + 1e-7), rtol=1e-9)


# ----------------------------------------------------------------------------- same

@pytest.mark.parametrize("a, b, expected", [
    ("add(mul(y, log(p)), mul(y, log(p)))", "mul(add(y, y), log(p))", True),
    ("mul(y, log(p))", "mul(y, log10(p))", False),
    ("mul(y, log(p))", "neg(mul(y, log(p)))", True),     # sign -1 vs +1
    ("mul(y, log(p))", "ce", True),
    (CE, f"add({CE}, p)", True),                          # + sum_c p_c = + 1
    (CE, f"sub({CE}, y)", True),                          # - sum_c y_c = - 1
    ("baikal", "sub(div(y, p), log10(p))", False),        # O(1) change hidden by 1/p^2 rows
    (CE, f"add({CE}, {CE})", False),                      # a rescaling is different
    ("y", "1", True),                                     # constants are the same ...
    ("add(y, p)", "y", True),
    ("y", CE, False),                                     # ... only as constants
    ("mul(y, sin(mul(p, 7)))", "neg(mul(y, sin(mul(p, 7))))", False),  # rejected: sign +1 both
])
def test_same(a, b, expected):
    assert screen.same(a, b) is expected
    assert screen.same(b, a) is expected


def test_same_typed_set():
    assert screen.same("ce(y, p)", "neg(dot(y, log(p)))", "typed")
    assert not screen.same("ce(y, p)", "mse(y, p)", "typed")
    assert screen.screen("add(ce(y, p), mse(y, p))", "typed").accepted
    assert screen.probe_reason("sum(log(p))", "typed") == "ignores_target"


def _equivalence_pairs():
    data = tomllib.loads(EQUIVALENCE_SET.read_text(encoding="utf-8"))
    return [v for value in data.values() if isinstance(value, list)
            for v in value if isinstance(v, dict) and {"a", "b", "same"} <= set(v)]


def test_equivalence_set_labels_hold():
    # Every label: no false merge, and every `same` pair detected.
    pairs = _equivalence_pairs()
    assert len(pairs) >= 40
    wrong, signs = [], []
    for pair in pairs:
        pset = pair.get("pset", "paper")
        sign_a, key_a, fp_a = screen.key_and_fingerprint(pair["a"], pset)
        sign_b, key_b, fp_b = screen.key_and_fingerprint(pair["b"], pset)
        said = key_a == key_b or screen.fingerprints_match(fp_a, fp_b)
        if said is not bool(pair["same"]):
            wrong.append((pair["a"], pair["b"], pair["same"], pair.get("why")))
        if (pair.get("sign_a", sign_a), pair.get("sign_b", sign_b)) != (sign_a, sign_b):
            signs.append((pair["a"], pair["b"]))
    assert wrong == [] and signs == []
    some = pairs[0]
    assert screen.same(some["a"], some["b"], some.get("pset", "paper")) is bool(some["same"])


# ----------------------------------------------------------------------------- novelty index

def test_novelty_index_add_find_remove():
    idx = novelty.NoveltyIndex()
    fps = {name: screen.screen(name).fingerprint for name in ("ce", "baikal", "focal", "mse")}
    for cid, (name, fp) in enumerate(fps.items()):
        idx.add(cid, f"key-{name}", fp)
    assert len(idx) == 4 and 2 in idx
    assert idx.find("key-focal", None) == 2                      # by key
    twin = screen.screen(f"add({CE}, p)")                          # by fingerprint
    assert idx.find("other-key", twin.fingerprint) == 0
    assert idx.find(None, screen.screen("sub(div(y, p), log10(p))").fingerprint) is None
    assert idx.remove(0) and not idx.remove(0)
    assert idx.find("other-key", twin.fingerprint) is None
    assert idx.find("key-mse", None) == 3 and idx.find("key-focal", fps["focal"]) == 2
    idx.add(3, "key-mse2", fps["mse"])                            # replacing an id
    assert idx.find("key-mse", None) is None and idx.find(None, fps["mse"]) == 3
    constant = np.zeros_like(fps["ce"])
    idx.add(9, None, constant)
    assert idx.find(None, np.zeros_like(constant)) == 9 and idx.find(None, fps["ce"]) is None
    idx.add(10, "key-nan", np.full_like(constant, np.nan))        # key only
    idx.add(11, "key-none", None)
    assert idx.find("key-nan", None) == 10 and idx.find("key-none", fps["ce"]) == 11
    assert idx.find(None, np.full_like(constant, np.nan)) is None and len(idx) == 6
    assert idx.remove(10) and idx.remove(11) and idx.find("key-none", None) is None
    assert len(idx) == 4 and idx.find(None, fps["mse"]) == 3


def test_novelty_index_many_entries_agrees_with_pairwise_test():
    # Synthetic fingerprints (gradient part with very different row scales, then row scales),
    # plus copies just inside and just outside the tolerance, and copies off in one row only.
    pr = fingerprint.probe()
    rng = np.random.default_rng(0)
    base = []
    for _ in range(80):
        g = rng.standard_normal(pr.size) * 10.0 ** rng.uniform(-3, 6, pr.rows)[pr.row_of]
        base.append(np.concatenate([g, np.abs(rng.standard_normal(pr.rows))]))
    probes = list(base)
    for fp in base[:15]:
        g, s = fingerprint.split(fp)
        probes.append(np.concatenate([g * (1 + 3e-7), s]))        # inside
        probes.append(np.concatenate([g * (1 + 3e-6), s]))        # outside
        one_row = g.copy()
        one_row[pr.row_of == 5] *= 1.0001                          # one row off only
        probes.append(np.concatenate([one_row, s]))
    idx = novelty.NoveltyIndex()
    for i, fp in enumerate(base[:50]):
        idx.add(i, None, fp)
    for fp in probes:
        found = idx.find(None, fp)
        pairwise = [j for j in idx._cids if screen.fingerprints_match(base[j], fp)]
        assert (found is None) == (not pairwise)
        assert found is None or found in pairwise
    assert idx.find(None, probes[80]) == 0 and idx.find(None, probes[81]) is None
    assert idx.find(None, probes[82]) is None
    for cid in range(0, 50, 2):
        idx.remove(cid)
    assert len(idx) == 25
    for cid in range(50):
        assert idx.find(None, base[cid]) == (None if cid % 2 == 0 else cid)


# ----------------------------------------------------------------------------- phenotype

def test_phenotype_and_near_duplicate():
    ce = screen.integrity(CE)
    ph = novelty.phenotype(ce.curve, ce.sign)
    assert ph.min() == 0.0 and ph.max() == 1.0 and ph.shape == (1000,)
    flipped = screen.integrity("mul(y, log(p))")
    np.testing.assert_allclose(novelty.phenotype(flipped.curve, flipped.sign), ph, atol=1e-12)
    assert novelty.phenotype(screen.integrity("y").curve) is None
    mse = screen.integrity("mse")
    other = novelty.phenotype(mse.curve, mse.sign)
    assert novelty.near_duplicate(ph, [None, other, ph], 0.01)
    assert not novelty.near_duplicate(ph, [other], 0.01)
    assert novelty.near_duplicate(ph, np.stack([other, ph]), 0.01)
    assert not novelty.near_duplicate(None, [ph], 0.01) and not novelty.near_duplicate(ph, [], 0.01)
