"""A model that comes with state from an earlier step is optimized as if freshly reset (issue 27, item 6).

The user ran a training step (or a forward on another batch size) and did not reset the neurons: snntorch's hidden
``mem`` still references the step's freed autograd graph, spikingjelly's and sinabs's ``v`` has another batch size.
``optimize`` must (1) succeed, running everything from the fresh state (never "the model fails on the example", never
a validation step failing "on the model itself"), (2) leave the user's stale state exactly as it was (the same
objects, the same values, the same version counters), and (3) return a module whose training step, after a reset,
is bitwise equal to the unoptimized model's. A plain module whose stale state cannot be reset generically raises
:class:`~fxmemopt.errors.StaleStateError` saying which attribute and what to do.

Models are small versions of each library's tutorials: snntorch tutorial 5 (an ``nn.Sequential`` of
``init_hidden=True`` neurons called once per time step), spikingjelly's activation_based multi-step conv net, a
sinabs ``nn.Sequential`` on ``[N, T, F]``, and plain-PyTorch neurons keeping ``self.v``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxmemopt
from fxmemopt.errors import StaleStateError

T = 4


def _states(model: nn.Module, names: tuple[str, ...]) -> dict[tuple[str, str], tuple[object, torch.Tensor, int]]:
    """(module path, state name) -> (the object, a copy of its value, its version counter), for every tensor state."""
    out = {}
    for path, m in model.named_modules():
        mem = m.__dict__.get("_memories", {})
        for n in names:
            v = mem.get(n, m._buffers.get(n, m.__dict__.get(n)))
            if isinstance(v, torch.Tensor):
                out[(path, n)] = (v, v.detach().clone(), v._version)
    return out


def _assert_untouched(model: nn.Module, before: dict, names: tuple[str, ...]) -> None:
    after = _states(model, names)
    assert after.keys() == before.keys()
    for key, (obj, value, version) in before.items():
        now = after[key][0]
        assert now is obj, f"{key}: optimize rebound the user's state"
        assert torch.equal(now, value) and now._version == version, f"{key}: optimize changed the user's state"


def _optimize(model: nn.Module, inputs: tuple, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxmemopt.FxMemOptWarning)
        return fxmemopt.optimize(model, inputs, return_summary=True, never_worse=False, **kw)


def _clean(summary) -> None:
    """Nothing in the summary says a run failed on the model: it was optimized from its fresh state."""
    assert summary.regions and not summary.failed_regions, str(summary)
    assert not any("fails on the model itself" in n or "no prediction" in n for n in summary.notes), summary.notes


# --- snntorch: tutorial 5, init_hidden=True, the training loop runs over time -----------------------------------

def _snntorch_net(seed: int = 0) -> nn.Sequential:
    snn = pytest.importorskip("snntorch")
    from snntorch import surrogate

    torch.manual_seed(seed)
    grad = surrogate.fast_sigmoid(slope=25)
    net = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), snn.Leaky(beta=0.9, spike_grad=grad, init_hidden=True),
                        nn.Linear(16, 4), snn.Leaky(beta=0.9, spike_grad=grad, init_hidden=True, output=True))
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.mul_(4.0)  # so that both layers fire
    return net.train()


def _snntorch_step(net: nn.Module, x_seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tutorial 5's training step: one call per time step, the loss over the recorded output, one backward."""
    spk_rec, mem_rec = [], []
    for t in range(x_seq.shape[0]):
        spk, mem = net(x_seq[t])
        spk_rec.append(spk)
        mem_rec.append(mem)
    spk, mem = torch.stack(spk_rec), torch.stack(mem_rec)
    (spk.sum() + mem.sum()).backward()
    return spk, mem


def _snntorch_reset(net: nn.Module) -> None:
    # per neuron: snntorch.utils.reset resets the class-level instance list, which holds every model's neurons
    for m in net.modules():
        if hasattr(m, "reset_mem"):
            m.reset_mem()


def test_snntorch_init_hidden_after_a_training_step():
    """(a) ``mem`` references the freed graph of the user's step: optimize resets it, runs fresh, puts it back."""
    torch.manual_seed(1)
    x_seq = (torch.rand(T, 2, 1, 6, 6) > 0.5).float()
    net = _snntorch_net()
    _snntorch_reset(net)
    _snntorch_step(net, x_seq)  # the user's step; nothing resets the neurons afterwards
    assert net[2].mem.grad_fn is not None
    before = _states(net, ("mem",))
    grads = [p.grad.clone() for p in net.parameters()]

    gm, summary = _optimize(net, (x_seq[0],), calls_per_step=T)
    _clean(summary)
    _assert_untouched(net, before, ("mem",))
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads))

    reference = _snntorch_net()
    for m in (net, reference):
        _snntorch_reset(m)
        for p in m.parameters():
            p.grad = None
    a, ma = _snntorch_step(reference, x_seq)
    b, mb = _snntorch_step(gm, x_seq)
    assert torch.equal(a, b) and torch.equal(ma, mb)
    for (n, p), q in zip(reference.named_parameters(), net.parameters()):
        assert torch.equal(p.grad, q.grad), n
    for m, q in zip(reference.modules(), net.modules()):
        if hasattr(m, "reset_mem"):
            assert torch.equal(m.mem, q.mem)


