"""Transfer tables (``compare``) and the elimination protocol (``eliminate``).

The statistics are checked against hand computation on fixed numbers; the lr selection, the
failure accounting and the elimination rounds (including an interrupted run resumed) use fake
evaluators, so they are fast and exact; one real ``compare`` (digits, ce vs baikal, 2 seeds) and
one real ``eliminate`` train a few tiny surrogates. CLI tests run in-process.
"""
import json
import math
from dataclasses import asdict

import pytest
from click.testing import CliRunner
from scipy import stats

from gp_loss.protocol import compare as C
from gp_loss.protocol import eliminate as E
from gp_loss.errors import InputError
from gp_loss.cli.app import cli
from gp_loss.config import config_to_dict, load_config
from gp_loss.lang.psets import load_pset
from gp_loss.runs.store import RunStore

TINY = ["--set", "surrogate.steps=30", "--set", "surrogate.prescreen_steps=0", "--device", "cpu"]


@pytest.fixture
def run():
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return invoke


@pytest.fixture(autouse=True)
def _private_dirs(tmp_path, monkeypatch):
    import tempfile
    (tmp_path / "tmpdir").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmpdir"))
    monkeypatch.chdir(tmp_path)


# ----------------------------------------------------------------------------- statistics

def test_welch_matches_hand_computation():
    a, b = [0.90, 0.92, 0.94], [0.80, 0.85, 0.83, 0.86]
    ma, mb = sum(a) / 3, sum(b) / 4
    va = sum((x - ma) ** 2 for x in a) / 2
    vb = sum((x - mb) ** 2 for x in b) / 3
    se2 = va / 3 + vb / 4
    t = (ma - mb) / math.sqrt(se2)
    df = se2 ** 2 / ((va / 3) ** 2 / 2 + (vb / 4) ** 2 / 3)
    p = 2 * stats.t.sf(abs(t), df)
    assert C.welch_p(a, b) == pytest.approx(p, rel=1e-9)
    assert C.welch_p(b, a) == pytest.approx(p, rel=1e-9)


def test_welch_undefined_is_none():
    assert C.welch_p([0.9], [0.8, 0.7]) is None  # fewer than 2 runs
    assert C.welch_p([], []) is None
    assert C.welch_p([0.9, 0.9], [0.8, 0.8]) is None  # both constant
    assert C.welch_p([0.9, 0.9], [0.9, 0.9]) is None
    assert C.welch_p([0.9, 0.9], [0.8, 0.7]) is not None  # one constant side is fine


def test_holm_by_hand():
    # m = 3 defined: 0.01*3 = 0.03; 0.03*2 = 0.06; 0.04*1 = 0.04 -> raised to 0.06 (monotone)
    assert C.holm([0.01, 0.04, 0.03, None]) == pytest.approx([0.03, 0.06, 0.06, None])
    assert C.holm([0.6, 0.7]) == [1.0, 1.0]  # capped at 1
    assert C.holm([]) == [] and C.holm([None]) == [None]


def test_wins_ties_losses_pairs_seeds_and_skips_failures():
    ok = lambda s, t: {"seed": s, "test_acc": t, "status": "ok"}
    base = [ok(0, 0.5), ok(1, 0.6), ok(2, 0.7), {"seed": 3, "test_acc": None, "status": "failed"}]
    runs = [ok(0, 0.55), ok(1, 0.6), ok(2, 0.65), ok(3, 0.9), ok(4, 0.9)]
    assert C.wins_ties_losses(runs, base) == (1, 1, 1)


# ----------------------------------------------------------------------------- fake training

CALLS = []


def fake_eval(expr, pset, sur, seed=0, sign=1, with_test=False):
    """Deterministic accuracies: baikal prefers lr 1e-3, ce 2e-3; 'focal' fails on seed 1."""
    CALLS.append((expr, sur["steps"], sur.get("lr"), seed))
    best_lr = 1e-3 if expr.startswith("sub(div") else 2e-3
    acc = 0.8 - abs(sur["lr"] - best_lr) * 10 + 0.01 * seed + 0.001 * len(expr) % 0.01
    if "square" in expr and seed == 1:
        return {"status": "failed", "reason": "nan_loss", "val_acc": None, "test_acc": None,
                "fitness": 0.0, "seconds": 0.1}
    return {"status": "ok", "reason": None, "val_acc": acc, "test_acc": acc - 0.01,
            "fitness": acc, "seconds": 0.1}


def _cells(**sets):
    cfg = load_config(None, [f"surrogate.{k}={v}" for k, v in sets.items()])
    return C.plan_cells(cfg, ["digits"], [], [], "cpu", preflight=False)


