"""The search engine (gp_loss.search.evolution + cli_run): loop semantics, one real tiny search, errors.

Loop-semantics tests run in-process with the serial executor and a fake ``evaluate``
(monkeypatched as ``gp_loss.search.evolution.evaluate``), so they are fast and exact; screening,
canonical keys and mutations are the real ones. One end-to-end search trains for real through
the CLI (in-process, ``CliRunner``) with a tiny budget. Kill-and-resume tests are in
test_resume.py.
"""
from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import time

import pytest
import torch
from click.testing import CliRunner

import gp_loss.search.evolution as evo
from gp_loss.cli.app import cli
from gp_loss.config import Config, apply_overrides
from gp_loss.runs.store import RunStore
from gp_loss.lang.trees import parse

CHILD_DONE = ("evaluated", "reused", "failed")      # statuses that count as a child
NOT_PROPOSALS = ("rejected", "duplicate", "near_duplicate")
TABLE = ("phase", "birth", "expr", "status", "reason", "fitness", "sign", "parent_id")


# --------------------------------------------------------------------------- fakes and helpers

def _unit(expr: str, salt: str) -> float:
    return int(hashlib.sha256(f"{salt}:{expr}".encode()).hexdigest()[:8], 16) / 16**8


class FakeEvaluate:
    """Stands in for fitness.evaluate: instant, deterministic, records every call.

    ``table`` maps expression text -> fitness, or 'fail' (a failed result) or 'raise' (an
    exception, as a worker crash would give). Other expressions: every ``fail_every``-th call
    fails, every ``raise_every``-th raises (by call number, so that the outcomes do not hinge
    on which expressions the mutations happen to produce), else a hash-based fitness.
    """

    def __init__(self, table=None, fail_every=0, raise_every=0):
        self.table, self.fail_every, self.raise_every = table or {}, fail_every, raise_every
        self.calls: list[str] = []

    def __call__(self, expr, pset_name, eval_config, seed=0, sign=1, with_test=False):
        self.calls.append(expr)
        n = len(self.calls)
        outcome = self.table.get(expr)
        if outcome is None:
            outcome = ("raise" if self.raise_every and n % self.raise_every == 0 else
                       "fail" if self.fail_every and n % self.fail_every == 0 else
                       round(0.1 + 0.8 * _unit(expr, "fitness"), 2))  # 2 decimals: ties happen
        if outcome == "raise":
            raise RuntimeError(f"boom on {expr}")
        if outcome == "fail":
            return {"status": "failed", "reason": "nan_loss", "fitness": 0.0, "steps": 3,
                    "seconds": 0.0}
        return {"status": "ok", "reason": None, "fitness": float(outcome),
                "steps": eval_config["steps"], "seconds": 0.0}



def use_fake(mp, fake):
    """Train nothing: ``fake`` stands in for ``fitness.evaluate`` in the driver, alone and in
    packs (each item of a pack is one call of ``fake``; results say the width, as real ones)."""
    mp.setattr(evo, "evaluate", fake)
    mp.setattr(evo, "evaluate_pack", lambda items, pset, conf, with_test=False, *, width=1: [
        {**fake(e, pset, conf, seed, sign), "pack_k": width} for e, seed, sign in items])

# One evaluation at a time (K = 1): the scripted sequences below are step by step.
BASE = ["executor.kind=serial", "search.reference=[]", "surrogate.steps=100",
        "executor.candidates_per_worker=1"]


def make_cfg(*sets) -> Config:
    return apply_overrides(Config(), BASE + list(sets))


def run_fake(run_dir, cfg, fake, monkeypatch, spy=None):
    """Run a whole search in-process with ``fake`` as the evaluation; returns the open store."""
    use_fake(monkeypatch, fake)
    if spy is not None:
        orig = evo.Evolution._insert

        def insert(self, cand):
            before = {r["id"]: (r["age_order"], r["fitness"]) for r in self.store.population()}
            orig(self, cand)
            after = {r["id"]: (r["age_order"], r["fitness"]) for r in self.store.population()}
            spy.append((cand.id, before, after))
        monkeypatch.setattr(evo.Evolution, "_insert", insert)
    store = evo.start_run(run_dir, cfg)
    result = evo.Evolution(store, cfg).run()
    assert result["stop_reason"] == "finished", result
    return store


def table(store):
    return [tuple(r[k] for k in TABLE) for r in store.candidates()]


