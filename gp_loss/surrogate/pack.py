"""A pack: K surrogate networks of one architecture run as one grouped network (issue 14).

Each slot is an ordinary model from ``models.build_model`` with its own parameters (so its own
optimizer and learning rate), its own BatchNorm running statistics and its own input batch.
``Pack.forward`` concatenates the slots' weights on every call and runs one grouped layer per
layer of the architecture (convolutions with ``groups=K`` in channels-last layout, batched
matrix products for linear layers, one BatchNorm over the K slots' channels), so one forward and one backward serve all K;
the gradients flow back into each slot's own parameters. Why grouped layers and not
``torch.func.vmap``: on the 2-core CPU they measured faster (``analysis/bench_population.py``),
and BatchNorm's running statistics work as they do today, per slot, in train and eval mode.

The input is always one batch per slot, ``(K, B, C, H, W)``, even when the slots share one:
the computation then depends on K alone, never on which candidates share the pack or where a
slot sits (tests check bit-identity across packs and positions). A pack's numbers do depend on
K (kernels are chosen by shape), so K is part of the evaluation settings.

Architectures: ``TinyCNN``, ``MLP`` and ``ResNet9V2`` (``packable``); anything else trains
alone (K = 1). Dropout (ResNet9V2's) draws each slot's mask from that slot's own generator
(``forward(x, generators)``), in the same way and amount as ``nn.Dropout`` draws from the
global one, so a slot's masks never depend on its neighbours. Used by the trainer; reads
``models``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .models import MLP, ResNet9V2, TinyCNN

PACKABLE = (TinyCNN, MLP, ResNet9V2)


def packable(model: nn.Module) -> bool:
    """Whether ``Pack`` can run this model with others of its kind."""
    return type(model) in PACKABLE


def _same_shapes(nets) -> bool:
    first = [(n, p.shape) for n, p in nets[0].named_parameters()]
    return all([(n, p.shape) for n, p in net.named_parameters()] == first for net in nets[1:])


class Pack:
    """K models of one packable architecture with equal shapes, run as one grouped network.

    ``forward(x)`` takes ``(K, B, ...)`` (slot k's batch is ``x[k]``) and returns the logits
    ``(K, B, classes)``; train or eval mode follows the slots' ``training`` flag (set it with
    ``train()``/``eval()`` here). ``slots`` are the models themselves: optimise, save or
    evaluate each as usual. ``replace(k, model)`` puts a new model in slot k (a refill)."""

    def __init__(self, nets):
        nets = list(nets)
        if not nets:
            raise ValueError("a pack needs at least one model")
        kind = type(nets[0])
        if kind not in PACKABLE or any(type(n) is not kind for n in nets):
            raise ValueError(f"cannot pack {sorted({type(n).__name__ for n in nets})}: "
                             f"packable architectures are {[c.__name__ for c in PACKABLE]}")
        if not _same_shapes(nets):
            raise ValueError("the models of a pack must have the same parameter shapes")
        self.kind, self.slots = kind, nets
        self._bind_bn()

    @property
    def k(self) -> int:
        return len(self.slots)

    # -- BatchNorm: the pack owns one running-statistics buffer; each slot's are views of it --

    def _bns(self, net) -> list:
        return [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]

    def _bind_bn(self) -> None:
        self._bn_state = []
        for layer in zip(*(self._bns(n) for n in self.slots)):
            mean = torch.cat([m.running_mean for m in layer])
            var = torch.cat([m.running_var for m in layer])
            c = layer[0].num_features
            for k, m in enumerate(layer):
                m.running_mean = mean[k * c:(k + 1) * c]
                m.running_var = var[k * c:(k + 1) * c]
            self._bn_state.append((layer, mean, var))

    def replace(self, k: int, net: nn.Module) -> None:
        """Slot ``k`` becomes ``net``, with its own parameters and running statistics."""
        if type(net) is not self.kind or not _same_shapes([self.slots[0], net]):
            raise ValueError("a replacement must be the same architecture with the same shapes")
        self.slots[k] = net
        self._bind_bn()

    def train(self, mode: bool = True) -> "Pack":
        for net in self.slots:
            net.train(mode)
        return self

    def eval(self) -> "Pack":
        return self.train(False)

    # -- the grouped forward -----------------------------------------------------------------

    def forward(self, x: torch.Tensor, generators=None) -> torch.Tensor:
        """Slot k's logits from slot k's batch ``x[k]``. ``generators``: one
        ``torch.Generator`` per slot for the models that draw dropout masks in training
        (None: each slot draws from a generator seeded 0 -- fine for tests, not for training)."""
        if x.shape[0] != self.k:
            raise ValueError(f"expected one batch per slot: shape ({self.k}, B, ...), "
                             f"got {tuple(x.shape)}")
        if self.kind is TinyCNN:
            return self._tiny(x)
        if self.kind is MLP:
            return self._mlp(x)
        return self._resnet9v2(x, generators)

    __call__ = forward

    def _cat(self, get) -> torch.Tensor:
        return torch.cat([get(n) for n in self.slots])

    @staticmethod
    def _grouped(x: torch.Tensor) -> torch.Tensor:
        """(K, B, C, H, W) -> (B, K*C, H, W), slot-major channels, channels-last."""
        b = x.shape[1]
        h = x.transpose(0, 1).reshape(b, -1, *x.shape[3:])
        # Channels-last: oneDNN's grouped convolutions are 1.3-1.7x faster so on the CPU
        # (bench_population.py); the plain model (K = 1) keeps its own layout.
        return h.contiguous(memory_format=torch.channels_last)

    def _conv(self, h: torch.Tensor, get) -> torch.Tensor:
        """The slots' convolution ``get(net)`` as one grouped conv (a ``models._SameConv``
        pads its input as TensorFlow does first)."""
        c = get(self.slots[0])
        if hasattr(c, "same_pad"):
            h = c.same_pad(h)
        bias = None if c.bias is None else self._cat(lambda n: get(n).bias)
        return F.conv2d(h, self._cat(lambda n: get(n).weight), bias, c.stride, c.padding,
                        groups=self.k)

    def _bn(self, h: torch.Tensor, i: int, get) -> torch.Tensor:
        """The slots' i-th BatchNorm2d (``get(net)``) over the K slots' channels at once."""
        layer, mean, var = self._bn_state[i]
        bn, training = layer[0], self.slots[0].training
        if training:  # as each slot's BatchNorm2d would count its batches
            for m in layer:
                m.num_batches_tracked.add_(1)
        return F.batch_norm(h, mean, var, self._cat(lambda n: get(n).weight),
                            self._cat(lambda n: get(n).bias), training, bn.momentum, bn.eps)

    def _head(self, h: torch.Tensor, get) -> torch.Tensor:
        """(K, B, F) through each slot's linear layer ``get(net)``: one batched product."""
        w = torch.stack([get(n).weight for n in self.slots])  # (K, out, F)
        bias = torch.stack([get(n).bias for n in self.slots]).unsqueeze(1)
        return torch.baddbmm(bias, h, w.transpose(1, 2))

    def _tiny(self, x: torch.Tensor) -> torch.Tensor:
        k, b = x.shape[:2]
        h = self._conv(self._grouped(x), lambda n: n.features[0])
        # max-pool before the ReLU: the same numbers, values and gradients (ReLU is monotone
        # and both route the gradient to the same element), on a quarter of the pixels
        h = F.relu(F.max_pool2d(h, 2))
        h = self._conv(h, lambda n: n.features[3])
        h = self._bn(h, 0, lambda n: n.features[4])
        h = F.relu(h).mean((2, 3)).view(b, k, -1).transpose(0, 1)  # (K, B, 2w)
        return self._head(h, lambda n: n.head)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(2)  # (K, B, C*H*W)
        first, second = (lambda n: n.net[1]), (lambda n: n.net[3])  # noqa: E731
        w1 = torch.stack([first(n).weight for n in self.slots])
        b1 = torch.stack([first(n).bias for n in self.slots]).unsqueeze(1)
        h = F.relu(torch.baddbmm(b1, h, w1.transpose(1, 2)))
        w2 = torch.stack([second(n).weight for n in self.slots])
        b2 = torch.stack([second(n).bias for n in self.slots]).unsqueeze(1)
        return torch.baddbmm(b2, h, w2.transpose(1, 2))

    def _resnet9v2(self, x: torch.Tensor, generators) -> torch.Tensor:
        k, b = x.shape[:2]
        h = self._conv(self._grouped(x), lambda n: n.stem)
        i = 0  # BatchNorm layers in the order _bind_bn found them (the forward order)
        for name in ("block1", "block2"):
            block = lambda n, name=name: getattr(n, name)  # noqa: E731
            inp = h
            for j in (0, 3, 6):  # body: [BN -> swish -> conv] x 3
                h = F.silu(self._bn(h, i, lambda n, j=j: block(n).body[j]))
                h = self._conv(h, lambda n, j=j: block(n).body[j + 2])
                i += 1
            h = h + self._conv(inp, lambda n: block(n).shortcut)
        h = h.mean((2, 3)).view(b, k, -1).transpose(0, 1)  # (K, B, 32)
        if self.slots[0].training:
            h = torch.stack([self._dropout(h[s], net.dropout.p,
                                           generators[s] if generators else None)
                             for s, net in enumerate(self.slots)])
        return self._head(h, lambda n: n.head)

    @staticmethod
    def _dropout(h: torch.Tensor, p: float, generator) -> torch.Tensor:
        """``F.dropout(h, p)`` with ``generator``: the same draws, in the same amount, as
        torch's CPU dropout takes from the global generator (a Bernoulli(1 - p) mask / (1 - p))."""
        if p == 0:
            return h
        if p == 1:
            return h * torch.zeros_like(h)
        if generator is None:
            generator = torch.Generator(h.device).manual_seed(0)
        noise = torch.empty_like(h).bernoulli_(1 - p, generator=generator)
        return h * noise.div_(1 - p)