def test_lr_selection_keeps_best_mean_validation_per_loss():
    ps = load_pset("paper")
    losses = [C.make_loss("ce", ps, "ce"), C.make_loss("baikal", ps)]
    res = C.compare(losses, _cells(), [0, 1], lrs=[2e-3, 1e-3], evaluate_fn=fake_eval,
                    reference="ce")
    cell = res["cells"][0]["results"]
    assert cell["ce"]["lr"] == 2e-3 and cell["baikal"]["lr"] == 1e-3
    assert res["lrs"] == [2e-3, 1e-3] and res["runs_total"] == 2 * 2 * 2
    assert set(cell["baikal"]["lr_val_acc_mean"]) == {"0.002", "0.001"}
    # only the chosen lr's runs are reported (their accuracies are the lr's optimum)
    assert [r["val_acc"] for r in cell["baikal"]["runs"]] == pytest.approx(
        [fake_eval("sub(div(y, p), log(p))", "", {"lr": 1e-3, "steps": 1}, s)["val_acc"]
         for s in (0, 1)])


def test_select_lr_ties_go_to_first_listed_and_failures_rank_last():
    ok = lambda v: {"status": "ok", "val_acc": v}
    assert C.select_lr({0.1: [ok(0.5)], 0.2: [ok(0.5)]}) == 0.1
    assert C.select_lr({0.1: [{"status": "failed", "val_acc": None}], 0.2: [ok(0.1)]}) == 0.2


def test_failed_runs_are_reported_and_excluded():
    ps = load_pset("paper")
    losses = [C.make_loss("ce", ps, "ce"), C.make_loss("focal", ps)]
    assert "square" in losses[1].expr
    res = C.compare(losses, _cells(), [0, 1, 2], evaluate_fn=fake_eval, reference="ce")
    e = res["cells"][0]["results"]["focal"]
    assert e["n_ok"] == 2 and e["n_failed"] == 1 and res["failed_runs"] == 1
    assert [r["reason"] for r in e["runs"]] == [None, "nan_loss", None]
    assert e["test_acc_mean"] == pytest.approx((e["runs"][0]["test_acc"] + e["runs"][2]["test_acc"]) / 2)
    assert e["wins"] + e["ties"] + e["losses"] == 2


# ----------------------------------------------------------------------------- compare CLI

def test_compare_digits_two_losses_two_seeds(run, tmp_path):
    from gp_loss.cli.protocol import format_compare
    md = tmp_path / "table.md"
    r = run("compare", "--loss", "ce", "--loss", "baikal", "--dataset", "digits", "--model", "tiny",
            "--seeds", 2, "--json", "--markdown", md, *TINY)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    # the reference (torch's cross-entropy) first, then the losses given
    assert [l["name"] for l in res["losses"]] == ["ce_torch", "ce", "baikal"]
    assert res["reference"] == "ce_torch" and res["losses"][0]["pset"] == "reference"
    (cell,) = res["cells"]
    assert (cell["dataset"], cell["model"], cell["augment"]) == ("digits", "tiny", "none")
    for name in ("ce_torch", "ce", "baikal"):
        e = cell["results"][name]
        assert [r["seed"] for r in e["runs"]] == [0, 1]
        for run_ in e["runs"]:
            assert {"seed", "val_acc", "test_acc", "seconds"} <= set(run_)
            assert 0 <= run_["test_acc"] <= 1 and run_["status"] == "ok"
        tests = [x["test_acc"] for x in e["runs"]]
        assert e["test_acc_mean"] == pytest.approx(sum(tests) / 2)
        assert e["test_acc_std"] == pytest.approx(abs(tests[0] - tests[1]) / math.sqrt(2))
    b, c = cell["results"]["baikal"], cell["results"]["ce_torch"]
    assert c["p_value"] is None and c["wins"] is None and c["p_bootstrap"] is None
    expect = C.welch_p([x["test_acc"] for x in b["runs"]], [x["test_acc"] for x in c["runs"]])
    assert b["p_value"] == expect
    pair = [cell["results"][n]["p_value"] for n in ("ce", "baikal")]
    assert [cell["results"][n]["p_value_holm"] for n in ("ce", "baikal")] == C.holm(pair)
    assert b["wins"] + b["ties"] + b["losses"] == 2
    assert b["test_acc_diff"] == pytest.approx(b["test_acc_mean"] - c["test_acc_mean"])
    lo, hi = b["diff_ci95"]
    assert lo <= b["test_acc_diff"] <= hi and 0 < b["p_bootstrap"] <= 1
    for e in (b, c):
        for x in e["runs"]:
            assert x["split_seed"] == 0 and 0 <= x["ece"] <= 1
            assert x["train_test_gap"] == pytest.approx(x["checkpoint_train_acc"] - x["test_acc"])
            assert [v for _, v in x["val_curve"]].count(x["val_acc"]) >= 1
        assert e["train_test_gap"] == pytest.approx(
            sum(x["train_test_gap"] for x in e["runs"]) / 2)
    text = format_compare(res)
    assert "baikal" in text and "±" in text and "W/T/L" in text
    table = md.read_text()
    assert table.startswith("| loss |") and "| baikal |" in table and "**" in table
    # the analysis script turns the JSON into the same table
    (tmp_path / "c.json").write_text(r.stdout)
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "compare_table", __import__("pathlib").Path(__file__).parents[1] / "analysis/compare_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([str(tmp_path / "c.json"), "-o", str(tmp_path / "t.md")]) == 0
    assert (tmp_path / "t.md").read_text() == table