def same_as(reason):
    m = re.fullmatch(r"same as #(\d+)", reason or "")
    return int(m.group(1)) if m else None


def check_accounting(store, cfg):
    """Invariants of every finished run: one proposal per birth, the counter, no pending."""
    s = cfg.search
    rows = store.candidates()
    assert not [r for r in rows if r["status"] == "pending"]
    for phase, expected in (("initial", list(range(len(s.seed_with) + s.initial))),
                            ("child", list(range(1, s.children + 1)))):
        births = sorted(r["birth"] for r in rows
                        if r["phase"] == phase and r["status"] not in NOT_PROPOSALS)
        if phase == "initial":  # a seed that duplicates an earlier one is skipped
            assert set(births) <= set(expected) and len(births) == len(set(births))
        else:
            assert births == expected
    children = [r for r in rows if r["phase"] == "child" and r["status"] in CHILD_DONE]
    assert len(children) == s.children == store.get_state("children_done")
    assert len(store.population()) <= s.population
    assert all(r["status"] in ("evaluated", "reused") and r["fitness"] is not None
               for r in store.population())


# --------------------------------------------------------------------------- scripted loop

def test_scripted_duplicates_reuse_failures_retries_and_aging(tmp_path, monkeypatch):
    """Every rule of DESIGN §5.4/§6 on a hand-written sequence of mutations."""
    script = [
        "mul(y, log(p))",                # child 1: same as member ce (sign -1 vs +1): duplicate
        "focal",                         # new -> evaluated 0.7; ages out mse (tie: lowest fit)
        "square(sub(p, y))",             # child 2: same as aged-out mse -> reused, no training
        None,                            # child 3: no valid mutation -> rejected
        "neg(mul(y, sqrt(p)))",          # fails training -> recorded, not inserted
        "add(y, log(p))",                # child 4: ignores the target -> rejected
        "square(sub(y, p))",             # same as the reused member -> duplicate; that makes
                                         # max_retries=2 rejections in a row: new parent
        "neg(mul(y, tanh(p)))",          # -> evaluated 0.8
    ]
    queue = list(script)

    def fake_mutate(tree, pset, rng, weights):
        text = queue.pop(0)
        return (None, "node") if text is None else (parse(text, pset), "scripted")

    monkeypatch.setattr(evo, "mutate", fake_mutate)
    fake = FakeEvaluate({"neg(mul(y, log(p)))": 0.6, "square(sub(y, p))": 0.5,
                         "neg(mul(square(sub(1, p)), mul(y, log(p))))": 0.7,
                         "neg(mul(y, sqrt(p)))": "fail", "neg(mul(y, tanh(p)))": 0.8})
    cfg = make_cfg("search.initial=0", 'search.seed_with=["ce", "mse"]', "search.population=2",
                   "search.tournament=1", "search.children=4", "search.max_retries=2")
    spy = []
    store = run_fake(tmp_path / "run", cfg, fake, monkeypatch, spy)
    assert not queue

    rows = {r["id"]: r for r in store.candidates()}
    got = [(r["phase"], r["birth"], r["status"], r["fitness"]) for r in rows.values()]
    assert got == [
        ("initial", 0, "evaluated", 0.6), ("initial", 1, "evaluated", 0.5),
        ("child", 1, "duplicate", None), ("child", 1, "evaluated", 0.7),
        ("child", 2, "reused", 0.5),
        ("child", 3, "rejected", None), ("child", 3, "failed", None),
        ("child", 4, "rejected", None), ("child", 4, "duplicate", None),
        ("child", 4, "rejected", None), ("child", 4, "evaluated", 0.8)]
    assert same_as(rows[3]["reason"]) == 1          # the member ce
    assert same_as(rows[5]["reason"]) == 2          # the aged-out mse: its stored fitness
    assert rows[6]["reason"] == "no_valid_mutation"
    assert rows[7]["reason"] == "nan_loss"
    assert rows[8]["reason"].startswith("integrity")
    assert same_as(rows[9]["reason"]) == 5
    assert rows[10]["reason"] == "max_retries"
    assert rows[3]["parent_id"] in (1, 2) and rows[4]["parent_id"] == rows[3]["parent_id"]
    # Reused and rejected candidates were never trained; everything else exactly once.
    assert fake.calls == ["neg(mul(y, log(p)))", "square(sub(y, p))",
                          "neg(mul(square(sub(1, p)), mul(y, log(p))))",
                          "neg(mul(y, sqrt(p)))", "neg(mul(y, tanh(p)))"]
    # Aging: initial members equally old, ties -> lowest fitness; then the oldest goes.
    assert [(cid, sorted((set(before) | {cid}) - set(after))) for cid, before, after in spy] == \
        [(4, [2]), (5, [1]), (11, [4])]
    assert {r["id"]: r["age_order"] for r in store.population()} == {5: 2, 11: 4}
    assert store.get_state("children_done") == 4
    check_accounting(store, cfg)


