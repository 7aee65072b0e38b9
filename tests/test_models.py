"""Models: every architecture builds and trains on CPU for 10 and 100 classes, grey and colour;
the paper's ResNet9V2 matches the authors' Keras model; the torchvision stems are adapted."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gp_loss.surrogate import models
from gp_loss.surrogate.models import ALIASES, MODELS, build_model

LIGHT = ["tiny", "tinycnn", "mlp", "resnet9v2"]
# Grey 28x28 (MNIST-like) with 10 classes and colour 32x32 (CIFAR-like) with 100 classes.
SHAPES = [(1, 10, 28), (3, 100, 32)]


def _train_steps(model: nn.Module, c: int, k: int, s: int, batch: int, steps: int) -> None:
    """A few Adam steps on a fixed random batch: logits have the right shape, the loss stays
    finite and every parameter that gets a gradient moves."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c, s, s, generator=g)
    y = torch.randint(0, k, (batch,), generator=g)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        logits = model(x)
        assert logits.shape == (batch, k)
        loss = F.cross_entropy(logits, y)
        assert torch.isfinite(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    moved = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    assert sum(moved) >= 0.9 * len(moved)  # (a few may get no gradient, e.g. unused SE paths)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (batch, k) and torch.isfinite(out).all()


@pytest.mark.parametrize("c,k,s", SHAPES)
@pytest.mark.parametrize("name", LIGHT)
def test_light_models_train(name, c, k, s):
    torch.manual_seed(0)
    _train_steps(build_model(name, c, k, s), c, k, s, batch=8, steps=3)


# The torchvision models are large for a CPU: small inputs (still the <= 64 px adaptation path)
# and batch 2 keep the file fast.
@pytest.mark.parametrize("c,k", [(1, 10), (3, 100)])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_models_train(name, c, k):
    torch.manual_seed(0)
    _train_steps(build_model(name, c, k, 16), c, k, 16, batch=2, steps=1)


def test_efficientnet_v2_s_forward_backward():
    torch.manual_seed(0)
    m = build_model("efficientnet_v2_s", 3, 100, 32)
    out = m(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100)
    out.sum().backward()
    assert m.features[0][0].weight.grad is not None
    grey = build_model("efficientnet_v2_s", 1, 10, 28)
    assert grey.features[0][0].in_channels == 1 and grey.classifier[-1].out_features == 10


def test_models_list_and_aliases():
    assert {"tiny", "mlp", "resnet9v2", "resnet18", "mobilenet_v3_small",
            "efficientnet_v2_s"} <= set(MODELS)
    assert ALIASES == {"tinycnn": "tiny"} and "tinycnn" not in MODELS


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError) as err:
        build_model("resnet1000", 3, 10, 32)
    msg = str(err.value)
    assert "resnet1000" in msg
    for name in MODELS + ["tinycnn"]:
        assert name in msg


def test_tiny_and_tinycnn_are_the_same_model():
    torch.manual_seed(3)
    a = build_model("tiny", 1, 10, 8).state_dict()
    torch.manual_seed(3)
    b = build_model("tinycnn", 1, 10, 8).state_dict()
    assert list(a) == list(b)
    for key in a:
        assert a[key].shape == b[key].shape and torch.equal(a[key], b[key])


# --- ResNet9V2 (the paper's surrogate) ---------------------------------------------------------

def test_resnet9v2_parameter_count_matches_keras():
    m = build_model("resnet9v2", 3, 10, 32)
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    stats = sum(b.numel() for n, b in m.named_buffers() if n.endswith(("running_mean", "running_var")))
    assert trainable == 30_426 and stats == 240
    assert trainable + stats == 30_666  # Keras count_params() of build_resnet9_v2("swish")
    wide = build_model("resnet9v2", 3, 100, 32)
    assert sum(p.numel() for p in wide.parameters()) == 30_426 + 90 * 33  # dense 32 -> 100


def test_resnet9v2_structure():
    m = build_model("resnet9v2", 3, 10, 80)
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8] + [16] * 4 + [32] * 4  # stem, 2 x (3 + shortcut)
    assert all(c.bias is not None for c in convs)  # Keras Conv2D has biases
    assert sum(isinstance(mod, nn.SiLU) for mod in m.modules()) == 6
    bns = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]
    assert len(bns) == 6 and all(b.eps == 1e-3 and b.momentum == 0.01 for b in bns)
    assert [d.p for d in m.modules() if isinstance(d, nn.Dropout)] == [0.5]
    assert all(float(c.bias.detach().abs().max()) == 0.0 for c in convs)  # zero-initialised biases
    # Two stride-2 blocks: 80 -> 40 -> 20 before the global pool; odd sizes work too.
    feats = m.block2(m.block1(m.stem(torch.randn(1, 3, 80, 80))))
    assert feats.shape == (1, 32, 20, 20)
    assert m.eval()(torch.randn(2, 3, 33, 33)).shape == (2, 10)


def test_resnet9v2_strided_conv_pads_like_tensorflow():
    """TF 'same' with stride 2 on an even size pads only after: output (0, 0) is centred on
    input pixel (1, 1), not (0, 0)."""
    conv = models._SameConv(1, 1, 3, stride=2)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1, 1] = 1.0  # picks the window centre
        conv.bias.zero_()
        x = torch.arange(64.0).reshape(1, 1, 8, 8)
        out = conv(x)
    assert out.shape == (1, 1, 4, 4)
    assert torch.equal(out[0, 0], x[0, 0, 1::2, 1::2])


def test_resnet9v2_eval_is_deterministic_and_seeded():
    torch.manual_seed(5)
    a = build_model("resnet9v2", 3, 10, 32).eval()
    torch.manual_seed(5)
    b = build_model("resnet9v2", 3, 10, 32).eval()
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(a(x), b(x)) and torch.equal(a(x), a(x))  # dropout off in eval


def test_resnet9v2_trains_in_the_training_loop():
    from gp_loss.surrogate.train import train_candidate

    res = train_candidate(F.cross_entropy, {"dataset": "digits", "model": "resnet9v2",
                                            "steps": 6, "eval_every": 3, "prescreen_steps": 0},
                          seed=0)
    assert res["status"] == "ok" and 0.0 <= res["val_acc"] <= 1.0


# --- torchvision stem adaptations --------------------------------------------------------------

def test_resnet18_stem_adaptation():
    small = build_model("resnet18", 1, 10, 28)
    assert small.conv1.in_channels == 1 and small.conv1.kernel_size == (3, 3)
    assert small.conv1.stride == (1, 1) and isinstance(small.maxpool, nn.Identity)
    assert small.fc.out_features == 10
    large = build_model("resnet18", 3, 100, 224)
    assert large.conv1.kernel_size == (7, 7) and large.conv1.stride == (2, 2)
    assert isinstance(large.maxpool, nn.MaxPool2d) and large.fc.out_features == 100
    grey_large = build_model("resnet18", 1, 10, 96)
    assert grey_large.conv1.in_channels == 1 and grey_large.conv1.kernel_size == (7, 7)
    assert grey_large.conv1.stride == (2, 2)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_v2_s"])
def test_mobile_and_efficient_stem_adaptation(name):
    small = build_model(name, 1, 10, 32)
    assert small.features[0][0].in_channels == 1 and small.features[0][0].stride == (1, 1)
    large = build_model(name, 3, 10, 96)
    assert large.features[0][0].in_channels == 3 and large.features[0][0].stride == (2, 2)
