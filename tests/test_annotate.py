"""Tests of value-set inference (:mod:`fxmemopt.analysis.annotate`) and of the packing widths it leads to."""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxmemopt
from fxmemopt.analysis.annotate import AnnotatedGraph, NodeInfo, ValueSet, annotate, observe_value_set
from fxmemopt.analysis.state import probe
from fxmemopt.analysis.trace import make_graph_module, trace
from fxmemopt.runtime.packing import bits_for_max
from fxmemopt.snn import IFNode, SeqToANNContainer

T, N, C, H, W = 2, 2, 2, 4, 4


def spike_input(seed: int = 0) -> torch.Tensor:
    """A real-valued [T, N, C, H, W] input that makes IFNodes both fire and stay silent."""
    return torch.rand(T, N, C, H, W, generator=torch.Generator().manual_seed(seed)) * 3


def run_annotate(model: nn.Module, *inputs: object) -> AnnotatedGraph:
    """The pipeline of fxmemopt.optimize up to annotate: probe -> trace -> make_graph_module -> annotate."""
    found = probe(model, inputs)
    stateful = dict(found.stateful)
    cap = trace(model, inputs, stateful_paths=stateful)
    graph, constants = cap.graph, cap.constants
    gm = make_graph_module(model, graph, type(model).__name__, extra=constants)
    return annotate(gm, inputs, stateful)


def outputs_of(g: AnnotatedGraph) -> list[NodeInfo]:
    """The infos of the nodes the graph's output reads (in order; the models below return distinct nodes)."""
    out = g[g.order[-1]]
    assert out.op == "output"
    return [g[name] for name in out.inputs]


def only_output(g: AnnotatedGraph) -> NodeInfo:
    (info,) = outputs_of(g)
    return info


# ------------------------------------------------------------------------------------------------------------
# ValueSet basics
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("vs", "text"), [
    (ValueSet(1), "{0,1}"), (ValueSet(0), "{0..0}"), (ValueSet(2), "{0..2}"), (ValueSet(255), "{0..255}"),
    (ValueSet(None), "real"), (ValueSet(None, unknown=True), "unknown"),
])
def test_value_set_str(vs, text):
    assert str(vs) == text


@pytest.mark.parametrize(("a", "b", "joined"), [
    (ValueSet(1), ValueSet(1), "{0,1}"), (ValueSet(1), ValueSet(3), "{0..3}"),
    (ValueSet(0), ValueSet(2), "{0..2}"), (ValueSet(1), ValueSet(None), "real"),
    (ValueSet(None), ValueSet(None), "real"), (ValueSet(1), ValueSet(None, unknown=True), "unknown"),
    (ValueSet(None), ValueSet(None, unknown=True), "unknown"),
])
def test_value_set_join(a, b, joined):
    assert str(a.join(b)) == joined
    assert str(b.join(a)) == joined


@pytest.mark.parametrize(("value", "text"), [
    (torch.tensor([0.0, 1.0, 1.0]), "{0,1}"),
    (torch.tensor([0.0, 2.0]), "{0..2}"),
    (torch.zeros(3), "{0..0}"),
    (torch.zeros(0), "{0..0}"),
    (torch.tensor([-0.0, 1.0]), "{-0,0,1}"),  # sinabs' MultiSpike: (v > 0) * trunc(v / theta) is -0.0 below 0
    (torch.tensor([-0.0, 0.5]), "real"),
    ((torch.tensor([-0.0, 2.0]), torch.tensor([1.0])), "{-0,0..2}"),
    (torch.tensor([0.5]), "real"),
    (torch.tensor([float("nan")]), "real"),
    (torch.tensor([-1, 0]), "real"),
    (torch.tensor([256]), "real"),
    (torch.tensor([255], dtype=torch.uint8), "{0..255}"),
    (torch.tensor([True, False]), "{0,1}"),
    ((torch.tensor([1.0]), torch.tensor([3.0])), "{0..3}"),
    ((torch.tensor([1.0]), torch.tensor([0.5])), "real"),
    ([torch.tensor([1.0]), {"a": torch.tensor([2])}], "{0..2}"),
    (3, "real"),
    (None, "real"),
])
def test_observe_value_set(value, text):
    assert str(observe_value_set(value)) == text


# ------------------------------------------------------------------------------------------------------------
# Static rules on spike tensors: one table, one model per row
# ------------------------------------------------------------------------------------------------------------


