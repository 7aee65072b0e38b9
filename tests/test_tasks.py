"""[[search.tasks]]: fitness that rewards transfer (issue 15, part 2).

- config: a task is a named table of [surrogate] keys; bad ones are named (exit 2);
- fitness with >= 2 tasks is the mean over tasks of (val_acc - ce_torch's val_acc, same task
  settings and seed), ce_torch trained once per (task, seed offset), re-evaluation seeds too;
  checked against an independent recomputation from the fake's own numbers, and on a real
  tiny search against ``fitness.evaluate`` called directly;
- a candidate that fails a task is not trained on the later ones;
- one task is today's fitness under the task's settings (same table as the settings folded
  into [surrogate]);
- the fitness cache keys per task (failures included): no (expression, task, seed) trains twice;
- a search interrupted between (and during) tasks resumes exactly, repeating no training;
- packs (K > 1) and eliminate on the same tasks (steps scaled per task); show --json ``tasks``.
"""
from __future__ import annotations

import json
import statistics

import pytest
from click.testing import CliRunner

import gp_loss.search.evolution as evo
from gp_loss.cli.app import cli
from gp_loss.config import Config, ConfigError, apply_overrides, config_from_dict, config_to_dict
from gp_loss.runs.report import summary
from gp_loss.runs.store import RunStore
from test_search import _unit, use_fake

CE_TORCH = "neg(mul(y, logp))"
TASKS = [{"name": "tiny_a", "model": "tiny", "lr": 2e-3},
         {"name": "mlp_b", "model": "mlp", "lr": 4e-3, "steps": 50}]
BASE = ["executor.kind=serial", "search.reference=[]", "surrogate.steps=100",
        "executor.candidates_per_worker=1", "search.initial=6", "search.population=3",
        "search.tournament=2", "search.children=12", "search.fitness_cache=off"]


def make_cfg(tasks=TASKS, *sets) -> Config:
    cfg = apply_overrides(Config(), BASE + list(sets))
    data = config_to_dict(cfg)
    data["search"]["tasks"] = [dict(t) for t in tasks]
    return config_from_dict(data)


class TaskFake:
    """A deterministic evaluation whose numbers depend on (expression, task settings, seed);
    ce_torch gets its own. The first task fails a quarter of the candidates' pre-screens.
    ``stops``: call numbers that raise KeyboardInterrupt (a Ctrl-C mid-evaluation)."""

    def __init__(self, stops=(), fail_ce_on=None):
        self.stops, self.fail_ce_on = set(stops), fail_ce_on
        self.calls: list[tuple] = []

    @staticmethod
    def value(expr, conf, seed) -> float:
        return round(0.2 + 0.7 * _unit(f"{expr}|{conf['model']}|{conf['lr']}|{conf['steps']}"
                                       f"|{seed}", "task"), 3)

    def __call__(self, expr, pset_name, conf, seed=0, sign=1, with_test=False):
        self.calls.append((expr, conf["model"], conf["lr"], conf["steps"], seed))
        if len(self.calls) in self.stops:
            raise KeyboardInterrupt
        if expr == CE_TORCH and conf["model"] == self.fail_ce_on:
            return {"status": "failed", "reason": "nan_loss", "fitness": 0.0, "steps": 1,
                    "seconds": 0.0}
        v = self.value(expr, conf, seed)
        if expr != CE_TORCH and conf["model"] == "tiny" and v < 0.35:
            return {"status": "failed", "reason": "prescreen", "fitness": 0.0, "steps": 20,
                    "seconds": 0.0}
        return {"status": "ok", "reason": None, "fitness": v, "val_acc": v, "val_nll": 1 - v,
                "steps": conf["steps"], "seconds": 0.0}


def run(run_dir, cfg, fake, monkeypatch):
    use_fake(monkeypatch, fake)
    evo.start_run(run_dir, cfg).close()
    with RunStore.open(run_dir) as store:
        return evo.Evolution(store, cfg).run()


