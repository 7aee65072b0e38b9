"""Surrogate and transfer architectures, built by name.

Fed by: the `surrogate.model` config key (and `compare --model`), plus the input shape and
class count that `data.load_splits` reports. Feeds: `train.py`.

Models return raw logits (B, num_classes); the candidate loss applies the softmax itself.
Parameters are initialised from torch's global RNG: `train.py` seeds (and forks) it around
`build_model`, so the same seed gives the same initial weights in any process.

Names (`MODELS`; `ALIASES` maps old names):
  tiny               the CPU default (alias `tinycnn`, the identical model).
  mlp                a non-convolutional baseline.
  resnet9v2          the paper's surrogate, exactly as the authors' Keras code (DESIGN §6).
  resnet18, mobilenet_v3_small, efficientnet_v2_s
                     torchvision's own builders (weights=None: never downloads), adapted to
                     small inputs and any channel count (see `_adapt_stem`).
Every model works for any channel count, resolution (global pooling; the MLP is sized by
`image_size`) and class count.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MODEL_ALIASES

__all__ = ["MODELS", "ALIASES", "build_model", "ResNet9V2"]


class TinyCNN(nn.Module):
    """conv3x3(16) -> ReLU -> maxpool 2 -> conv3x3(32) -> BN -> ReLU -> global avg pool -> linear.

    The CPU surrogate for 8x8 digits (it also runs at 28x28). Why this shape:
    - On a 1-thread CPU each conv costs mostly fixed per-call overhead, so two convs is the
      budget; pooling before the second conv gave ~2 points more validation accuracy than a
      stride-2 conv at the same cost (digits, cross-entropy, 400 steps: ~0.975 vs ~0.955).
    - BN only after the second conv: the inputs are already standardised, and a BN after the
      first conv added ~10% to the step time without a measurable gain; the remaining BN keeps
      the head's input scale stable whatever gradient scale a candidate loss produces.
    - Global average pooling (not a flatten) keeps the head independent of the image size.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),  # BN supplies the bias
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MLP(nn.Module):
    """Flatten -> 128 hidden ReLU units -> logits: a non-convolutional second architecture, so
    transfer tests can ask whether a loss found on the CNN helps a different inductive bias."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size * image_size, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# --- the paper's surrogate --------------------------------------------------------------------

def _keras_bn(channels: int) -> nn.BatchNorm2d:
    # Keras BatchNormalization defaults: moving average 0.99 (torch momentum 0.01), epsilon 1e-3.
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class _SameConv(nn.Conv2d):
    """A Keras `padding='same'` convolution, including TensorFlow's asymmetric padding for
    strided convs: a 3x3 stride-2 conv on an even size pads 0 before and 1 after, so its
    windows are centred on pixels 1, 3, 5, ... (torch's symmetric padding=1 would centre them
    on 0, 2, 4, ...). Stride 1 is torch's padding=k//2, which is the same thing."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1):
        super().__init__(cin, cout, k, stride=stride, padding=k // 2 if stride == 1 else 0)

    def same_pad(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` padded as TensorFlow pads a strided 'same' conv (stride 1: unchanged, the
        conv's own padding does it). The pack (``pack.py``) pads its grouped input with it."""
        s, k = self.stride[0], self.kernel_size[0]
        if s > 1:
            pads = []
            for n in (x.shape[-1], x.shape[-2]):  # F.pad order: last dim first
                total = max((math.ceil(n / s) - 1) * s + k - n, 0)
                pads += [total // 2, total - total // 2]
            if any(pads):
                x = F.pad(x, pads)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.same_pad(x))


class _PreActBlock(nn.Module):
    """[BN->swish->conv3x3(f, stride 2)] -> [BN->swish->conv3x3(f)] -> [BN->swish->conv3x3(f)],
    plus a 1x1 stride-2 conv of the raw block input, added (no activation after the sum)."""

    def __init__(self, cin: int, f: int):
        super().__init__()
        self.body = nn.Sequential(
            _keras_bn(cin), nn.SiLU(), _SameConv(cin, f, 3, stride=2),
            _keras_bn(f), nn.SiLU(), _SameConv(f, f, 3),
            _keras_bn(f), nn.SiLU(), _SameConv(f, f, 3),
        )
        self.shortcut = _SameConv(cin, f, 1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class ResNet9V2(nn.Module):
    """The paper's surrogate, `build_resnet9_v2("swish")` of the authors' fitness_functions.py:
    conv3x3(8) stem -> block(16) -> block(32) -> global average pool -> dropout 0.5 -> dense.

    Parameter count at 3 input channels and 10 classes: 30,426 trainable + 240 BN running
    statistics = 30,666, the Keras `count_params()` figure (Keras counts moving mean/variance).
    Matching Keras throughout: every conv has a bias (`Conv2D` default), 'same' padding with
    TensorFlow's asymmetry for strides, Glorot-uniform kernels with zero biases, and Keras BN
    hyperparameters (momentum 0.99, eps 1e-3). Swish = SiLU. The Keras model ends in a softmax;
    here the logits go out and the candidate loss applies the softmax.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, dropout: float = 0.5):
        super().__init__()
        self.stem = _SameConv(in_channels, 8, 3)
        self.block1 = _PreActBlock(8, 16)
        self.block2 = _PreActBlock(16, 32)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(32, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)  # Keras glorot_uniform (same fan definition)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.head(self.dropout(self.pool(x)))


# --- torchvision transfer architectures -------------------------------------------------------

SMALL_INPUT = 64  # at or below this many pixels the stems below drop their early downsampling


def _adapt_stem(conv: nn.Conv2d, in_channels: int, small: bool, kernel: int | None = None
                ) -> nn.Conv2d:
    """The same first conv with `in_channels` inputs and, for small inputs, stride 1 (and
    `kernel` if given); re-initialised the way torchvision initialises its convs."""
    k = kernel if (small and kernel) else conv.kernel_size[0]
    stride = 1 if small else conv.stride[0]
    if in_channels == conv.in_channels and k == conv.kernel_size[0] and stride == conv.stride[0]:
        return conv
    new = nn.Conv2d(in_channels, conv.out_channels, k, stride=stride, padding=k // 2,
                    bias=conv.bias is not None)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    return new


def _resnet18(c: int, k: int, s: int) -> nn.Module:
    """torchvision resnet18. Small inputs (<= 64 px): the 7x7 stride-2 stem and the max-pool
    (4x downsampling meant for 224-px ImageNet) become a 3x3 stride-1 conv and nothing, the usual
    CIFAR adaptation, so 32 px reaches the last stage at 4x4 instead of 1x1."""
    from torchvision.models import resnet18

    m = resnet18(weights=None, num_classes=k)
    small = s <= SMALL_INPUT
    m.conv1 = _adapt_stem(m.conv1, c, small, kernel=3)
    if small:
        m.maxpool = nn.Identity()
    return m


def _mobilenet_v3_small(c: int, k: int, s: int) -> nn.Module:
    """torchvision mobilenet_v3_small. Small inputs: the stem conv (3x3, stride 2) gets stride 1,
    so 32 px ends at 2x2 rather than 1x1. Its classifier keeps torchvision's dropout 0.2."""
    from torchvision.models import mobilenet_v3_small

    m = mobilenet_v3_small(weights=None, num_classes=k)
    m.features[0][0] = _adapt_stem(m.features[0][0], c, s <= SMALL_INPUT)
    return m


def _efficientnet_v2_s(c: int, k: int, s: int) -> nn.Module:
    """torchvision efficientnet_v2_s (~20M parameters; GPU only in practice). Small inputs: the
    stem conv (3x3, stride 2) gets stride 1. Dropout and stochastic depth stay torchvision's."""
    from torchvision.models import efficientnet_v2_s

    m = efficientnet_v2_s(weights=None, num_classes=k)
    m.features[0][0] = _adapt_stem(m.features[0][0], c, s <= SMALL_INPUT)
    return m


_Builder = Callable[[int, int, int], nn.Module]

# name -> builder(in_channels, num_classes, image_size)
_BUILDERS: dict[str, _Builder] = {
    "tiny": lambda c, k, s: TinyCNN(c, k),
    "mlp": lambda c, k, s: MLP(c, k, s),
    "resnet9v2": lambda c, k, s: ResNet9V2(c, k),
    "resnet18": _resnet18,
    "mobilenet_v3_small": _mobilenet_v3_small,
    "efficientnet_v2_s": _efficientnet_v2_s,
}

# Old names still accepted (runs stored before "tiny" may say "tinycnn"); the table lives in
# config/sections.py, which reads a config's model under its current name.
ALIASES: dict[str, str] = MODEL_ALIASES

MODELS: list[str] = list(_BUILDERS)


def build_model(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """A freshly initialised model (on the CPU; the caller moves it)."""
    builder = _BUILDERS.get(ALIASES.get(name, name))
    if builder is None:
        known = ", ".join(MODELS + [f"{a} (= {t})" for a, t in ALIASES.items()])
        raise ValueError(f"unknown model {name!r}; known models: {known}")
    return builder(int(in_channels), int(num_classes), int(image_size))
