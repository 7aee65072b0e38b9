"""Fair baselines (issue 15, part 1): the reference losses, the fixed test split, the
checkpoint figures, tuned learning rates, split seeds, the bootstrap and the compare ledger.

The reference losses are checked against an independent oracle: torch's own
``cross_entropy`` (values and gradients, confident logits included), through the compiled
printer output and through an exported file. The statistics use hand-made numbers; the
protocol uses fake evaluators (fast, exact), one real tiny compare checks the new fields.
"""
import importlib.util
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import gp_loss
from gp_loss.cli.app import cli
from gp_loss.config import ConfigError, load_config
from gp_loss.errors import InputError
from gp_loss.lang.psets import load_pset, loss_pset
from gp_loss.lang.trees import ParseError, parse
from gp_loss.protocol import compare as C
from gp_loss.protocol.ledger import Ledger, job_key, lasting

from test_protocol import TINY, run  # noqa: F401 - the in-process CLI fixture, shared


def _torch_oracle(name):
    eps = {"ce_torch": 0.0, "label_smoothing": 0.1}.get(name)
    if eps is None:
        eps = float(name.split(":")[1])
    return lambda z, t: torch.nn.functional.cross_entropy(z, t, label_smoothing=eps)


# ----------------------------------------------------------------------------- the losses

@pytest.mark.parametrize("name", ["ce_torch", "label_smoothing", "label_smoothing:0.2",
                                  "label_smoothing:0"])
@pytest.mark.parametrize("scale", [1.0, 10.0, 40.0])
def test_reference_losses_equal_torch_values_and_gradients(name, scale, tmp_path):
    g = torch.Generator().manual_seed(3)
    z = (scale * torch.randn(512, 10, generator=g, dtype=torch.float64)).requires_grad_(True)
    t = torch.randint(0, 10, (512,), generator=g)
    oracle = _torch_oracle(name)
    want = oracle(z, t)
    (gw,) = torch.autograd.grad(want, z)
    out = tmp_path / "ref.py"
    gp_loss.export([name], out)
    spec = importlib.util.spec_from_file_location("ref_export", out)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (exported,) = module.LOSSES.values()
    for fn in (gp_loss.compile_loss(name), exported):
        got = fn(z, t)
        (gg,) = torch.autograd.grad(got, z)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gg, gw, rtol=1e-10, atol=1e-12)
    # soft targets: the one-hot of t gives the same value
    onehot = torch.nn.functional.one_hot(t, 10).double()
    torch.testing.assert_close(exported(z, onehot), want, rtol=1e-12, atol=1e-12)


def test_ce_is_the_papers_protected_form_and_ce_torch_is_not():
    z = 10 * torch.randn(10000, 10, generator=torch.Generator().manual_seed(0))
    t = torch.randint(0, 10, (10000,), generator=torch.Generator().manual_seed(1))
    exact = torch.nn.functional.cross_entropy(z, t)
    assert torch.allclose(gp_loss.compile_loss("ce_torch")(z, t), exact, rtol=1e-5)
    assert gp_loss.compile_loss("ce")(z, t) < exact - 1.0  # log(|p| + 1e-7) caps each term


def test_reference_names_resolve_with_any_set_and_search_refuses_the_set(tmp_path):
    assert loss_pset("ce_torch", "paper").name == "reference"
    assert loss_pset("label_smoothing:0.3", "typed").name == "reference"
    assert loss_pset("baikal", "paper").name == "paper"
    ref = load_pset("reference")
    assert not ref.searchable and load_pset("paper").searchable
    assert gp_loss.check("ce_torch", "reference") == {"accepted": True, "reason": "ok", "sign": 1}
    for bad in ("label_smoothing:1", "label_smoothing:-0.1", "label_smoothing:nan",
                "label_smoothing:0.1x"):
        with pytest.raises(ParseError):
            parse(bad, ref)
    with pytest.raises(ParseError):
        parse("ce_torch", "paper")  # only the callers that accept references resolve them
    from gp_loss.search.evolution import Evolution, start_run

    cfg = load_config(None, ['search.pset="reference"', "executor.kind=serial"])
    with start_run(tmp_path / "r", cfg) as store, \
            pytest.raises(ConfigError, match="not a search space"):
        Evolution(store, cfg)
    r = CliRunner().invoke(cli, ["search", "--set", 'search.pset="reference"', "--run-dir",
                                 str(tmp_path / "r2")])
    assert r.exit_code == 2 and "not a search space" in r.output
    assert not (tmp_path / "r2").exists()


