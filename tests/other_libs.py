"""Models written the way the snntorch 1.0.0 and norse 1.1.0 docs and tutorials write them, for fxmemopt checks.

Every factory returns ``(model, example_inputs)``, built from ``torch.manual_seed`` (deterministic), in train mode.
The models are small, but their activations (all T time steps kept for backward) dominate the parameters.

* snntorch (tutorials 5-7): ``snn.Leaky`` keeps its membrane ``mem`` in a (non-persistent) buffer that every forward
  rebinds, in both modes. With ``init_hidden=True`` the caller never sees it: the outer loop calls the net once per
  time step (:func:`snntorch_single_step_net`, :func:`snntorch_run_sequence`) or the forward loops over time
  (:func:`snntorch_init_hidden_loop_in_forward`); without it the forward threads ``mem`` through its own time loop
  by hand (:func:`snntorch_loop_in_forward_net`).
* norse: neurons are functional, the state is a value passed in and returned (``z, s = cell(x, s)``); ``LIF`` runs
  the time loop itself over the first dimension, ``LIFCell`` is one step, ``Lift`` maps a stateless module over time
  and ``SequentialState`` threads a list of states through its children.

This module is not a test file (no ``test_`` prefix): ``benchmarks/other_libs_check.py`` imports it, and tests may.
Neither snntorch nor norse import torchvision on these paths, so no stand-in is needed.
"""

from __future__ import annotations

import norse.torch as norse
import snntorch as snn
import torch
import torch.nn.functional as F
from norse.torch import LICell, LIFCell, SequentialState
from norse.torch.models.conv import ConvNet
from snntorch import spikegen, surrogate, utils
from torch import nn

__all__ = [
    "FACTORIES", "VARIANTS", "SnntorchCSNN", "SnntorchCSNNIndexed", "SnntorchCSNNInitHiddenIndexed", "Wrapped",
    "snntorch_example_sequence", "SnntorchCSNNInitHidden", "NorseLIFConvNet",
    "snntorch_single_step_net", "snntorch_run_sequence", "snntorch_loop_in_forward_net",
    "snntorch_init_hidden_loop_in_forward", "norse_lif_multistep", "norse_lif_multistep_module",
    "norse_sequential_state", "norse_sequential_state_readme", "norse_lifcell_loop_in_forward",
    "SnntorchBNEventNet", "snntorch_bn_event_net", "snntorch_bn_event_net_small", "NorseSpeechNet",
    "norse_recurrent_speech_net", "norse_recurrent_speech_net_small",
]

T, N = 16, 4  # time steps, batch
BETA = 0.5  # snntorch tutorials 6 and 7


def _drive(model: nn.Module, gain: float) -> nn.Module:
    """Scale every conv/linear weight by ``gain`` so every spiking layer fires (as trained weights make it do).

    Freshly initialized nets are nearly silent on these inputs (rates < 1% past the first layer), which would
    leave spike packing and the surrogate paths unexercised. norse's own ``ConvNet`` does the same inside its
    ``forward`` (``z = 10 * self.conv2(z)``).
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(gain)
    return model


def _mnist_like_spikes(seed: int, t: int = T, n: int = N) -> torch.Tensor:
    """``[T, N, 1, 28, 28]`` rate-coded spikes, as snntorch tutorial 1 makes them (``spikegen.rate``)."""
    torch.manual_seed(seed)
    images = torch.rand(n, 1, 28, 28)
    return spikegen.rate(images, num_steps=t)


# --- snntorch ------------------------------------------------------------------------------------------------------

def snntorch_single_step_net(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Tutorial 7: an ``nn.Sequential`` of ``init_hidden=True`` neurons, called once per time step.

    The last ``Leaky`` has ``output=True``, so one call returns ``(spk, mem)`` of the output layer. The example input
    is ONE time step ``[N, 1, 28, 28]``; run a sequence with :func:`snntorch_run_sequence`.
    """
    torch.manual_seed(seed)
    spike_grad = surrogate.fast_sigmoid()
    net = nn.Sequential(
        nn.Conv2d(1, 12, 5),
        nn.MaxPool2d(2),
        snn.Leaky(beta=BETA, spike_grad=spike_grad, init_hidden=True),
        nn.Conv2d(12, 64, 5),
        nn.MaxPool2d(2),
        snn.Leaky(beta=BETA, spike_grad=spike_grad, init_hidden=True),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 10),
        snn.Leaky(beta=BETA, spike_grad=spike_grad, init_hidden=True, output=True),
    )
    net.train()
    return _drive(net, 3.0), (snntorch_example_sequence(seed)[0],)