class SpikeOps(nn.Module):
    """Three IF neurons fed from one input; returns ``fn(self, s1, s2, s3, x)`` (traced through by fx)."""

    def __init__(self, fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.fn = fn
        self.n1, self.n2, self.n3 = IFNode(), IFNode(), IFNode()
        self.pool = nn.MaxPool2d(2)
        self.apool = nn.AvgPool2d(2)
        self.conv = nn.Conv2d(C, 3, 3, padding=1)
        self.linear = nn.Linear(W, 3)
        self.bn = nn.BatchNorm2d(C)
        self.drop = nn.Dropout(0.5)
        self.flat = nn.Flatten(2)
        self.ident = nn.Identity()
        self.relu = nn.ReLU()
        self.seq_conv = SeqToANNContainer(nn.Conv2d(C, C, 3, padding=1), nn.BatchNorm2d(C))
        self.seq_pool = SeqToANNContainer(nn.MaxPool2d(2))

    def forward(self, x):
        s1 = self.n1(x)
        s2 = self.n2(x * 0.7)
        s3 = self.n3(x * 1.3)
        return self.fn(self, s1, s2, s3, x)


BINARY_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "neuron": lambda m, a, b, c, x: a,
    "mul": lambda m, a, b, c, x: a * b,
    "torch.mul": lambda m, a, b, c, x: torch.mul(a, b),
    "one_minus": lambda m, a, b, c, x: 1 - a,
    "rsub": lambda m, a, b, c, x: torch.rsub(a, 1),
    "logical_and": lambda m, a, b, c, x: torch.logical_and(a, b),
    "reshape": lambda m, a, b, c, x: a.reshape(T * N, -1),
    "torch.reshape": lambda m, a, b, c, x: torch.reshape(a, (-1,)),
    "view": lambda m, a, b, c, x: a.view(T, N, -1),
    "flatten_method": lambda m, a, b, c, x: a.flatten(2),
    "torch.flatten": lambda m, a, b, c, x: torch.flatten(a, 1),
    "nn.Flatten": lambda m, a, b, c, x: m.flat(a),
    "unflatten": lambda m, a, b, c, x: a.flatten(0, 1).unflatten(0, (T, N)),
    "permute": lambda m, a, b, c, x: a.permute(1, 0, 2, 4, 3),
    "torch.permute": lambda m, a, b, c, x: torch.permute(a, (4, 3, 2, 1, 0)),
    "transpose": lambda m, a, b, c, x: a.transpose(0, 1),
    "torch.transpose": lambda m, a, b, c, x: torch.transpose(a, 2, 3),
    "getitem_int": lambda m, a, b, c, x: a[0],
    "getitem_slice": lambda m, a, b, c, x: a[:, 1:, ..., ::2],
    "getitem_chain": lambda m, a, b, c, x: a[1][0],
    "cat": lambda m, a, b, c, x: torch.cat([a, b]),
    "cat_dim_kw": lambda m, a, b, c, x: torch.cat([a, b, c], dim=3),
    "cat_dim0": lambda m, a, b, c, x: torch.cat((a, b), 0),
    "stack": lambda m, a, b, c, x: torch.stack([a, b]),
    "stack_dim_kw": lambda m, a, b, c, x: torch.stack([a, b], dim=4),
    "F.max_pool2d": lambda m, a, b, c, x: F.max_pool2d(a.flatten(0, 1), 2),
    "F.max_pool2d_kw": lambda m, a, b, c, x: F.max_pool2d(a.flatten(0, 1), kernel_size=3, stride=1,
                                                          padding=1),
    "nn.MaxPool2d": lambda m, a, b, c, x: m.pool(a.flatten(0, 1)),
    "seq_maxpool": lambda m, a, b, c, x: m.seq_pool(a),
    "adaptive_max_pool2d": lambda m, a, b, c, x: F.adaptive_max_pool2d(a.flatten(0, 1), 1),
    "maximum": lambda m, a, b, c, x: torch.maximum(a, b),
    "relu": lambda m, a, b, c, x: F.relu(a),
    "nn.ReLU": lambda m, a, b, c, x: m.relu(a),
    "nn.Identity": lambda m, a, b, c, x: m.ident(a),
    "unsqueeze_squeeze": lambda m, a, b, c, x: a.unsqueeze(0).squeeze(0),
    "contiguous_clone_detach": lambda m, a, b, c, x: a.transpose(0, 1).contiguous().clone().detach(),
    "chunk_getitem": lambda m, a, b, c, x: torch.chunk(a, 2, dim=1)[1],
    "flip_roll": lambda m, a, b, c, x: a.flip(0).roll(1, 2),
    "to_float_half": lambda m, a, b, c, x: a.half().float(),
    "expand": lambda m, a, b, c, x: a[:1].expand(3, N, C, H, W),
}

SMALL_INT_OPS: dict[str, tuple[Callable[..., torch.Tensor], str]] = {
    "add2": (lambda m, a, b, c, x: a + b, "{0..2}"),
    "add2_same": (lambda m, a, b, c, x: a + a, "{0..2}"),
    "torch.add": (lambda m, a, b, c, x: torch.add(a, b), "{0..2}"),
    "add3": (lambda m, a, b, c, x: a + b + c, "{0..3}"),
    "add3_nested": (lambda m, a, b, c, x: a + (b + c), "{0..3}"),
    "add_const": (lambda m, a, b, c, x: a + 1, "{0..2}"),
    "mul_const": (lambda m, a, b, c, x: a * 2, "{0..2}"),
    "two_minus_sum": (lambda m, a, b, c, x: 2 - (a + b), "{0..2}"),
    "sum_then_reshape": (lambda m, a, b, c, x: (a + b).flatten(0, 1), "{0..2}"),
    "sum_then_pool": (lambda m, a, b, c, x: F.max_pool2d((a + b + c).flatten(0, 1), 2), "{0..3}"),
    "cat_of_sum": (lambda m, a, b, c, x: torch.cat([a + b, c]), "{0..2}"),
}