def test_reference_formula_is_exact_log_softmax(run):
    out = json.loads(run("simplify", "ce_torch", "--pset", "reference", "--json").stdout)
    assert out["formula"] == "-y*log(p)" and out["per_class"]["target"] == "-log(p)"
    ls = json.loads(run("simplify", "label_smoothing:0.2", "--pset", "reference",
                        "--json").stdout)
    assert "C" in ls["formula"] and ls["per_class"]["other"] == "-log(p)/(5*C)"


# ----------------------------------------------------------------------------- the splits

def test_split_seeds_redraw_train_and_validation_but_never_the_test_split():
    from gp_loss.surrogate.data import _cpu_splits, _raw

    x, y, _ = _raw("digits", "")
    base = _cpu_splits("digits", "", 0, 0.15, 0.15, 1.0)
    seen_val = set()
    for seed in (1, 2):
        s = _cpu_splits("digits", "", seed, 0.15, 0.15, 1.0)
        assert torch.equal(s.y_test, base.y_test)
        # the same test images (standardised by each split's own training statistics)
        un = s.x_test * torch.tensor(s.std).view(1, -1, 1, 1) + torch.tensor(s.mean).view(1, -1, 1, 1)
        un0 = base.x_test * torch.tensor(base.std).view(1, -1, 1, 1) \
            + torch.tensor(base.mean).view(1, -1, 1, 1)
        torch.testing.assert_close(un, un0, atol=1e-5, rtol=0)
        assert len(s.y_train) == len(base.y_train) and len(s.y_val) == len(base.y_val)
        assert not torch.equal(s.x_val, base.x_val)
        key = s.y_val.numpy().tobytes() + s.x_val.numpy().tobytes()
        assert key not in seen_val
        seen_val.add(key)


# ----------------------------------------------------------------------------- checkpoint figures

def test_checkpoint_metrics_against_numpy():
    from gp_loss.surrogate.train import ECE_BINS, checkpoint_metrics

    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 7, generator=g)
    y = torch.randint(0, 4, (300,), generator=g)
    model = torch.nn.Linear(7, 4)
    got = checkpoint_metrics(model, x, y)
    logits = model(x).detach().double().numpy()
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    hit = prob.argmax(1) == y.numpy()
    conf = prob.max(1)
    ece = 0.0
    for b in range(ECE_BINS):
        m = (conf > b / ECE_BINS) & (conf <= (b + 1) / ECE_BINS)
        if m.any():
            ece += m.mean() * abs(hit[m].mean() - conf[m].mean())
    assert got["test_acc"] == hit.mean() and got["n_test"] == 300
    assert got["ece"] == pytest.approx(ece, abs=1e-9)
    mask = C.correct_matrix([{"status": "ok", "test_acc": 0.5, "test_correct": got["test_correct"],
                              "n_test": 300}])
    assert (mask[0] == hit).all()


def test_steps_to_reference_and_its_median():
    run = {"status": "ok", "test_acc": 0.9, "val_curve": [[10, 0.5], [20, 0.8], [30, 0.85]]}
    assert C.steps_to(run, 0.8) == 20 and C.steps_to(run, 0.9) is None
    assert C.steps_to(run, None) is None
    runs = [{**run, "steps_to_reference": v} for v in (20, None, 30)]
    assert C.median_steps(runs) == (30.0, 2)
    assert C.median_steps(runs[1:2]) == (None, 0)


def _masked(bits):
    return {"status": "ok", "test_acc": sum(bits) / len(bits), "n_test": len(bits),
            "test_correct": format(sum(1 << i for i, b in enumerate(bits) if b), "x")}


def test_bootstrap_over_test_images():
    rng = np.random.default_rng(0)
    ref = [_masked(rng.random(400) < 0.8) for _ in range(3)]
    same = C.bootstrap_diff(ref, ref, 500)
    assert same[0] == 0 and same[2] == 1.0
    better = [_masked(np.ones(400, dtype=bool)) for _ in range(3)]
    diff, (lo, hi), p = C.bootstrap_diff(better, ref, 500)
    assert diff == pytest.approx(np.mean([r["test_acc"] for r in better])
                                 - np.mean([r["test_acc"] for r in ref]))
    assert 0 < lo <= diff <= hi and p == pytest.approx(2 / 501)
    assert C.bootstrap_diff(better, ref, 500) == (diff, [lo, hi], p)  # deterministic
    assert C.bootstrap_diff([{"status": "ok", "test_acc": 1.0}], ref, 500) == (None, None, None)
    with pytest.raises(ValueError):
        C.bootstrap_diff([_masked(np.ones(10, dtype=bool))], ref, 10)


# ----------------------------------------------------------------------------- tuned rates

CALLS = []