# --------------------------------------------------------------------------- random loop

RANDOM = ["search.initial=6", "search.population=4", "search.tournament=3",
          "search.children=25"]


def test_random_search_invariants(tmp_path, monkeypatch):
    """Real mutations and screening, fake training with failures and worker errors."""
    fake = FakeEvaluate(fail_every=4, raise_every=7)
    cfg = make_cfg(*RANDOM)
    spy = []
    store = run_fake(tmp_path / "run", cfg, fake, monkeypatch, spy)
    check_accounting(store, cfg)
    rows = {r["id"]: r for r in store.candidates()}

    # Failed candidates carry a reason, including exceptions raised by the evaluation.
    failed = [r for r in rows.values() if r["status"] == "failed"]
    assert failed and all(r["reason"] for r in failed)
    assert any(r["reason"] == "nan_loss" for r in failed)
    assert any(r["reason"].startswith("worker: RuntimeError: boom") for r in failed)
    assert all(r["fitness"] is None for r in failed)

    # Population: never above search.population; the oldest (ties: lowest fitness, then id)
    # leaves; failed candidates never enter.
    failed_ids = {r["id"] for r in failed}
    for cid, before, after in spy:
        assert cid in after and len(after) <= cfg.search.population
        assert not failed_ids & set(after)
        pool = {**before, cid: after[cid]}
        removed = set(pool) - set(after)
        if len(pool) > cfg.search.population:
            oldest = min(pool, key=lambda i: (pool[i][0], pool[i][1], i))
            assert removed == {oldest}
        else:
            assert not removed

    # Training happened exactly for the evaluated and failed rows, never for reused ones.
    trained = [r["expr"] for r in rows.values() if r["status"] in ("evaluated", "failed")]
    assert sorted(fake.calls) == sorted(trained)
    # Reuse takes the stored fitness of a candidate that is no longer a member.
    members = {r["id"] for r in store.population()}
    for r in rows.values():
        if r["status"] == "reused":
            old = rows[same_as(r["reason"])]
            assert old["id"] < r["id"] and old["id"] not in members
            assert old["status"] in CHILD_DONE and r["fitness"] == old["fitness"]
        if r["status"] == "duplicate":
            assert rows[same_as(r["reason"])]["status"] not in NOT_PROPOSALS
    assert {"duplicate", "rejected"} <= {r["status"] for r in rows.values()}


def test_same_seed_same_table_other_seed_differs(tmp_path, monkeypatch):
    cfg = make_cfg(*RANDOM, "search.children=10")
    runs = [table(run_fake(tmp_path / f"run{i}", cfg, FakeEvaluate(fail_every=5), monkeypatch))
            for i in range(2)]
    other = table(run_fake(tmp_path / "seed1", apply_overrides(cfg, ["search.seed=1"]),
                           FakeEvaluate(fail_every=5), monkeypatch))
    assert runs[0] == runs[1]
    assert other != runs[0]


def test_reference_and_seed_with_are_evaluated(tmp_path, monkeypatch):
    fake = FakeEvaluate({"neg(mul(y, log(p)))": 0.9})
    cfg = make_cfg("search.reference=[\"ce\"]", 'search.seed_with=["ce", "ce"]',
                   "search.initial=2", "search.population=2", "search.children=2")
    store = run_fake(tmp_path / "run", cfg, fake, monkeypatch)
    ref = store.candidates(phase="reference")
    assert [(r["expr"], r["status"], r["fitness"]) for r in ref] == \
        [("neg(mul(y, log(p)))", "evaluated", 0.9)]
    init = store.candidates(phase="initial")
    # The second "ce" seed duplicates the first: recorded and skipped.
    assert [(r["birth"], r["status"]) for r in init[:2]] == [(0, "evaluated"), (1, "duplicate")]
    assert init[0]["expr"] == "neg(mul(y, log(p)))"
    check_accounting(store, cfg)


