"""Hypothesis strategies: random spiking networks built from fxmemopt.snn neurons and plain PyTorch layers.

``snn_specs()`` draws a plain-data :class:`SNNSpec` (so a failing example prints readably and can be pinned with
``@example``); ``build(spec)`` turns it into an ``nn.Module`` and an input tensor.

Each layer's spiking module (:attr:`LayerSpec.cell`) is a neuron, or one of the stateful modules spikingjelly
models are built from, written in plain PyTorch in ``tests/plain_stateful.py`` (state in ``_memories`` or in plain
attributes, :attr:`LayerSpec.memories`): a recurrent container holding a neuron (``LinearRecurrentContainer``,
``ElementWiseRecurrentContainer``), an adaptive threshold around a neuron, the same around a recurrent container
(two levels of nesting), a stateless time loop around a single-step neuron that keeps a trace beside its
``_memories``; or, where spikingjelly is installed, its own containers. A synapse filter (a stateful low-pass filter
with a learnable tau, no spikes) may follow it (:attr:`LayerSpec.synapse`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from plain_stateful import (
    Adaptive,
    ElementWiseRecurrent,
    LinearRecurrent,
    MultiStep,
    StepLIF,
    StepModule,
    SynapseFilter,
)
from torch import nn

from fxmemopt.snn import IFNode, LIFNode, ParametricLIFNode, SeqToANNContainer
from fxmemopt.snn.surrogate import ATan, ATanSpike, Sigmoid, SigmoidSpike

#: spikingjelly is optional: its own containers and synapse filter are drawn only where it is installed
HAS_SPIKINGJELLY = importlib.util.find_spec("spikingjelly") is not None
#: what a layer's spiking module can be (see LayerSpec.cell)
PLAIN_CELLS = ("lrc", "erc", "adaptive", "nested", "multistep")
SJ_CELLS = ("sj_lrc", "sj_erc")
CELLS = ("neuron", *PLAIN_CELLS, *SJ_CELLS)


@dataclass(frozen=True)
class LayerSpec:
    kind: str            # "conv" | "res" | "linear"
    width: int
    bn: bool
    pool: str            # "none" | "max" | "avg"
    dropout: float
    # The layer's spiking module: "neuron" (SNNSpec.neuron itself), or a stateful module around a single-step
    # neuron that keeps its own state (tests/plain_stateful.py): "lrc" (LinearRecurrentContainer-style, over the
    # last dimension), "erc" (ElementWiseRecurrentContainer-style), "adaptive" (an adaptive threshold of its own
    # around the neuron), "nested" (the same around an "erc": two levels), "multistep" (a stateless time loop around
    # the neuron); "sj_lrc" / "sj_erc": spikingjelly's own containers around its own single-step neuron.
    cell: str = "neuron"
    memories: bool = True  # plain cells: state in a spikingjelly-style _memories dict, or in plain attributes
    trace: bool = False    # plain cells' neuron: a spike trace in a plain attribute beside its _memories
    synapse: str = "none"  # "none" | "plain" | "sj": a SynapseFilter(learnable tau) after the spiking module


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


def _step_neuron(spec: SNNSpec, layer: LayerSpec) -> nn.Module:
    """The single-step neuron inside a plain cell: fxmemopt.snn's IF / PLIF (state in ``_memories``), or the
    plain-PyTorch :class:`StepLIF` (for "lif" and "value", or when the cell keeps its state in attributes)."""
    if spec.neuron in ("if", "plif") and layer.memories and not layer.trace:
        sg = ATan() if spec.surrogate == "atan" else Sigmoid()
        kw = dict(v_reset=0.0 if spec.hard_reset else None, detach_reset=spec.detach_reset, surrogate_function=sg,
                  step_mode="s")
        return IFNode(**kw) if spec.neuron == "if" else ParametricLIFNode(init_tau=2.0, **kw)
    return StepLIF(spec.detach_reset, spec.hard_reset, memories=layer.memories, trace=layer.trace)


def _sj_step_neuron(spec: SNNSpec) -> nn.Module:
    from spikingjelly.activation_based import neuron, surrogate

    sg = surrogate.ATan() if spec.surrogate == "atan" else surrogate.Sigmoid()
    kw = dict(v_reset=0.0 if spec.hard_reset else None, detach_reset=spec.detach_reset, surrogate_function=sg,
              step_mode="s")
    if spec.neuron == "if":
        return neuron.IFNode(**kw)
    if spec.neuron == "plif":
        return neuron.ParametricLIFNode(init_tau=2.0, **kw)
    return neuron.LIFNode(tau=2.0, **kw)


def make_cell(spec: SNNSpec, layer: LayerSpec, features: int) -> nn.Module:
    """The layer's spiking module (``layer.cell``), then its synapse filter (``layer.synapse``); multi-step, spikes
    out (the filter's output is a current). ``features``: the size of the input's last dimension."""
    cell, mem = layer.cell, layer.memories
    if cell == "neuron":
        m: nn.Module = Spikes(spec)
    elif cell == "lrc":
        m = LinearRecurrent(_step_neuron(spec, layer), features, memories=mem)
    elif cell == "erc":
        m = ElementWiseRecurrent(_step_neuron(spec, layer), memories=mem)
    elif cell == "adaptive":
        m = Adaptive(_step_neuron(spec, layer), memories=mem)
    elif cell == "nested":
        m = Adaptive(StepModule(ElementWiseRecurrent(_step_neuron(spec, layer), memories=mem)), memories=mem)
    elif cell == "multistep":
        m = MultiStep(_step_neuron(spec, layer))
    else:
        from spikingjelly.activation_based import layer as sj_layer

        if cell == "sj_lrc":
            m = sj_layer.LinearRecurrentContainer(_sj_step_neuron(spec), features, features, step_mode="m")
        elif cell == "sj_erc":
            m = sj_layer.ElementWiseRecurrentContainer(_sj_step_neuron(spec), _add, step_mode="m")
        else:
            raise ValueError(cell)
    if layer.synapse == "none":
        return m
    if layer.synapse == "plain":
        return nn.Sequential(m, SynapseFilter(memories=mem))
    from spikingjelly.activation_based import layer as sj_layer

    return nn.Sequential(m, sj_layer.SynapseFilter(tau=2.0, learnable=True, step_mode="m"))


def _add(y, x):
    return y + x


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
        self.sn = make_cell(spec, layer, size)
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

        self.c1, self.c2 = cbn(), cbn()
        self.sn1, self.sn2 = make_cell(spec, layer, size), make_cell(spec, layer, size)

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
                layers += [SeqToANNContainer(*mods), make_cell(spec, layer, layer.width)]
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
def layer_specs(draw, allow_pool: bool, cells: tuple[str, ...] | None = None) -> LayerSpec:
    """One layer; ``cells``: the spiking modules to draw from (default: a plain neuron half the time, else any
    cell, spikingjelly's only where it is installed)."""
    kind = draw(st.sampled_from(["conv", "conv", "res", "linear"]))
    if cells is None:
        cells = ("neuron",) * (len(PLAIN_CELLS) + 2) + PLAIN_CELLS + (SJ_CELLS if HAS_SPIKINGJELLY else ())
    cell = draw(st.sampled_from(cells))
    plain = cell in PLAIN_CELLS
    synapses = ["none", "none", "plain"] + (["sj"] if HAS_SPIKINGJELLY else [])
    return LayerSpec(
        kind=kind,
        width=draw(st.integers(1, 6)),
        bn=draw(st.booleans()),
        pool=draw(st.sampled_from(["none", "max", "avg"])) if allow_pool and kind == "conv" else "none",
        dropout=draw(st.sampled_from([0.0, 0.0, 0.3])),
        cell=cell,
        memories=draw(st.booleans()) if plain else True,
        trace=draw(st.booleans()) if plain else False,
        synapse=draw(st.sampled_from(synapses)),
    )


@st.composite
def snn_specs(draw, max_depth: int = 4, max_T: int = 4, cells: tuple[str, ...] | None = None) -> SNNSpec:
    size = draw(st.sampled_from([2, 4, 6]))
    depth = draw(st.integers(1, max_depth))
    layers = tuple(draw(layer_specs(allow_pool=size >= 4, cells=cells)) for _ in range(depth))
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