REAL_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "placeholder": lambda m, a, b, c, x: x,
    "scaled_input": lambda m, a, b, c, x: x * 0.7,
    "F.avg_pool2d": lambda m, a, b, c, x: F.avg_pool2d(a.flatten(0, 1), 2),
    "nn.AvgPool2d": lambda m, a, b, c, x: m.apool(a.flatten(0, 1)),
    "conv": lambda m, a, b, c, x: m.conv(a.flatten(0, 1)),
    "linear": lambda m, a, b, c, x: m.linear(a),
    "batchnorm": lambda m, a, b, c, x: m.bn(a.flatten(0, 1)),
    "seq_conv_bn": lambda m, a, b, c, x: m.seq_conv(a),
    "nn.Dropout": lambda m, a, b, c, x: m.drop(a),
    "F.dropout": lambda m, a, b, c, x: F.dropout(a, 0.5, training=True),
    "sub": lambda m, a, b, c, x: a - b,
    "one_minus_sum": lambda m, a, b, c, x: 1 - (a + b),
    "float_one_minus": lambda m, a, b, c, x: 1.0 - a,
    "mul_half": lambda m, a, b, c, x: a * 0.5,
    "add_half": lambda m, a, b, c, x: a + 0.5,
    "mul_negative": lambda m, a, b, c, x: a * -1,
    "div": lambda m, a, b, c, x: a / 2,
    "mean": lambda m, a, b, c, x: a.mean(0),
    "sum": lambda m, a, b, c, x: a.sum(0),
    "sigmoid": lambda m, a, b, c, x: torch.sigmoid(a),
    "spike_plus_input": lambda m, a, b, c, x: a + x,
    "spike_times_input": lambda m, a, b, c, x: a * x,
    "cat_with_real": lambda m, a, b, c, x: torch.cat([a, x]),
    "maximum_with_real": lambda m, a, b, c, x: torch.maximum(a, x),
    "relu_of_real": lambda m, a, b, c, x: F.relu(x - 1),
    "reshape_of_real": lambda m, a, b, c, x: x.flatten(0, 1),
    "pool_of_real": lambda m, a, b, c, x: F.max_pool2d(x.flatten(0, 1), 2),
}


def _decided(fn: Callable[..., torch.Tensor], seed: int = 0) -> NodeInfo:
    model = SpikeOps(fn)
    return only_output(run_annotate(model, spike_input(seed)))


@pytest.mark.parametrize("name", list(BINARY_OPS))
def test_binary_preserving_ops(name):
    info = _decided(BINARY_OPS[name])
    assert str(info.value_set) == "{0,1}", (name, info)
    assert str(info.static) == "{0,1}"
    assert info.observed.is_int and info.observed.hi <= 1


@pytest.mark.parametrize("name", list(SMALL_INT_OPS))
def test_small_integer_ops(name):
    fn, expected = SMALL_INT_OPS[name]
    info = _decided(fn)
    assert str(info.value_set) == expected, (name, info)
    assert info.static == info.value_set
    assert info.observed.is_int and info.observed.hi <= info.value_set.hi


@pytest.mark.parametrize("name", list(REAL_OPS))
def test_real_ops(name):
    info = _decided(REAL_OPS[name])
    assert str(info.value_set) == "real", (name, info)


@pytest.mark.parametrize("name", ["sum", "mean", "sigmoid", "spike_times_input", "div"])
def test_ops_without_rule_are_statically_real(name):
    # no static rule means static "real", which the example never upgrades (see the sum-over-time test below)
    info = _decided(REAL_OPS[name])
    assert str(info.static) == "real"
    assert str(info.value_set) == "real"


def test_sum_over_time_observed_small_int_stays_real():
    info = _decided(REAL_OPS["sum"])
    assert info.observed.is_int and info.observed.hi <= T
    assert not info.value_set.is_int


def test_neuron_node_facts():
    g = run_annotate(SpikeOps(BINARY_OPS["neuron"]), spike_input())
    neurons = [g[n] for n in g.order if g[n].op == "call_module" and g[n].module_type == "IFNode"]
    assert [i.target for i in neurons] == ["n1", "n2", "n3"]
    for info in neurons:
        assert info.stateful
        assert str(info.static) == str(info.value_set) == "{0,1}"
        assert info.observed == ValueSet(1)  # the example fires and stays silent
        assert info.is_tensor and info.shape == (T, N, C, H, W) and info.dtype == "float32"
        assert info.nbytes == T * N * C * H * W * 4
    for name in g.order:  # only the neurons are stateful
        assert g[name].stateful == (g[name].module_type == "IFNode")