def snntorch_example_sequence(seed: int = 0) -> torch.Tensor:
    """The whole ``[T, N, 1, 28, 28]`` sequence whose step 0 is :func:`snntorch_single_step_net`'s example input."""
    return _mnist_like_spikes(seed + 1)


def snntorch_run_sequence(net: nn.Module, x_seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tutorial 7's ``forward_pass``: reset the hidden states, call ``net`` once per step, stack spk and mem.

    ``utils.reset(net)`` only looks at ``net``'s direct children and then resets every ``Leaky`` in the
    process-wide ``SpikingNeuron.instances`` list, which a ``copy.deepcopy`` of ``net`` is not in (see the report in
    ``benchmarks/other_libs_check.py``).
    """
    spk_rec = []
    mem_rec = []
    utils.reset(net)  # resets hidden states for all LIF neurons in net
    for step in range(x_seq.size(0)):
        spk_out, mem_out = net(x_seq[step])
        spk_rec.append(spk_out)
        mem_rec.append(mem_out)
    return torch.stack(spk_rec), torch.stack(mem_rec)


class SnntorchCSNN(nn.Module):
    """Tutorial 6's convolutional SNN with tutorial 5's time loop inside ``forward`` (states threaded by hand)."""

    def __init__(self) -> None:
        super().__init__()
        spike_grad = surrogate.fast_sigmoid(slope=25)
        self.conv1 = nn.Conv2d(1, 12, 5)
        self.lif1 = snn.Leaky(beta=BETA, spike_grad=spike_grad)
        self.conv2 = nn.Conv2d(12, 64, 5)
        self.lif2 = snn.Leaky(beta=BETA, spike_grad=spike_grad)
        self.fc1 = nn.Linear(64 * 4 * 4, 10)
        self.lif3 = snn.Leaky(beta=BETA, spike_grad=spike_grad)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Initialize hidden states at t=0
        mem1 = self.lif1.init_leaky()
        mem2 = self.lif2.init_leaky()
        mem3 = self.lif3.init_leaky()

        # Record the final layer
        spk_rec = []
        mem_rec = []

        for step in range(x.size(0)):
            cur1 = F.max_pool2d(self.conv1(x[step]), 2)
            spk1, mem1 = self.lif1(cur1, mem1)
            cur2 = F.max_pool2d(self.conv2(spk1), 2)
            spk2, mem2 = self.lif2(cur2, mem2)
            cur3 = self.fc1(spk2.view(x.size(1), -1))
            spk3, mem3 = self.lif3(cur3, mem3)
            spk_rec.append(spk3)
            mem_rec.append(mem3)

        return torch.stack(spk_rec), torch.stack(mem_rec)


def snntorch_loop_in_forward_net(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """:class:`SnntorchCSNN` on ``[T, N, 1, 28, 28]``."""
    torch.manual_seed(seed)
    return _drive(SnntorchCSNN().train(), 3.0), (_mnist_like_spikes(seed + 1),)


class SnntorchCSNNInitHidden(nn.Module):
    """The same network with ``init_hidden=True`` neurons, ``utils.reset(self)`` at the top of ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        spike_grad = surrogate.fast_sigmoid(slope=25)
        self.conv1 = nn.Conv2d(1, 12, 5)
        self.lif1 = snn.Leaky(beta=BETA, spike_grad=spike_grad, init_hidden=True)
        self.conv2 = nn.Conv2d(12, 64, 5)
        self.lif2 = snn.Leaky(beta=BETA, spike_grad=spike_grad, init_hidden=True)
        self.fc1 = nn.Linear(64 * 4 * 4, 10)
        self.lif3 = snn.Leaky(beta=BETA, spike_grad=spike_grad, init_hidden=True, output=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        utils.reset(self)  # resets hidden states for all LIF neurons in net

        spk_rec = []
        mem_rec = []

        for step in range(x.size(0)):
            cur1 = F.max_pool2d(self.conv1(x[step]), 2)
            spk1 = self.lif1(cur1)
            cur2 = F.max_pool2d(self.conv2(spk1), 2)
            spk2 = self.lif2(cur2)
            cur3 = self.fc1(spk2.view(x.size(1), -1))
            spk3, mem3 = self.lif3(cur3)
            spk_rec.append(spk3)
            mem_rec.append(mem3)

        return torch.stack(spk_rec), torch.stack(mem_rec)


def snntorch_init_hidden_loop_in_forward(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """:class:`SnntorchCSNNInitHidden` on ``[T, N, 1, 28, 28]``."""
    torch.manual_seed(seed)
    return _drive(SnntorchCSNNInitHidden().train(), 3.0), (_mnist_like_spikes(seed + 1),)


class SnntorchBNEventNet(nn.Module):
    """Conv + BatchNorm + ``Leaky`` (``init_hidden=False``, atan surrogate) on DVS-like event frames, the time loop
    in ``forward`` and the membranes threaded by hand (tutorial 5's loop, tutorial 7's event data). snntorch's
    ``Leaky`` rebinds ``self.mem`` and ``self.reset`` in every call before reading them: a region that kept their
    entry values for recomputation held one dead tensor per time step (issue 28: measured above the unoptimized
    step while predicted 1.9x below it)."""

    def __init__(self, c1: int = 32, c2: int = 64, size: int = 24) -> None:
        super().__init__()
        spike_grad = surrogate.atan()
        self.conv1 = nn.Conv2d(2, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.lif1 = snn.Leaky(beta=0.9, spike_grad=spike_grad)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c2)
        self.lif2 = snn.Leaky(beta=0.9, spike_grad=spike_grad)
        self.fc = nn.Linear(c2 * size * size, 10)
        self.lif3 = snn.Leaky(beta=0.9, spike_grad=spike_grad)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mem1, mem2, mem3 = self.lif1.init_leaky(), self.lif2.init_leaky(), self.lif3.init_leaky()
        spk_rec, mem_rec = [], []
        for step in range(x.size(0)):
            spk1, mem1 = self.lif1(self.bn1(self.conv1(x[step])), mem1)
            spk2, mem2 = self.lif2(self.bn2(self.conv2(spk1)), mem2)
            spk3, mem3 = self.lif3(self.fc(spk2.flatten(1)), mem3)
            spk_rec.append(spk3)
            mem_rec.append(mem3)
        return torch.stack(spk_rec), torch.stack(mem_rec)


def snntorch_bn_event_net(seed: int = 0, *, t: int = 8, n: int = 4, size: int = 24, c1: int = 32,
                          c2: int = 64) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """:class:`SnntorchBNEventNet` on ``[T, N, 2, size, size]`` event frames (T=8, batch 4, 24x24 by default)."""
    torch.manual_seed(seed)
    model = _drive(SnntorchBNEventNet(c1, c2, size).train(), 3.0)
    return model, (_event_frames(seed + 1, t, n, size),)


def snntorch_bn_event_net_small(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """The smaller size: 8 and 16 channels, 16x16 frames, T=6, batch 2."""
    return snntorch_bn_event_net(seed, t=6, n=2, size=16, c1=8, c2=16)


# --- norse ---------------------------------------------------------------------------------------------------------

class NorseSpeechNet(nn.Module):
    """A recurrent keyword-spotting net in the style of norse's speech-commands task: a ``LIFRecurrentCell`` called
    once per frame in ``forward`` (its ``LIFState`` threaded by hand), a linear readout into a ``LICell``, the
    maximum voltage over time as the logits."""

    def __init__(self, n_in: int = 40, hidden: int = 128, n_out: int = 35) -> None:
        super().__init__()
        self.cell = norse.LIFRecurrentCell(n_in, hidden)
        self.fc = nn.Linear(hidden, n_out)
        self.out = LICell()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = s2 = None
        voltages = []
        for t in range(x.shape[0]):
            z, s1 = self.cell(x[t], s1)
            v, s2 = self.out(self.fc(z), s2)
            voltages.append(v)
        return torch.stack(voltages).max(0).values


def norse_recurrent_speech_net(seed: int = 0, *, t: int = 64, n: int = 8, hidden: int = 128
                               ) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """:class:`NorseSpeechNet` on ``[T, N, 40]`` mel-like frames (T=64, batch 8 by default)."""
    torch.manual_seed(seed)
    return NorseSpeechNet(hidden=hidden).train(), (torch.rand(t, n, 40) * 2,)


def norse_recurrent_speech_net_small(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """The smaller size: 24 frames, batch 4, 32 hidden neurons."""
    return norse_recurrent_speech_net(seed, t=24, n=4, hidden=32)

def _event_frames(seed: int, t: int = T, n: int = N, size: int = 32) -> torch.Tensor:
    """``[T, N, 2, size, size]`` sparse binary event frames (a DVS-like two-polarity input)."""
    torch.manual_seed(seed)
    return (torch.rand(t, n, 2, size, size) < 0.2).float()


def norse_lif_multistep(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Multi-step ``LIF`` (loops over the first dimension itself) in a ``SequentialState`` of ``Lift`` ed layers.

    The form of ``Lift``'s own docstring (``Lift(Conv2d)`` then ``LIF()``); returns ``(out, [state per child])``.
    Input ``[T, N, 2, 32, 32]``.
    """
    torch.manual_seed(seed)
    model = SequentialState(
        norse.Lift(nn.Conv2d(2, 16, 3, padding=1)),
        norse.LIF(),
        norse.Lift(nn.MaxPool2d(2)),
        norse.Lift(nn.Conv2d(16, 32, 3, padding=1)),
        norse.LIF(),
        norse.Lift(nn.MaxPool2d(2)),
        nn.Flatten(2),
        norse.Lift(nn.Linear(32 * 8 * 8, 10)),
        norse.LIF(),
    )
    return _drive(model.train(), 10.0), (_event_frames(seed + 1),)


class NorseLIFConvNet(nn.Module):
    """A module calling multi-step ``LIF`` layers and unpacking ``z, s = self.lif(z)``; returns the spikes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 16, 3, padding=1)
        self.lif1 = norse.LIF()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.lif2 = norse.LIF()
        self.fc = nn.Linear(32 * 8 * 8, 10)
        self.lif3 = norse.LIF()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, n = x.shape[:2]
        z = self.conv1(x.flatten(0, 1)).unflatten(0, (t, n))
        z, s1 = self.lif1(z)
        z = F.max_pool2d(z.flatten(0, 1), 2)
        z = self.conv2(z).unflatten(0, (t, n))
        z, s2 = self.lif2(z)
        z = F.max_pool2d(z.flatten(0, 1), 2).unflatten(0, (t, n))
        z = self.fc(z.flatten(2))
        z, s3 = self.lif3(z)
        return z


def norse_lif_multistep_module(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """:class:`NorseLIFConvNet` on ``[T, N, 2, 32, 32]``."""
    torch.manual_seed(seed)
    return _drive(NorseLIFConvNet().train(), 10.0), (_event_frames(seed + 1),)


def norse_sequential_state_readme(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """norse's README "spiking convolutional classifier", verbatim: ``SequentialState`` of cells, ONE time step.

    ``output, state = model(data)`` with ``data`` ``[8, 1, 28, 28]`` (as in the README).
    """
    torch.manual_seed(seed)
    model = SequentialState(
        nn.Conv2d(1, 20, 5, 1),      # Convolve from 1 -> 20 channels
        LIFCell(),                   # Spiking activation layer
        nn.MaxPool2d(2, 2),
        nn.Conv2d(20, 50, 5, 1),     # Convolve from 20 -> 50 channels
        LIFCell(),
        nn.MaxPool2d(2, 2),
        nn.Flatten(),                # Flatten to 800 units
        nn.Linear(800, 10),
        LICell(),                    # Non-spiking integrator layer
    )
    return _drive(model.train(), 20.0), (torch.randn(8, 1, 28, 28),)


def norse_sequential_state(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """The README's ``SequentialState`` lifted over time (``Lift`` + multi-step ``LIF``/``LI``): ``(out, states)``.

    Input ``[T, N, 1, 28, 28]``.
    """
    torch.manual_seed(seed)
    model = SequentialState(
        norse.Lift(nn.Conv2d(1, 20, 5, 1)),
        norse.LIF(),
        norse.Lift(nn.MaxPool2d(2, 2)),
        norse.Lift(nn.Conv2d(20, 50, 5, 1)),
        norse.LIF(),
        norse.Lift(nn.MaxPool2d(2, 2)),
        nn.Flatten(2),
        norse.Lift(nn.Linear(800, 10)),
        norse.LI(),
    )
    return _drive(model.train(), 6.0), (_mnist_like_spikes(seed + 1),)


def norse_lifcell_loop_in_forward(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """norse's own ``norse.torch.models.conv.ConvNet`` (MNIST tutorial): ``LIFCell`` s, ``s0 = None``, time loop in
    ``forward`` (``z, s0 = self.lif0(z, s0)``), voltages written into a preallocated ``[T, N, 10]`` tensor.

    Input ``[T, N, 1, 28, 28]``.
    """
    torch.manual_seed(seed)
    return _drive(ConvNet().train(), 2.0), (_mnist_like_spikes(seed + 1),)


# --- diagnostic variants (NOT the tutorials' style) -----------------------------------------------------------------
# Each changes one thing in a factory above, to tell apart the causes of what fxmemopt does with the originals.

class SnntorchCSNNIndexed(SnntorchCSNN):
    """:class:`SnntorchCSNN` with each neuron's ``(spk, mem)`` indexed (``o[0], o[1]``) instead of unpacked."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mem1 = self.lif1.init_leaky()
        mem2 = self.lif2.init_leaky()
        mem3 = self.lif3.init_leaky()
        spk_rec = []
        mem_rec = []
        for step in range(x.size(0)):
            o = self.lif1(F.max_pool2d(self.conv1(x[step]), 2), mem1)
            spk1, mem1 = o[0], o[1]
            o = self.lif2(F.max_pool2d(self.conv2(spk1), 2), mem2)
            spk2, mem2 = o[0], o[1]
            o = self.lif3(self.fc1(spk2.view(x.size(1), -1)), mem3)
            spk3, mem3 = o[0], o[1]
            spk_rec.append(spk3)
            mem_rec.append(mem3)
        return torch.stack(spk_rec), torch.stack(mem_rec)


class SnntorchCSNNInitHiddenIndexed(SnntorchCSNNInitHidden):
    """:class:`SnntorchCSNNInitHidden` with the last neuron's ``(spk, mem)`` indexed instead of unpacked."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        utils.reset(self)
        spk_rec = []
        mem_rec = []
        for step in range(x.size(0)):
            spk1 = self.lif1(F.max_pool2d(self.conv1(x[step]), 2))
            spk2 = self.lif2(F.max_pool2d(self.conv2(spk1), 2))
            o = self.lif3(self.fc1(spk2.view(x.size(1), -1)))
            spk_rec.append(o[0])
            mem_rec.append(o[1])
        return torch.stack(spk_rec), torch.stack(mem_rec)


class Wrapped(nn.Module):
    """``model`` as the only child of a parent whose ``forward(x)`` calls it (so ``model``'s optional ``state``
    argument is not a graph input)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> object:
        return self.model(x)


def _variant(factory, cls=None):
    def make(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        model, inputs = factory(seed)
        if cls is None:
            return Wrapped(model).train(), inputs
        other = cls()
        other.load_state_dict(model.state_dict())
        return other.train(), inputs
    make.__name__ = factory.__name__ + ("_wrapped" if cls is None else "_indexed")
    make.__doc__ = f"{factory.__name__}, changed: " + ((cls or Wrapped).__doc__ or "").split("\n")[0]
    return make


#: name -> diagnostic variant factory.
VARIANTS = {
    "snntorch_loop_in_forward_net_indexed": _variant(snntorch_loop_in_forward_net, SnntorchCSNNIndexed),
    "snntorch_init_hidden_loop_in_forward_indexed": _variant(snntorch_init_hidden_loop_in_forward,
                                                            SnntorchCSNNInitHiddenIndexed),
    "norse_lif_multistep_wrapped": _variant(norse_lif_multistep),
    "norse_sequential_state_wrapped": _variant(norse_sequential_state),
    "norse_lifcell_loop_in_forward_wrapped": _variant(norse_lifcell_loop_in_forward),
}


#: name -> factory. ``snntorch_single_step_net`` takes one time step; the others a whole ``[T, N, ...]`` sequence.
FACTORIES = {
    "snntorch_single_step_net": snntorch_single_step_net,
    "snntorch_loop_in_forward_net": snntorch_loop_in_forward_net,
    "snntorch_init_hidden_loop_in_forward": snntorch_init_hidden_loop_in_forward,
    "snntorch_bn_event_net": snntorch_bn_event_net,
    "snntorch_bn_event_net_small": snntorch_bn_event_net_small,
    "norse_lif_multistep": norse_lif_multistep,
    "norse_lif_multistep_module": norse_lif_multistep_module,
    "norse_sequential_state": norse_sequential_state,
    "norse_sequential_state_readme": norse_sequential_state_readme,
    "norse_lifcell_loop_in_forward": norse_lifcell_loop_in_forward,
    "norse_recurrent_speech_net": norse_recurrent_speech_net,
    "norse_recurrent_speech_net_small": norse_recurrent_speech_net_small,
}
