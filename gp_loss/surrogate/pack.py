"""A pack: K surrogate networks of one architecture run as one grouped network (issue 14).

Each slot is an ordinary model from ``models.build_model`` with its own parameters, its own
BatchNorm running statistics and its own input batch. The pack stacks each parameter of the
K slots into one leaf tensor ``stacked[name]`` of shape ``(K, *shape)``, and each slot's
parameter becomes a view of its row (the same memory: the slot's plain model always sees the
pack's current weights, for a test evaluation, a checkpoint or a hash). ``Pack.forward`` runs
one grouped layer per layer of the architecture on those stacks (convolutions with
``groups=K`` in channels-last layout, batched matrix products for linear layers, one
BatchNorm over the K slots' channels), so one forward and one backward serve all K, and the
gradients land in ``stacked[name].grad``, row k for slot k: one optimizer step over the stacks
(``packtrain.PackAdam``) updates every slot at once, each at its own learning rate. Why grouped layers and not
``torch.func.vmap``: on the 2-core CPU they measured faster (``analysis/bench_population.py``),
and BatchNorm's running statistics work as they do today, per slot, in train and eval mode.

The input is always one batch per slot, ``(K, B, C, H, W)``, even when the slots share one:
the computation then depends on K alone, never on which candidates share the pack or where a
slot sits (tests check bit-identity across packs and positions). A pack's numbers do depend on
K (kernels are chosen by shape), so K is part of the evaluation settings.

Architectures: ``TinyCNN``, ``MLP`` and ``ResNet9V2`` (``packable``); anything else trains
alone (K = 1). Dropout (ResNet9V2's) draws each slot's mask from that slot's own generator
(``forward(x, generators)``), so a slot's masks never depend on its neighbours; on the CPU in
the same way and amount as ``nn.Dropout`` draws from the global one (on CUDA ``nn.Dropout``
uses a fused kernel with other draws: one more reason K is a setting). Used by the trainer; reads
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
    ``train()``/``eval()`` here). ``slots`` are the models themselves (evaluate, save or hash
    each as usual); their parameters are views of ``stacked`` (``parameters()``), where the
    gradients go. ``replace(k, model)`` puts a new model in slot k (a refill)."""

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
        self.stacked = {name: torch.stack([dict(n.named_parameters())[name].detach()
                                           for n in nets]).requires_grad_(True)
                        for name, _ in nets[0].named_parameters()}
        for k, net in enumerate(nets):
            self._bind_params(k, net)
        self._bind_bn()

    @property
    def k(self) -> int:
        return len(self.slots)

    def parameters(self) -> list:
        """The stacked parameters, ``(K, *shape)`` each: what the optimizer steps."""
        return list(self.stacked.values())

    def _bind_params(self, k: int, net: nn.Module) -> None:
        for name, p in net.named_parameters():
            p.data = self.stacked[name].data[k]  # a view: the slot reads the pack's weights

    # -- BatchNorm: the pack owns one running-statistics buffer; each slot's are views of it --

    def _bns(self, net) -> list:
        return [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]

    def _bind_bn(self) -> None:
        self._bn_state = {}
        names = [n for n, m in self.slots[0].named_modules() if isinstance(m, nn.BatchNorm2d)]
        for name, layer in zip(names, zip(*(self._bns(n) for n in self.slots))):
            mean = torch.cat([m.running_mean for m in layer])
            var = torch.cat([m.running_var for m in layer])
            c = layer[0].num_features
            for k, m in enumerate(layer):
                m.running_mean = mean[k * c:(k + 1) * c]
                m.running_var = var[k * c:(k + 1) * c]
            self._bn_state[name] = (layer, mean, var)

    def replace(self, k: int, net: nn.Module) -> None:
        """Slot ``k`` becomes ``net``: its parameters are copied into row k of the stacks
        (and become views of it), its running statistics into the pack's buffers."""
        if type(net) is not self.kind or not _same_shapes([self.slots[0], net]):
            raise ValueError("a replacement must be the same architecture with the same shapes")
        with torch.no_grad():
            for name, p in net.named_parameters():
                self.stacked[name][k].copy_(p)
        self._bind_params(k, net)
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

    def _flat(self, name: str):
        """The K slots' parameter ``name`` end to end along its first dimension (None if the
        layer has none): a grouped layer's weight, a view of the stack."""
        t = self.stacked.get(name)
        return None if t is None else t.flatten(0, 1)

    @staticmethod
    def _grouped(x: torch.Tensor) -> torch.Tensor:
        """(K, B, C, H, W) -> (B, K*C, H, W), slot-major channels, channels-last."""
        b = x.shape[1]
        h = x.transpose(0, 1).reshape(b, -1, *x.shape[3:])
        # Channels-last: oneDNN's grouped convolutions are 1.3-1.7x faster so on the CPU
        # (bench_population.py); the plain model (K = 1) keeps its own layout.
        return h.contiguous(memory_format=torch.channels_last)

    def _conv(self, h: torch.Tensor, name: str) -> torch.Tensor:
        """The slots' convolution ``name`` as one grouped conv (a ``models._SameConv`` pads
        its input as TensorFlow does first)."""
        c = self.slots[0].get_submodule(name)
        if hasattr(c, "same_pad"):
            h = c.same_pad(h)
        return F.conv2d(h, self._flat(f"{name}.weight"), self._flat(f"{name}.bias"), c.stride,
                        c.padding, groups=self.k)

    def _bn(self, h: torch.Tensor, name: str) -> torch.Tensor:
        """The slots' BatchNorm2d ``name`` over the K slots' channels at once."""
        layer, mean, var = self._bn_state[name]
        bn, training = layer[0], self.slots[0].training
        if training:  # as each slot's BatchNorm2d would count its batches
            for m in layer:
                m.num_batches_tracked.add_(1)
        return F.batch_norm(h, mean, var, self._flat(f"{name}.weight"),
                            self._flat(f"{name}.bias"), training, bn.momentum, bn.eps)

    @staticmethod
    def _pool(h: torch.Tensor, k: int) -> torch.Tensor:
        """Global average pooling of (B, K*C, H, W) channels-last to (K, B, C). Averaged in
        the memory order (B, H*W, K*C), so its gradient comes back channels-last: the ReLU
        backward before it then reads two tensors of one layout (mixed layouts took 20 % of
        a tiny pack's step on the CPU)."""
        b, kc, hh, ww = h.shape
        pooled = h.permute(0, 2, 3, 1).reshape(b, hh * ww, kc).mean(1)  # (B, K*C)
        return pooled.view(b, k, kc // k).transpose(0, 1)

    def _linear(self, h: torch.Tensor, name: str) -> torch.Tensor:
        """(K, B, F) through each slot's linear layer ``name``: one batched product."""
        w, bias = self.stacked[f"{name}.weight"], self.stacked[f"{name}.bias"]  # (K, out, F)
        return torch.baddbmm(bias.unsqueeze(1), h, w.transpose(1, 2))

    def _tiny(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[0]
        h = self._conv(self._grouped(x), "features.0")
        # max-pool before the ReLU: the same numbers, values and gradients (ReLU is monotone
        # and both route the gradient to the same element), on a quarter of the pixels
        h = F.relu(F.max_pool2d(h, 2))
        h = self._bn(self._conv(h, "features.3"), "features.4")
        return self._linear(self._pool(F.relu(h), k), "head")  # pooled: (K, B, 2w)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self._linear(x.flatten(2), "net.1"))  # input (K, B, C*H*W)
        return self._linear(h, "net.3")

    def _resnet9v2(self, x: torch.Tensor, generators) -> torch.Tensor:
        k = x.shape[0]
        h = self._conv(self._grouped(x), "stem")
        for block in ("block1", "block2"):
            inp = h
            for j in (0, 3, 6):  # body: [BN -> swish -> conv] x 3
                h = self._conv(F.silu(self._bn(h, f"{block}.body.{j}")), f"{block}.body.{j + 2}")
            h = h + self._conv(inp, f"{block}.shortcut")
        h = self._pool(h, k)  # (K, B, 32)
        if self.slots[0].training:
            h = torch.stack([self._dropout(h[s], net.dropout.p,
                                           generators[s] if generators else None)
                             for s, net in enumerate(self.slots)])
        return self._linear(h, "head")

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