def test_compare_explicit_cells(run):
    r = run("compare", "--loss", "baikal", "--cell", "dataset=digits,train_fraction=0.5",
            "--cell", "model=mlp", "--seeds", 2, "--json", *TINY)
    assert r.exit_code == 0, r.output
    cells = json.loads(r.stdout)["cells"]
    default = load_config(None).surrogate.train_fraction  # quick.toml's
    assert [(c["dataset"], c["model"], c["train_fraction"], c["settings"]) for c in cells] == \
        [("digits", cells[0]["model"], 0.5, {"train_fraction": 0.5}),
         (cells[1]["dataset"], "mlp", default, {})]
    assert cells[0]["label"].endswith(" train_fraction=0.5")
    # both cells are in one Holm correction
    ps = [c["results"]["baikal"]["p_value"] for c in cells]
    if None not in ps:
        assert [c["results"]["baikal"]["p_value_holm"] for c in cells] == C.holm(ps)


@pytest.mark.parametrize("args", [
    ["--loss", "nosuchloss(p)"],
    ["--loss", "baikal", "--dataset", "nosuchdata"],
    ["--loss", "baikal", "--model", "nosuchmodel"],
    ["--loss", "baikal", "--augment", "sideways"],
    ["--loss", "ce_torch"],  # nothing to compare with the reference
    ["--reference", "baikal", "--loss", "baikal"],
    ["--loss", "baikal", "--reference", "nosuchloss"],
    ["--loss", "baikal", "--tune-seeds", "2"],  # nothing to tune without an --lr grid
    ["--loss", "label_smoothing:1.5"],  # eps must be in [0, 1)
    ["--loss", "label_smoothing:x"],
    ["--loss", "baikal", "--store", "/no/such/folder/c.sqlite"],
    ["--from-run", "no/such/run"],
    ["--loss", "baikal", "--cell", "dataset"],
    ["--loss", "baikal", "--cell", "datasets=digits"],
    ["--loss", "baikal", "--cell", "train_fraction=2"],
    ["--loss", "baikal", "--cell", "model=mlp", "--dataset", "digits"],
])
def test_compare_bad_input_exits_2(run, args):
    r = run("compare", *args, *TINY)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and r.stdout == ""


# ----------------------------------------------------------------------------- eliminate

EXPRS = ["neg(mul(y, log(p)))", "sub(div(y, p), log(p))", "neg(mul(y, p))",
         "neg(mul(y, sqrt(p)))", "neg(mul(y, exp(p)))"]


def _store(path, steps=30):
    cfg = load_config(None, [f"surrogate.steps={steps}", "surrogate.prescreen_steps=0",
                             "executor.kind=serial", "executor.workers=1"])
    store = RunStore.create(path, config_to_dict(cfg))
    ids = []
    for i, (e, fit) in enumerate(zip(EXPRS, [0.5, 0.9, 0.7, 0.6, 0.8])):
        ids.append(store.add_candidate(e, "evaluated", phase="initial" if i < 3 else "child",
                                       birth=i, key=f"k{i}", fitness=fit, sign=1))
    store.add_candidate(EXPRS[1], "evaluated", phase="child", key="k1", fitness=0.85, sign=1)
    store.add_candidate(EXPRS[0], "evaluated", phase="reference", key="k0", fitness=0.99, sign=1)
    store.set_state(phase="done")
    return store, ids, asdict(cfg.surrogate)