class CheapAware(FakeEvaluate):
    """The cheap initial surrogate (steps 7) gives an unrelated fitness, so a cheap score that
    leaked into ranking or reuse would show."""

    def __call__(self, expr, pset_name, eval_config, seed=0, sign=1, with_test=False):
        res = super().__call__(expr, pset_name, eval_config, seed, sign, with_test)
        if eval_config["steps"] == 7 and res["status"] == "ok":
            res["fitness"] = round(0.1 + 0.8 * _unit(expr, "cheap"), 3)
        return res


def test_cheap_seeding_rescores_the_best_and_never_mixes_fitnesses(tmp_path, monkeypatch):
    fake = CheapAware(fail_every=6)
    cfg = make_cfg(*RANDOM, "search.initial=12", "search.population=3", "search.rescore=5",
                   "search.children=25", "search.initial_fitness=cheap",
                   "search.initial_surrogate.steps=7", 'search.reference=["ce"]')
    store = run_fake(tmp_path / "run", cfg, fake, monkeypatch)
    rows = store.candidates()
    seeding = [r for r in rows if r["phase"] == "seeding" and r["status"] not in NOT_PROPOSALS]
    assert len(seeding) == 12
    ok = sorted((r for r in seeding if r["status"] == "evaluated"),
                key=lambda r: (-r["fitness"], r["id"]))
    rescored = store.candidates(phase="initial")
    # the best 5 by the cheap fitness, in that order, each re-trained by the surrogate itself
    assert [r["parent_id"] for r in rescored] == [r["id"] for r in ok[:5]]
    assert [r["expr"] for r in rescored] == [r["expr"] for r in ok[:5]]
    assert [r["birth"] for r in rescored] == list(range(5))
    cheap_calls = [r["expr"] for r in seeding]
    assert fake.calls[1:13] == cheap_calls  # after the reference: the 12 cheap evaluations
    for r in rescored:
        if r["status"] == "evaluated":
            assert r["fitness"] == round(0.1 + 0.8 * _unit(r["expr"], "fitness"), 2)
    # the population came from the re-scored rows; the hall of fame and reuse never see a
    # cheap fitness
    ids = {r["id"] for r in seeding}
    assert not {r["id"] for r in store.top(100)} & ids
    assert not [r for r in rows if r["phase"] != "seeding" and same_as(r["reason"]) in ids]
    resumed = evo.Evolution(store, cfg)
    resumed._load()  # what a child could be reused from, and what the population holds
    assert not (set(resumed.past_rows) | set(resumed.members)) & ids
    assert set(resumed.past_rows) & {r["id"] for r in rescored}
    first_children = [r for r in rows if r["phase"] == "child"]
    assert all(r["parent_id"] not in ids for r in first_children)
    assert store.get_state("phase") == "done"
    assert len([r for r in rows if r["phase"] == "child" and r["status"] in CHILD_DONE]) == 25
    from gp_loss.runs import render, report
    counts = report.summary(store, 3, formulas=False)["counts"]
    assert counts["seeding"]["evaluated"] + counts["seeding"]["failed"] == 12
    assert "seeding (cheap initial fitness): " in render.format_summary(
        report.summary(store, 3, formulas=False))


class SeedAware(FakeEvaluate):
    """Fitness depends on the seed, as training noise does."""

    def __call__(self, expr, pset_name, eval_config, seed=0, sign=1, with_test=False):
        res = super().__call__(expr, pset_name, eval_config, seed, sign, with_test)
        if res["status"] == "ok" and seed:
            res["fitness"] = round(0.1 + 0.8 * _unit(expr, f"seed{seed}"), 2)
        return res


