"""Capture with the example inputs: shape control flow under guards, neurons from any library, validation.

Each model here is written the way SNN libraries write theirs (``if x.ndim == 4``, loops over ``range(x.size(0))``,
``T, B, *rest = x.shape``, stateless neurons returning ``(spikes, state)``, state in a rebound buffer), and every
result is compared bitwise with the unoptimized model.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import fxmemopt
from fxmemopt.analysis.trace import trace
from fxmemopt.errors import GuardError, InvalidOptionError, PlanError
from fxmemopt.snn import LIFNode, reset_net
from fxmemopt.snn.surrogate import ATanSpike


def atan(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Heaviside forward, arctan surrogate gradient."""
    return ATanSpike.apply(x, alpha)


class ShapeFlowNet(nn.Module):
    """spikingjelly zoo style: a 4-D image is repeated over T, a 5-D sequence is used as is; blocks reshape with
    ``*y.shape[1:]`` and check their input's rank."""

    def __init__(self, T: int = 4):
        super().__init__()
        self.T = T
        self.c1, self.b1, self.n1 = nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), LIFNode()
        self.c2, self.b2, self.n2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), LIFNode()

    def _to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            return x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)
        if x.ndim == 5:
            return x
        raise ValueError(f"expected 4D or 5D input, got {x.shape}")

    def layer(self, conv: nn.Module, bn: nn.Module, neuron: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError("expected [T, B, C, H, W]")
        T, B, *_ = x.shape
        y = bn(conv(x.flatten(0, 1)))
        return neuron(y.reshape(T, B, *y.shape[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._to_sequence(x)
        x = self.layer(self.c1, self.b1, self.n1, x)
        x = self.layer(self.c2, self.b2, self.n2, x)
        return x.mean((0, 3, 4))


class StepLIF(nn.Module):
    """A single-step neuron keeping no state (snntorch's ``Leaky`` without ``init_hidden``): ``(x, mem) ->
    (spk, mem)``. It calls a custom autograd.Function, so tracing keeps it whole."""

    def forward(self, x, mem):
        mem = 0.5 * mem + x
        spk = atan(mem - 1.0, 2.0)
        return spk, mem * (1 - spk)


class LoopNet(nn.Module):
    """snntorch tutorial style: the time loop is in ``forward``, over ``range(x.size(0))``."""

    def __init__(self):
        super().__init__()
        self.fc1, self.lif1, self.fc2, self.lif2 = nn.Linear(6, 16), StepLIF(), nn.Linear(16, 4), StepLIF()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mem1 = torch.zeros(x.shape[1], 16)
        mem2 = torch.zeros(x.shape[1], 4)
        out = []
        for t in range(x.size(0)):
            spk1, mem1 = self.lif1(self.fc1(x[t]), mem1)
            spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
            out.append(spk2)
        return torch.stack(out)


def _exact(model: nn.Module, gm: nn.Module, x: torch.Tensor, ref: nn.Module) -> None:
    reset_net(ref)
    reset_net(gm)
    report = fxmemopt.compare_training_step(ref, gm, (x,))
    assert report.ok, str(report)
    reset_net(ref)
    reset_net(gm)


@pytest.mark.parametrize("prefer", [None, "memory"])
def test_shape_control_flow_traces_under_guards_and_is_exact(prefer):
    torch.manual_seed(0)
    model = ShapeFlowNet()
    ref = copy.deepcopy(model)
    x = torch.rand(4, 2, 2, 8, 8)
    gm, summary = fxmemopt.optimize(model, (x,), prefer=prefer, return_summary=True)
    assert [r.anchor for r in summary.regions] == ["n1", "n2"]
    assert not summary.leaf_fallbacks
    # only what the control flow reads: the rank of x and of each block's input, the lengths it unpacks
    texts = [str(g) for g in summary.guards]
    assert texts[0].startswith("(x.ndim == 4) is False") and "test_capture.py" in texts[0]
    assert all("size" not in g.expression for g in summary.guards)  # no guard on T or the batch
    assert "guards (" in str(summary)
    _exact(model, gm, x, ref)
    # shape-generic where the code is: another T and batch, same rank, exact
    x2 = torch.rand(6, 3, 2, 8, 8)
    _exact(model, gm, x2, ref)
    # a 4-D image took the other branch when traced: a typed error naming the guard, never a wrong result
    with pytest.raises(GuardError, match=r"guard 0 \(x.ndim == 4.*expected bool False as traced, got True"):
        gm(torch.rand(2, 2, 8, 8))


def test_image_input_repeated_over_T_traces_that_branch():
    torch.manual_seed(0)
    model = ShapeFlowNet(T=3)
    ref = copy.deepcopy(model)
    img = torch.rand(2, 2, 8, 8)
    gm, summary = fxmemopt.optimize(model, (img,), return_summary=True)
    assert str(summary.guards[0]).startswith("(x.ndim == 4) is True")
    _exact(model, gm, img, ref)
    _exact(model, gm, torch.rand(5, 2, 8, 8), ref)  # another batch: fine
    with pytest.raises(GuardError):
        gm(torch.rand(3, 2, 2, 8, 8))


def test_time_loop_in_forward_is_unrolled_under_a_guard_on_T():
    torch.manual_seed(0)
    model = LoopNet()
    ref = copy.deepcopy(model)
    x = torch.rand(5, 3, 6) * 2
    gm, summary = fxmemopt.optimize(model, (x,), return_summary=True, never_worse=False)
    assert {f.path for f in summary.leaf_fallbacks} == {"lif1", "lif2"}  # the custom Function: kept whole
    assert len(summary.regions) == 10  # one per neuron call: 2 neurons x 5 unrolled steps
    guards = [g for g in summary.guards if g.kind == "index"]
    assert len(guards) == 1 and guards[0].expression == "x.size(0)" and guards[0].expected == 5
    _exact(model, gm, x, ref)
    _exact(model, gm, torch.rand(5, 7, 6) * 2, ref)  # the batch is free
    with pytest.raises(GuardError, match=r"x.size\(0\).*expected index 5 as traced, got 8"):
        gm(torch.rand(8, 3, 6))


def test_data_dependent_control_flow_is_not_specialized():
    class DataBranch(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # a decision on data: would be wrong for the next batch
                return x * 2
            return x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.branch = DataBranch()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.branch(self.fc(x))

    cap = trace(Net(), (torch.rand(2, 4),))
    assert [f.path for f in cap.fallbacks] == ["branch"] and "tensor" in cap.fallbacks[0].reason
    assert cap.guards == ()


def test_model_without_control_flow_has_no_guards():
    from fxmemopt.snn import DeepConvSNN

    model = DeepConvSNN(num_blocks=2, channels=4)
    _, summary = fxmemopt.optimize(model, (torch.rand(2, 2, 3, 8, 8),), return_summary=True)
    assert summary.guards == ()


def test_plan_file_carries_the_guards(tmp_path):
    torch.manual_seed(0)
    model = ShapeFlowNet()
    x = torch.rand(4, 2, 2, 8, 8)
    _, summary = fxmemopt.optimize(model, (x,), return_summary=True)
    path = tmp_path / "plan.json"
    summary.save_plan(path)
    saved = json.loads(path.read_text())
    assert saved["guards"][0] == "bool(x.ndim == 4) == False"
    fxmemopt.optimize(model, (x,), plan=str(path))  # same decisions: applies
    with pytest.raises(PlanError, match="different model"):
        fxmemopt.optimize(model, (torch.rand(2, 2, 8, 8),), plan=str(path))  # the image branch: another graph
    # the same graph with another decision recorded: refused by the guards themselves
    edited = json.loads(path.read_text())
    edited["guards"][0] = "bool(x.ndim == 4) == True"
    with pytest.raises(PlanError, match="specialized on other example inputs.*bool\\(x.ndim == 4\\) == True"):
        fxmemopt.optimize(model, (x,), plan=json.dumps(edited))


class StatelessLIF(nn.Module):
    """norse style: keeps nothing, returns ``(spikes, state)``; the state is threaded through the graph."""

    def forward(self, x, v=None):
        v = torch.zeros_like(x[0]) if v is None else v
        out = []
        for t in range(x.shape[0]):
            v = 0.5 * v + x[t]
            s = atan(v - 1.0, 2.0)
            v = v * (1 - s)
            out.append(s)
        return torch.stack(out), v


class StatelessNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1, self.l1 = nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), StatelessLIF()
        self.c2, self.b2, self.l2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), StatelessLIF()

    def forward(self, x):
        T, N = x.shape[:2]
        z, _ = self.l1(self.b1(self.c1(x.flatten(0, 1))).unflatten(0, (T, N)))
        z, s = self.l2(self.b2(self.c2(z.flatten(0, 1))).unflatten(0, (T, N)))
        return z.mean((0, 3, 4)) + s.mean((1, 2))


def test_stateless_neurons_seed_regions():
    torch.manual_seed(0)
    model = StatelessNet()
    ref = copy.deepcopy(model)
    x = torch.rand(4, 2, 2, 8, 8)
    gm, summary = fxmemopt.optimize(model, (x,), return_summary=True, never_worse=False, leaf_modules=(StatelessLIF,))
    assert summary.stateful_modules == {}
    assert [r.anchor for r in summary.regions] == ["l1", "l2"]
    assert summary.regions[1].inputs[0].bits == 1  # l1's spikes, packed
    _exact(model, gm, x, ref)


class ContinuedNet(nn.Module):
    """Three ways a neuron that returns its state is first called: ``lif(z)`` (the neuron makes its initial state),
    ``lif(z, None)`` (norse's ``SequentialState``), and ``lif(z, s)`` with the state another call returned."""

    def __init__(self):
        super().__init__()
        self.c1, self.l1 = nn.Conv2d(2, 8, 3, padding=1), StatelessLIF()
        self.c2, self.l2 = nn.Conv2d(8, 8, 3, padding=1), StatelessLIF()
        self.c3, self.l3 = nn.Conv2d(8, 8, 3, padding=1), StatelessLIF()

    def forward(self, x):
        T, N = x.shape[:2]
        z, _ = self.l1(self.c1(x.flatten(0, 1)).unflatten(0, (T, N)))
        h = self.c2(z.flatten(0, 1)).unflatten(0, (T, N))
        a, s = self.l2(h, None)
        b, _ = self.l3(self.c3(a.flatten(0, 1)).unflatten(0, (T, N)), s)  # continues l2's membrane
        return b.mean((0, 3, 4)) + s.mean((2, 3))


@pytest.mark.parametrize("keep_prefix", [True, False])
@pytest.mark.parametrize("chunks", [2, 3, 7])
def test_neurons_that_return_their_state_are_sliced_in_time_exactly(chunks, keep_prefix):
    """Rule 8 with the state carried as a value: each slice gets the state the previous slice returned; the first is
    called as the model calls the neuron. Seven slices exercise the start-state checkpoints (every third slice)."""
    import dataclasses

    torch.manual_seed(0)
    model = ContinuedNet()
    ref = copy.deepcopy(model)
    x = (torch.rand(7, 2, 2, 6, 6) < 0.4).float()
    # (never_worse=False: on this small net, l3's region keeps the state it continues from to the end of the step)
    gm, summary = fxmemopt.optimize(model, (x,), return_summary=True, leaf_modules=(StatelessLIF,), level=1,
                                    never_worse=False)
    assert [r.anchor for r in summary.regions] == ["l1", "l2", "l3"]
    plan = dataclasses.replace(summary.plan, regions=tuple(
        dataclasses.replace(r, chunks=chunks, keep_prefix=keep_prefix) for r in summary.plan.regions))
    gm = fxmemopt.optimize(model, (x,), plan=plan, leaf_modules=(StatelessLIF,), never_worse=False)
    forms = {name: (m.chunks, m.initial_state) for name, m in gm.named_children() if name.startswith("ckpt_")}
    assert forms == {"ckpt_l1": (chunks, "absent"), "ckpt_l2": (chunks, "constant"), "ckpt_l3": (chunks, "body")}
    _exact(model, gm, x, ref)
    report = fxmemopt.compare_training_step(ref, gm, (x,))  # and again: nothing of the first step is left over
    assert report.ok, str(report)


def test_prefer_memory_slices_a_neuron_that_returns_its_state():
    torch.manual_seed(0)
    model = ContinuedNet()
    ref = copy.deepcopy(model)
    x = (torch.rand(8, 4, 2, 16, 16) < 0.4).float()
    gm, summary = fxmemopt.optimize(model, (x,), return_summary=True, leaf_modules=(StatelessLIF,), prefer="memory")
    assert any(r.chunks > 1 for r in summary.plan.regions), fxmemopt.explain(gm)
    _exact(model, gm, x, ref)


class WritesIntoPreallocated(nn.Module):
    """norse's ConvNet: each step's output written into a tensor made before the loop (``out[t] = v``)."""

    def __init__(self):
        super().__init__()
        self.fc, self.lif = nn.Linear(3, 4), StatelessLIF()

    def forward(self, x):
        out = torch.zeros(x.shape[0], x.shape[1], 4)
        before = out.sum()  # read before the writes: must still read zeros
        v = None
        for t in range(x.shape[0]):
            z, v = self.lif(self.fc(x[t]).unsqueeze(0), v)
            out[t] = z[0] + v
        return out * 2 + before


def test_item_assignment_into_a_traced_tensor_keeps_its_order():
    torch.manual_seed(0)
    model = WritesIntoPreallocated()
    ref = copy.deepcopy(model)
    x = torch.rand(5, 2, 3) * 3
    gm, summary = fxmemopt.optimize(model, (x,), return_summary=True, never_worse=False, leaf_modules=(StatelessLIF,))
    assert len(summary.regions) == 5 and not summary.failed_regions
    assert torch.equal(gm(x), ref(x))
    _exact(model, gm, x, ref)


class BufferNeuron(nn.Module):
    """snntorch style: the membrane lives in a non-persistent buffer that forward rebinds, reset lazily when the
    input's shape differs; a class-level registry of instances."""

    instances: list[nn.Module] = []

    def __init__(self):
        super().__init__()
        self.register_buffer("mem", torch.zeros(0), persistent=False)
        BufferNeuron.instances.append(self)

    def forward(self, x):
        if not self.mem.shape == x.shape:
            self.mem = torch.zeros_like(x)
        self.mem = 0.5 * self.mem + x
        spk = atan(self.mem - 1.0, 2.0)
        self.mem = self.mem - spk * self.mem
        return spk, self.mem


def test_state_in_a_rebound_buffer_over_an_outer_time_loop():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), _First(BufferNeuron()), nn.Conv2d(4, 4, 3),
                        _First(BufferNeuron()))
    ref = copy.deepcopy(net)
    T, x = 5, torch.rand(5, 2, 1, 10, 10) * 2
    gm, summary = fxmemopt.optimize(net, (x[0],), return_summary=True, calls_per_step=T)
    assert summary.stateful_modules == {"2.m": "updates mem", "4.m": "updates mem"}
    assert len(summary.regions) == 2 and not summary.failed_regions
    assert summary.calls_per_step == T and "5 calls of the module" in str(summary)
    assert summary.predicted_peak_before > summary.predicted_peak_after

    def run(m):
        for mod in m.modules():
            if isinstance(mod, BufferNeuron):
                mod.mem = torch.zeros(0)
        out = torch.stack([m(x[t]) for t in range(T)])
        out.sum().backward()
        return out

    torch.manual_seed(1)
    a = run(ref)
    torch.manual_seed(1)
    b = run(gm)
    assert torch.equal(a, b)
    for (n, p), q in zip(ref.named_parameters(), net.parameters()):
        assert torch.equal(p.grad, q.grad), n
    for p, q in zip(ref.buffers(), net.buffers()):
        assert torch.equal(p, q)


class _First(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x)[0]


def test_calls_per_step_is_validated():
    with pytest.raises(InvalidOptionError, match="calls_per_step"):
        fxmemopt.optimize(ShapeFlowNet(), (torch.rand(4, 2, 2, 8, 8),), calls_per_step=0)


class Flaky(nn.Module):
    """A layer whose forward is not a function of its inputs and state: a Python counter changes its output."""

    def __init__(self):
        super().__init__()
        self.calls = [0]  # kept in a list: invisible to state detection, so recomputation sees another value

    def forward(self, x):
        self.calls[0] += 1
        return x * 2 if self.calls[0] % 2 else x.relu()  # relu saves its result for backward, * 2 saves nothing


def test_a_region_that_fails_the_validation_step_is_unwrapped():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.n1 = nn.Conv2d(2, 4, 3, padding=1), LIFNode()
            self.flaky = Flaky()
            self.c2, self.n2 = nn.Conv2d(4, 4, 3, padding=1), LIFNode()

        def forward(self, x):
            y = self.n1(self.c1(x.flatten(0, 1)).unflatten(0, x.shape[:2]))
            z = self.c2(y.flatten(0, 1)).unflatten(0, x.shape[:2])
            return self.n2(self.flaky(z)).sum((0, 2, 3, 4))

    model = Net()
    x = torch.rand(3, 2, 2, 6, 6)
    with pytest.warns(fxmemopt.FxMemOptWarning, match="failed a training step"):
        gm, summary = fxmemopt.optimize(model, (x,), return_summary=True, leaf_modules=(Flaky,))
    assert [r for r, _ in summary.failed_regions] == ["ckpt_n2"]
    assert "RecomputationMismatchError" in summary.failed_regions[0][1]
    assert [r.anchor for r in summary.regions] == ["n1"]
    assert "left unoptimized ckpt_n2" in str(summary)
    gm(x).sum().backward()  # the returned module trains


class ResetsInForward(nn.Module):
    """snntorch's ``mem1 = self.lif1.init_leaky()`` at the top of ``forward``: traced code rebinds a neuron's buffer,
    which the optimized module must do on every call (a graph node), not only while tracing."""

    def __init__(self):
        super().__init__()
        self.fc1, self.n1 = nn.Linear(6, 8), BufferNeuron()
        self.fc2, self.n2 = nn.Linear(8, 4), BufferNeuron()

    def forward(self, x):
        self.n1.mem = torch.zeros_like(self.n1.mem)
        self.n2.mem = torch.zeros_like(self.n2.mem)
        out = []
        for t in range(x.size(0)):
            s1, _ = self.n1(self.fc1(x[t]))
            s2, _ = self.n2(self.fc2(s1))
            out.append(s2)
        return torch.stack(out)


def test_state_assigned_by_traced_code_is_assigned_on_every_call():
    torch.manual_seed(0)
    model = ResetsInForward()
    ref = copy.deepcopy(model)
    x = torch.rand(4, 3, 6) * 2
    gm, summary = fxmemopt.optimize(model, (x,), return_summary=True)
    # regions around both neurons' calls (how many of the 8 per-call regions pay for themselves is the cost model's)
    assert "set_module_state" in gm.code and {r.anchor for r in summary.regions} == {"n1", "n2"}
    for step in range(2):  # the second step starts from the reset, as the model's own does
        report = fxmemopt.compare_training_step(ref, gm, (x,))
        assert report.ok, f"step {step}: {report}"


class _EveryStep(nn.Module):
    """A loop over time indexing steps of its input (norse's ``Lift``, snntorch loops in ``forward``)."""

    def __init__(self, steps: tuple[int, ...] | None = None, scale: float = 1.0, linear: bool = True) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3) if linear else None
        self.steps, self.scale = steps, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = range(x.shape[0]) if self.steps is None else self.steps
        out = []
        for t in steps:
            xt = x[t]
            out.append(self.scale * xt if self.lin is None else self.lin(xt) + self.scale * xt)
        return torch.stack(out)


