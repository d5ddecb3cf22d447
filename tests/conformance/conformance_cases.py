"""The conformance suite's models: each library's neurons in the styles of its own tutorials and examples, written
for this suite (not copied), at two sizes, and the check every one of them must pass.

A :class:`Case` builds ``(model, example_inputs)`` from a fixed seed, in train mode, with weights scaled so that
every spiking layer fires (as trained weights make it do; freshly initialized nets are nearly silent). The
libraries are imported lazily: :func:`cases` lists only the cases whose library is installed.

:func:`check` is what ``tests/conformance/test_conformance.py`` asserts and ``python -m fxmemopt bench --libraries``
prints: for one case and one preset, the unoptimized and the optimized training step measured with the storage
tracker at the examples' size, the prediction beside the measurement, and the step compared bitwise with a model
built again from the same seed (not deep-copied: a deepcopy drops tensor hooks such as norse's recurrent cells',
and is not in snntorch's class-level list of neurons that ``utils.reset`` resets).

This module is not a test file (no ``test_`` prefix): the bench command imports it from the source checkout.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fxmemopt

__all__ = ["Case", "CaseResult", "LIBRARIES", "cases", "check", "markdown_table"]

#: library -> the module whose presence says it is installed.
LIBRARIES = {"spikingjelly": "spikingjelly.activation_based", "snntorch": "snntorch", "norse": "norse",
             "sinabs": "sinabs", "plain PyTorch": "torch"}

#: Every model is built at these two sizes.
SIZES = ("small", "large")


@dataclass(frozen=True)
class Case:
    """One model of one library at one size."""

    library: str
    name: str
    size: str
    style: str  # the tutorial or example whose way of writing it follows
    build: Callable[[], tuple[nn.Module, tuple[Any, ...]]]
    reset: Callable[[nn.Module], None] | None = None  # the library's reset between training steps, if any

    @property
    def id(self) -> str:
        return f"{self.library.replace(' ', '_')}-{self.name}-{self.size}"


def _drive(model: nn.Module, gain: float) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear)):
                m.weight.mul_(gain)
    return model


def _frames(seed: int, *shape: int, p: float = 0.2) -> torch.Tensor:
    torch.manual_seed(seed)
    return (torch.rand(*shape) < p).float()


# --- spikingjelly (activation_based tutorials: conv_fashion_mnist / DVS128 Gesture, single-step mode) ------------

def _sj_conv_net(c: int, size: int, t: int, n: int) -> tuple[nn.Module, tuple[torch.Tensor]]:
    from spikingjelly.activation_based import functional, layer, neuron, surrogate

    class CSNN(nn.Module):  # the DVS128 Gesture example's block: conv-BN-LIF-pool, multi-step
        def __init__(self) -> None:
            super().__init__()
            self.conv_fc = nn.Sequential(
                layer.Conv2d(2, c, 3, padding=1, bias=False), layer.BatchNorm2d(c),
                neuron.LIFNode(surrogate_function=surrogate.ATan(), detach_reset=True), layer.MaxPool2d(2),
                layer.Conv2d(c, c, 3, padding=1, bias=False), layer.BatchNorm2d(c),
                neuron.LIFNode(surrogate_function=surrogate.ATan(), detach_reset=True), layer.MaxPool2d(2),
                layer.Flatten(), layer.Linear(c * (size // 4) ** 2, 10),
                neuron.LIFNode(surrogate_function=surrogate.ATan(), detach_reset=True))
            functional.set_step_mode(self, "m")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv_fc(x).mean(0)

    torch.manual_seed(0)
    return _drive(CSNN().train(), 2.0), (_frames(1, t, n, 2, size, size),)


def _sj_single_step_loop(hidden: int, t: int, n: int) -> tuple[nn.Module, tuple[torch.Tensor]]:
    from spikingjelly.activation_based import layer, neuron, surrogate

    class SNN(nn.Module):  # single-step neurons, the time loop in forward, reset by the training code
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Sequential(
                layer.Flatten(), layer.Linear(28 * 28, hidden, bias=False),
                neuron.LIFNode(tau=2.0, surrogate_function=surrogate.Sigmoid()),
                layer.Linear(hidden, 10, bias=False), neuron.LIFNode(tau=2.0, surrogate_function=surrogate.Sigmoid()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = 0.0
            for step in range(x.shape[0]):
                out = out + self.layer(x[step])
            return out / x.shape[0]

    torch.manual_seed(0)
    return _drive(SNN().train(), 3.0), (_frames(1, t, n, 1, 28, 28, p=0.3),)


def _sj_reset(model: nn.Module) -> None:
    from spikingjelly.activation_based import functional
    functional.reset_net(model)


# --- snntorch (tutorials 5-7: the time loop in forward, states threaded by hand or hidden) -------------------------

def _snn_neuron(kind: str, init_hidden: bool = False) -> nn.Module:
    import snntorch as snn
    from snntorch import surrogate
    grad = surrogate.fast_sigmoid(slope=25)
    if kind == "leaky":
        return snn.Leaky(beta=0.9, spike_grad=grad, init_hidden=init_hidden)
    if kind == "synaptic":
        return snn.Synaptic(alpha=0.8, beta=0.9, spike_grad=grad, init_hidden=init_hidden)
    if kind == "alpha":
        return snn.Alpha(alpha=0.9, beta=0.8, spike_grad=grad, init_hidden=init_hidden)
    return snn.Lapicque(beta=0.9, spike_grad=grad, init_hidden=init_hidden)


def _snn_state(lif: nn.Module, kind: str) -> tuple[Any, ...]:
    if kind == "leaky":
        return (lif.init_leaky(),)
    if kind == "synaptic":
        return lif.init_synaptic()
    if kind == "alpha":
        return lif.init_alpha()
    return (lif.init_lapicque(),)


def _snntorch_mlp(kind: str, hidden: int, t: int, n: int) -> tuple[nn.Module, tuple[torch.Tensor]]:
    class Net(nn.Module):  # tutorial 5: fc1 -> lif1 -> fc2 -> lif2, recorded spikes and membranes of the output
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.lif1 = nn.Linear(784, hidden), _snn_neuron(kind)
            self.fc2, self.lif2 = nn.Linear(hidden, hidden), _snn_neuron(kind)
            self.fc3, self.lif3 = nn.Linear(hidden, 10), _snn_neuron(kind)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            s1, s2, s3 = _snn_state(self.lif1, kind), _snn_state(self.lif2, kind), _snn_state(self.lif3, kind)
            spk_rec, mem_rec = [], []
            for step in range(x.size(0)):
                spk1, *s1 = self.lif1(self.fc1(x[step].flatten(1)), *s1)
                spk2, *s2 = self.lif2(self.fc2(spk1), *s2)
                spk3, *s3 = self.lif3(self.fc3(spk2), *s3)
                spk_rec.append(spk3)
                mem_rec.append(s3[-1])
            return torch.stack(spk_rec), torch.stack(mem_rec)

    torch.manual_seed(0)
    return _drive(Net().train(), 2.0), (_frames(1, t, n, 1, 28, 28, p=0.3),)


def _snntorch_csnn(init_hidden: bool, c: int, size: int, t: int, n: int) -> tuple[nn.Module, tuple[torch.Tensor]]:
    from snntorch import utils

    class CSNN(nn.Module):  # tutorial 7's conv net on event frames, with BatchNorm; the loop in forward
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1, self.lif1 = nn.Conv2d(2, c, 3, padding=1), nn.BatchNorm2d(c), _snn_neuron(
                "leaky", init_hidden)
            self.conv2, self.bn2, self.lif2 = nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), _snn_neuron(
                "leaky", init_hidden)
            self.fc, self.lif3 = nn.Linear(2 * c * (size // 4) ** 2, 10), _snn_neuron("leaky", init_hidden)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if init_hidden:
                utils.reset(self)
            else:
                m1, m2, m3 = self.lif1.init_leaky(), self.lif2.init_leaky(), self.lif3.init_leaky()
            spk_rec = []
            for step in range(x.size(0)):
                cur1 = F.max_pool2d(self.bn1(self.conv1(x[step])), 2)
                spk1 = self.lif1(cur1) if init_hidden else None
                if not init_hidden:
                    spk1, m1 = self.lif1(cur1, m1)
                cur2 = F.max_pool2d(self.bn2(self.conv2(spk1)), 2)
                if init_hidden:
                    spk2 = self.lif2(cur2)
                    spk3 = self.lif3(self.fc(spk2.flatten(1)))
                else:
                    spk2, m2 = self.lif2(cur2, m2)
                    spk3, m3 = self.lif3(self.fc(spk2.flatten(1)), m3)
                spk_rec.append(spk3)
            return torch.stack(spk_rec)

    torch.manual_seed(0)
    return _drive(CSNN().train(), 3.0), (_frames(1, t, n, 2, size, size),)


# --- norse (SequentialState of Lift-ed layers and multi-step neurons; cells in a loop) ------------------------------

def _norse_sequential(neuron: str, c: int, size: int, t: int, n: int) -> tuple[nn.Module, tuple[torch.Tensor]]:
    import norse.torch as norse

    def spiking() -> nn.Module:
        return norse.LIF() if neuron == "lif" else norse.LSNN() if neuron == "lsnn" else norse.Lift(
            norse.LIFBoxCell())

    torch.manual_seed(0)
    model = norse.SequentialState(
        norse.Lift(nn.Conv2d(2, c, 3, padding=1)), spiking(), norse.Lift(nn.MaxPool2d(2)),
        norse.Lift(nn.Conv2d(c, 2 * c, 3, padding=1)), spiking(), norse.Lift(nn.MaxPool2d(2)),
        nn.Flatten(2), norse.Lift(nn.Linear(2 * c * (size // 4) ** 2, 10)), norse.LI())
    return _drive(model.train(), 8.0), (_frames(1, t, n, 2, size, size),)


def _norse_cell_loop(c: int, size: int, t: int, n: int) -> tuple[nn.Module, tuple[torch.Tensor]]:
    import norse.torch as norse

    class ConvNet(nn.Module):  # norse's MNIST conv example: LIFCells called in a loop, states threaded by hand
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.lif1 = nn.Conv2d(2, c, 3, padding=1), norse.LIFCell()
            self.conv2, self.lif2 = nn.Conv2d(c, 2 * c, 3, padding=1), norse.LIFCell()
            self.fc, self.out = nn.Linear(2 * c * (size // 4) ** 2, 10), norse.LICell()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s1 = s2 = s3 = None
            voltages = []
            for step in range(x.shape[0]):
                z, s1 = self.lif1(self.conv1(x[step]), s1)
                z = F.max_pool2d(z, 2)
                z, s2 = self.lif2(self.conv2(z), s2)
                z = F.max_pool2d(z, 2)
                v, s3 = self.out(self.fc(z.flatten(1)), s3)
                voltages.append(v)
            return torch.stack(voltages)

    torch.manual_seed(0)
    return _drive(ConvNet().train(), 8.0), (_frames(1, t, n, 2, size, size),)


# --- sinabs (DVS conv nets of *Squeeze layers, batch and time flattened; LIF on [B, T, features]) ---------------

def _sinabs_squeeze(c: int, size: int, t: int, n: int) -> tuple[nn.Module, tuple[torch.Tensor]]:
    import sinabs.layers as sl

    class DVSNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.seq = nn.Sequential(
                nn.Conv2d(2, c, 3, padding=1, bias=False), sl.IAFSqueeze(batch_size=n, min_v_mem=-1.0),
                nn.AvgPool2d(2),
                nn.Conv2d(c, 2 * c, 3, padding=1, bias=False), sl.IAFSqueeze(batch_size=n, min_v_mem=-1.0),
                nn.AvgPool2d(2),
                nn.Flatten(), nn.Linear(2 * c * (size // 4) ** 2, 10, bias=False),
                sl.IAFSqueeze(batch_size=n, min_v_mem=-1.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for m in self.modules():
                if isinstance(m, sl.StatefulLayer):
                    m.reset_states()
            return self.seq(x.flatten(0, 1)).unflatten(0, (n, t)).sum(1)

    torch.manual_seed(0)
    return _drive(DVSNet().train(), 4.0), (_frames(1, n, t, 2, size, size, p=0.15),)


def _sinabs_lif(hidden: int, t: int, n: int) -> tuple[nn.Module, tuple[torch.Tensor]]:
    import sinabs.layers as sl

    class SHDNet(nn.Module):  # the SHD-style feed-forward net: [B, T, 700] through LIF layers, a leaky readout
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.lif1 = nn.Linear(700, hidden, bias=False), sl.LIF(tau_mem=20.0, tau_syn=5.0)
            self.fc2, self.lif2 = nn.Linear(hidden, hidden, bias=False), sl.LIF(tau_mem=20.0)
            self.fc3, self.out = nn.Linear(hidden, 20, bias=False), sl.ExpLeak(tau_mem=20.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for m in self.modules():
                if isinstance(m, sl.StatefulLayer):
                    m.reset_states()
            return self.out(self.fc3(self.lif2(self.fc2(self.lif1(self.fc1(x)))))).sum(1)

    torch.manual_seed(0)
    return _drive(SHDNet().train(), 6.0), (_frames(1, n, t, 700, p=0.05),)


# --- plain PyTorch: a surrogate of one's own, neurons nobody registered -------------------------------------------

class SpikeFn(torch.autograd.Function):
    """Heaviside forward, fast-sigmoid surrogate backward: the usual hand-written spike function."""

    @staticmethod
    def forward(ctx: Any, v: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(v)
        return (v > 0).to(v.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (v,) = ctx.saved_tensors
        return grad / (1 + 10 * v.abs()) ** 2


class MultiStepLIF(nn.Module):
    """A multi-step LIF layer looping over time itself (``[T, N, ...]`` in and out), soft reset."""

    def __init__(self, tau: float = 2.0) -> None:
        super().__init__()
        self.decay = 1.0 - 1.0 / tau

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = torch.zeros_like(x[0])
        out = []
        for step in range(x.shape[0]):
            v = self.decay * v + x[step]
            s = SpikeFn.apply(v - 1.0)
            v = v - s
            out.append(s)
        return torch.stack(out)


class TimeDistributed(nn.Module):
    """``[T, N, ...]`` through a stateless module, time folded into the batch."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.flatten(0, 1)).unflatten(0, x.shape[:2])