def test_measure_step_runs_a_stale_snntorch_model_fresh():
    """``fxmemopt.measure_step`` resets snntorch neurons as it resets spikingjelly's, on copies of the state."""
    torch.manual_seed(1)
    x_seq = (torch.rand(T, 2, 1, 6, 6) > 0.5).float()
    net = _snntorch_net()
    _snntorch_reset(net)
    _snntorch_step(net, x_seq)
    before = _states(net, ("mem",))
    assert fxmemopt.measure_step(net, (x_seq[0],), repeats=0, warmup=1).peak_bytes > 0
    _assert_untouched(net, before, ("mem",))


# --- spikingjelly: activation_based, multi-step ------------------------------------------------------------------

def _spikingjelly_net(seed: int = 0) -> nn.Module:
    pytest.importorskip("spikingjelly")
    from spikingjelly.activation_based import functional, layer, neuron, surrogate

    torch.manual_seed(seed)
    net = nn.Sequential(
        layer.Conv2d(1, 4, 3, padding=1, bias=False), layer.BatchNorm2d(4),
        neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan()), layer.MaxPool2d(2),
        layer.Conv2d(4, 4, 3, padding=1, bias=False), layer.BatchNorm2d(4),
        neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan()), layer.MaxPool2d(2),
        layer.Flatten(), layer.Linear(4 * 2 * 2, 3), neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan()))
    functional.set_step_mode(net, "m")
    return net.train()


@pytest.mark.parametrize("earlier", ["forward, other batch size", "training step, same batch size"])
def test_spikingjelly_multistep_with_state_from_an_earlier_call(earlier):
    """(b) ``v`` is a tensor from ``net(x_small)`` (no ``functional.reset_net``), or from a whole training step."""
    from spikingjelly.activation_based import functional

    torch.manual_seed(2)
    x = torch.rand(T, 2, 1, 8, 8) * 3
    net = _spikingjelly_net()
    if earlier.startswith("forward"):
        net(torch.rand(T, 3, 1, 8, 8) * 3)
    else:
        net(x).sum().backward()
    before = _states(net, ("v",))
    assert before and all(v[0].shape[0] == (3 if earlier.startswith("forward") else 2) for v in before.values())

    gm, summary = _optimize(net, (x,))
    _clean(summary)
    _assert_untouched(net, before, ("v",))

    reference = _spikingjelly_net()
    reference.load_state_dict(net.state_dict())  # BatchNorm statistics the earlier call updated
    for m in (reference, net):
        functional.reset_net(m)
        for p in m.parameters():
            p.grad = None
    report = fxmemopt.compare_training_step(reference, gm, (x,))
    assert report.ok, str(report)  # outputs, every gradient, BatchNorm statistics, every neuron's v after the step


# --- sinabs: [N, T, F], reset_states() ---------------------------------------------------------------------------

def _sinabs_net(seed: int = 0) -> nn.Module:
    sl = pytest.importorskip("sinabs.layers")
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), sl.LIF(tau_mem=2.0), nn.Linear(8, 3), sl.IAF()).train()


def _sinabs_reset(net: nn.Module) -> None:
    for m in net.modules():
        if type(m).__module__.startswith("sinabs") and hasattr(m, "reset_states"):
            m.reset_states()


def test_sinabs_with_state_of_another_batch_size_and_a_freed_graph():
    """sinabs keeps ``v_mem`` in buffers, reset in place by ``reset_states()``: optimize resets copies."""
    torch.manual_seed(3)
    x = torch.rand(2, T, 6) * 3
    x_earlier = torch.rand(3, T, 6) * 3
    net = _sinabs_net()
    net(x_earlier).sum().backward()  # the user's step on a batch of 3
    before = _states(net, ("v_mem",))
    assert len(before) == 2 and all(v[0].shape[0] == 3 and v[0].grad_fn is not None for v in before.values())

    gm, summary = _optimize(net, (x,))
    _clean(summary)
    _assert_untouched(net, before, ("v_mem",))

    # the reference with the same history, then both reset as the user would (sinabs picks states of the old batch
    # size at random for a new one: the same history keeps the RNG draws alike)
    reference = _sinabs_net()
    reference(x_earlier).sum().backward()
    for m in (reference, net):
        _sinabs_reset(m)
        for p in m.parameters():
            p.grad = None
    report = fxmemopt.compare_training_step(reference, gm, (x,))
    assert report.ok, str(report)  # outputs, gradients, and the v_mem buffers after the step