def test_meta_and_users_consistent():
    g = run_annotate(SpikeOps(SMALL_INT_OPS["add3"][0]), spike_input())
    assert set(g.order) == set(g.nodes)
    for name in g.order:
        assert g[name].name == name
        for i in g[name].inputs:
            assert name in g.users[i]
            assert g.order.index(i) < g.order.index(name)
    add_nodes = [g[n] for n in g.order if g[n].target == "_operator.add"]
    assert [str(i.value_set) for i in add_nodes] == ["{0..2}", "{0..3}"]


# Regression (found by these tests): the positional ``dim`` of cat/stack was joined as if it were a value set.
@pytest.mark.parametrize(("name", "fn"), [
    pytest.param("cat_dim2", lambda m, a, b, c, x: torch.cat([a, b], 2)),
    pytest.param("cat_dim-1", lambda m, a, b, c, x: torch.cat([a, b], -1)),
    pytest.param("stack_dim3", lambda m, a, b, c, x: torch.stack([a, b], 3)),
    pytest.param("cat_dim1", lambda m, a, b, c, x: torch.cat([a, b], 1)),
])
def test_cat_stack_positional_dim_keeps_binary(name, fn):
    info = _decided(fn)
    assert str(info.value_set) == "{0,1}", info


def test_cat_positional_dim_packs_at_one_bit():
    class CatNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.n1, self.n2, self.n3, self.n4 = IFNode(), IFNode(), IFNode(), IFNode()

        def forward(self, x):
            s = torch.cat([self.n1(x), self.n2(x * 0.7)], 2)
            return self.n3(s * 0.9) + self.n4(s * 1.1)

    # never_worse=False: the region stays even if the prediction says it does not pay on a net this small
    _, summary = fxmemopt.optimize(CatNet(), (spike_input(),), return_summary=True, never_worse=False)
    cat_inputs = [i for r in summary.regions for i in r.inputs if i.node.startswith("cat")]
    assert cat_inputs
    assert all(i.bits == 1 for i in cat_inputs), [(i.node, i.value_set, i.bits) for i in cat_inputs]


