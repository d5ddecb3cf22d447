"""Every region kind on every stateful module kind: the plain-PyTorch spikingjelly-style modules of
``tests/plain_stateful.py``, and what spikingjelly, snntorch, norse and sinabs ship (each skipped where the library is
not installed).

Each model is tiny, written the way the library's tutorials write it (time-major input ``[T, N, F]``, or the time
loop in ``forward`` for single-step neurons; sinabs batch-major ``[N, T, F]``). For each, every region kind that
applies is forced with an explicit plan (:func:`plan_kinds.forced_plans`: checkpoint, time-sliced neuron with the
prefix kept or recomputed and with all slice starts kept, whole-region slices, packed saves, unwrapped) and two
training steps, reset in between, are compared bitwise with the unoptimized model (whole-region slices: with the
modules run slice by slice, Rule 9). ``expect`` names the kinds a model must reach (time slices for a neuron the
slice check should accept).
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from plain_stateful import (
    Adaptive,
    ElementWiseRecurrent,
    LinearRecurrent,
    MultiStep,
    StepLIF,
    StepModule,
    SynapseFilter,
    reset_net,
)
from plan_kinds import check_every_kind
from torch import nn

T, N, F = 3, 2, 4
SLICED = ("checkpoint", "chunked", "chunked-recompute-prefix", "chunked-keep-starts", "unwrapped")


def _x(seed: int = 1, batch_first: bool = False) -> torch.Tensor:
    torch.manual_seed(seed)
    x = torch.rand(N, T, F) if batch_first else torch.rand(T, N, F)
    return x * 3


class TimeMajor(nn.Module):
    """``Linear -> cell -> Linear`` on ``[T, N, F]`` (the Linear layers act on the last dimension)."""

    def __init__(self, cell: nn.Module, out: int = 2) -> None:
        super().__init__()
        self.fc1, self.cell, self.fc2 = nn.Linear(F, F), cell, nn.Linear(F, out)

    def forward(self, x):
        return self.fc2(self.cell(self.fc1(x)))


# --- plain PyTorch, spikingjelly-style (tests/plain_stateful.py) ---------------------------------------------------

def _step(memories: bool, trace: bool = False, detach: bool = True) -> nn.Module:
    return StepLIF(detach_reset=detach, hard_reset=not detach, memories=memories, trace=trace)


PLAIN = {
    "lrc": lambda mem: LinearRecurrent(_step(mem), F, memories=mem),
    "erc": lambda mem: ElementWiseRecurrent(_step(mem, detach=False), memories=mem),
    "adaptive": lambda mem: Adaptive(_step(mem), memories=mem),
    "nested": lambda mem: Adaptive(StepModule(ElementWiseRecurrent(_step(mem), memories=mem)), memories=mem),
    "lrc-in-adaptive": lambda mem: Adaptive(StepModule(LinearRecurrent(_step(mem), F, memories=mem)),
                                            memories=mem),
    "trace": lambda mem: MultiStep(_step(mem, trace=True)),
    "synapse": lambda mem: nn.Sequential(MultiStep(_step(mem)), SynapseFilter(memories=mem)),
}
PLAIN_EXPECT = {"trace": ("checkpoint",), "synapse": ("checkpoint",)}


@pytest.mark.parametrize("memories", [True, False], ids=["memories", "attributes"])
@pytest.mark.parametrize("name", PLAIN)
def test_plain_stateful_modules_under_every_region_kind(name, memories):
    def make():
        torch.manual_seed(0)
        return TimeMajor(PLAIN[name](memories)), (_x(),)

    check_every_kind(make, reset_net, T, expect=PLAIN_EXPECT.get(name, SLICED))


# --- spikingjelly ---------------------------------------------------------------------------------------------------

def _sj():
    pytest.importorskip("spikingjelly.activation_based")
    from spikingjelly.activation_based import functional, layer, neuron, surrogate

    return functional, layer, neuron, surrogate


SJ_NEURONS = {
    "IFNode": lambda n, s, **kw: n.IFNode(surrogate_function=s.ATan(), **kw),
    "IFNode-detach": lambda n, s, **kw: n.IFNode(surrogate_function=s.ATan(), detach_reset=True, **kw),
    "LIFNode": lambda n, s, **kw: n.LIFNode(tau=2.0, surrogate_function=s.Sigmoid(), **kw),
    "LIFNode-soft": lambda n, s, **kw: n.LIFNode(tau=2.0, v_reset=None, **kw),
    "ParametricLIFNode": lambda n, s, **kw: n.ParametricLIFNode(init_tau=2.0, **kw),
    "QIFNode": lambda n, s, **kw: n.QIFNode(**kw),
    "EIFNode": lambda n, s, **kw: n.EIFNode(**kw),
    "IzhikevichNode": lambda n, s, **kw: n.IzhikevichNode(**kw),
}


class SJStepLoop(nn.Module):
    """A single-step spikingjelly net called once per time step in ``forward`` (its tutorials' single-step mode)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return torch.stack([self.net(x[t]) for t in range(x.shape[0])])


@pytest.mark.parametrize("mode", ["m", "s", "m-store_v_seq"])
@pytest.mark.parametrize("name", SJ_NEURONS)
def test_spikingjelly_neurons_under_every_region_kind(name, mode):
    functional, layer, neuron, surrogate = _sj()
    kw = {"store_v_seq": True} if mode == "m-store_v_seq" else {}

    def make():
        torch.manual_seed(0)
        net = nn.Sequential(layer.Linear(F, F), SJ_NEURONS[name](neuron, surrogate, **kw), layer.Linear(F, 2))
        functional.set_step_mode(net, "s" if mode == "s" else "m")
        return (SJStepLoop(net) if mode == "s" else net), (_x(),)

    # store_v_seq keeps every step's membrane: slices would keep only the last slice's (never time-sliced)
    expect = ("checkpoint",) if mode != "m" else SLICED
    check_every_kind(make, functional.reset_net, T, expect=expect)


def _sj_containers():
    functional, layer, neuron, surrogate = _sj()
    return {
        "LinearRecurrentContainer": lambda: layer.LinearRecurrentContainer(
            neuron.IFNode(surrogate_function=surrogate.ATan(), detach_reset=True), F, F, step_mode="m"),
        "ElementWiseRecurrentContainer": lambda: layer.ElementWiseRecurrentContainer(
            neuron.LIFNode(tau=2.0), lambda y, x: x + y, step_mode="m"),
        "ElementWiseRecurrentContainer-PLIF": lambda: layer.ElementWiseRecurrentContainer(
            neuron.ParametricLIFNode(init_tau=2.0), lambda y, x: x * y + x, step_mode="m"),
        "SynapseFilter": lambda: nn.Sequential(neuron.IFNode(step_mode="m"),
                                               layer.SynapseFilter(tau=2.0, learnable=True, step_mode="m")),
        "SynapseFilter-fixed": lambda: nn.Sequential(neuron.IFNode(step_mode="m"),
                                                     layer.SynapseFilter(tau=2.0, step_mode="m")),
    }


@pytest.mark.parametrize("name", ["LinearRecurrentContainer", "ElementWiseRecurrentContainer",
                                  "ElementWiseRecurrentContainer-PLIF", "SynapseFilter", "SynapseFilter-fixed"])
def test_spikingjelly_containers_and_filters_under_every_region_kind(name):
    functional, layer, _, _ = _sj()

    def make():
        torch.manual_seed(0)
        net = nn.Sequential(layer.Linear(F, F, step_mode="m"), _sj_containers()[name](),
                            layer.Linear(F, 2, step_mode="m"))
        return net, (_x(),)

    expect = ("checkpoint",) if name.startswith("SynapseFilter") else SLICED
    check_every_kind(make, functional.reset_net, T, expect=expect)


# --- snntorch --------------------------------------------------------------------------------------------------------

def _snn():
    return pytest.importorskip("snntorch")


def _snntorch_neurons():
    snn = _snn()
    from snntorch import surrogate

    sg = surrogate.fast_sigmoid(slope=25)
    return {
        "Leaky": (lambda ih: snn.Leaky(beta=0.5, spike_grad=sg, init_hidden=ih), 1),
        "Synaptic": (lambda ih: snn.Synaptic(alpha=0.6, beta=0.5, spike_grad=sg, init_hidden=ih), 2),
        "Alpha": (lambda ih: snn.Alpha(alpha=0.6, beta=0.5, spike_grad=sg, init_hidden=ih), 3),
        "Lapicque": (lambda ih: snn.Lapicque(beta=0.5, spike_grad=sg, init_hidden=ih), 1),
        "RLeaky": (lambda ih: snn.RLeaky(beta=0.5, linear_features=F, spike_grad=sg, init_hidden=ih), -1),
        "RSynaptic": (lambda ih: snn.RSynaptic(alpha=0.6, beta=0.5, linear_features=F, spike_grad=sg,
                                               init_hidden=ih), -2),
    }


class SnntorchLoop(nn.Module):
    """snntorch tutorial 5's net: the time loop in ``forward``. ``init_hidden=False``: the states threaded by hand,
    started from the neuron's ``init_*``; ``True``: ``utils.reset(self)`` at the top, each call returns spikes."""

    def __init__(self, lif: nn.Module, states: int, init_hidden: bool) -> None:
        super().__init__()
        self.fc1, self.lif, self.fc2 = nn.Linear(F, F), lif, nn.Linear(F, 2)
        self.states, self.init_hidden = states, init_hidden

    def forward(self, x):
        from snntorch import utils

        out = []
        if self.init_hidden:
            utils.reset(self)
            for t in range(x.shape[0]):
                out.append(self.fc2(self.lif(self.fc1(x[t]))))
            return torch.stack(out)
        init = {"Leaky": "init_leaky", "Synaptic": "init_synaptic", "Alpha": "init_alpha",
                "Lapicque": "init_lapicque", "RLeaky": "init_rleaky", "RSynaptic": "init_rsynaptic"}
        s = getattr(self.lif, init[type(self.lif).__name__])()
        s = s if isinstance(s, tuple) else (s,)
        for t in range(x.shape[0]):
            if self.states < 0:  # recurrent: the spike is a state too, first
                spk, *s = self.lif(self.fc1(x[t]), *s)
                s = (spk, *s)
            else:
                spk, *s = self.lif(self.fc1(x[t]), *s)
            out.append(self.fc2(spk))
        return torch.stack(out)


@pytest.mark.parametrize("init_hidden", [False, True], ids=["threaded", "init_hidden"])
@pytest.mark.parametrize("name", ["Leaky", "Synaptic", "Alpha", "Lapicque", "RLeaky", "RSynaptic"])
def test_snntorch_neurons_under_every_region_kind(name, init_hidden):
    _snn()
    factory, states = _snntorch_neurons()[name]

    def make():
        torch.manual_seed(0)
        return SnntorchLoop(factory(init_hidden), states, init_hidden), (_x(),)

    def reset(m):
        for sub in m.modules():
            if hasattr(sub, "reset_mem"):
                sub.reset_mem()

    check_every_kind(make, reset, T)


# --- norse -----------------------------------------------------------------------------------------------------------

def _norse():
    return pytest.importorskip("norse.torch")


class NorseSeq(nn.Module):
    """norse's multi-step neurons: ``z, s = neuron(x)`` over the first (time) dimension, state returned."""

    def __init__(self, neuron: nn.Module) -> None:
        super().__init__()
        self.fc1, self.neuron, self.fc2 = nn.Linear(F, F), neuron, nn.Linear(F, 2)

    def forward(self, x):
        z, _ = self.neuron(self.fc1(x))
        return self.fc2(z)


class NorseCellLoop(nn.Module):
    """norse's cells in a time loop in ``forward``: ``z, s = cell(x[t], s)``, ``s = None`` first."""

    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.fc1, self.cell, self.fc2 = nn.Linear(F, F), cell, nn.Linear(F, 2)

    def forward(self, x):
        s, out = None, []
        for t in range(x.shape[0]):
            z, s = self.cell(self.fc1(x[t]), s)
            out.append(self.fc2(z))
        return torch.stack(out)


def _norse_models():
    nt = _norse()
    p = nt.LIFParameters(v_th=torch.as_tensor(0.3))
    return {
        "LIF": lambda: NorseSeq(nt.LIF(p)),
        "LIFBoxCell": lambda: NorseCellLoop(nt.LIFBoxCell()),
        "LIFAdEx": lambda: NorseSeq(nt.LIFAdEx()),
        "LIFEx": lambda: NorseSeq(nt.LIFEx()),
        "LSNN": lambda: NorseSeq(nt.LSNN()),
        "LIFRecurrent": lambda: NorseSeq(nt.LIFRecurrent(F, F, p=p)),
        "LIFCell": lambda: NorseCellLoop(nt.LIFCell(p)),
        "LIFAdExCell": lambda: NorseCellLoop(nt.LIFAdExCell()),
        "LSNNCell": lambda: NorseCellLoop(nt.LSNNCell()),
        "LIFRecurrentCell": lambda: NorseCellLoop(nt.LIFRecurrentCell(F, F, p=p)),
        "SequentialState": lambda: nt.SequentialState(nt.Lift(nn.Linear(F, F)), nt.LIF(p), nt.Lift(nn.Linear(F, 2))),
    }


NORSE = ["LIF", "LIFBoxCell", "LIFAdEx", "LIFEx", "LSNN", "LIFRecurrent", "LIFCell", "LIFAdExCell", "LSNNCell",
         "LIFRecurrentCell", "SequentialState"]


@pytest.mark.parametrize("name", NORSE)
def test_norse_neurons_under_every_region_kind(name):
    _norse()

    def make():
        torch.manual_seed(0)
        return _norse_models()[name](), (_x(),)

    expect = SLICED if name in ("LIF", "LIFAdEx", "LIFEx", "LSNN") else ("checkpoint",)
    check_every_kind(make, lambda m: None, T, expect=expect)  # norse keeps no state in modules: nothing to reset


# --- sinabs ----------------------------------------------------------------------------------------------------------

def _sinabs_models():
    sl = pytest.importorskip("sinabs.layers")
    return {
        "IAF": lambda: (nn.Sequential(nn.Linear(F, F), sl.IAF(), nn.Linear(F, 2)), False),
        "LIF": lambda: (nn.Sequential(nn.Linear(F, F), sl.LIF(tau_mem=2.0), nn.Linear(F, 2)), False),
        "ExpLeak": lambda: (nn.Sequential(nn.Linear(F, F), sl.ExpLeak(tau_mem=2.0), nn.Linear(F, 2)), False),
        "ALIF": lambda: (nn.Sequential(nn.Linear(F, F), sl.ALIF(tau_mem=2.0, tau_adapt=2.0), nn.Linear(F, 2)),
                         False),
        "IAFSqueeze": lambda: (nn.Sequential(nn.Linear(F, F), sl.IAFSqueeze(batch_size=N), nn.Linear(F, 2)), True),
        "LIFSqueeze": lambda: (nn.Sequential(nn.Linear(F, F), sl.LIFSqueeze(tau_mem=2.0, batch_size=N),
                                             nn.Linear(F, 2)), True),
    }


@pytest.mark.parametrize("name", ["IAF", "LIF", "ExpLeak", "ALIF", "IAFSqueeze", "LIFSqueeze"])
def test_sinabs_layers_under_every_region_kind(name):
    models = _sinabs_models()

    def make():
        torch.manual_seed(0)
        net, squeeze = models[name]()
        x = _x(batch_first=True)  # sinabs: [N, T, F]; its Squeeze layers: [N*T, F]
        return net, (x.flatten(0, 1) if squeeze else x,)

    def reset(m):
        for sub in m.modules():
            if hasattr(sub, "reset_states"):
                sub.reset_states()

    # sinabs is batch-major: slicing dim 0 slices the batch, which the neuron check rejects; whole-region slices
    # apply (against the modules run slice by slice)
    check_every_kind(make, reset, T, expect=("checkpoint", "whole-slices"))


def test_plain_modules_keep_state_as_spikingjelly_does():
    """The plain containers store what spikingjelly's do: their own output in their own state, the inner neuron's
    membrane in the neuron's (compared on one forward against spikingjelly's containers with copied weights)."""
    if importlib.util.find_spec("spikingjelly") is None:
        pytest.skip("spikingjelly is not installed")
    from spikingjelly.activation_based import layer

    torch.manual_seed(0)
    x = _x()
    ours = LinearRecurrent(_step(True), F)
    theirs = layer.LinearRecurrentContainer(copy.deepcopy(ours.sub_module), F, F, step_mode="m")
    theirs.rc.load_state_dict(ours.rc.state_dict())
    assert torch.equal(ours(x), theirs(x))
    assert torch.equal(ours.y, theirs.y) and torch.equal(ours.sub_module.v, theirs.sub_module.v)
    ours = ElementWiseRecurrent(_step(False))
    theirs = layer.ElementWiseRecurrentContainer(copy.deepcopy(ours.sub_module), lambda y, x: y + x, step_mode="m")
    assert torch.equal(ours(x), theirs(x)) and torch.equal(ours.y, theirs.y)
    ours = SynapseFilter()
    theirs = layer.SynapseFilter(tau=2.0, learnable=True, step_mode="m")
    s = (x > 1.5).float()
    assert torch.equal(ours(s), theirs(s)) and torch.equal(ours.out_i, theirs.out_i)