def test_reeval_seeds_give_long_lived_members_a_mean_fitness(tmp_path, monkeypatch):
    fake = SeedAware(fail_every=7)
    cfg = make_cfg(*RANDOM, "search.reeval_seeds=3", "search.reeval_after=3")
    store = run_fake(tmp_path / "run", cfg, fake, monkeypatch)
    rows = store.candidates()
    reeval = [r for r in rows if r["phase"] == "reeval"]
    parents = sorted({r["parent_id"] for r in reeval})
    assert parents, "no member lived long enough"
    for pid in parents:
        mine = sorted((r for r in reeval if r["parent_id"] == pid), key=lambda r: r["birth"])
        assert [r["birth"] for r in mine] == [1, 2]  # seeds surrogate.seed + 1, + 2
        parent = store.candidate(pid)
        assert all(r["expr"] == parent["expr"] for r in mine)
        seeds = parent["result"]["seed_fitness"]
        assert seeds[0] == parent["result"]["fitness"]
        assert seeds[1:] == [r["fitness"] if r["status"] == "evaluated" else 0.0 for r in mine]
        assert parent["fitness"] == pytest.approx(sum(seeds) / 3)
    # every member that survived 3 births after its own was promoted, once
    assert len(parents) == len(set(parents))
    assert all(r["phase"] != "reeval" for r in store.top(50))
    from gp_loss.runs import report
    counts = report.summary(store, 3, formulas=False)["counts"]["reeval"]
    assert counts["evaluated"] + counts["failed"] == len(reeval) and counts["pending"] == 0
    check_accounting(store, cfg)


class FlatFitness(FakeEvaluate):
    """Every success scores the same fitness (a saturated surrogate); the validation NLL, the
    tie-break, differs by expression and seed."""

    def __call__(self, expr, pset_name, eval_config, seed=0, sign=1, with_test=False):
        res = super().__call__(expr, pset_name, eval_config, seed, sign, with_test)
        if res["status"] == "ok":
            res.update(fitness=1.0, val_nll=round(_unit(expr, f"nll{seed}"), 4))
        return res


def test_fitness_ties_go_to_the_lower_validation_nll(tmp_path, monkeypatch):
    """With every fitness equal, the initial population, the ranking (show / export /
    eliminate's entrants) and re-evaluated members follow the validation NLL."""
    chosen = []
    real = RunStore.replace_population

    def spy(self, members):
        chosen.append([cid for cid, _ in members])
        return real(self, members)

    monkeypatch.setattr(RunStore, "replace_population", spy)
    cfg = make_cfg(*RANDOM)
    store = run_fake(tmp_path / "run", cfg, FlatFitness(fail_every=9), monkeypatch)
    initial = [r for r in store.candidates(phase="initial") if r["status"] == "evaluated"]
    by_nll = sorted(initial, key=lambda r: (r["result"]["val_nll"], r["id"]))
    assert len(initial) > cfg.search.population
    assert chosen == [[r["id"] for r in by_nll[:cfg.search.population]]]
    top = store.top(50)
    nlls = [r["result"].get("val_nll") for r in top]
    assert None not in nlls and nlls == sorted(nlls)
    from gp_loss.runs import render, report
    s = report.summary(store, 5, formulas=False)
    assert s["tie_break"] == "val_nll"
    assert [t["val_nll"] for t in s["top"]] == nlls[:5]
    text = render.format_summary(s)
    assert "ties broken by validation NLL, lower wins" in text and "val NLL" in text
    # a re-evaluated member's tie-break is the mean over its seeds, like its fitness
    cfg = make_cfg(*RANDOM, "search.reeval_seeds=2", "search.reeval_after=2")
    store = run_fake(tmp_path / "reeval", cfg, FlatFitness(), monkeypatch)
    reeval = [r for r in store.candidates(phase="reeval") if r["status"] == "evaluated"]
    assert reeval, "no member lived long enough"
    for r in reeval:
        parent = store.candidate(r["parent_id"])
        first, second = parent["result"]["seed_val_nll"]
        assert second == r["result"]["val_nll"]
        assert parent["result"]["val_nll"] == pytest.approx((first + second) / 2)


def test_tournament_ties_go_to_the_lower_validation_nll():
    import random

    from gp_loss.search.population import Population
    from gp_loss.search.start import Cand

    pop = Population(4)
    for i, fit, nll in [(1, 0.9, 0.5), (2, 0.9, None), (3, 0.9, 0.3), (4, 0.8, 0.1)]:
        pop.add(Cand(i, None, f"k{i}", None, None, 1, fitness=fit, val_nll=nll))
    assert pop.tournament(random.Random(0), 40).id == 3
    del pop.members[3]
    assert pop.tournament(random.Random(0), 40).id == 1  # a missing NLL loses the tie


# --------------------------------------------------------------------------- real, via the CLI

TINY = ["--set", "search.initial=5", "--set", "search.population=3", "--set",
        "search.tournament=2", "--set", "search.children=5", "--set", "surrogate.steps=40",
        "--set", "surrogate.prescreen_steps=20", "--set", "executor.kind=serial"]


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