def test_rounds_defaults_and_validation():
    sur = {"steps": 100, "model": "tinycnn", "seed": 0}
    r = E.resolve_rounds(None, sur)
    assert [(x.size, x.keep, x.steps) for x in r] == [(25, 12, 100), (12, 6, 200), (6, 4, 300),
                                                       (4, 4, 400)]
    assert {x.model for x in r} == {"tiny"}  # the old name "tinycnn" is the current one
    assert E.resolve_rounds({"keep": [2], "model": "tinycnn"}, sur)[0].model == "tiny"
    r = E.resolve_rounds({"keep": [4, 2], "seeds": [1, 3], "model": "mlp"}, sur)
    assert [(x.steps, x.model, x.seeds) for x in r] == [(100, "mlp", (0,)), (200, "mlp", (0, 1, 2))]
    for bad in ({"keep": [2, 4]}, {"keep": []}, {"keep": [3, 2], "steps": [1, 2, 3]},
                {"nope": 1}, {"keep": [2, 1], "seeds": [0]}):
        with pytest.raises(InputError):
            E.resolve_rounds(bad, sur)


def test_eliminate_rounds_scores_and_idempotent(tmp_path):
    store, ids, sur = _store(tmp_path / "run")
    rounds = E.resolve_rounds({"keep": [4, 2, 1], "seeds": [1, 2, 1]}, sur)
    CALLS.clear()
    res = E.eliminate(store, rounds, sur, evaluate_fn=fake_eval)
    # entrants: best 4 distinct search candidates (reference and duplicate key left out)
    assert [m["id"] for m in sorted(res["rounds"][0]["members"], key=lambda m: m["id"])] == \
        sorted([ids[1], ids[4], ids[2], ids[3]])
    assert len(CALLS) == 4 + 2 * 2 + 1 and res["trained_now"] == 9
    assert [c[1] for c in CALLS] == [30] * 4 + [60] * 4 + [90]
    assert [len(store.candidates(phase=f"elim{i}")) for i in (1, 2, 3)] == [4, 4, 1]
    r2 = res["rounds"][1]
    for m in r2["members"]:
        assert m["score"] == pytest.approx(sum(x["val_acc"] for x in m["runs"]) / 2)
    assert [m["kept"] for m in r2["members"]] == [True, False]
    assert res["finalists"][0]["id"] == r2["members"][0]["id"]
    row = store.candidates(phase="elim2")[0]
    assert row["parent_id"] in ids and row["key"].startswith("k") and row["status"] == "evaluated"
    CALLS.clear()
    again = E.eliminate(store, rounds, sur, evaluate_fn=fake_eval)
    assert CALLS == [] and again["rounds"] == res["rounds"] and again["trained_now"] == 0
    with pytest.raises(InputError):  # other settings on the same run are refused
        E.eliminate(store, E.resolve_rounds({"keep": [3, 1]}, sur), sur,
                           evaluate_fn=fake_eval)
    store.close()


def test_eliminate_ties_are_deterministic(tmp_path):
    store, ids, sur = _store(tmp_path / "run")
    flat = lambda *a, **k: {"status": "ok", "val_acc": 0.5, "test_acc": None, "seconds": 0.0}
    res = E.eliminate(store, E.resolve_rounds({"keep": [3, 2]}, sur), sur,
                             evaluate_fn=flat)
    # equal scores: the better search fitness first (0.9 > 0.8 > 0.7)
    assert [m["id"] for m in res["rounds"][0]["members"]] == [ids[1], ids[4], ids[2]]
    store.close()


class _Interrupt:
    def __init__(self, after):
        self.n, self.after = 0, after

    def __call__(self, *args, **kw):
        self.n += 1
        if self.n > self.after:
            raise KeyboardInterrupt
        return fake_eval(*args, **kw)


def test_eliminate_cli_resumes_after_interruption(run, tmp_path, monkeypatch):
    import gp_loss.surrogate.fitness
    store, ids, sur = _store(tmp_path / "run")
    store.close()
    args = ["eliminate", tmp_path / "run", "--set", "eliminate.keep=[4,2]",
            "--set", "executor.candidates_per_worker=1", "--json"]  # the fake: one at a time
    CALLS.clear()
    monkeypatch.setattr(gp_loss.surrogate.fitness, "evaluate", _Interrupt(after=5))
    r = run(*args)
    assert r.exit_code == 130 and "gp-loss eliminate" in r.stderr
    with RunStore.open(tmp_path / "run", readonly=True) as s:
        assert s.counts(phase="elim1")["evaluated"] == 4
        assert s.counts(phase="elim2") == {**s.counts(phase="elim2"), "evaluated": 1, "pending": 1}
    done_before = list(CALLS)
    monkeypatch.setattr(gp_loss.surrogate.fitness, "evaluate", fake_eval)
    r = run(*args)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["trained_now"] == 1 and len(CALLS) == len(done_before) + 1
    keys = [(c[0], c[1], c[3]) for c in CALLS]
    assert len(keys) == len(set(keys))  # nothing trained twice
    assert [len(x["members"]) for x in res["rounds"]] == [4, 2]
    r = run(*args[:-1])  # finished: prints the table, trains nothing
    assert r.exit_code == 0 and "round 2 (elim2)" in r.stdout and len(CALLS) == 6