class TwoInputs(nn.Module):
    """``fn(n1(x), n2(y), y)``: with an all-zero ``y`` example, n2 never fires."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.n1, self.n2 = IFNode(), IFNode()

    def forward(self, x, y):
        return self.fn(self.n1(x), self.n2(y), y)


def test_binary_torch_max_with_float_input_is_real():
    y = torch.zeros(T, N, C, H, W)  # a float input: data, whatever the example holds
    info = only_output(run_annotate(TwoInputs(lambda a, b, y: torch.max(a, y)), spike_input(), y))
    assert str(info.value_set) == "real", info


def test_binary_torch_maximum_with_float_input_is_real():
    # the same computation through torch.maximum is handled correctly (join with the real placeholder)
    y = torch.zeros(T, N, C, H, W)
    info = only_output(run_annotate(TwoInputs(lambda a, b, y: torch.maximum(a, y)), spike_input(), y))
    assert str(info.value_set) == "real"


def test_torch_add_alpha_not_underestimated():
    silent = torch.zeros(T, N, C, H, W)  # n2 never fires on this example
    model = TwoInputs(lambda a, b, y: torch.add(a, b, alpha=3))
    info = only_output(run_annotate(model, spike_input(), silent))
    assert info.observed == ValueSet(1)  # b is all zeros on the example
    assert not info.value_set.is_int or info.value_set.hi >= 4, info  # a + 3 * b is in {0..4}


# ------------------------------------------------------------------------------------------------------------
# Placeholders and "static real wins"
# ------------------------------------------------------------------------------------------------------------


class Passthrough(nn.Module):
    def forward(self, x):
        return x.flatten()


@pytest.mark.parametrize(("value", "expected"), [
    (torch.zeros(4, 3), "real"),
    (torch.ones(4, 3), "real"),
    (torch.tensor([0.0, 1.0, 1.0]), "real"),
    (torch.tensor([0.0, 1.0], dtype=torch.float64), "real"),
    (torch.tensor([0.0, 1.0], dtype=torch.float16), "real"),
    (torch.tensor([0.0, 1.0], dtype=torch.bfloat16), "real"),
    (torch.rand(4, 3), "real"),
    (torch.tensor([True, False, True]), "{0,1}"),
    (torch.tensor([[True], [True]]), "{0,1}"),
    (torch.tensor([0, 1, 2, 3, 4, 5]), "{0..5}"),
    (torch.arange(6, dtype=torch.int32).view(2, 3), "{0..5}"),
    (torch.tensor([3, 0], dtype=torch.uint8), "{0..3}"),
    (torch.tensor([255, 0], dtype=torch.uint8), "{0..255}"),
    (torch.tensor([0, 256]), "real"),
    (torch.tensor([-1, 0, 1]), "real"),
    (torch.zeros(3, dtype=torch.int64), "real"),  # all zeros say nothing about later values: not packed
])
def test_placeholder_value_sets(value, expected):
    g = run_annotate(Passthrough(), value)
    x = g[g.order[0]]
    assert x.op == "placeholder"
    assert str(x.static) == "unknown"
    assert str(x.value_set) == expected
    assert str(only_output(g).value_set) == expected  # flatten keeps it


def test_float_placeholder_observed_but_not_used():
    g = run_annotate(Passthrough(), torch.ones(5))
    x = g[g.order[0]]
    assert x.observed == ValueSet(1)
    assert str(x.value_set) == "real"


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.lin = nn.Linear(4, 2, bias=False)

    def forward(self, x):
        return self.conv(x), self.lin(x), x.float() * 2


def test_zero_example_does_not_make_conv_binary():
    x = torch.zeros(1, 2, 4, 4)
    model = ConvNet()
    conv, lin, scaled = outputs_of(run_annotate(model, x))
    for info in (conv, lin):
        assert info.observed == ValueSet(0)  # the example is all zeros ...
        assert str(info.static) == "real"
        assert str(info.value_set) == "real"  # ... but a static "real" is never upgraded
    assert str(scaled.value_set) == "real"  # float placeholder is real, so is any product


class IntInputNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)

    def forward(self, x):
        xf = x.float()
        return xf, self.conv(xf), xf + xf


@pytest.mark.parametrize(("x", "cast", "conv", "double"), [
    (torch.zeros(1, 2, 4, 4, dtype=torch.int64), "real", "real", "real"),  # all zeros: no evidence, not packed
    (torch.arange(32).remainder(6).view(1, 2, 4, 4), "{0..5}", "real", "{0..10}"),
    (torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(0)) > 0.5, "{0,1}", "real", "{0..2}"),
    (torch.full((1, 2, 4, 4), 200, dtype=torch.uint8), "{0..200}", "real", "real"),  # 400 > 255: real
])
def test_integer_placeholder_propagates(x, cast, conv, double):
    xf, c, d = outputs_of(run_annotate(IntInputNet(), x))
    assert (str(xf.value_set), str(c.value_set), str(d.value_set)) == (cast, conv, double)


# ------------------------------------------------------------------------------------------------------------
# Stateful modules: spiking ones (v_threshold) claim {0,1}, which the example must confirm; others are
# decided by the example
# ------------------------------------------------------------------------------------------------------------


class GradedNeuron(nn.Module):
    """MemoryModule-like (a ``_memories`` dict and ``v_threshold``) but emits graded spikes 0 or 2."""

    def __init__(self, scale: float = 2.0):
        super().__init__()
        self._memories = {"v": 0.0}
        self.v_threshold = 1.0
        self.scale = scale

    def forward(self, x):
        return (x >= self.v_threshold).float() * self.scale


class CounterModule(nn.Module):
    """Stateful (``_memories``) but no threshold: static inference has no opinion."""

    def __init__(self):
        super().__init__()
        self._memories = {"count": 0}

    def forward(self, x):
        self._memories["count"] = self._memories["count"] + 1
        return (x >= 1.0).float() * 2


class StatefulNet(nn.Module):
    def __init__(self, node: nn.Module):
        super().__init__()
        self.node = node
        self.after = IFNode()

    def forward(self, x):
        s = self.node(x)
        return s, self.after(s * 0.9)


@pytest.mark.parametrize(("node", "static", "observed", "decided"), [
    (IFNode(), "{0,1}", "{0,1}", "{0,1}"),
    (GradedNeuron(2.0), "{0,1}", "{0..2}", "real"),  # the example disagrees with the spiking claim
    (GradedNeuron(0.5), "{0,1}", "real", "real"),
    (GradedNeuron(1.0), "{0,1}", "{0,1}", "{0,1}"),
    (CounterModule(), "unknown", "{0..2}", "{0..2}"),  # unknown resolved by the example
], ids=["if", "graded2", "graded_half", "graded1", "counter"])
def test_stateful_module_value_sets(node, static, observed, decided):
    g = run_annotate(StatefulNet(node), spike_input())
    info = g[next(n for n in g.order if g[n].op == "call_module" and g[n].target == "node")]
    assert info.stateful
    assert (str(info.static), str(info.observed), str(info.value_set)) == (static, observed, decided)
    after = g[next(n for n in g.order if g[n].target == "after")]
    assert str(after.value_set) == "{0,1}"


def test_graded_neuron_region_input_not_packed():
    model = StatefulNet(GradedNeuron(2.0))
    # (never_worse=False: at this size neither region lowers the peak, and the default would leave both out)
    _, summary = fxmemopt.optimize(model, (spike_input(),), return_summary=True, never_worse=False)
    by_anchor = {r.anchor: r for r in summary.regions}
    assert set(by_anchor) == {"node", "after"}
    (inp,) = by_anchor["after"].inputs
    assert (inp.node, inp.value_set, inp.bits) == ("node", "real", 0)


# ------------------------------------------------------------------------------------------------------------
# Planned packing widths of region inputs (fxmemopt.optimize summary)
# ------------------------------------------------------------------------------------------------------------


def _block(ci: int, co: int) -> SeqToANNContainer:
    return SeqToANNContainer(nn.Conv2d(ci, co, 3, padding=1), nn.BatchNorm2d(co))


class SEWNet(nn.Module):
    """n1 -> n2, ADD of their spikes (or of three neurons) read by two later regions: the sum is an input of both
    (the first region does not take the sum in, which would give it a second output)."""

    def __init__(self, three: bool = False, cast: bool = False):
        super().__init__()
        self.three, self.cast = three, cast
        self.c1, self.n1 = _block(C, 4), IFNode()
        self.c2, self.n2 = _block(4, 4), IFNode()
        self.c5, self.n5 = _block(4, 4), IFNode()
        self.c3, self.n3 = _block(4, 4), IFNode()
        self.c4, self.n4 = _block(4, 4), IFNode()

    def forward(self, x):
        if self.cast:
            x = x.float()
        s1 = self.n1(self.c1(x))
        s2 = self.n2(self.c2(s1))
        a = s1 + s2
        if self.three:
            a = a + self.n5(self.c5(s1))
        return self.n3(self.c3(a)) + self.n4(self.c4(a))


def _hi(text: str) -> int | None:
    """Upper bound of a printed value set: "{0,1}" -> 1, "{0..k}" -> k, "real" -> None."""
    if text == "real":
        return None
    return 1 if text == "{0,1}" else int(text[len("{0.."):-1])


_X_INT = torch.randint(0, 6, (T, N, C, H, W), generator=torch.Generator().manual_seed(1))
_X_INT[0, 0, 0, 0, 0] = 5


@pytest.mark.parametrize(("three", "x", "expected"), [
    (False, spike_input(), {
        "n1": [("x", "real", 0)], "n2": [("n1", "{0,1}", 1)], "n3": [("add", "{0..2}", 2)],
        "n4": [("add", "{0..2}", 2)]}),
    (True, spike_input(), {
        "n1": [("x", "real", 0)], "n2": [("n1", "{0,1}", 1)],
        "n3": [("add_1", "{0..3}", 2)], "n5": [("n1", "{0,1}", 1)],
        "n4": [("add_1", "{0..3}", 2)]}),
    (False, _X_INT, {
        "n1": [("x", "{0..5}", 8)], "n2": [("n1", "{0,1}", 1)],
        "n3": [("add", "{0..2}", 2)], "n4": [("add", "{0..2}", 2)]}),
    (False, spike_input() > 1.5, {
        "n1": [("x", "{0,1}", 1)], "n2": [("n1", "{0,1}", 1)], "n3": [("add", "{0..2}", 2)],
        "n4": [("add", "{0..2}", 2)]}),
], ids=["float_in_add2", "float_in_add3", "int_in", "bool_in"])
def test_region_input_bits(three, x, expected):
    model = SEWNet(three=three, cast=x.dtype != torch.float32)
    _, summary = fxmemopt.optimize(model, (x,), return_summary=True)
    got = {r.anchor: [(i.node, i.value_set, i.bits) for i in r.inputs] for r in summary.regions}
    assert got == expected
    for r, rp in zip(summary.regions, summary.plan.regions):
        # the report lists tensor inputs; the plan also has a width (0) for each metadata input (x.shape[0] ...)
        extra = len(rp.pack_bits) - len(r.inputs)
        assert extra >= 0 and tuple(b for b in rp.pack_bits if b) == tuple(i.bits for i in r.inputs if i.bits)
        for i in r.inputs:
            numel = 1
            for s in i.shape:
                numel *= s
            assert i.full_bytes == numel * (x.element_size() if i.node == "x" else 4)
            assert i.stored_bytes == ((numel * i.bits + 7) // 8 if i.bits else i.full_bytes)
            assert i.bits == bits_for_max(_hi(i.value_set))
    assert summary.packed_input_count == sum(1 for r in got.values() for _, _, b in r if b)


@pytest.mark.parametrize("x", [spike_input(), _X_INT], ids=["float", "int"])
def test_compress_false_gives_zero_bits(x):
    model = SEWNet(three=True, cast=x.dtype != torch.float32)
    _, on = fxmemopt.optimize(model, (x,), return_summary=True)
    _, off = fxmemopt.optimize(model, (x,), compress=False, return_summary=True)
    assert [r.anchor for r in off.regions] == [r.anchor for r in on.regions]
    assert all(i.bits == 0 for r in off.regions for i in r.inputs)
    assert all(b == 0 for rp in off.plan.regions for b in rp.pack_bits)
    assert off.packed_input_count == 0
    # the value sets are still inferred; only the storage differs
    assert [[i.value_set for i in r.inputs] for r in off.regions] == [[i.value_set for i in r.inputs]
                                                                        for r in on.regions]
    assert any(i.bits for r in on.regions for i in r.inputs)
    for r in off.regions:
        for i in r.inputs:
            assert i.stored_bytes == i.full_bytes
            if i.value_set != "real":
                assert "compress=False" in i.reason


# ------------------------------------------------------------------------------------------------------------
# Annotating leaves the model untouched
# ------------------------------------------------------------------------------------------------------------


class StateNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = _block(C, 4)
        self.n1 = IFNode()
        self.drop = nn.Dropout(0.3)
        self.c2 = _block(4, 4)
        self.n2 = IFNode(v_reset=None)

    def forward(self, x):
        return self.n2(self.c2(self.drop(self.n1(self.c1(x)))))


def _model_state(model: nn.Module) -> dict[str, object]:
    return {
        "memories": {p: dict(m._memories) for p, m in model.named_modules() if hasattr(m, "_memories")},
        "buffers": {k: (b, b.clone()) for k, b in model.named_buffers()},
        "params": {k: (p, p.detach().clone(), p.grad) for k, p in model.named_parameters()},
        "training": {p: m.training for p, m in model.named_modules()},
        "rng": torch.get_rng_state(),
    }


def _assert_same_state(before: dict, after: dict) -> None:
    assert before["memories"].keys() == after["memories"].keys()
    for path, mem in before["memories"].items():
        now = after["memories"][path]
        assert mem.keys() == now.keys(), path
        for k, v in mem.items():
            assert now[k] is v, (path, k)  # the very same object (float or tensor): nothing rebound
    assert before["buffers"].keys() == after["buffers"].keys()
    for k, (obj, value) in before["buffers"].items():
        now_obj, now_value = after["buffers"][k]
        assert now_obj is obj, k
        assert torch.equal(now_value, value), k
    for k, (obj, value, grad) in before["params"].items():
        now_obj, now_value, now_grad = after["params"][k]
        assert now_obj is obj and torch.equal(now_value, value) and now_grad is grad, k
    assert before["training"] == after["training"]
    assert torch.equal(before["rng"], after["rng"])


@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "after_a_forward"])
def test_optimize_leaves_model_untouched(warm):
    torch.manual_seed(0)
    model = StateNet().train()
    x = spike_input()
    if warm:  # neurons hold tensor state, BN stats moved, num_batches_tracked == 1, grads exist
        model(x).sum().backward()
        assert isinstance(model.n1.v, torch.Tensor)
    before = _model_state(model)
    nbt = model.c1[1].num_batches_tracked.item()
    fxmemopt.optimize(model, (x,), return_summary=True)
    after = _model_state(model)
    _assert_same_state(before, after)
    assert model.c1[1].num_batches_tracked.item() == nbt == int(warm)
    if not warm:
        assert model.n1._memories == {"v": 0.0} and model.n2._memories == {"v": 0.0}


def test_annotate_alone_leaves_model_untouched():
    torch.manual_seed(1)
    model = StateNet().train()
    x = spike_input(3)
    found = probe(model, (x,))
    stateful = dict(found.stateful)
    assert set(stateful) == {"n1", "n2"}
    cap = trace(model, (x,), stateful_paths=stateful)
    graph, constants = cap.graph, cap.constants
    gm = make_graph_module(model, graph, "StateNet", extra=constants)
    before = _model_state(model)
    g = annotate(gm, (x,), stateful)
    _assert_same_state(before, _model_state(model))
    # the records are also in node.meta
    for node in gm.graph.nodes:
        assert node.meta["fxmemopt"] is g[node.name]
    drop = g[next(n for n in g.order if g[n].target == "drop")]
    assert str(drop.value_set) == "real"


def test_annotate_runs_without_grad_and_keeps_training_flags():
    model = StateNet().train()
    model.c1[1].eval()  # a mixed setting must survive
    flags = {p: m.training for p, m in model.named_modules()}
    g = run_annotate(model, spike_input())
    assert {p: m.training for p, m in model.named_modules()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert str(g[next(n for n in g.order if g[n].target == "n1")].value_set) == "{0,1}"


def test_deepcopy_model_gives_same_annotation():
    model = SpikeOps(SMALL_INT_OPS["add3"][0])
    x = spike_input()
    g1 = run_annotate(model, x)
    g2 = run_annotate(copy.deepcopy(model), x)
    assert g1.order == g2.order
    assert [(g1[n].static, g1[n].observed, g1[n].value_set) for n in g1.order] == \
        [(g2[n].static, g2[n].observed, g2[n].value_set) for n in g2.order]


def test_operator_targets_are_named():
    g = run_annotate(SpikeOps(lambda m, a, b, c, x: (a + b) * c), spike_input())
    names = [g[n].target for n in g.order if g[n].op == "call_function"]
    assert f"{operator.add.__module__}.add" in names and f"{operator.mul.__module__}.mul" in names
    out = only_output(g)
    assert out.target == "_operator.mul" and str(out.value_set) == "{0..2}"


class Chunker(nn.Module):
    def forward(self, x):
        return torch.chunk(x, 2), torch.max(x, 0)


def test_nbytes_of_tuple_of_views():
    x = torch.rand(4, 3)
    g = run_annotate(Chunker(), x)
    chunk = g[next(n for n in g.order if g[n].target.endswith("chunk"))]
    assert chunk.nbytes == 48  # two 6-element float32 views: 48 summed, 48 of shared storage either way


def test_nbytes_of_tuple_of_distinct_tensors():
    g = run_annotate(Chunker(), torch.rand(4, 3))
    mx = g[next(n for n in g.order if g[n].target.endswith(".max"))]
    assert not mx.is_tensor and mx.shape is None and mx.dtype is None
    assert mx.nbytes == 3 * 4 + 3 * 8  # float32 values + int64 indices


class PassThroughs(nn.Module):
    """Layers that return their input or a view of all of it, beside layers that compute (one of them in place)."""

    def __init__(self):
        super().__init__()
        self.identity, self.flatten, self.conv = nn.Identity(), nn.Flatten(0, 1), nn.Conv2d(2, 2, 1)
        self.relu_ = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.conv(self.flatten(self.identity(x)))
        return self.relu_(y).reshape(x.shape), torch.stack([x[0]]), x[0]


@pytest.mark.parametrize(("node", "passes"), [
    ("identity", True), ("flatten", True), ("reshape", True),  # nothing computed: nothing saved for backward
    ("conv", False),
    ("relu_", False),  # returns its input, written in place: it computes (and saves its result)
    ("stack", False),  # a new tensor
    ("getitem", False),  # a view of part of its input (not "all of it": not claimed, though it saves nothing)
])
def test_passes_through(node, passes):
    g = run_annotate(PassThroughs(), spike_input())
    assert g[node].passes_through is passes, g[node]


class StepsOfTime(nn.Module):
    """A time loop (``x[t]``, traced into one ``unbind_steps`` for T >= 2), the last step taken with ``select``, and a
    stack of the steps (time-major again)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        steps = torch.stack([self.conv(x[t]) * 2.0 for t in range(x.shape[0])])
        return steps + x, x.select(0, -1).relu()