def fake_eval(expr, pset, sur, seed=0, sign=1, with_test=False):
    """On tuning seeds (>= 100) every loss prefers lr 1e-3; on test seeds lr 2e-3 would look
    better -- so a rate chosen on the test seeds differs from one chosen on tuning seeds."""
    CALLS.append((expr, sur.get("lr"), seed, sur.get("split_seed"), with_test))
    good = 1e-3 if seed >= 100 else 2e-3
    acc = 0.8 - abs(sur["lr"] - good) * 10 + 0.001 * seed + 0.002 * sur.get("split_seed", 0)
    return {"status": "ok", "reason": None, "val_acc": acc, "test_acc": acc - 0.01,
            "fitness": acc, "seconds": 0.1}


def _setup():
    cfg = load_config(None)
    cells = C.plan_cells(cfg, ["digits"], [], [], "cpu", preflight=False)
    ps = load_pset("paper")
    return [C.make_loss("ce_torch", ps, "ce_torch"), C.make_loss("baikal", ps)], cells


def test_tune_seeds_choose_the_rate_and_never_overlap_the_test_seeds():
    losses, cells = _setup()
    assert C.tune_seed_list([100, 101], 2) == [102, 103]
    CALLS.clear()
    res = C.compare(losses, cells, [0, 1], lrs=[2e-3, 1e-3], evaluate_fn=fake_eval,
                    tune_seeds=[100, 101], split_seeds=[0, 1])
    tune = [c for c in CALLS if not c[4]]
    test = [c for c in CALLS if c[4]]
    assert len(tune) == 2 * 2 * 2 * 2 and {c[2] for c in tune} == {100, 101}
    assert len(test) == 2 * 2 * 2 and {c[2] for c in test} == {0, 1}
    assert {c[1] for c in test} == {1e-3}  # chosen on the tuning seeds, not the test seeds
    e = res["cells"][0]["results"]["baikal"]
    assert e["lr"] == 1e-3 and set(e["lr_val_acc_mean"]) == {"0.002", "0.001"}
    assert [(r["seed"], r["split_seed"]) for r in e["runs"]] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert res["tune_seeds"] == [100, 101] and res["split_seeds"] == [0, 1]
    assert res["runs_total"] == 24 and res["reference"] == "ce_torch"
    assert (e["wins"], e["ties"], e["losses"]) == (0, 4, 0)  # same fake accuracy: 4 pairs tie
    # without tuning seeds the test seeds pick (the older protocol)
    res = C.compare(losses, cells, [0, 1], lrs=[2e-3, 1e-3], evaluate_fn=fake_eval)
    assert res["cells"][0]["results"]["baikal"]["lr"] == 2e-3
    with pytest.raises(InputError):
        C.compare(losses, cells, [0, 1], evaluate_fn=fake_eval, tune_seeds=[5])
    with pytest.raises(InputError):
        C.compare(losses, cells, [0, 1], lrs=[1e-3], evaluate_fn=fake_eval, tune_seeds=[1])
    with pytest.raises(InputError):
        C.compare(losses[1:], cells, [0, 1], evaluate_fn=fake_eval)  # no reference among them


# ----------------------------------------------------------------------------- the ledger

def test_a_killed_compare_continues_from_its_ledger(tmp_path):
    losses, cells = _setup()
    path = tmp_path / "c.sqlite"
    n = {"calls": 0}

    def dies_after_5(*args):
        n["calls"] += 1
        if n["calls"] > 5:
            raise KeyboardInterrupt
        return fake_eval(*args)

    with Ledger(path) as ledger, pytest.raises(KeyboardInterrupt):
        C.compare(losses, cells, [0, 1, 2], lrs=[2e-3, 1e-3], evaluate_fn=dies_after_5,
                  tune_seeds=[10], ledger=ledger)
    with Ledger(path) as ledger:
        assert len(ledger) == 5
        CALLS.clear()
        res = C.compare(losses, cells, [0, 1, 2], lrs=[2e-3, 1e-3], evaluate_fn=fake_eval,
                        tune_seeds=[10], ledger=ledger)
    assert len(CALLS) == 4 + 6 - 5 and res["runs_from_ledger"] == 5
    whole = C.compare(losses, cells, [0, 1, 2], lrs=[2e-3, 1e-3], evaluate_fn=fake_eval,
                      tune_seeds=[10])
    assert res["cells"] == whole["cells"]
    with Ledger(path) as ledger:
        CALLS.clear()
        C.compare(losses, cells, [0, 1, 2], lrs=[2e-3, 1e-3], evaluate_fn=fake_eval,
                  tune_seeds=[10], ledger=ledger)
        assert CALLS == []