def test_eliminate_real_training_and_show(run, tmp_path):
    store, ids, sur = _store(tmp_path / "run", steps=20)
    store.close()
    r = run("eliminate", tmp_path / "run", "--set", "eliminate.keep=[2,1]", "--device", "cpu",
            "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert [r_["steps"] for r_ in res["rounds"]] == [20, 40]
    assert all(0 <= m["score"] <= 1 for x in res["rounds"] for m in x["members"])
    r = run("show", tmp_path / "run", "--json")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("extra", [
    ["--set", "eliminate.keep=[2,3]"],
    ["--set", "eliminate.colour=1"],
    ["--set", "search.population=3"],
    ["--set", "surrogate.steps=-1"],
])
def test_eliminate_bad_input_exits_2(run, tmp_path, extra):
    _store(tmp_path / "run")[0].close()
    r = run("eliminate", tmp_path / "run", *extra)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output


def test_eliminate_missing_run_exits_2(run):
    r = run("eliminate", "no/such/run")
    assert r.exit_code == 2 and "Traceback" not in r.output


# ----------------------------------------------------------------------------- progressive stages

TWO_STAGES = [{"steps": 20, "image_size": 8, "dropout": 0.1},
              {"steps": 20, "image_size": 12, "dropout": 0.3, "randaugment_magnitude": 12}]


def test_two_stage_training_changes_size_dropout_and_differs(monkeypatch):
    import torch
    import torch.nn.functional as F

    from gp_loss.surrogate import train
    seen = []
    real = train._accuracy

    def spy(model, x, y, *rest):
        seen.append((x.shape[-1], [m.p for m in train._dropouts(model)]))
        return real(model, x, y, *rest)
    monkeypatch.setattr(train, "_accuracy", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = {"model": "resnet9v2", "prescreen_steps": 0, "eval_every": 15,
                "augment": "randaugment"}
        staged = train.train_candidate(F.cross_entropy, {**base, "steps": 7, "stages": TWO_STAGES},
                                       seed=0, with_test=True)
        evals, seen[:] = list(seen), []
        plain = train.train_candidate(F.cross_entropy, {**base, "steps": 40}, seed=0)
        one = train.train_candidate(F.cross_entropy, {**base, "steps": 9,
                                                      "stages": [{"steps": 40}]}, seed=0)
    finally:
        torch.set_num_threads(before)
    assert staged["status"] == "ok" and staged["steps"] == 40  # the stages' total, not `steps`
    assert 0 < staged["val_acc"] <= 1 and 0 < staged["test_acc"] <= 1
    # validations at steps 15 and 20 (the end of stage 1) at 8 px, 30 and 40 at 12 px; dropout
    # 0.1 then 0.3 (resnet9v2's own is 0.5); the test split at the best stage's size
    assert evals[:4] == [(8, [0.1]), (8, [0.1]), (12, [0.3]), (12, [0.3])] and len(evals) == 5
    assert evals[4][0] in (8, 12)
    assert staged["weights_hash"] != plain["weights_hash"]
    # one stage that keeps every run value is the plain run, bit for bit
    assert (one["weights_hash"], one["val_acc"]) == (plain["weights_hash"], plain["val_acc"])


@pytest.mark.parametrize("stages, match", [
    ({"steps": 10}, "list of tables"),
    ([{"image_size": 8}], r"stages\[0\] must be a table"),
    ([{"steps": 10, "colour": 1}], r"stages\[0\] must be a table"),
    ([{"steps": 10}, {"steps": 0}], r"stages\[1\]\.steps must be an integer >= 1"),
    ([{"steps": 10, "dropout": 1.0}], r"dropout must be a number in \[0, 1\)"),
    ([{"steps": True}], "steps must be"),
    ([{"steps": 10, "image_size": -1}], "image_size must be"),
    ([{"steps": 10, "randaugment_magnitude": float("nan")}], "randaugment_magnitude must be"),
])
def test_bad_stages_are_a_clear_value_error(stages, match):
    import torch.nn.functional as F

    from gp_loss.surrogate.train import train_candidate
    with pytest.raises(ValueError, match=match):
        train_candidate(F.cross_entropy, {"stages": stages})


def test_rounds_with_stages():
    sur = {"steps": 100, "model": "tinycnn", "seed": 0}
    st = [{"steps": 10, "image_size": 8}, {"steps": 20, "dropout": 0.2},
          {"steps": 30, "randaugment_magnitude": 8}]
    r = E.resolve_rounds({"keep": [3, 2], "stages": st, "seeds": [1, 2]}, sur)
    assert [(x.steps, len(x.stages), x.seeds) for x in r] == [(10, 1, (0,)), (30, 2, (0, 1))]
    assert r[1].stages == ({"steps": 10, "image_size": 8}, {"steps": 20, "dropout": 0.2})
    assert E.resolve_rounds({"keep": [3], "stages": []}, sur)[0].stages == ()
    for bad, key in [({"keep": [3, 2, 1], "stages": st[:2]}, "eliminate.stages"),
                     ({"keep": [3, 2], "stages": st, "steps": [5, 6]}, "eliminate.steps"),
                     ({"keep": [3, 2], "stages": st, "steps_factor": 2}, "steps_factor"),
                     ({"keep": [2], "stages": [{"steps": 0}]}, r"eliminate.stages\[0\].steps"),
                     ({"keep": [2], "stages": [{"size": 8, "steps": 1}]}, "eliminate.stages"),
                     ({"keep": [2], "stages": {"steps": 1}}, "eliminate.stages")]:
        with pytest.raises(InputError, match=key):
            E.resolve_rounds(bad, sur)


def test_paper_eliminate_toml_is_the_papers_protocol():
    import tomllib
    from pathlib import Path
    path = Path(__file__).parents[1] / "search_runs" / "paper_eliminate.toml"
    data = tomllib.loads(path.read_text())
    assert set(data) == {"eliminate", "surrogate"}
    paper = load_config("paper")
    sur = {**asdict(paper.surrogate), **data["surrogate"]}
    rounds = E.resolve_rounds(data["eliminate"], sur)
    assert [(r.size, r.keep, r.steps, r.model) for r in rounds] == [
        (25, 12, 16000, "efficientnet_v2_s"), (12, 6, 32000, "efficientnet_v2_s"),
        (6, 4, 48000, "efficientnet_v2_s"), (4, 4, 64000, "efficientnet_v2_s")]
    assert [(s["image_size"], s["dropout"], s["randaugment_magnitude"])
            for s in rounds[-1].stages] == [(128, 0.1, 5), (160, 0.2, 8), (192, 0.3, 12),
                                            (224, 0.4, 15)]
    # the [surrogate] part is valid run config (the CLI applies it as overrides)
    cfg = load_config("paper", [f"surrogate.{k}={json.dumps(v)}"
                                for k, v in data["surrogate"].items()])
    assert cfg.surrogate.model == "efficientnet_v2_s" and cfg.surrogate.midrun_min_acc == 0.45


STAGE_CALLS = []


def _stage_eval(expr, pset, sur, seed=0, sign=1, with_test=False):
    STAGE_CALLS.append((expr, sur["steps"], [s["steps"] for s in sur.get("stages", [])], seed))
    return fake_eval(expr, pset, sur, seed, sign, with_test)


def test_eliminate_with_stages_resumes(tmp_path):
    store, ids, sur = _store(tmp_path / "run")
    table = {"keep": [3, 2], "stages": [{"steps": 10, "image_size": 8},
                                        {"steps": 15, "image_size": 12, "dropout": 0.2}]}
    rounds = E.resolve_rounds(table, sur)
    STAGE_CALLS.clear()
    stop = _Interrupt(after=4)
    with pytest.raises(KeyboardInterrupt):
        E.eliminate(store, rounds, sur, evaluate_fn=lambda *a, **k: (
            stop(*a, **k), _stage_eval(*a, **k))[1])
    assert store.counts(phase="elim1")["evaluated"] == 3
    saved = store.meta()["eliminate"]["rounds"]
    assert [len(r["stages"]) for r in saved] == [1, 2]  # the stages are part of the plan
    # other stages on the same run are refused
    other = E.resolve_rounds({**table, "stages": [{"steps": 10}, {"steps": 15}]}, sur)
    with pytest.raises(InputError, match="other settings"):
        E.eliminate(store, other, sur, evaluate_fn=_stage_eval)
    res = E.eliminate(store, rounds, sur, evaluate_fn=_stage_eval)
    # the interrupted 5th run (round 2, 2nd entrant) is the only one trained again
    assert res["trained_now"] == 1 and [r["steps"] for r in res["rounds"]] == [10, 25]
    assert [c[1:3] for c in STAGE_CALLS] == [(10, [10])] * 3 + [(25, [10, 15])] * 2
    assert res["rounds"][1]["stages"][1] == {"steps": 15, "image_size": 12, "dropout": 0.2}
    store.close()


def test_eliminate_real_training_with_stages_config_file(run, tmp_path):
    store, ids, sur = _store(tmp_path / "run", steps=20)
    store.close()
    (tmp_path / "elim.toml").write_text(
        "[eliminate]\nkeep = [2, 1]\n"
        "[[eliminate.stages]]\nsteps = 10\nimage_size = 8\n"
        "[[eliminate.stages]]\nsteps = 10\nimage_size = 12\ndropout = 0.2\n"
        "[surrogate]\nmodel = \"resnet9v2\"\n")
    args = ["eliminate", tmp_path / "run", "--config", tmp_path / "elim.toml", "--device", "cpu"]
    r = run(*args, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert [x["steps"] for x in res["rounds"]] == [10, 20]
    assert all(0 < m["score"] <= 1 for x in res["rounds"] for m in x["members"])
    with RunStore.open(tmp_path / "run", readonly=True) as s:
        row = s.candidates(phase="elim2")[0]
        assert row["status"] == "evaluated" and row["result"]["steps"] == 20
    r = run(*args, "--set", "eliminate.stages=[{steps=10}, {steps=10}]")
    assert r.exit_code == 2 and "other settings" in r.stderr


# ----------------------------------------------------------------------------- show: elimination

def test_show_displays_elimination_rounds(run, tmp_path, monkeypatch):
    import gp_loss.surrogate.fitness
    store, ids, sur = _store(tmp_path / "run")
    store.close()
    r = run("show", tmp_path / "run", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["elimination"] is None
    assert "Elimination" not in run("show", tmp_path / "run").stdout
    args = ["eliminate", tmp_path / "run", "--set", "eliminate.keep=[4,2]", "--set",
            "eliminate.seeds=[1,2]", "--set", "executor.candidates_per_worker=1"]
    monkeypatch.setattr(gp_loss.surrogate.fitness, "evaluate", _Interrupt(after=5))
    assert run(*args).exit_code == 130  # round 1 done, round 2: 1 of 4 runs
    s = json.loads(run("show", tmp_path / "run", "--json").stdout)
    r1, r2 = s["elimination"]
    assert r1["complete"] and not r2["complete"]
    assert (r2["runs_done"], r2["runs_total"]) == (1, 4)
    text = run("show", tmp_path / "run").stdout
    assert "round 2 (elim2)" in text and "pending: 1 of 4 runs done" in text
    monkeypatch.setattr(gp_loss.surrogate.fitness, "evaluate", fake_eval)
    done = json.loads(run(*args, "--json").stdout)
    s = json.loads(run("show", tmp_path / "run", "--json").stdout)
    assert {"top", "counts", "seconds", "reference", "state", "config"} < set(s)
    assert [x["round"] for x in s["elimination"]] == [1, 2]
    for shown, ran in zip(s["elimination"], done["rounds"]):  # the same scoring as eliminate
        assert [(m["id"], m["score"], m["kept"]) for m in shown["members"]] == \
            [(m["id"], m["score"], m["kept"]) for m in ran["members"]]
        assert (shown["steps"], shown["model"], shown["seeds"]) == \
            (ran["steps"], ran["model"], ran["seeds"])
    r1, r2 = s["elimination"]
    assert [m["kept"] for m in r1["members"]] == [True, True, False, False]
    assert r2["complete"] and r2["members"][0]["formula"]
    scores = [m["score"] for m in r1["members"]]
    assert scores == sorted(scores, reverse=True)
    text = run("show", tmp_path / "run").stdout
    assert "Elimination" in text and "round 1 (elim1): 4 candidates" in text
    assert "-> 2 kept" in text and text.count("(out)") == 2
    assert r2["members"][0]["expr"] in text


def test_builtin_elimination_settings_resolve_by_name():
    from gp_loss.cli.protocol import _elim_settings
    from gp_loss.config import builtin_config_names

    assert "paper_eliminate" in builtin_config_names("eliminate")
    assert "paper_eliminate" not in builtin_config_names()  # not a search config
    table, overrides = _elim_settings({}, "paper_eliminate", [])
    assert table["keep"] == [25, 12, 6, 4] and len(table["stages"]) == 4
    assert 'surrogate.model="efficientnet_v2_s"' in overrides


def test_from_run_ranks_by_a_finished_elimination(tmp_path):
    store, ids, sur = _store(tmp_path / "run")
    by_search = [l.expr for l in C.run_losses(tmp_path / "run", 3)]
    assert by_search == [EXPRS[1], EXPRS[4], EXPRS[2]]  # search fitness 0.9, 0.8, 0.7
    rounds = E.resolve_rounds({"keep": [4, 2], "seeds": [1]}, sur)
    res = E.eliminate(store, rounds, sur, evaluate_fn=fake_eval)
    store.close()
    losses = C.run_losses(tmp_path / "run", 3)
    assert [l.expr for l in losses] == [m["expr"] for m in res["finalists"]]
    assert [l.name for l in losses] == ["rank1", "rank2"][:len(losses)]
    assert all("(elimination)" in l.source for l in losses)
    # export and plot rank the same way
    from gp_loss.lang import export
    from gp_loss.runs import export as run_export
    from gp_loss.runs import plots
    assert [e["expr"] for e in run_export.run_entries(tmp_path / "run", 3)] == \
        [l.expr for l in losses]
    from gp_loss.lang.export import run_lines

    lines = run_lines(run_export.run_entries(tmp_path / "run", 3))
    assert any("Ranked by the run's finished elimination" in line for line in lines)
    assert any("elimination score" in line for line in lines)
    assert [r["expr"] for r in plots.load_run(tmp_path / "run", 3).top] == \
        [l.expr for l in losses]


def test_show_leads_with_the_ranking_export_and_compare_use(run, tmp_path):
    """Once an elimination finished, show's first table is its final ranking (the order of
    export RUN_DIR and compare --from-run, with the scores); --json keeps top in search order
    and adds finalists. Each table says what it is ranked by."""
    from gp_loss.lang import export
    from gp_loss.runs import export as run_export
    store, ids, sur = _store(tmp_path / "run")
    store.close()
    s = json.loads(run("show", tmp_path / "run", "--json").stdout)
    assert s["finalists"] is None and s["tie_break"] == "val_nll"
    text = run("show", tmp_path / "run").stdout
    assert "ranked by search fitness" in text and "ranked by elimination" not in text
    store = RunStore.open(tmp_path / "run")
    rounds = E.resolve_rounds({"keep": [4, 2], "seeds": [1]}, sur)
    E.eliminate(store, rounds, sur, evaluate_fn=fake_eval)
    store.close()
    s = json.loads(run("show", tmp_path / "run", "--json").stdout)
    exported = run_export.run_entries(tmp_path / "run", 5)
    losses = C.run_losses(tmp_path / "run", 5)
    assert [f["id"] for f in s["finalists"]] == [e["candidate_id"] for e in exported]
    assert [f["expr"] for f in s["finalists"]] == [l.expr for l in losses]
    assert [f["score"] for f in s["finalists"]] == [e["elimination_score"] for e in exported]
    assert [f["rank"] for f in s["finalists"]] == [1, 2]
    assert [t["fitness"] for t in s["top"]] == [0.9, 0.8, 0.7, 0.6, 0.5]  # search order
    assert s["finalists"][0]["id"] != s["top"][0]["id"], "the test needs a reordering"
    text = run("show", tmp_path / "run").stdout
    lead = text.index("ranked by elimination")
    assert lead < text.index("ranked by search fitness")
    first_row = text[lead:].splitlines()[2].split()
    assert first_row[:2] == ["1", f"{s['finalists'][0]['score']:.4f}"]
    assert str(s["finalists"][0]["id"]) in first_row
    # show --latex leads the same way: the finalists' tabular (with scores) first
    tex = run("show", tmp_path / "run", "--latex").stdout
    assert tex.index("ranked by elimination") < tex.index("ranked by search fitness")
    first = tex[tex.index(r"\begin{tabular}"):].splitlines()[4].split(" & ")
    assert first[:2] == ["1", f"{s['finalists'][0]['score']:.4f}"]
    assert tex.count(r"\begin{tabular}") == 2 and "$T(p)$" in tex


def test_show_says_where_a_rows_sign_is_unknown(run, tmp_path):
    """The per-class form is shown with the search's sign; a row whose sign is unknown (NULL)
    gets the form as written, and its row says so instead of passing it off as signed."""
    store, ids, sur = _store(tmp_path / "run")
    unknown = store.add_candidate("neg(mul(y, log(p)))", "evaluated", phase="child", birth=9,
                                  key="k9", fitness=0.95, sign=None)
    store.close()
    s = json.loads(run("show", tmp_path / "run", "--json").stdout)
    row = next(t for t in s["top"] if t["id"] == unknown)
    assert row["sign"] is None and row["per_class_sign"] is None
    assert row["per_class"]["target"] == "-log(p + 1e-07)"  # as written
    assert {t["per_class_sign"] for t in s["top"] if t["id"] != unknown} == {1}
    lines = run("show", tmp_path / "run").stdout.splitlines()
    mine = [line for line in lines if f" {unknown} " in line and "T = " in line]
    assert len(mine) == 1 and "sign unknown" in mine[0] and " ? " in mine[0]
    assert not any("sign unknown" in line for line in lines if line not in mine)
