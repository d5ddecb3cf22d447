"""Hypothesis strategies: random spiking networks built from fxmemopt.snn neurons and plain PyTorch layers.

``snn_specs()`` draws a plain-data :class:`SNNSpec` (so a failing example prints readably and can be pinned with
``@example``); ``build(spec)`` turns it into an ``nn.Module`` and an input tensor.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import nn

from fxmemopt.snn import IFNode, LIFNode, ParametricLIFNode, SeqToANNContainer
from fxmemopt.snn.surrogate import ATan, ATanSpike, Sigmoid, SigmoidSpike


@dataclass(frozen=True)
class LayerSpec:
    kind: str            # "conv" | "res" | "linear"
    width: int
    bn: bool
    pool: str            # "none" | "max" | "avg"
    dropout: float


@dataclass(frozen=True)
class SNNSpec:
    layers: tuple[LayerSpec, ...]
    neuron: str          # "if" | "lif" | "plif" | "value" (keeps no state: returns it, as norse's neurons do)
    hard_reset: bool
    detach_reset: bool
    surrogate: str       # "atan" | "sigmoid"
    T: int
    N: int
    in_channels: int
    size: int
    spike_input: bool
    seed: int


class ValueStateLIF(nn.Module):
    """A multi-step LIF neuron that keeps no state, in norse's convention: ``z, v = neuron(x)`` or
    ``neuron(x, v0)``, the membrane returned, not stored. Its surrogate is an ``autograd.Function`` called directly
    (as norse's ``SuperSpike`` is), so fxmemopt keeps the neuron whole; regions form because it makes spikes."""

    def __init__(self, spec: SNNSpec) -> None:
        super().__init__()
        self.spike = ATanSpike if spec.surrogate == "atan" else SigmoidSpike
        self.hard_reset, self.detach_reset = spec.hard_reset, spec.detach_reset

    def forward(self, x: torch.Tensor, v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        v = torch.zeros_like(x[0]) if v is None else v
        out = []
        for t in range(x.shape[0]):
            v = v + (x[t] - v) / 2.0
            z = self.spike.apply(v - 1.0, 2.0)
            r = z.detach() if self.detach_reset else z
            v = v * (1.0 - r) if self.hard_reset else v - r
            out.append(z)
        return torch.stack(out), v


class Spikes(nn.Module):
    """``neuron(x)``'s spikes, whether the neuron returns them or ``(spikes, state)``."""

    def __init__(self, spec: SNNSpec) -> None:
        super().__init__()
        self.neuron = make_neuron(spec)
        self.returns_state = spec.neuron == "value"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.returns_state:
            z, _ = self.neuron(x)
            return z
        return self.neuron(x)


def make_neuron(spec: SNNSpec) -> nn.Module:
    if spec.neuron == "value":
        return ValueStateLIF(spec)
    sg = ATan() if spec.surrogate == "atan" else Sigmoid()
    kw = dict(v_reset=0.0 if spec.hard_reset else None, detach_reset=spec.detach_reset, surrogate_function=sg)
    if spec.neuron == "if":
        return IFNode(**kw)
    if spec.neuron == "lif":
        return LIFNode(tau=2.0, **kw)
    return ParametricLIFNode(init_tau=2.0, **kw)


def _bn_ok(spec: SNNSpec, values_per_channel: int) -> bool:
    # BatchNorm in training needs more than one value per channel.
    return spec.T * spec.N * values_per_channel > 1


class ConvLayer(nn.Module):
    def __init__(self, cin: int, layer: LayerSpec, spec: SNNSpec, size: int = 2):
        super().__init__()
        bn = layer.bn and _bn_ok(spec, size * size)
        mods: list[nn.Module] = [nn.Conv2d(cin, layer.width, 3, padding=1, bias=not bn)]
        if bn:
            mods.append(nn.BatchNorm2d(layer.width))
        self.body = SeqToANNContainer(*mods)
        self.sn = Spikes(spec)
        post: list[nn.Module] = []
        if layer.pool == "max":
            post.append(nn.MaxPool2d(2))
        elif layer.pool == "avg":
            post.append(nn.AvgPool2d(2))
        if layer.dropout:
            post.append(nn.Dropout(layer.dropout))
        self.post = SeqToANNContainer(*post) if post else nn.Identity()

    def forward(self, x):
        return self.post(self.sn(self.body(x)))


class ResLayer(nn.Module):
    """SEW block with ADD: sn2(bn2(conv2(sn1(bn1(conv1(x)))))) + x."""

    def __init__(self, cin: int, layer: LayerSpec, spec: SNNSpec, size: int = 2):
        super().__init__()
        bn = layer.bn and _bn_ok(spec, size * size)

        def cbn():
            mods: list[nn.Module] = [nn.Conv2d(cin, cin, 3, padding=1, bias=not bn)]
            if bn:
                mods.append(nn.BatchNorm2d(cin))
            return SeqToANNContainer(*mods)

        self.c1, self.sn1, self.c2, self.sn2 = cbn(), Spikes(spec), cbn(), Spikes(spec)

    def forward(self, x):
        return self.sn2(self.c2(self.sn1(self.c1(x)))) + x


class RandomSNN(nn.Module):
    def __init__(self, spec: SNNSpec):
        super().__init__()
        layers = []
        c, size, flat = spec.in_channels, spec.size, False
        for layer in spec.layers:
            if layer.kind == "linear":
                if not flat:
                    layers.append(SeqToANNContainer(nn.Flatten()))
                    c, flat = c * size * size, True
                bn = layer.bn and _bn_ok(spec, 1)
                mods: list[nn.Module] = [nn.Linear(c, layer.width, bias=not bn)]
                if bn:
                    mods.append(nn.BatchNorm1d(layer.width))
                if layer.dropout:
                    mods.append(nn.Dropout(layer.dropout))
                layers += [SeqToANNContainer(*mods), Spikes(spec)]
                c = layer.width
            elif layer.kind == "res" and not flat:
                layers.append(ResLayer(c, layer, spec, size))
            elif not flat:
                if size < 2:  # nothing left to pool
                    layer = dataclasses.replace(layer, pool="none")
                layers.append(ConvLayer(c, layer, spec, size))
                c = layer.width
                if layer.pool != "none":
                    size //= 2
        self.features = nn.Sequential(*layers)
        if not flat:
            self.flatten = SeqToANNContainer(nn.Flatten())
            c = c * size * size
        else:
            self.flatten = nn.Identity()
        self.head = SeqToANNContainer(nn.Linear(c, 3))

    def forward(self, x):
        return self.head(self.flatten(self.features(x)))


@st.composite
def layer_specs(draw, allow_pool: bool) -> LayerSpec:
    kind = draw(st.sampled_from(["conv", "conv", "res", "linear"]))
    return LayerSpec(
        kind=kind,
        width=draw(st.integers(1, 6)),
        bn=draw(st.booleans()),
        pool=draw(st.sampled_from(["none", "max", "avg"])) if allow_pool and kind == "conv" else "none",
        dropout=draw(st.sampled_from([0.0, 0.0, 0.3])),
    )


@st.composite
def snn_specs(draw, max_depth: int = 4, max_T: int = 4) -> SNNSpec:
    size = draw(st.sampled_from([2, 4, 6]))
    depth = draw(st.integers(1, max_depth))
    layers = tuple(draw(layer_specs(allow_pool=size >= 4)) for _ in range(depth))
    return SNNSpec(
        layers=layers,
        neuron=draw(st.sampled_from(["if", "lif", "plif", "value"])),
        hard_reset=draw(st.booleans()),
        detach_reset=draw(st.booleans()),
        surrogate=draw(st.sampled_from(["atan", "sigmoid"])),
        T=draw(st.integers(1, max_T)),
        N=draw(st.integers(1, 3)),
        in_channels=draw(st.integers(1, 3)),
        size=size,
        spike_input=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def build(spec: SNNSpec) -> tuple[nn.Module, torch.Tensor]:
    """The model (BN/dropout in training mode) and an example input [T, N, C, H, W] for ``spec``."""
    torch.manual_seed(spec.seed)
    model = RandomSNN(spec)
    # Non-trivial BN statistics and a threshold the first layer actually crosses.
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.rand(spec.T, spec.N, spec.in_channels, spec.size, spec.size) * 4
    if spec.spike_input:
        x = (x > 2).float()
        # At least one spike: on an all-zero example nothing downstream varies, and a neuron known only from its
        # example values (neuron="value") cannot be told from a constant (found by the property run: no region formed).
        x.view(-1)[0] = 1.0
    return model, x