def test_ledger_keys_and_what_it_keeps(tmp_path):
    sur = {"steps": 10, "lr": 1e-3}
    k = job_key("e", "paper", sur, 0, 1, True)
    assert k == job_key("e", "paper", dict(reversed(list(sur.items()))), 0, 1, True)
    assert k != job_key("e", "paper", {**sur, "lr": 2e-3}, 0, 1, True)
    assert k != job_key("e", "paper", sur, 1, 1, True) != job_key("e", "paper", sur, 0, 1, False)
    assert lasting({"status": "ok"}) and lasting({"status": "failed", "reason": "nan_loss"})
    assert not lasting({"status": "failed", "reason": "timeout"})
    assert not lasting({"status": "failed", "reason": "out_of_memory"})
    assert not lasting({"status": "failed", "reason": "error: RuntimeError: pack"})
    assert k != job_key("e", "paper", sur, 0, 1, True, width=8)  # results depend on K
    assert k == job_key("e", "paper", {**sur, "timeout_s": 5}, 0, 1, True)
    assert not lasting({"status": "failed", "reason": "error: WorkerLost", "lost": True})
    (tmp_path / "junk.sqlite").write_text("not a database " * 100)
    with pytest.raises(InputError):
        Ledger(tmp_path / "junk.sqlite")


def test_compare_cli_tuned_split_and_resumed(run, tmp_path):
    md = tmp_path / "t.md"
    args = ["compare", "--loss", "label_smoothing", "--dataset", "digits", "--model", "tiny",
            "--seeds", 2, "--split-seeds", 2, "--lr", "2e-3", "--lr", "4e-3", "--tune-seeds", 1,
            "--bootstrap", 200, "--markdown", md, "--json", *TINY]
    r = run(*args)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert (tmp_path / "t.sqlite").is_file() and res["runs_trained"] == 2 * 2 * 2 + 2 * 2 * 2
    e = res["cells"][0]["results"]["label_smoothing"]
    assert e["pset"] == "reference" and e["lr"] in (2e-3, 4e-3)
    assert {(x["seed"], x["split_seed"]) for x in e["runs"]} == {(0, 0), (1, 0), (0, 1), (1, 1)}
    for key in ("steps_to_reference", "train_test_gap", "ece", "p_bootstrap", "diff_ci95"):
        assert key in e
    table = md.read_text()
    assert "vs ce_torch" in table and "| label_smoothing |" in table and "ECE" in table
    again = run(*args)
    res2 = json.loads(again.stdout)
    assert res2["runs_trained"] == 0 and res2["runs_from_ledger"] == res["runs_trained"]
    assert res2["cells"] == res["cells"]


def test_wins_ties_losses_pair_by_seed_and_split_seed():
    ok = lambda s, sp, t: {"seed": s, "split_seed": sp, "test_acc": t, "status": "ok"}  # noqa
    ref = [ok(0, 0, 0.5), ok(0, 1, 0.9)]
    # beats the reference of its own split on both; against the other split it would not
    assert C.wins_ties_losses([ok(0, 0, 0.6), ok(0, 1, 0.95)], ref) == (2, 0, 0)


def test_split_seeds_are_refused_where_the_split_cannot_vary():
    from gp_loss.surrogate.data import split_varies

    assert split_varies("digits", 0.15, 0.15) and split_varies("cifar10", 0.2, 0.15)
    assert not split_varies("cifar10", 0.15, 0.15)
    losses, _ = _setup()
    cfg = load_config(None, ["surrogate.val_fraction=0.15", "surrogate.test_fraction=0.15"])
    cells = C.plan_cells(cfg, ["cifar10"], [], [], "cpu", preflight=False)
    with pytest.raises(InputError, match="split seed"):
        C.compare(losses, cells, [0, 1], evaluate_fn=fake_eval, split_seeds=[0, 1])


def test_split_seeds_start_from_the_cells_own(tmp_path):
    losses, _ = _setup()
    cells = C.plan_cells(load_config(None, ["surrogate.split_seed=7"]), ["digits"], [], [],
                         "cpu", preflight=False)
    res = C.compare(losses, cells, [0], evaluate_fn=fake_eval, split_seeds=[0, 1])
    runs = res["cells"][0]["results"]["baikal"]["runs"]
    assert [r["split_seed"] for r in runs] == [7, 8] and res["split_seeds"] == [7, 8]


def test_compare_from_run_without_config(run, tmp_path):
    from test_protocol import _store

    store, _, _ = _store(tmp_path / "run")
    store.close()
    r = run("compare", "--from-run", tmp_path / "run", "--top", 1, "--seeds", 1,
            "--markdown", tmp_path / "m.md", "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert [l["name"] for l in res["losses"]] == ["ce_torch", "rank1"]
    assert (tmp_path / "m.sqlite").is_file()