def invoke(runner, *args):
    return runner.invoke(cli, ["-q", *args], catch_exceptions=False)


def test_end_to_end_search_show_and_table(runner, tmp_path):
    run_dir = tmp_path / "run"
    # A seed that overflows at the first step: a real training failure the run survives.
    res = invoke(runner, "search", "--run-dir", str(run_dir), *TINY,
                 "--set", 'search.seed_with=["exp(exp(exp(exp(y))))"]')
    assert res.exit_code == 0, res.output
    with RunStore.open(run_dir, readonly=True) as store:
        rows = store.candidates()
        ref = store.candidates(phase="reference")
        assert [(r["expr"], r["status"]) for r in ref] == [("neg(mul(y, log(p)))", "evaluated")]
        seed = [r for r in rows if r["phase"] == "initial" and r["birth"] == 0]
        assert [(r["status"], r["reason"] in ("inf_loss", "nan_loss")) for r in seed] == \
            [("failed", True)]
        initial = [r for r in rows if r["phase"] == "initial" and r["status"] not in NOT_PROPOSALS]
        assert sorted(r["birth"] for r in initial) == list(range(6))
        children = [r for r in rows if r["phase"] == "child" and r["status"] in CHILD_DONE]
        assert sorted(r["birth"] for r in children) == [1, 2, 3, 4, 5]
        assert store.get_state("children_done") == 5 and store.get_state("phase") == "done"
        assert 1 <= len(store.population()) <= 3
        assert not store.candidates(status="pending")
        meta = store.meta()
        assert meta["config"]["search"]["children"] == 5 and meta["device"] == "cpu"
        assert meta["torch"] and meta["python"]
    ce_fit = ref[0]["fitness"]
    assert 0 < ce_fit <= 1
    assert "ref" in res.output and f"{ce_fit:.4f}" in res.output

    shown = invoke(runner, "show", str(run_dir), "--json", "--top", "3")
    assert shown.exit_code == 0, shown.output
    s = json.loads(shown.output)
    assert 1 <= len(s["top"]) <= 3
    for item in s["top"]:
        assert {"id", "expr", "formula", "fitness", "sign"} <= set(item)
        assert item["sign"] in (1, -1) and 0 <= item["fitness"] <= 1 and item["formula"]
    fits = [t["fitness"] for t in s["top"]]
    assert fits == sorted(fits, reverse=True)
    counts = s["counts"]
    assert {"evaluated", "reused", "failed", "duplicates", "near_duplicates",
            "rejected"} <= set(counts)
    assert isinstance(counts["rejected"], dict)
    # The search's candidates (initial + children); the reference is reported apart.
    assert counts["evaluated"] + counts["reused"] + counts["failed"] == 6 + 5
    assert counts["failed"] >= 1
    assert [(r["name"], r["fitness"]) for r in s["reference"]] == [("ce", ce_fit)]
    assert set(s["seconds"]) >= {"surrogate", "engine", "wall"}
    assert s["seconds"]["surrogate"] > 0 and s["seconds"]["engine"] > 0
    assert s["seconds"]["wall"] >= s["seconds"]["surrogate"]

    plain = invoke(runner, "show", str(run_dir))
    assert plain.exit_code == 0 and f"{ce_fit:.4f}" in plain.output


def test_train_json_fields(runner):
    # no pre-screen: 20 steps on quick.toml's 246 training images are too few to pass it
    res = invoke(runner, "train", "--loss", "ce", "--seeds", "2", "--json",
                 "--set", "surrogate.steps=40", "--set", "surrogate.prescreen_steps=0")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert (out["dataset"], out["model"], out["steps"]) == ("digits", "tiny", 40)
    assert [r["seed"] for r in out["runs"]] == [0, 1]
    for r in out["runs"]:
        assert {"seed", "val_acc", "test_acc", "seconds"} <= set(r)
        assert 0 < r["val_acc"] <= 1 and 0 < r["test_acc"] <= 1 and r["seconds"] > 0
    tests = [r["test_acc"] for r in out["runs"]]
    assert out["test_acc_mean"] == pytest.approx(sum(tests) / 2)
    assert out["test_acc_std"] >= 0


