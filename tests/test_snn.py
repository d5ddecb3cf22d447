"""Tests of the reference SNN library :mod:`fxmemopt.snn`."""

from __future__ import annotations

import copy
import math
import pickle
from collections.abc import Callable

import pytest
import torch
import torch.fx
from torch import nn

from fxmemopt.snn import (
    BaseNode,
    ConvBNNeuron,
    DeepConvSNN,
    IFNode,
    LIFNode,
    MemoryModule,
    ParametricLIFNode,
    SeqToANNContainer,
    SEWResNet18,
    Spikformer,
    SpikingVGG11,
    TimeDistributed,
    make_neuron,
    reset_net,
)
from fxmemopt.snn.surrogate import ATan, Sigmoid

T, N = 4, 3


def _seq(*shape: int, seed: int = 0, scale: float = 1.5) -> torch.Tensor:
    """Deterministic random input, scaled so that neurons both fire and stay silent."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=gen) * scale


# ----------------------------------------------------------------------------------------------
# Surrogate spike functions
# ----------------------------------------------------------------------------------------------


def _atan_grad(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return alpha / 2 / (1 + (math.pi / 2 * alpha * x) ** 2)


def _sigmoid_grad(x: torch.Tensor, alpha: float) -> torch.Tensor:
    sg = torch.sigmoid(alpha * x)
    return alpha * sg * (1 - sg)


SURROGATES = [
    pytest.param(ATan, 2.0, _atan_grad, id="atan-default"),
    pytest.param(ATan, 5.0, _atan_grad, id="atan-5"),
    pytest.param(Sigmoid, 4.0, _sigmoid_grad, id="sigmoid-default"),
    pytest.param(Sigmoid, 1.5, _sigmoid_grad, id="sigmoid-1.5"),
]


@pytest.mark.parametrize("cls, alpha, _grad", SURROGATES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_surrogate_forward_is_heaviside(cls, alpha, _grad, dtype):
    x = torch.tensor([-2.0, -1e-6, 0.0, 1e-6, 3.0], dtype=dtype)
    y = cls(alpha)(x)
    assert y.dtype == dtype
    assert torch.equal(y, torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0], dtype=dtype))


@pytest.mark.parametrize("cls, alpha, grad_fn", SURROGATES)
def test_surrogate_backward_matches_closed_form(cls, alpha, grad_fn):
    x = (torch.linspace(-2, 2, 41, dtype=torch.float64)).requires_grad_()
    upstream = _seq(41, seed=1).double()
    (grad,) = torch.autograd.grad(cls(alpha)(x), x, grad_outputs=upstream)
    torch.testing.assert_close(grad, upstream * grad_fn(x.detach(), alpha))


@pytest.mark.parametrize("cls", [ATan, Sigmoid])
def test_surrogate_saves_input_through_save_for_backward(cls):
    # The optimizer sees saved activations only through saved_tensors_hooks.
    packed = []

    def pack(t):
        packed.append(t)
        return t

    x = torch.randn(5, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = cls()(x)
    assert len(packed) == 1 and torch.equal(packed[0], x)
    y.sum().backward()
    assert x.grad is not None


def test_surrogate_is_parameter_free_and_deterministic():
    sg = ATan(3.0)
    assert list(sg.parameters()) == [] and list(sg.buffers()) == []
    assert isinstance(sg.alpha, float)
    x = torch.randn(100, requires_grad=True)
    g1 = torch.autograd.grad(sg(x).sum(), x)[0]
    g2 = torch.autograd.grad(sg(x).sum(), x)[0]
    assert torch.equal(g1, g2)


# ----------------------------------------------------------------------------------------------
# Neuron dynamics against a hand-written per-step reference
# ----------------------------------------------------------------------------------------------


def _reference(
    charge: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_seq: torch.Tensor,
    v_threshold: float,
    v_reset: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    v = torch.full_like(x_seq[0], v_reset if v_reset is not None else 0.0)
    spikes = []
    for t in range(x_seq.shape[0]):
        h = charge(v, x_seq[t])
        s = (h - v_threshold >= 0).to(h.dtype)
        if v_reset is None:
            v = h - s * v_threshold
        else:
            v = h * (1 - s) + v_reset * s
        spikes.append(s)
    return torch.stack(spikes), v


def _make_node(kind: str, v_reset: float | None, decay_input: bool, v_threshold: float, **kw) -> BaseNode:
    common = dict(v_threshold=v_threshold, v_reset=v_reset, **kw)
    if kind == "if":
        return IFNode(**common)
    if kind == "lif":
        return LIFNode(tau=1.7, decay_input=decay_input, **common)
    return ParametricLIFNode(init_tau=2.5, decay_input=decay_input, **common)


def _reference_charge(kind: str, node: BaseNode, v_reset: float | None, decay_input: bool):
    v0 = v_reset if v_reset is not None else 0.0
    if kind == "if":
        return lambda v, x: v + x
    if kind == "lif":
        tau = 1.7
        if decay_input:
            return lambda v, x: v + (x - (v - v0)) / tau
        return lambda v, x: v - (v - v0) / tau + x
    k = node.w.detach().sigmoid()
    if decay_input:
        return lambda v, x: v + (x - (v - v0)) * k
    return lambda v, x: v - (v - v0) * k + x


NEURON_CASES = [
    pytest.param(kind, v_reset, decay, id=f"{kind}-vreset={v_reset}-decay={decay}")
    for kind in ("if", "lif", "plif")
    for v_reset in (0.0, -0.3, None)
    for decay in ((True, False) if kind != "if" else (True,))
]


@pytest.mark.parametrize("kind, v_reset, decay_input", NEURON_CASES)
def test_neuron_matches_reference(kind, v_reset, decay_input):
    v_threshold = 0.8
    node = _make_node(kind, v_reset, decay_input, v_threshold)
    x_seq = _seq(8, N, 5, scale=2.0) - 0.2
    spikes = node(x_seq)
    ref_spikes, ref_v = _reference(
        _reference_charge(kind, node, v_reset, decay_input), x_seq, v_threshold, v_reset
    )
    assert spikes.shape == x_seq.shape
    assert 0 < spikes.sum() < spikes.numel(), "test input should make neurons both fire and stay silent"
    assert torch.equal(spikes, ref_spikes)
    assert torch.equal(node.v, ref_v)


@pytest.mark.parametrize("kind, v_reset, decay_input", NEURON_CASES)
def test_single_step_loop_equals_multi_step(kind, v_reset, decay_input):
    multi = _make_node(kind, v_reset, decay_input, 1.0)
    single = _make_node(kind, v_reset, decay_input, 1.0, step_mode="s")
    x_seq = _seq(T, N, 2, 3, seed=2)
    out_single = torch.stack([single(x_seq[t]) for t in range(T)])
    assert torch.equal(multi(x_seq), out_single)
    assert torch.equal(multi.v, single.v)


def test_state_continues_across_calls_until_reset():
    node = IFNode()
    x = _seq(T, N, seed=3, scale=0.7)
    whole = node(torch.cat([x, x]))
    node.reset()
    first, second = node(x), node(x)
    assert torch.equal(whole, torch.cat([first, second]))
    node.reset()
    assert torch.equal(node(x), first)


@pytest.mark.parametrize("kind", ["if", "lif", "plif"])
def test_detach_reset_changes_gradients_not_forward(kind):
    x = _seq(T, N, 4, seed=4, scale=2.0).requires_grad_()
    results = []
    for detach in (False, True):
        node = _make_node(kind, 0.0, True, 1.0, detach_reset=detach)
        out = node(x)
        (grad,) = torch.autograd.grad((out * torch.arange(1.0, T + 1).view(T, 1, 1)).sum(), x)
        results.append((out.detach(), grad))
    assert torch.equal(results[0][0], results[1][0])
    assert not torch.equal(results[0][1], results[1][1])


def test_plif_tau_is_learnable():
    node = ParametricLIFNode(init_tau=3.0)
    torch.testing.assert_close(node.w.sigmoid(), torch.tensor(1 / 3.0))
    node(_seq(T, N, seed=5, scale=3.0)).sum().backward()
    assert node.w.grad is not None and node.w.grad.item() != 0.0
    with pytest.raises(ValueError):
        ParametricLIFNode(init_tau=1.0)


def test_invalid_step_mode():
    with pytest.raises(ValueError):
        IFNode(step_mode="x")


def test_extra_repr_shows_options():
    text = repr(LIFNode(tau=3.0, v_reset=None, detach_reset=True))
    for part in ("tau=3.0", "v_reset=None", "detach_reset=True", "step_mode='m'", "ATan"):
        assert part in text


# ----------------------------------------------------------------------------------------------
# MemoryModule state convention
# ----------------------------------------------------------------------------------------------


def test_memory_attribute_routing():
    node = LIFNode(v_reset=-0.5)
    assert node._memories == {"v": -0.5} and node._memories_reset == {"v": -0.5}
    assert "v" not in node.__dict__ and node.v == -0.5
    t = torch.ones(2)
    node.v = t
    assert node._memories["v"] is t and node.v is t
    assert list(node.memories()) == [("v", t)]
    assert "v" not in node.state_dict()
    with pytest.raises(KeyError):
        node.register_memory("v", 0.0)
    with pytest.raises(KeyError):
        node.register_memory("v_threshold", 0.0)


def test_state_is_replaced_not_mutated():
    node = LIFNode()
    node(_seq(1, N, seed=6, scale=2.0))
    old = node.v
    old_copy = old.clone()
    node(_seq(1, N, seed=7, scale=2.0))
    assert node.v is not old
    assert torch.equal(old, old_copy)


def test_reset_restores_independent_copies():
    class Buffered(MemoryModule):
        def __init__(self):
            super().__init__()
            self.register_memory("hist", torch.zeros(2))

    m = Buffered()
    m.hist.add_(1.0)  # in-place on the current value must not leak into the reset value
    m.reset()
    assert torch.equal(m.hist, torch.zeros(2))
    assert m.hist is not m._memories_reset["hist"]


def test_reset_net_resets_all_memories_including_duck_typed():
    class DuckNeuron(nn.Module):
        def __init__(self):
            super().__init__()
            self._memories = {"v": 0.0}

        def reset(self):
            self._memories["v"] = 0.0

        def forward(self, x):
            self._memories["v"] = x
            return x

    net = nn.Sequential(
        LIFNode(),
        SeqToANNContainer(nn.Linear(4, 4)),
        ParametricLIFNode(v_reset=-0.25),
        DuckNeuron(),
    )
    net(_seq(T, N, 4, seed=8, scale=3.0))
    assert isinstance(net[0].v, torch.Tensor) and isinstance(net[2].v, torch.Tensor)
    assert isinstance(net[3]._memories["v"], torch.Tensor)
    reset_net(net)
    assert net[0].v == 0.0 and net[2].v == -0.25 and net[3]._memories["v"] == 0.0

    # A MemoryModule at the root is reset too.
    node = IFNode()
    node(_seq(T, N, seed=9))
    reset_net(node)
    assert node.v == 0.0


@pytest.mark.parametrize("kind", ["if", "lif", "plif"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_and_pickle_after_reset(kind, how):
    node = make_neuron(kind, v_reset=None, surrogate_function=Sigmoid(3.0), detach_reset=True)
    x = _seq(T, N, seed=10, scale=2.0)
    expected = node(x)
    node.reset()
    clone = copy.deepcopy(node) if how == "deepcopy" else pickle.loads(pickle.dumps(node))
    assert type(clone) is type(node)
    assert clone._memories == node._memories and clone._memories_reset == node._memories_reset
    assert clone._memories is not node._memories
    assert clone.v_reset is None and clone.detach_reset and clone.surrogate_function.alpha == 3.0
    assert torch.equal(clone(x), expected)
    assert node.v == 0.0  # the clone's state is its own
    for (name, p), (name_c, p_c) in zip(node.named_parameters(), clone.named_parameters(), strict=True):
        assert name == name_c and torch.equal(p, p_c)


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


def test_seq_to_ann_container():
    assert TimeDistributed is SeqToANNContainer
    conv, bn = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)
    layer = SeqToANNContainer(conv, bn)
    assert {"0.weight", "0.bias", "1.weight", "1.running_mean"} <= set(layer.state_dict())
    x = _seq(T, N, 2, 5, 5, seed=11)
    y = layer(x)
    assert y.shape == (T, N, 3, 5, 5)
    assert torch.equal(y, bn(conv(x.reshape(T * N, 2, 5, 5))).reshape(T, N, 3, 5, 5))
    gm = torch.fx.symbolic_trace(layer)
    assert torch.equal(gm(x), layer(x))


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------

NUM_CLASSES = 5

MODELS = {
    "vgg11": (
        lambda **kw: SpikingVGG11(in_channels=2, num_classes=NUM_CLASSES, width=0.0625, image_size=32, **kw),
        (2, 2, 2, 32, 32),
    ),
    "sew_resnet18": (
        lambda **kw: SEWResNet18(in_channels=3, num_classes=NUM_CLASSES, width=0.0625, **kw),
        (2, 2, 3, 32, 32),
    ),
    "spikformer": (
        lambda **kw: Spikformer(
            in_channels=3,
            num_classes=NUM_CLASSES,
            image_size=16,
            embed_dim=16,
            num_heads=2,
            depth=1,
            mlp_ratio=2,
            **kw,
        ),
        (2, 2, 3, 16, 16),
    ),
    "deep_conv": (
        lambda **kw: DeepConvSNN(num_blocks=3, channels=4, in_channels=3, num_classes=NUM_CLASSES, **kw),
        (2, 2, 3, 8, 8),
    ),
}


def _build(name: str, **kw) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    factory, shape = MODELS[name]
    return factory(**kw), _seq(*shape, seed=12, scale=2.0)


class SNNTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return hasattr(m, "_memories") or super().is_leaf_module(m, module_qualified_name)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_shape_and_backward(name):
    model, x = _build(name)
    x.requires_grad_()
    out = model(x)
    assert out.shape == (x.shape[0], x.shape[1], NUM_CLASSES)
    out.mean(0).sum().backward()
    assert x.grad is not None
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname


@pytest.mark.parametrize("kind", ["if", "plif"])
def test_model_neuron_options(kind):
    model, x = _build("deep_conv", neuron=kind, surrogate=Sigmoid(2.5), detach_reset=True)
    nodes = [m for m in model.modules() if isinstance(m, BaseNode)]
    assert len(nodes) == 4
    assert all(type(m) is {"if": IFNode, "plif": ParametricLIFNode}[kind] for m in nodes)
    assert all(m.detach_reset and isinstance(m.surrogate_function, Sigmoid) for m in nodes)
    assert len({id(m.surrogate_function) for m in nodes}) == len(nodes)
    assert all(m.surrogate_function.alpha == 2.5 for m in nodes)
    assert model(x).shape == (2, 2, NUM_CLASSES)


def test_model_argument_validation():
    with pytest.raises(ValueError):
        make_neuron("relu")
    with pytest.raises(ValueError):
        SpikingVGG11(width=0.0625, image_size=16)
    with pytest.raises(ValueError):
        SEWResNet18(cnf="OR")
    with pytest.raises(ValueError):
        Spikformer(embed_dim=10, num_heads=4)


def test_vgg_dropout_and_conv_blocks():
    model = SpikingVGG11(width=0.0625, image_size=48, dropout=0.5)
    assert sum(isinstance(m, ConvBNNeuron) for m in model.modules()) == 8
    assert any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in model.modules())
    assert model.classifier[-1].in_features == 32  # 512 * 0.0625 channels, 48 -> 1 after 5 pools


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_model_fx_trace_is_bitwise_identical(name, train):
    model, x = _build(name)
    model.train(train)
    tracer = SNNTracer()
    graph = tracer.trace(model)
    gm = torch.fx.GraphModule(tracer.root, graph)

    neuron_names = {n for n, m in model.named_modules() if isinstance(m, BaseNode)}
    called = {node.target for node in graph.nodes if node.op == "call_module"}
    assert neuron_names and neuron_names <= called
    # Neurons are leaves: nothing inside them (e.g. their surrogate) is traced separately.
    assert not any(t.startswith(f"{n}.") for t in called for n in neuron_names)

    results = []
    for runner in (model, gm):
        reset_net(model)
        xi = x.clone().requires_grad_()
        out = runner(xi)
        (grad,) = torch.autograd.grad(out.sum(), xi)
        results.append((out.detach(), grad))
    reset_net(model)
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