def _plain_multistep(c: int, size: int, t: int, n: int) -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(
        TimeDistributed(nn.Sequential(nn.Conv2d(2, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))), MultiStepLIF(),
        TimeDistributed(nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(c, 2 * c, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(2 * c))), MultiStepLIF(),
        TimeDistributed(nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * c * (size // 4) ** 2, 10))),
        MultiStepLIF())
    return _drive(model.train(), 2.0), (_frames(1, t, n, 2, size, size),)


def _plain_loop(hidden: int, t: int, n: int) -> tuple[nn.Module, tuple[torch.Tensor]]:
    class Net(nn.Module):  # the loop in forward, membranes as local variables, the spike a custom Function
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(700, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 20)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            v1 = v2 = v3 = torch.zeros(())
            total = 0.0
            for step in range(x.shape[0]):
                v1 = 0.9 * v1 + self.fc1(x[step])
                s1 = SpikeFn.apply(v1 - 1.0)
                v1 = v1 - s1
                v2 = 0.9 * v2 + self.fc2(s1)
                s2 = SpikeFn.apply(v2 - 1.0)
                v2 = v2 - s2
                v3 = 0.9 * v3 + self.fc3(s2)
                total = total + v3
            return total

    torch.manual_seed(0)
    return _drive(Net().train(), 4.0), (_frames(1, t, n, 700, p=0.05),)


def _all_cases() -> list[Case]:
    out: list[Case] = []

    def add(library: str, name: str, style: str, sizes: dict[str, Callable[[], Any]], reset: Any = None) -> None:
        for size in SIZES:
            out.append(Case(library, name, size, style, sizes[size], reset))

    add("spikingjelly", "conv_dvs_multistep", "DVS128 Gesture example: conv-BN-LIF, step_mode='m'",
        {"small": lambda: _sj_conv_net(8, 16, 4, 2), "large": lambda: _sj_conv_net(16, 32, 8, 4)}, _sj_reset)
    add("spikingjelly", "mlp_single_step_loop", "single-step LIFNode, the time loop in forward",
        {"small": lambda: _sj_single_step_loop(64, 8, 4), "large": lambda: _sj_single_step_loop(256, 16, 8)},
        _sj_reset)
    for kind in ("leaky", "synaptic", "alpha", "lapicque"):
        add("snntorch", f"mlp_{kind}", f"tutorial 5: an MLP of {kind.capitalize()} neurons, states threaded",
            {"small": lambda k=kind: _snntorch_mlp(k, 64, 8, 4), "large": lambda k=kind: _snntorch_mlp(k, 256, 16, 8)})
    for hidden in (False, True):
        add("snntorch", "csnn_bn" + ("_init_hidden" if hidden else ""),
            "tutorial 7: conv-BN-Leaky on event frames" + (", init_hidden=True" if hidden else ""),
            {"small": lambda h=hidden: _snntorch_csnn(h, 8, 16, 6, 2),
             "large": lambda h=hidden: _snntorch_csnn(h, 16, 24, 8, 4)})
    for neuron in ("lif", "lsnn", "lifbox"):
        add("norse", f"sequential_state_{neuron}", f"SequentialState of Lift-ed convs and {neuron.upper()}",
            {"small": lambda k=neuron: _norse_sequential(k, 8, 16, 6, 2),
             "large": lambda k=neuron: _norse_sequential(k, 16, 32, 8, 4)})
    add("norse", "lifcell_loop", "the MNIST conv example: LIFCells in a loop in forward",
        {"small": lambda: _norse_cell_loop(8, 16, 6, 2), "large": lambda: _norse_cell_loop(16, 32, 8, 4)})
    add("sinabs", "iaf_squeeze_dvs", "the DVS tutorial: IAFSqueeze, batch and time flattened",
        {"small": lambda: _sinabs_squeeze(8, 16, 8, 2), "large": lambda: _sinabs_squeeze(16, 32, 16, 4)})
    add("sinabs", "lif_shd", "LIF and ExpLeak on [B, T, 700]",
        {"small": lambda: _sinabs_lif(64, 25, 4), "large": lambda: _sinabs_lif(256, 50, 8)})
    add("plain PyTorch", "multistep_conv", "a multi-step LIF layer of one's own, custom surrogate Function",
        {"small": lambda: _plain_multistep(8, 16, 4, 2), "large": lambda: _plain_multistep(16, 32, 8, 4)})
    add("plain PyTorch", "mlp_loop", "the loop in forward, membranes as locals, custom surrogate Function",
        {"small": lambda: _plain_loop(64, 25, 4), "large": lambda: _plain_loop(256, 50, 8)})
    return out


def cases(library: str | None = None) -> list[Case]:
    """Every case whose library is installed (of ``library`` only, when given)."""
    installed = {lib for lib, mod in LIBRARIES.items() if importlib.util.find_spec(mod.split(".")[0]) is not None}
    return [c for c in _all_cases() if c.library in installed and (library is None or c.library == library)]


@dataclass(frozen=True)
class CaseResult:
    """What :func:`check` measured for one case and one preset (bytes from the storage tracker)."""

    case: Case
    preset: str
    regions: int
    unoptimized: int
    optimized: int
    predicted: int
    exact: bool
    mismatch: str
    activation_share: float  # of the unoptimized whole step: (tracker peak - parameter gradients) / (peak + resident)

    @property
    def reduction(self) -> float:
        return self.unoptimized / self.optimized

    @property
    def prediction_error(self) -> float:
        return (self.predicted - self.optimized) / self.optimized


PRESETS = {"default": {}, "memory": {"prefer": "memory"}}


def check(case: Case, preset: str) -> CaseResult:
    """Optimize ``case`` with ``preset`` and measure: see the module docstring."""
    model, inputs = case.build()
    reset = case.reset or (lambda m: None)
    reset(model)
    base = fxmemopt.measure_step(model, inputs, repeats=0, warmup=0).peak_bytes
    reference, _ = case.build()
    gm, summary = fxmemopt.optimize(model, inputs, return_summary=True, **PRESETS[preset])
    reset(gm)
    opt = fxmemopt.measure_step(gm, inputs, repeats=0, warmup=0).peak_bytes
    for m in (reference, gm):
        reset(m)
    report = fxmemopt.compare_training_step(reference, gm, inputs)
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    resident = sum(summary.resident.values())
    return CaseResult(case, preset, len(summary.regions), base, opt, summary.predicted_peak_after, report.ok,
                      "" if report.ok else str(report)[:400], (base - grads) / (base + resident))


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def markdown_table(results: list[CaseResult]) -> str:
    """One row per case, the presets side by side: the activations' share of the whole unoptimized step
    (:attr:`CaseResult.activation_share`), the unoptimized peak, then per preset the measured peak, the reduction,
    the prediction's error and exactness."""
    by_case: dict[str, dict[str, CaseResult]] = {}
    for r in results:
        by_case.setdefault(r.case.id, {})[r.preset] = r
    lines = ["| library | model (style) | size | activations | unoptimized | default | `prefer=\"memory\"` |",
             "|---|---|---|---|---|---|---|"]
    for rs in by_case.values():
        first = next(iter(rs.values()))
        cells = []
        for preset in PRESETS:
            r = rs.get(preset)
            cells.append("-" if r is None else (
                f"{_mib(r.optimized)} ({r.reduction:.2f}x, predicted {r.prediction_error:+.1%}, "
                f"{'exact' if r.exact else 'NOT EXACT'})"))
        c = first.case
        lines.append(f"| {c.library} | `{c.name}` ({c.style}) | {c.size} | {first.activation_share:.0%} | "
                     f"{_mib(first.unoptimized)} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)