def test_train_text_names_the_dataset_model_and_steps(runner):
    res = invoke(runner, "train", "--loss", "ce", "--set", "surrogate.steps=30",
                 "--set", "surrogate.prescreen_steps=0", "--set", "surrogate.model=tinycnn",
                 "--device", "cpu")
    assert res.exit_code == 0, res.output
    first, *rest = res.stdout.splitlines()
    assert first == ('training neg(mul(y, log(p))) (sign +1) on digits / tiny, 30 steps, device cpu, '
                     'in packs of 8')  # executor.candidates_per_worker's default
    assert rest[0].startswith("seed 0: val_acc ") and rest[-1].startswith("test_acc ")


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("setting, key", [
    ("search.populaton=3", "search.populaton"),
    ("search.population=abc", "search.population"),
    ("surrogate.steps=1.5", "surrogate.steps"),
    ("executor.kind=threads", "executor.kind"),
])
def test_bad_config_exits_2_naming_the_key(runner, tmp_path, setting, key):
    res = runner.invoke(cli, ["search", "--run-dir", str(tmp_path / "r"), "--set", setting])
    assert res.exit_code == 2 and key in res.output
    assert "Traceback" not in res.output
    assert not RunStore.exists(tmp_path / "r")


def test_a_misspelt_built_in_config_exits_2_with_the_close_match(runner, tmp_path):
    res = runner.invoke(cli, ["search", "paperr", "--run-dir", str(tmp_path / "r")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "did you mean 'paper'?" in res.stderr and "quick" in res.stderr
    assert not RunStore.exists(tmp_path / "r")


def test_bad_config_file_exits_2(runner, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[search]\npopulation = 'many'\n")
    res = runner.invoke(cli, ["search", str(cfg), "--run-dir", str(tmp_path / "r")])
    assert res.exit_code == 2 and "search.population" in res.output


def test_store_errors_exit_2(runner, tmp_path):
    existing = tmp_path / "run"
    evo.start_run(existing, make_cfg()).close()
    res = runner.invoke(cli, ["search", "--run-dir", str(existing), *TINY])
    assert res.exit_code == 2 and "gp-loss resume" in res.output

    def foreign(path):
        con = sqlite3.connect(path)
        con.execute("CREATE TABLE t(x)")
        con.close()

    for name, make in [
        ("missing", lambda path: None),
        ("corrupt", lambda path: path.write_bytes(b"SQLite format 3\x00" + b"\x07" * 500)),
        ("garbage", lambda path: path.write_text("not a database")),
        ("foreign", foreign),
    ]:
        d = tmp_path / name
        d.mkdir()
        make(d / "run.sqlite")
        res = runner.invoke(cli, ["resume", str(d)])
        assert res.exit_code == 2, (name, res.output)
        assert "Traceback" not in res.output

    for setting in ("search.population=5", "surrogate.steps=10", "search.seed=3"):
        res = runner.invoke(cli, ["resume", str(existing), "--set", setting])
        assert res.exit_code == 2 and setting.split("=")[0] in res.output
    with RunStore.open(existing, readonly=True) as store:
        assert store.config()["search"]["population"] == 100


def test_config_warnings_are_logged_once_naming_the_keys(runner, tmp_path, monkeypatch):
    # valid settings that quietly change what the search does: warn once, at the start
    import gp_loss.cli.run as cli_run

    ran = []
    monkeypatch.setattr(cli_run, "_run_search", lambda *a, **k: ran.append(1))
    res = runner.invoke(cli, ["search", "--run-dir", str(tmp_path / "r"), *TINY, "--set",
                              "search.tournament=4", "--set", "surrogate.prescreen_steps=40"])
    assert res.exit_code == 0, res.output
    assert ran == [1]
    warned = [ln for ln in res.stderr.splitlines() if "search.tournament" in ln]
    assert len(warned) == 1, res.stderr
    assert "search.tournament (4) > search.population (3)" in warned[0]
    assert sum("surrogate.prescreen_steps (40) >= surrogate.steps (40)" in ln
               for ln in res.stderr.splitlines()) == 1
    quiet = runner.invoke(cli, ["search", "--run-dir", str(tmp_path / "q"), *TINY])
    assert quiet.exit_code == 0 and "search.tournament" not in quiet.stderr
    assert "paper set, digits/tiny, 5 initial" in quiet.stderr  # the header: one model name
    assert "prescreen_steps" not in quiet.stderr


def test_population_core_is_pure_and_follows_aging_evolution():
    """The aging-evolution core alone (search/population.py): no store, no screening."""
    import random as _random
    from dataclasses import dataclass

    from gp_loss.search.population import Population

    @dataclass
    class M:
        id: int
        age: int
        fitness: float
        val_nll: float | None = None

    pop = Population(3)
    for m in (M(1, 0, 0.5), M(2, 0, 0.9), M(3, 0, 0.7)):
        assert pop.insert(m) is None
    # Tournament: best of k drawn with replacement; k = 1 is a uniform draw over members.
    rng = _random.Random(0)
    assert {pop.tournament(rng, 1).id for _ in range(200)} == {1, 2, 3}
    assert pop.tournament(_random.Random(1), 60).id == 2          # k >> n: the best wins
    # Equal fitness: the lower validation NLL, then the lower id.
    tie = Population(2)
    tie.add(M(7, 0, 0.8, 0.30))
    tie.add(M(5, 0, 0.8, 0.20))
    assert tie.tournament(_random.Random(2), 50).id == 5
    # Insert beyond capacity removes the oldest; among the equally old, the worst.
    assert pop.insert(M(4, 1, 0.1)).id == 1                      # ages 0: fitness 0.5 worst
    assert pop.insert(M(5, 2, 0.2)).id == 3
    assert sorted(m.id for m in pop) == [2, 4, 5] and len(pop) == 3
    assert pop.insert(M(6, 3, 0.3)).id == 2                      # the best ages out too
    with pytest.raises(ValueError):
        Population(0)


# --------------------------------------------------------------------------- proposals.vet

def test_vet_gives_one_verdict_shape_for_every_outcome_and_seeds_are_forced():
    from gp_loss.lang.psets import load_pset
    from gp_loss.screen.novelty import NoveltyIndex
    from gp_loss.search.proposals import Attempts, forced, vet

    pset = load_pset("paper")
    ce, sq = parse("neg(mul(y, log(p)))", pset), parse("square(sub(y, p))", pset)
    pool, past = NoveltyIndex(), NoveltyIndex()

    def judge(tree, tolerance=0.0, phenotypes=()):
        return vet(tree, pset, pool=pool, past=past, phenotypes=list(phenotypes),
                   tolerance=tolerance)

    first = judge(ce)
    assert (first.status, first.accepted, first.reason, first.past_id) == ("new", True, None,
                                                                           None)
    assert first.key and first.phenotype is not None and first.sign == 1  # CE: minimised as is
    assert vet(parse("mul(y, log(p))", pset), pset, pool=NoveltyIndex(), past=past,
               phenotypes=[], tolerance=0.0).sign == -1  # its negation: maximised
    const = judge(parse("add(y, y)", pset))
    assert (const.status, const.accepted) == ("rejected", False)
    assert const.reason.startswith("integrity") and const.key is None
    pool.add(7, first.key, first.screened.fingerprint)
    dup = judge(parse("neg(mul(log(p), y))", pset))  # the same loss, written otherwise
    assert (dup.status, dup.reason) == ("duplicate", "same as #7")
    near = judge(sq, tolerance=1e9, phenotypes=[first.phenotype])
    assert (near.status, near.reason) == ("near_duplicate", "phenotype within tolerance")
    past.add(3, judge(sq).key, judge(sq).screened.fingerprint)
    again = judge(sq)
    assert (again.status, again.accepted, again.past_id) == ("reuse", True, 3)
    # A seed is evaluated whatever the screen, novelty or an earlier result say ...
    for verdict, tree in ((const, parse("add(y, y)", pset)), (near, sq), (again, sq)):
        seed = forced(tree, pset, verdict)
        assert (seed.status, seed.past_id, seed.phenotype) == ("new", None, None) and seed.key
    assert forced(ce, pset, dup) is dup  # ... except a duplicate of what is in the pool

    tried = Attempts(pset, "child", 5)
    tried.reject(ce, "duplicate", "same as #7", parent=2, mutation="node", seconds=0.25)
    assert tried.rows == [dict(expr="neg(mul(y, log(p)))", status="duplicate",
                               reason="same as #7", phase="child", birth=5, parent_id=2,
                               mutation="node", engine_seconds=0.25)]
    own = tried.own_seconds()  # the clock since the start less what the rows already hold
    assert -0.25 < own <= time.perf_counter() - tried.t0 - 0.25
