"""Population training (issue 14): the grouped network, the pack trainer, the packer.

The property everything rests on: a candidate's result is a function of (expression,
settings, seed, K) only -- bit for bit the same whichever candidates share its pack, in which
slot it sits, and whether its slot was refilled after another candidate finished.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging

import pytest
import torch
import torch.nn.functional as F

from gp_loss.execution.base import EvaluationTimeout, Executor, SerialExecutor
from gp_loss.execution.packing import Packer, pack_timeout
from gp_loss.surrogate import packtrain
from gp_loss.surrogate.models import build_model
from gp_loss.surrogate.pack import Pack
from gp_loss.surrogate.packtrain import effective_width, train_pack
from gp_loss.surrogate.train import train_candidate

FIELDS = ("status", "reason", "val_acc", "val_nll", "test_acc", "train_acc", "steps",
          "weights_hash", "pack_k")
SHORT = {"steps": 40, "prescreen_steps": 20, "eval_every": 10}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ce(logits, y):
    return F.cross_entropy(logits, y)


def mse(logits, y):
    return ((logits.softmax(1) - F.one_hot(y, logits.shape[1])) ** 2).sum(1).mean()


def nan_loss(logits, y):
    return logits.sum() * float("nan")


def boom(logits, y):
    raise ValueError("boom")


class Late:
    """A loss that trains as cross-entropy, then fails at its ``at``-th call (NaN or raise):
    after validations, so a best checkpoint exists when it fails."""

    def __init__(self, at: int, how: str):
        self.calls, self.at, self.how = 0, at, how

    def __call__(self, logits, y):
        self.calls += 1
        if self.calls >= self.at:
            if self.how == "raise":
                raise ValueError("late")
            return logits.sum() * float("nan")
        return F.cross_entropy(logits, y)


def anti(logits, y):  # learns to be wrong: fails the pre-screen
    return -F.cross_entropy(logits, y)


def view(res):
    return tuple(res[f] for f in FIELDS)


# ----------------------------------------------------------------------------- the network

@pytest.mark.parametrize("model, size, c", [("tiny", 8, 1), ("mlp", 8, 1), ("tiny", 12, 1),
                                             ("resnet9v2", 8, 1), ("resnet9v2", 10, 3)])
def test_the_pack_computes_what_each_model_computes(model, size, c):
    # in training mode, ResNet9V2's dropout included: slot k draws from its own generator
    # what the plain model draws from the global RNG in the same state
    nets = []
    for s in range(3):
        torch.manual_seed(s)
        nets.append(build_model(model, c, 10, size))
    torch.manual_seed(9)
    x, y = torch.randn(3, 16, c, size, size), torch.randint(0, 10, (3, 16))
    plain = []
    for k, n in enumerate(nets):
        torch.manual_seed(100 + k)
        plain.append(n(x[k]))
    grads_plain = []
    for k, n in enumerate(nets):
        n.zero_grad()
        ce(plain[k], y[k]).backward()
        grads_plain.append([p.grad.clone() for p in n.parameters()])
    # fresh copies (the plain forward updated the BN statistics of the originals)
    copies = []
    for s in range(3):
        torch.manual_seed(s)
        copies.append(build_model(model, c, 10, size))
    pack = Pack(copies)
    out = pack(x, [torch.Generator().manual_seed(100 + k) for k in range(3)])
    assert out.shape == (3, 16, 10)
    for k in range(3):
        assert torch.allclose(out[k], plain[k], atol=1e-5)
    sum(ce(out[k], y[k]) for k in range(3)).backward()
    names = [name for name, _ in copies[0].named_parameters()]
    for k, n in enumerate(copies):  # the gradients land in the stacks, row k for slot k
        for g, name in zip(grads_plain[k], names):
            assert torch.allclose(pack.stacked[name].grad[k], g, atol=1e-5)
        for p, name in zip(n.parameters(), names):  # the slot's weights are the stack's row
            assert p.data_ptr() == pack.stacked[name][k].data_ptr()
        for a, b in zip(n.buffers(), nets[k].buffers()):  # BN statistics, per slot
            assert torch.allclose(a.double(), b.double(), atol=1e-6)
    pack.eval()  # evaluation mode uses each slot's own running statistics
    out = pack(x)
    for k, n in enumerate(nets):
        n.eval()
        assert torch.allclose(out[k], n(x[k]), atol=1e-5)


@pytest.mark.parametrize("wd", [0.0, 1e-3])
def test_the_pack_optimizer_is_adam_per_slot(wd):
    # three slots at their own learning rates: slot 2 joins late (a refill resets its
    # moments), slot 1 finishes early (learning rate 0 from then on: its weights stand still,
    # whatever its moments do). Each row follows torch.optim.Adam on that slot's tensor alone.
    torch.manual_seed(0)
    start = [torch.randn(3, 4, 5), torch.randn(3, 7)]
    stacked = [t.clone().requires_grad_(True) for t in start]
    opt = packtrain.PackAdam(stacked, wd)
    alone = [[t[k].clone().requires_grad_(True) for t in start] for k in range(3)]
    ref = [torch.optim.Adam(ps, lr=1.0, weight_decay=wd) for ps in alone]
    lr = {0: 1e-2, 1: 3e-3, 2: 5e-2}
    steps = [0, 0, 0]
    for it in range(6):
        grads = [torch.randn_like(t) for t in start]
        moving = [k for k in range(3) if not (k == 2 and it < 2) and not (k == 1 and it >= 3)]
        if it == 2:
            opt.reset(2)
        for p, g in zip(stacked, grads):
            p.grad = g.clone()
        for k in moving:
            steps[k] += 1
            for p, g in zip(alone[k], grads):
                p.grad = g[k].clone()
            ref[k].param_groups[0]["lr"] = lr[k]
            ref[k].step()
        opt.step([lr[k] if k in moving else 0.0 for k in range(3)],
                 [steps[k] if k in moving else 1 for k in range(3)])
        assert all(p.grad is None for p in stacked)
    assert steps == [6, 3, 4]
    for k in range(3):
        for p, q, t in zip(stacked, alone[k], start):
            assert torch.allclose(p[k], q, atol=1e-6, rtol=1e-5)
            assert not torch.equal(p[k], t[k])


def test_a_pack_refuses_what_it_cannot_run():
    torch.manual_seed(0)
    tiny, mlp = build_model("tiny", 1, 10, 8), build_model("mlp", 1, 10, 8)
    with pytest.raises(ValueError, match="cannot pack"):
        Pack([tiny, mlp])
    with pytest.raises(ValueError, match="same parameter shapes"):
        Pack([build_model("mlp", 1, 10, 8), build_model("mlp", 1, 10, 12)])
    with pytest.raises(ValueError, match="one batch per slot"):
        Pack([tiny])(torch.zeros(2, 4, 1, 8, 8))


# ----------------------------------------------------------------------------- the trainer

def test_width_one_is_the_plain_trainer():
    got = train_pack([ce, mse], SHORT, [0, 1], width=1, with_test=True)
    for res, fn, seed in zip(got, (ce, mse), (0, 1)):
        alone = train_candidate(fn, SHORT, seed=seed, with_test=True)
        assert view(res)[:-1] == tuple(alone[f] for f in FIELDS[:-1]) and res["pack_k"] == 1


def test_a_result_does_not_depend_on_its_neighbours_its_slot_or_a_refill():
    # mse (seed 0) sits in slot 1 of a pack with a NaN, an exception and a pre-screen failure
    # whose slots are refilled; then in slot 0 of another pack next to other candidates; then
    # as the refill of a finished slot. Every number is the same each time.
    a = train_pack([ce, mse, nan_loss, boom, anti, ce], SHORT, [1, 0, 0, 0, 0, 2],
                   width=4, with_test=True)
    b = train_pack([mse, ce], SHORT, [0, 2], width=4, with_test=True)
    c = train_pack([boom, nan_loss, anti, ce, ce, mse], SHORT, [0, 0, 0, 1, 2, 0],
                   width=4, with_test=True)
    assert view(a[1]) == view(b[0]) == view(c[5])
    assert view(a[5]) == view(b[1]) == view(c[4])  # ce seed 2: a refill in a and c
    assert view(a[0]) == view(c[3])
    assert [r["reason"] for r in a] == [None, None, "nan_loss", "error: ValueError: boom",
                                        "prescreen", None]
    assert a[1]["status"] == "ok" and a[1]["steps"] == 40 and a[1]["test_acc"] is not None
    assert a[2]["steps"] == 1 and a[4]["steps"] == 20  # each failure ends its own run
    assert all(r["pack_k"] == 4 for r in a + b + c)


def test_the_paper_surrogate_packs_with_its_dropout_per_slot():
    # ResNet9V2 draws dropout masks: each slot from its own stream, so a result is still the
    # same in any pack and slot, and a refill after a failure starts its own stream
    # ce sits in slot 1 of a and slot 0 of b; mse is the refill of slot 0 in a, slot 1 in b
    cfg = {**SHORT, "model": "resnet9v2", "steps": 24, "prescreen_steps": 12}
    a = train_pack([nan_loss, ce, mse], cfg, [0, 0, 1], width=2, with_test=True)
    b = train_pack([ce, mse], cfg, [0, 1], width=2, with_test=True)
    assert view(a[1]) == view(b[0]) and view(a[2]) == view(b[1])
    assert a[0]["reason"] == "nan_loss" and all(r["pack_k"] == 2 for r in a + b)
    assert a[1]["status"] == "ok" and a[1]["steps"] == 24


@pytest.mark.parametrize("how, reason", [("nan", "nan_loss"), ("raise", "error: ValueError: late")])
def test_a_candidate_failing_after_a_validation_ends_alone_with_the_test_split(how, reason):
    # with_test: the failing candidate's result loads its best checkpoint into its slot; its
    # neighbours' results are those they get without it, and its own as when it trains alone
    # (the weights of its last good step)
    a = train_pack([Late(25, how), mse], SHORT, [0, 0], width=2, with_test=True)
    b = train_pack([ce, mse], SHORT, [1, 0], width=2, with_test=True)
    assert a[0]["status"] == "failed" and a[0]["reason"] == reason and a[0]["steps"] == 25
    assert a[0]["test_acc"] is not None and a[0]["val_acc"] > 0
    assert view(a[1]) == view(b[1])
    c = train_pack([mse, Late(25, how)], SHORT, [0, 0], width=2, with_test=True)
    assert view(c[1]) == view(a[0]) and view(c[0]) == view(a[1])


def test_k_is_a_setting_and_close_to_training_alone():
    alone = train_pack([ce, mse], SHORT, [0, 0], width=1)
    packed = train_pack([ce, mse], SHORT, [0, 0], width=4)
    for x, y in zip(alone, packed):
        assert x["steps"] == y["steps"] and abs(x["val_acc"] - y["val_acc"]) < 0.05
        assert x["weights_hash"] != y["weights_hash"]  # the last bits differ: K is a setting


def test_the_separate_prescreen_runs_in_packs_too():
    cfg = {**SHORT, "prescreen_separate": True, "prescreen_steps": 15}
    a = train_pack([anti, ce, mse], cfg, [0, 0, 0], width=2, with_test=True)
    b = train_pack([mse, ce], cfg, [0, 0], width=2, with_test=True)
    assert a[0]["reason"] == "prescreen" and a[0]["steps"] == 15
    assert view(a[2]) == view(b[0]) and view(a[1]) == view(b[1])
    assert a[1]["steps"] == 40 and a[1]["seconds"] > 0


def test_stages_that_change_the_image_size_start_candidates_together():
    stages = [{"steps": 15, "image_size": 8}, {"steps": 15, "image_size": 12}]
    cfg = {**SHORT, "stages": stages, "prescreen_steps": 0}
    a = train_pack([nan_loss, ce, mse], cfg, [0, 0, 0], width=2, with_test=True)
    b = train_pack([ce, mse], cfg, [0, 0], width=2, with_test=True)  # other slots than in a
    assert a[0]["reason"] == "nan_loss" and a[1]["steps"] == a[2]["steps"] == 30
    assert view(a[2]) == view(b[1]) and view(a[1]) == view(b[0])


def test_a_pack_past_its_time_limit_retries_its_candidates_alone():
    got = train_pack([ce, mse, ce], {**SHORT, "timeout_s": 1e-9}, [0, 0, 1], width=2)
    assert [r["pack_k"] for r in got] == [1, 1, 1]
    assert [r["reason"] for r in got] == ["timeout"] * 3  # alone, under the normal limit


def test_out_of_memory_in_a_pack_halves_the_width(monkeypatch):
    real = Pack.forward

    def small_only(self, x, generators=None):
        if self.k > 2:
            raise torch.OutOfMemoryError("fake: the pack does not fit")
        return real(self, x, generators)
    monkeypatch.setattr(Pack, "forward", small_only)
    monkeypatch.setattr(Pack, "__call__", small_only)
    got = train_pack([ce, mse, ce], SHORT, [0, 0, 1], width=8)
    assert [r["pack_k"] for r in got] == [2, 2, 2] and all(r["status"] == "ok" for r in got)
    monkeypatch.setattr(Pack, "forward", real)
    monkeypatch.setattr(Pack, "__call__", real)
    assert [view(r) for r in got] == [view(r) for r in train_pack([ce, mse, ce], SHORT,
                                                                  [0, 0, 1], width=2)]


def test_a_model_the_pack_cannot_serve_trains_alone_and_says_so_once(monkeypatch, caplog,
                                                                    request):
    from gp_loss.surrogate.models import TinyCNN

    monkeypatch.setattr(packtrain, "PACKABLE", (TinyCNN,))
    packtrain.packable_name.cache_clear()  # what it answered for the real PACKABLE
    request.addfinalizer(packtrain.packable_name.cache_clear)
    monkeypatch.setattr(packtrain, "_WARNED", set())
    cfg = {**SHORT, "model": "mlp"}
    with caplog.at_level(logging.WARNING, logger="gp_loss.surrogate"):
        assert effective_width("mlp", 8) == 1 and effective_width("tiny", 8) == 8
        got = train_pack([ce, mse], cfg, [0, 0], width=4)
        train_pack([ce], cfg, [0], width=4)
    assert [r["pack_k"] for r in got] == [1, 1]
    assert view(got[0])[:-1] == tuple(train_candidate(ce, cfg, seed=0)[f] for f in FIELDS[:-1])
    assert sum("cannot be packed" in r.message for r in caplog.records) == 1


def test_evaluate_pack_fails_a_bad_expression_alone():
    from gp_loss.surrogate.fitness import evaluate_pack

    got = evaluate_pack([("neg(mul(y, log(p)))", 0, 1), ("nope(p)", 0, 1),
                         ("neg(mul(y, log(p)))", 1, 1)], "paper", SHORT, width=2)
    assert got[0]["status"] == got[2]["status"] == "ok" and got[1]["status"] == "failed"
    assert got[1]["reason"].startswith("error: ") and got[1]["expr"] == "nope(p)"
    assert [r["pack_k"] for r in got] == [2, 2, 2]


# ----------------------------------------------------------------------------- the packer

class Recorder(Executor):
    """Runs calls at once and records each call's items; multi-item calls can time out."""

    kind, capacity = "fake", 2

    def __init__(self, hang=False):
        self.calls, self.hang = [], hang

    def submit(self, fn, items, *shared, width):
        self.calls.append((len(items), shared, width))
        fut = cf.Future()
        if self.hang and len(items) > 1:
            fut.set_exception(EvaluationTimeout("hung"))
        else:
            fut.set_result(fn(items, *shared, width=width))
        return fut


