"""The fitness cache shared across runs (gp_loss/search/cache.py): a second search with the same
evaluation settings trains nothing it trained before; other settings share nothing; only
results that are a property of the settings are kept; a broken cache never stops a search."""
from __future__ import annotations

import pytest

import gp_loss.search.evolution as evo
from test_search import use_fake
from gp_loss.search.cache import FitnessCache, settings_digest
from gp_loss.config import Config, apply_overrides, config_to_dict

from test_search import FakeEvaluate, table

CFG = ["executor.kind=serial", 'search.reference=["ce"]', "surrogate.steps=100",
       "search.initial=6", "search.population=3", "search.tournament=2", "search.children=12"]


def run(run_dir, cfg, fake, monkeypatch):
    use_fake(monkeypatch, fake)
    store = evo.start_run(run_dir, cfg)
    assert evo.Evolution(store, cfg).run()["stop_reason"] == "finished"
    return store


def test_second_run_with_the_same_settings_trains_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("GP_LOSS_CACHE", str(tmp_path / "cache.sqlite"))
    cfg = apply_overrides(Config(), CFG)
    first = FakeEvaluate(fail_every=4)
    a = run(tmp_path / "a", cfg, first, monkeypatch)
    assert len(first.calls) > 10
    second = FakeEvaluate(fail_every=4)
    b = run(tmp_path / "b", cfg, second, monkeypatch)
    assert second.calls == []  # every evaluation came from the cache
    # the same search, result for result; successes read "reused (cache)", failures keep
    # their reason
    ta, tb = table(a), table(b)
    assert [(r[0], r[1], r[2], r[5]) for r in ta] == [(r[0], r[1], r[2], r[5]) for r in tb]
    from_cache = [r for r in b.candidates() if r["status"] in ("reused", "failed")
                  and not (r["reason"] or "").startswith("same as")]
    assert from_cache and all(r["result"]["cached"] for r in from_cache)
    assert {r["reason"] for r in from_cache if r["status"] == "reused"} == {"cache"}
    # show counts them
    from gp_loss.runs import render, report
    summary = report.summary(b, 3, formulas=False)
    assert summary["counts"]["from_cache"] == len(from_cache) > 0
    assert report.summary(a, 3, formulas=False)["counts"]["from_cache"] == 0
    assert f"{len(from_cache)} evaluations came from the fitness cache" in \
        render.format_summary(summary)
    # other evaluation settings share nothing
    third = FakeEvaluate(fail_every=4)
    run(tmp_path / "c", apply_overrides(cfg, ["surrogate.steps=101"]), third, monkeypatch)
    assert len(third.calls) == len(first.calls)


def test_cache_off_and_key_parts(tmp_path):
    off = FitnessCache("off")
    assert not off.enabled and off.get("k", 1, "s") is None
    cache = FitnessCache(str(tmp_path / "c.sqlite"))
    ok = {"status": "ok", "reason": None, "fitness": 0.5, "seconds": 3.0}
    cache.put("k", 1, "s", ok, "run#1")
    assert cache.get("k", 1, "s")["fitness"] == 0.5 and cache.get("k", 1, "s")["cached"]
    assert cache.get("k", -1, "s") is None and cache.get("k", 1, "t") is None
    assert cache.get("other", 1, "s") is None
    for reason in ("timeout", "worker: WorkerLost: died", "error: RuntimeError: x"):
        cache.put("bad", 1, reason, {"status": "failed", "reason": reason}, "run#2")
        assert cache.get("bad", 1, reason) is None  # a property of the moment, not the loss
    cache.put("nan", 1, "s", {"status": "failed", "reason": "nan_loss"}, "run#3")
    assert cache.get("nan", 1, "s")["reason"] == "nan_loss"
    sur = Config().surrogate.__dict__
    base = settings_digest(dict(sur), 0, 1, "set")
    assert base == settings_digest({**sur, "timeout_s": 9.0, "device": "cpu"}, 0, 1, "set")
    for other in (settings_digest({**sur, "lr": 0.5}, 0, 1, "set"),
                  settings_digest(dict(sur), 1, 1, "set"),
                  settings_digest(dict(sur), 0, 2, "set"),
                  settings_digest(dict(sur), 0, 1, "other set")):
        assert other != base


def test_unusable_cache_is_logged_and_the_search_goes_on(tmp_path, monkeypatch, caplog):
    bad = tmp_path / "cache.sqlite"
    bad.write_bytes(b"not a database at all" * 100)
    monkeypatch.setenv("GP_LOSS_CACHE", str(bad))
    fake = FakeEvaluate()
    store = run(tmp_path / "run", apply_overrides(Config(), CFG), fake, monkeypatch)
    assert fake.calls and store.get_state("phase") == "done"
    assert "fitness cache" in caplog.text


def test_cached_reevaluation_seeds_count_like_trained_ones(tmp_path, monkeypatch):
    from test_search import SeedAware

    monkeypatch.setenv("GP_LOSS_CACHE", str(tmp_path / "cache.sqlite"))
    cfg = apply_overrides(Config(), CFG + ["search.reeval_seeds=3", "search.reeval_after=2"])
    first = run(tmp_path / "a", cfg, SeedAware(), monkeypatch)
    second = run(tmp_path / "b", cfg, SeedAware(), monkeypatch)

    def means(store):
        ids = {r["parent_id"] for r in store.candidates(phase="reeval")}
        return sorted((store.candidate(i)["expr"], store.candidate(i)["fitness"]) for i in ids)
    assert means(first) and means(first) == means(second)
    assert all(r["status"] == "reused" for r in second.candidates(phase="reeval"))


def test_a_set_edited_in_place_does_not_meet_its_old_results(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("a")
    sur = dict(Config().surrogate.__dict__)
    before = settings_digest(sur, 0, 1, str(path))
    path.write_text("b")
    assert settings_digest(sur, 0, 1, str(path)) != before


def test_tiny_and_tinycnn_share_a_cache_key():
    sur = config_to_dict(Config())["surrogate"]
    assert settings_digest({**sur, "model": "tinycnn"}, 0, 1, "x") == \
        settings_digest({**sur, "model": "tiny"}, 0, 1, "x")
    assert settings_digest({**sur, "model": "mlp"}, 0, 1, "x") != \
        settings_digest({**sur, "model": "tiny"}, 0, 1, "x")