def _input_grad(module: nn.Module, x: torch.Tensor, upstream: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    xi = x.clone().requires_grad_()
    out = module(xi)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)) if upstream is None \
        else torch.full(out.shape, upstream)
    (out * weight).sum().backward()
    return out.detach(), xi.grad


@pytest.mark.parametrize("steps", [None, (0, 2), (1,)])
@pytest.mark.parametrize("upstream", [None, 0.0])
def test_a_loop_over_time_is_unbound_once_with_bitwise_equal_gradients(steps, upstream):
    """``x[0] .. x[T-1]`` (distinct steps, shape reads aside) become one ``unbind_steps``: one stacked gradient in
    backward instead of one full-size zero-filled tensor per step, the input's gradient bitwise the same. With a
    zero upstream gradient and ``scale=-1`` every step gradient is -0.0: autograd's sum of two or more select
    gradients makes it +0.0, and so does the rewrite; one select alone has no sum and is left as it is."""
    from fxmemopt.analysis.trace import make_graph_module

    torch.manual_seed(0)
    model = _EveryStep(steps, scale=-1.0, linear=upstream is None)
    x = torch.randn(4, 2, 3)
    cap = trace(model, (x,))
    assert sum("unbind_steps" in str(n.target) for n in cap.graph.nodes) == (0 if steps == (1,) else 1)
    gm = make_graph_module(model, cap.graph, "M", extra=cap.constants)
    (out_a, g_a), (out_b, g_b) = (_input_grad(m, x, upstream) for m in (model, gm))
    assert torch.equal(out_a.view(torch.int32), out_b.view(torch.int32))
    assert torch.equal(g_a.view(torch.int32), g_b.view(torch.int32))
    if upstream == 0.0:
        negative_zeros = int((g_a.view(torch.int32) == torch.tensor(-0.0).view(torch.int32)).sum())
        assert negative_zeros == (6 if steps == (1,) else 0)  # one select: its step's -0.0 survive


class _WritesSteps(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for t in range(x.shape[0]):
            xt = x[t]
            xt.mul_(2)  # written in place: an autograd Function's views may not be, so these selects stay
            out.append(xt)
        return torch.stack(out)


def test_steps_written_in_place_are_left_as_selects():
    from fxmemopt.analysis.trace import make_graph_module

    x = torch.rand(3, 2)
    cap = trace(_WritesSteps(), (x.clone(),))
    assert not any("unbind_steps" in str(n.target) for n in cap.graph.nodes)
    gm = make_graph_module(_WritesSteps(), cap.graph, "M", extra=cap.constants)
    assert torch.equal(gm(x.clone()), _WritesSteps()(x.clone()))