def fake_pack(items, tag, width):
    return [{"item": it, "tag": tag, "pack_k": width} for it in items]


def test_the_packer_groups_by_what_items_share_and_flushes_the_rest():
    ex = Recorder()
    packer = Packer(ex, 2, fake_pack)
    assert packer.per_call == 4 and packer.capacity == 8
    futs = [packer.submit(("a",), i) for i in range(5)] + [packer.submit(("b",), 9)]
    assert [c[0] for c in ex.calls] == [4]  # the first full group went at once
    assert not futs[4].done()
    packer.flush()
    assert sorted(c[:2] for c in ex.calls) == [(1, ("a",)), (1, ("b",)), (4, ("a",))]
    assert [f.result()["item"] for f in futs] == [0, 1, 2, 3, 4, 9]
    assert futs[5].result()["tag"] == "b" and all(c[2] == 2 for c in ex.calls)


def test_a_hung_pack_is_retried_one_candidate_per_call():
    ex = Recorder(hang=True)
    packer = Packer(ex, 2, fake_pack)
    futs = [packer.submit(("a",), i) for i in range(3)]
    packer.flush()
    assert [f.result()["pack_k"] for f in futs] == [1, 1, 1]
    assert [c[0] for c in ex.calls] == [3, 1, 1, 1]
    assert pack_timeout(10, 4) == 160 and pack_timeout(10, 1) == 10