# --- plain PyTorch: state in an attribute ------------------------------------------------------------------------

class PlainLIF(nn.Module):
    """A single-step LIF neuron keeping its membrane in ``self.v`` (``None`` when fresh), with no reset method."""

    def __init__(self) -> None:
        super().__init__()
        self.v: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = torch.zeros_like(x) if self.v is None else self.v
        h = v + (x - v) / 2.0
        z = (h >= 1.0).to(x.dtype) + (h - h.detach()) * 0.5  # spikes, straight-through surrogate
        self.v = h * (1.0 - z.detach())
        return z


def _plain_net(neuron: type[nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), neuron(), nn.Linear(8, 3)).train()


def test_plain_neuron_with_its_own_reset_is_reset_and_put_back():
    """A plain neuron with a ``reset()`` (``tests/plain_stateful.StepLIF``) is reset by it, on a copy."""
    from plain_stateful import StepLIF

    def neuron() -> nn.Module:
        return StepLIF(detach_reset=True, hard_reset=True)

    torch.manual_seed(4)
    x = torch.rand(2, 6) * 3
    net = _plain_net(neuron)
    net(torch.rand(3, 6) * 3).sum().backward()  # v: [3, 8], with autograd history
    before = _states(net, ("v",))
    assert before[("1", "v")][0].shape == (3, 8)

    gm, summary = _optimize(net, (x,))
    _clean(summary)
    _assert_untouched(net, before, ("v",))

    reference = _plain_net(neuron)
    for m in (reference, net):
        m[1].reset()
        for p in m.parameters():
            p.grad = None
    report = fxmemopt.compare_training_step(reference, gm, (x,))
    assert report.ok, str(report)
    assert torch.equal(reference[1].v, net[1].v)  # the neuron's state after the step


@pytest.mark.parametrize("earlier", ["forward, other batch size", "training step, same batch size"])
def test_plain_neuron_without_a_reset_raises_a_typed_error(earlier):
    """No generic fresh state exists for ``self.v``: a typed error names the module, the attribute, what is wrong
    and what to do, and the user's state is left as it was."""
    torch.manual_seed(5)
    x = torch.rand(2, 6) * 3
    net = _plain_net(PlainLIF)
    if earlier.startswith("forward"):
        with torch.no_grad():
            net(torch.rand(3, 6) * 3)
    else:
        net(x).sum().backward()
    before = _states(net, ("v",))

    with pytest.raises(StaleStateError) as info:
        fxmemopt.optimize(net, (x,))
    msg = str(info.value)
    assert msg.startswith("1 (PlainLIF): holds state from an earlier"), msg
    if earlier.startswith("forward"):
        assert "v: tensor [3, 8]" in msg and "fails on it" in msg and "inputs [2, 8]" in msg, msg
    else:
        assert "v: tensor [2, 8] with grad_fn=" in msg and "autograd graph" in msg, msg
    assert "Reset the model's state before optimize" in msg and "reset() method" in msg, msg
    _assert_untouched(net, before, ("v",))

    net[1].v = None  # the user's reset: now it optimizes
    _clean(_optimize(net, (x,))[1])


def test_plain_neuron_whose_forward_fails_for_another_reason_still_blames_the_inputs():
    """A failure in a module holding no state is the inputs' (InvalidInputsError), not stale state."""
    net = _plain_net(PlainLIF)
    with pytest.raises(fxmemopt.errors.InvalidInputsError):
        fxmemopt.optimize(net, (torch.rand(2, 5),))


class KeepsAnObservation(nn.Module):
    """Rebinds ``self.obs`` every call (so it is state to the probe) but never reads it: its stale value, autograd
    history included, changes nothing, and no error is raised for it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 8)
        self.obs: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        self.obs = y * 2
        return (y > 0).to(y.dtype) + y - y.detach()


def test_stale_state_the_forward_never_reads_is_harmless():
    torch.manual_seed(6)
    x = torch.rand(2, 6)
    net = nn.Sequential(KeepsAnObservation(), nn.Linear(8, 3)).train()
    net(x).sum().backward()
    assert net[0].obs.grad_fn is not None
    before = _states(net, ("obs",))
    gm, _ = _optimize(net, (x,))
    _assert_untouched(net, before, ("obs",))