def rows(run_dir):
    with RunStore.open(run_dir, readonly=True) as store:
        return store.candidates()


def task_confs(cfg):
    from dataclasses import asdict
    return [asdict(c) for _, c in cfg.task_surrogates()]


# --------------------------------------------------------------------------- config

@pytest.mark.parametrize("task, message", [
    ({"name": "a", "lrr": 1e-3}, "search.tasks[0].lrr"),
    ({"lr": 1e-3}, "search.tasks[0].name"),
    ({"name": "a", "lr": -1.0}, "surrogate.lr"),
    ({"name": "a", "seed": 3}, "search.tasks[0].seed"),
    ("digits", "list of tables"),
])
def test_a_bad_task_is_named(task, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config_from_dict({"search": {"tasks": [task]}})


def test_task_names_must_differ_and_the_config_round_trips():
    with pytest.raises(ConfigError, match="names two tasks"):
        config_from_dict({"search": {"tasks": [{"name": "a"}, {"name": "a"}]}})
    cfg = make_cfg()
    assert config_from_dict(config_to_dict(cfg)) == cfg
    (n0, c0), (n1, c1) = cfg.task_surrogates()
    assert (n0, c0.model, c0.lr, c0.steps) == ("tiny_a", "tiny", 2e-3, 100)
    assert (n1, c1.model, c1.lr, c1.steps) == ("mlp_b", "mlp", 4e-3, 50)
    assert Config().task_surrogates() == [(None, Config().surrogate)]


def test_the_cli_refuses_a_bad_task_with_exit_2(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text('[[search.tasks]]\nname = "a"\nmodle = "mlp"\n')
    res = CliRunner().invoke(cli, ["search", str(toml), "--run-dir", str(tmp_path / "r")])
    assert res.exit_code == 2 and "search.tasks[0].modle" in res.output, res.output
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- fitness

def test_fitness_is_the_mean_gain_over_ce_torch_per_task_and_seed(tmp_path, monkeypatch):
    cfg = make_cfg(TASKS, "search.reeval_seeds=2", "search.reeval_after=1",
                   "search.reference=[\"ce\"]")
    fake = TaskFake()
    assert run(tmp_path / "r", cfg, fake, monkeypatch)["stop_reason"] == "finished"
    confs, all_rows = task_confs(cfg), rows(tmp_path / "r")
    base = [r for r in all_rows if r["phase"] == "baseline"]
    assert sorted(r["birth"] for r in base) == [0, 1]  # once per seed offset
    assert all(r["expr"] == CE_TORCH and r["status"] == "evaluated" for r in base)
    ce_calls = [c for c in fake.calls if c[0] == CE_TORCH]
    assert len(ce_calls) == len(set(ce_calls)) == 4  # 2 tasks x 2 seeds, each trained once

    def gain(expr, seed):  # the oracle: the fake's own numbers, recomputed here
        return statistics.fmean(TaskFake.value(expr, c, seed) - TaskFake.value(CE_TORCH, c, seed)
                                for c in confs)
    checked = failed_first = 0
    for r in all_rows:
        res = r["result"] or {}
        if r["phase"] in ("initial", "child", "reference") and r["status"] == "evaluated":
            single = res.get("seed_fitness", [r["fitness"]])[0]
            assert single == pytest.approx(gain(r["expr"], 0), abs=1e-12), r
            assert [t["name"] for t in res["tasks"]] == ["tiny_a", "mlp_b"]
            for t, c in zip(res["tasks"], confs):
                assert t["gain"] == pytest.approx(TaskFake.value(r["expr"], c, 0)
                                                  - TaskFake.value(CE_TORCH, c, 0))
            checked += 1
        if r["phase"] == "reeval" and r["status"] == "evaluated":
            assert r["fitness"] == pytest.approx(gain(r["expr"], r["birth"]), abs=1e-12)
        if r["status"] == "failed" and r["phase"] in ("initial", "child"):
            # failed the first task's pre-screen: never trained on the second
            assert res["failed_task"] == "tiny_a" and len(res["tasks"]) == 1
            assert not [c for c in fake.calls if c[0] == r["expr"] and c[1] == "mlp"]
            failed_first += 1
    assert checked >= 4 and failed_first >= 1
    assert any(r["phase"] == "reeval" for r in all_rows)
    with RunStore.open(tmp_path / "r", readonly=True) as store:
        s = summary(store, formulas=False)
    top = s["top"][0]
    assert [set(t) >= {"name", "val_acc", "gain"} for t in top["tasks"]] == [True, True]
    assert top["tasks"][0]["gain"] == pytest.approx(top["tasks"][0]["val_acc"] - TaskFake.value(
        CE_TORCH, confs[0], 0))
    assert s["config"]["fitness"] == "mean gain over tasks"
    assert [b["seed_offset"] for b in s["baselines"]] == [0, 1]


def test_a_failed_reeval_seed_counts_accuracy_0_not_a_gain_of_0(tmp_path, monkeypatch):
    class FailSeed1(TaskFake):
        def __call__(self, expr, pset_name, conf, seed=0, sign=1, with_test=False):
            if seed == 1 and expr != CE_TORCH:
                self.calls.append((expr, conf["model"], conf["lr"], conf["steps"], seed))
                return {"status": "failed", "reason": "nan_loss", "fitness": 0.0, "steps": 1,
                        "seconds": 0.0}
            return super().__call__(expr, pset_name, conf, seed, sign, with_test)
    cfg = make_cfg(TASKS, "search.reeval_seeds=2", "search.reeval_after=1")
    run(tmp_path / "r", cfg, FailSeed1(), monkeypatch)
    confs = task_confs(cfg)
    penalty = -statistics.fmean(TaskFake.value(CE_TORCH, c, 1) for c in confs)
    done = [r for r in rows(tmp_path / "r") if (r["result"] or {}).get("seed_fitness")]
    assert done
    for r in done:
        first, second = r["result"]["seed_fitness"]
        assert second == pytest.approx(penalty)
        assert r["fitness"] == pytest.approx((first + penalty) / 2) and r["fitness"] < first


def test_a_failing_reference_stops_the_search_naming_the_task(tmp_path, monkeypatch):
    out = run(tmp_path / "r", make_cfg(), TaskFake(fail_ce_on="mlp"), monkeypatch)
    assert "ce_torch" in out["stop_reason"] and "mlp_b" in out["stop_reason"]
    assert not [r for r in rows(tmp_path / "r") if r["phase"] in ("initial", "child")
                and r["status"] == "evaluated"]


def test_one_task_is_the_plain_fitness_under_its_settings(tmp_path, monkeypatch):
    one = make_cfg([{"name": "only", "model": "mlp", "lr": 4e-3}])
    run(tmp_path / "task", one, TaskFake(), monkeypatch)
    folded = make_cfg([], "surrogate.model=mlp", "surrogate.lr=4e-3")
    run(tmp_path / "folded", folded, TaskFake(), monkeypatch)
    keys = ("phase", "birth", "expr", "status", "fitness")
    a, b = rows(tmp_path / "task"), rows(tmp_path / "folded")
    assert [tuple(r[k] for k in keys) for r in a] == [tuple(r[k] for k in keys) for r in b]
    assert not [r for r in a if r["phase"] == "baseline"]
    with RunStore.open(tmp_path / "task", readonly=True) as store:
        top = summary(store, formulas=False)["top"][0]
    assert top["tasks"] == [{"name": "only", "val_acc": top["fitness"], "gain": None,
                             "status": "ok", "reason": None}]


def test_the_fitness_cache_keys_per_task_failures_included(tmp_path, monkeypatch):
    cache = f"search.fitness_cache={tmp_path / 'cache.sqlite'}"
    first = TaskFake()
    run(tmp_path / "a", make_cfg(TASKS, cache), first, monkeypatch)
    again = TaskFake()
    run(tmp_path / "b", make_cfg(TASKS, cache), again, monkeypatch)
    assert again.calls == []  # every task of every candidate (and ce_torch) from the cache
    assert rows(tmp_path / "a")[-1]["fitness"] == rows(tmp_path / "b")[-1]["fitness"]
    # A run sharing the first task only: nothing trained under tiny_a's settings twice.
    other = [TASKS[0], {"name": "mlp_c", "model": "mlp", "lr": 1e-3}]
    third = TaskFake()
    run(tmp_path / "c", make_cfg(other, cache), third, monkeypatch)
    assert third.calls, "the new task trains"
    seen = set(first.calls)
    assert not [c for c in third.calls if c in seen]
    assert any(c[1] == "tiny" for c in first.calls)


def _interrupted(run_dir, cfg, stops, monkeypatch):
    fake = TaskFake(stops)
    use_fake(monkeypatch, fake)
    evo.start_run(run_dir, cfg).close()
    partial_seen = 0
    for _ in range(len(stops) + 1):
        with RunStore.open(run_dir) as store:
            out = evo.Evolution(store, cfg).run()
            partial_seen += sum(bool((r["result"] or {}).get("partial"))
                                for r in store.candidates(status="pending"))
        if out["stop_reason"] == "finished":
            return fake, partial_seen
        assert out["stop_reason"] == "interrupted"
    raise AssertionError("did not finish")


def test_an_interrupted_multi_task_search_resumes_exactly_repeating_no_task(tmp_path,
                                                                           monkeypatch):
    cfg = make_cfg(TASKS, "search.reeval_seeds=2", "search.reeval_after=1")
    whole, _ = _interrupted(tmp_path / "whole", cfg, (), monkeypatch)
    stops = (2, 5, 9, 10, 14, 19, 23, 30)
    cut, partial_seen = _interrupted(tmp_path / "cut", cfg, stops, monkeypatch)
    keys = ("id", "phase", "birth", "expr", "status", "reason", "fitness", "parent_id")
    assert [tuple(r[k] for k in keys) for r in rows(tmp_path / "cut")] == \
        [tuple(r[k] for k in keys) for r in rows(tmp_path / "whole")]
    assert [r["result"] for r in rows(tmp_path / "cut")] == \
        [r["result"] for r in rows(tmp_path / "whole")]
    # Only the interrupted calls were repeated: a task finished before a cut never retrains.
    done = [c for n, c in enumerate(cut.calls, 1) if n not in stops]
    assert done == whole.calls
    assert partial_seen >= 1  # some cut fell between two tasks of one candidate


def test_packs_train_each_task_in_its_own_packs(tmp_path, monkeypatch):
    cfg = make_cfg(TASKS, "executor.candidates_per_worker=2")
    fake = TaskFake()
    assert run(tmp_path / "r", cfg, fake, monkeypatch)["stop_reason"] == "finished"
    confs = task_confs(cfg)
    ok = [r for r in rows(tmp_path / "r") if r["phase"] in ("initial", "child")
          and r["status"] == "evaluated"]
    assert ok
    for r in ok:
        assert r["fitness"] == pytest.approx(statistics.fmean(
            TaskFake.value(r["expr"], c, 0) - TaskFake.value(CE_TORCH, c, 0) for c in confs))
        assert {t["pack_k"] for t in r["result"]["tasks"]} == {2}


def test_eliminate_retrains_on_the_same_tasks_with_scaled_steps(tmp_path, monkeypatch):
    from gp_loss.errors import InputError
    from gp_loss.protocol import eliminate as E

    cfg = make_cfg()
    run(tmp_path / "r", cfg, TaskFake(), monkeypatch)
    from dataclasses import asdict
    sur = asdict(cfg.surrogate)
    fake = TaskFake()
    rounds = E.resolve_rounds({"keep": [3, 2]}, sur)
    with RunStore.open(tmp_path / "r") as store:
        with pytest.raises(InputError, match="search.tasks"):
            E.eliminate(store, E.resolve_rounds({"keep": [3, 2], "model": "mlp"}, sur), sur,
                        evaluate_fn=fake)
        out = E.eliminate(store, rounds, sur, evaluate_fn=fake)
        r1 = store.candidates(phase="elim1")
    # round 1: x1 of each task's steps, round 2: x2 (tiny_a 100 -> 200, mlp_b 50 -> 100)
    assert sorted({(c[1], c[3]) for c in fake.calls}) == [
        ("mlp", 50), ("mlp", 100), ("tiny", 100), ("tiny", 200)]
    assert len(r1) == 3 * 2 and {r["mutation"] for r in r1} == {"tiny_a", "mlp_b"}
    confs = task_confs(cfg)
    for m in out["rounds"][0]["members"]:
        assert m["score"] == pytest.approx(statistics.fmean(
            0.0 if x["status"] == "failed" else x["val_acc"] for x in m["runs"]))
        assert len(m["runs"]) == 2
    assert out["rounds"][1]["tasks"] == [{"name": "tiny_a", "steps": 200},
                                         {"name": "mlp_b", "steps": 100}]
    from gp_loss.runs.plots import TASKS_LABEL, load_run
    from gp_loss.runs.render import format_summary
    with RunStore.open(tmp_path / "r", readonly=True) as store:
        text = format_summary(summary(store, formulas=False))
    assert "round 2: tasks tiny_a 200 steps, mlp_b 100 steps, seed(s) 0" in text
    assert "Per task" in text and "ce_torch" in text
    assert load_run(tmp_path / "r").fitness_label == TASKS_LABEL


# --------------------------------------------------------------------------- real training

def test_a_real_two_task_search_matches_evaluate_called_directly(tmp_path):
    """No fake: the stored fitness of the best candidate is the mean over tasks of
    (its validation accuracy - ce_torch's), each recomputed with fitness.evaluate."""
    from gp_loss.lang.psets import load_pset
    from gp_loss.surrogate.fitness import evaluate

    toml = tmp_path / "mt.toml"
    toml.write_text("""
[search]
population = 2
tournament = 2
initial = 3
children = 2
reference = []
fitness_cache = "off"
[surrogate]
dataset = "digits"
steps = 30
train_fraction = 0.3
prescreen_steps = 0
[executor]
candidates_per_worker = 1
[[search.tasks]]
name = "tiny"
[[search.tasks]]
name = "mlp"
model = "mlp"
lr = 4e-3
""")
    runner = CliRunner()
    res = runner.invoke(cli, ["search", str(toml), "--run-dir", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "Per task" in res.output and "ce_torch" in res.output
    shown = json.loads(runner.invoke(cli, ["show", str(tmp_path / "r"), "--json"]).output)
    top = shown["top"][0]
    cfg = config_from_dict(shown_config(tmp_path / "r"))
    gains = []
    for (name, conf), entry in zip(cfg.task_surrogates(), top["tasks"]):
        from dataclasses import asdict
        conf = asdict(conf)
        mine = evaluate(top["expr"], load_pset("paper").source, conf, 0, top["sign"])
        ref = evaluate(CE_TORCH, load_pset("reference").source, conf, 0, 1)
        assert entry["name"] == name and entry["val_acc"] == mine["val_acc"]
        gains.append(mine["val_acc"] - ref["val_acc"])
        assert entry["gain"] == pytest.approx(gains[-1], abs=1e-12)
    assert top["fitness"] == pytest.approx(statistics.fmean(gains), abs=1e-12)


def shown_config(run_dir):
    with RunStore.open(run_dir, readonly=True) as store:
        return store.config()