def test_a_packer_on_a_closed_executor_fails_its_futures():
    ex = SerialExecutor()
    ex.shutdown()
    fut = Packer(ex, 2, fake_pack).submit(("a",), 1)
    Packer(ex, 2, fake_pack).flush()
    with pytest.raises(RuntimeError):
        p = Packer(ex, 2, fake_pack)
        f = p.submit(("a",), 1)
        p.flush()
        f.result(timeout=1)
    assert not fut.done()  # never flushed


def test_the_cache_keys_on_k_above_one_only():
    from gp_loss.search.cache import settings_digest

    sur = {"model": "tiny", "steps": 10}
    base = settings_digest(sur, 0, 1, "paper")
    assert settings_digest(sur, 0, 1, "paper", pack=1) == base  # K = 1: as before packs
    assert settings_digest(sur, 0, 1, "paper", pack=4) not in (base, settings_digest(
        sur, 0, 1, "paper", pack=8))


# ----------------------------------------------------------------------------- commands

def cli_json(*args):
    import json

    from click.testing import CliRunner

    from gp_loss.cli.app import cli

    res = CliRunner().invoke(cli, ["-q", *map(str, args)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout) if "--json" in args else res


SMALL = ["--set", "surrogate.steps=40", "--set", "surrogate.prescreen_steps=20",
         "--set", "surrogate.eval_every=10", "--set", "search.fitness_cache=off"]


def test_a_search_in_packs_on_two_workers_and_train_reproduce_each_other(tmp_path):
    # Process workers each train packs of 4; `train` (packs of 4 too) gets a candidate's
    # search numbers back exactly.
    from gp_loss.runs.store import RunStore

    cli_json("search", "--run-dir", tmp_path / "run", *SMALL, "--set", "search.initial=6",
             "--set", "search.population=3", "--set", "search.tournament=2",
             "--set", "search.children=6", "--set", "executor.kind=process",
             "--set", "executor.workers=2", "--set", "executor.candidates_per_worker=4")
    with RunStore.open(tmp_path / "run", readonly=True) as store:
        rows = [r for r in store.candidates() if r["status"] in ("evaluated", "failed")]
        assert store.get_state("phase") == "done" and not store.candidates(status="pending")
    assert {r["result"]["pack_k"] for r in rows} == {4}
    best = max((r for r in rows if r["status"] == "evaluated"), key=lambda r: r["fitness"])
    out = cli_json("train", "--loss", best["expr"], "--json", *SMALL[:-2],
                   "--set", "executor.candidates_per_worker=4")
    assert out["runs"][0]["val_acc"] == best["fitness"] and out["runs"][0]["pack_k"] == 4


def test_compare_trains_in_packs(tmp_path):
    from dataclasses import asdict

    from gp_loss.config import Config, apply_overrides
    from gp_loss.lang.psets import load_pset
    from gp_loss.protocol import compare as C
    from gp_loss.surrogate.fitness import evaluate_pack

    cfg = apply_overrides(Config(), ["surrogate.steps=40", "surrogate.prescreen_steps=20",
                                     "surrogate.eval_every=10"])
    ps = load_pset("paper")
    losses = [C.make_loss("ce", ps, "ce"), C.make_loss("baikal", ps, "baikal")]
    cells = C.plan_cells(cfg, ["digits"], ["tiny"], ["none"], "cpu")
    res = C.compare(losses, cells, [0, 1, 2], width=2, reference="ce")
    entries = res["cells"][0]["results"]
    want = evaluate_pack([(losses[1].expr, s, losses[1].sign) for s in (2, 0, 1)],
                         ps.source, cells[0].surrogate, True, width=2)
    got = {r["seed"]: r for r in entries["baikal"]["runs"]}
    for seed, w in zip((2, 0, 1), want):
        assert got[seed]["test_acc"] == w["test_acc"] and got[seed]["pack_k"] == 2
    assert asdict(cfg.executor)["candidates_per_worker"] == 8  # the default


def test_eliminate_trains_in_packs_and_keeps_its_k(tmp_path):
    from click.testing import CliRunner

    from gp_loss.cli.app import cli
    from gp_loss.runs.store import RunStore
    from test_protocol import _store

    store, ids, sur = _store(tmp_path / "run", steps=20)
    store.close()
    args = ["eliminate", str(tmp_path / "run"), "--set", "eliminate.keep=[2,1]",
            "--device", "cpu"]
    res = CliRunner().invoke(cli, ["-q", *args, "--set", "executor.candidates_per_worker=2"])
    assert res.exit_code == 0, res.output
    with RunStore.open(tmp_path / "run", readonly=True) as s:
        ks = {r["result"]["pack_k"] for r in s.candidates() if r["phase"].startswith("elim")}
    assert ks == {2}
    res = CliRunner().invoke(cli, ["-q", *args, "--set", "executor.candidates_per_worker=3"])
    assert res.exit_code == 2 and "other settings" in res.output