@pytest.mark.parametrize("steps", [1, 2])
def test_per_step_values(steps):
    """One step's values (taken from the leading dimension, and what is computed from them) are marked; the stack
    of the steps and what follows it are not: their leading dimension is time. At T = 1 a step is ``[N, ...]``, a
    leading dimension that only this fact tells from time."""
    g = run_annotate(StepsOfTime(), torch.rand(steps, N, C, H, W))
    per_step = {g[n].target.rsplit(".", 1)[-1] for n in g.order if g[n].per_step}
    time_major = {g[n].target.rsplit(".", 1)[-1] for n in g.order if g[n].is_tensor and not g[n].per_step}
    assert per_step == {"getitem", "conv", "mul", "select", "relu"}, per_step
    assert time_major == {"x", "stack", "add"}, time_major


@pytest.mark.parametrize("op,a,b,expected", [
    # -0.0 + -0.0 is -0.0, -0.0 + 0.0 is +0.0; 1 * -0.0 is -0.0; cat keeps either's
    ("add", True, True, "{-0,0..2}"), ("add", True, False, "{0..2}"), ("add", False, True, "{0..2}"),
    ("mul", True, False, "{-0,0,1}"), ("mul", False, False, "{0,1}"),
    ("cat", False, True, "{-0,0,1}"), ("sub", False, True, "{0,1}"),
])
def test_value_rules_follow_negative_zero(op, a, b, expected):
    """sinabs' MultiSpike spikes hold -0.0 (``ValueSet.negzero``): the rules keep the flag where the result may
    hold it, and packing then reserves a code for it."""
    from torch import fx

    from fxmemopt.analysis.annotate import VALUE_RULES
    from fxmemopt.analysis.facts import ValueSet

    fns = {"add": lambda x, y: x + y, "mul": lambda x, y: x * y, "cat": lambda x, y: torch.cat([x, y]),
           "sub": lambda x, y: 1 - y}
    graph = fx.symbolic_trace(fns[op]).graph
    sets = {"x": ValueSet(1, negzero=a), "y": ValueSet(1, negzero=b)}
    node = next(n for n in graph.nodes if n.op not in ("placeholder", "output"))
    rule = VALUE_RULES[node.target]
    got = rule(node, lambda arg: sets[arg.name] if isinstance(arg, fx.Node) else ValueSet(None))
    assert str(got) == expected, (op, got)
