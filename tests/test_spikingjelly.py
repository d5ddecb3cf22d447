"""spikingjelly 2.0.0 models as they are: multi-step neurons, ``layer.*`` wrappers, its BatchNorm, ``reset_net``.

Skipped where spikingjelly is not installed (CI installs it: see README's test command).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import fxmemopt
from fxmemopt.profiling.verify import module_states

sj = pytest.importorskip("spikingjelly.activation_based")
from spikingjelly.activation_based import functional, layer, neuron, surrogate  # noqa: E402


class SJVGG(nn.Module):
    """VGG-style: conv-BN-neuron layers with spikingjelly's multi-step wrappers and three neuron kinds."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            layer.Conv2d(2, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8),
            neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan()),
            layer.MaxPool2d(2),
            layer.Conv2d(8, 16, 3, padding=1, bias=False), layer.BatchNorm2d(16), neuron.IFNode(),
            layer.Conv2d(16, 16, 3, padding=1, bias=False), layer.BatchNorm2d(16), neuron.ParametricLIFNode(),
            layer.AdaptiveAvgPool2d((1, 1)), layer.Flatten(), layer.Linear(16, 10), neuron.LIFNode())
        functional.set_step_mode(self, "m")

    def forward(self, x):
        return self.features(x)


class SJSEWBlock(nn.Module):
    """SEW-ResNet basic block (ADD): two conv-BN-IF layers, identity or conv-BN downsample."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Sequential(layer.Conv2d(cin, cout, 3, stride, 1, bias=False), layer.BatchNorm2d(cout),
                                   neuron.IFNode(detach_reset=True))
        self.conv2 = nn.Sequential(layer.Conv2d(cout, cout, 3, 1, 1, bias=False), layer.BatchNorm2d(cout),
                                   neuron.IFNode(detach_reset=True))
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(layer.SeqToANNContainer(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                                              nn.BatchNorm2d(cout)),
                                      neuron.IFNode(detach_reset=True))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        return self.conv2(self.conv1(x)) + identity


class SJSEW(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(layer.Conv2d(3, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8),
                                  neuron.IFNode(detach_reset=True))
        self.blocks = nn.Sequential(SJSEWBlock(8, 8), SJSEWBlock(8, 16, 2))
        self.head = nn.Sequential(layer.AdaptiveAvgPool2d((1, 1)), layer.Flatten(), layer.Linear(16, 10))
        functional.set_step_mode(self, "m")

    def forward(self, x):
        return self.head(self.blocks(self.stem(x))).mean(0)


class SJSpikformer(nn.Module):
    """Spikformer-style: conv patch embedding, spikingjelly's own SpikingSelfAttention, a spiking MLP."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.embed = nn.Sequential(layer.Conv2d(3, dim, 3, padding=1, bias=False), layer.BatchNorm2d(dim),
                                   neuron.LIFNode(), layer.MaxPool2d(2))
        self.attn = layer.SpikingSelfAttention(dim, num_heads=2)
        self.mlp = nn.Sequential(layer.Conv1d(dim, 2 * dim, 1), layer.BatchNorm1d(2 * dim), neuron.LIFNode(),
                                 layer.Conv1d(2 * dim, dim, 1), layer.BatchNorm1d(dim), neuron.LIFNode())
        self.head = layer.Linear(dim, 10)
        functional.set_step_mode(self, "m")

    def forward(self, x):
        x = self.embed(x).flatten(3)  # [T, N, C, L]
        x = x + self.attn(x)
        x = x + self.mlp(x)
        return self.head(x.mean(3))


MODELS = {
    "vgg": (SJVGG, (4, 2, 2, 16, 16)),
    "sew": (SJSEW, (4, 2, 3, 16, 16)),
    "spikformer": (SJSpikformer, (4, 2, 3, 16, 16)),
}
CALLS = {"default": {}, "memory": {"prefer": "memory"}, "level4": {"level": 4}, "speed": {"prefer": "speed"}}


def _neuron_paths(model: nn.Module) -> set[str]:
    from spikingjelly.activation_based.base import MemoryModule

    return {p for p, m in model.named_modules() if isinstance(m, MemoryModule) and isinstance(m, neuron.BaseNode)}


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("name", MODELS)
def test_spikingjelly_models_train_exactly(name, call):
    cls, shape = MODELS[name]
    torch.manual_seed(0)
    model = cls()
    reference = copy.deepcopy(model)
    x = torch.rand(shape)
    gm, summary = fxmemopt.optimize(model, (x,), return_summary=True, **CALLS[call])
    assert summary.regions
    report = fxmemopt.compare_training_step(reference, gm, (x,))
    assert report.ok, report.mismatches  # outputs, grads, spikingjelly BatchNorm stats, neuron memories, RNG
    # a second step after reset_net, as in a training loop
    functional.reset_net(gm)
    functional.reset_net(reference)
    report = fxmemopt.compare_training_step(reference, gm, (x,))
    assert report.ok, report.mismatches


@pytest.mark.parametrize("name", MODELS)
def test_spikingjelly_neurons_are_stateful_leaves_and_left_untouched(name):
    cls, shape = MODELS[name]
    torch.manual_seed(0)
    model = cls()
    x = torch.rand(shape)
    model(x)  # neurons now hold state: optimize must leave it exactly as it is
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in module_states(model).items()}
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    _, summary = fxmemopt.optimize(model, (x,), return_summary=True)
    after = module_states(model)
    assert before.keys() == after.keys()
    for k in before:
        assert (torch.equal(before[k], after[k]) if isinstance(before[k], torch.Tensor) else before[k] == after[k]), k
    for k, v in model.state_dict().items():
        assert torch.equal(v, buffers[k]), k
    found = {p for p, how in summary.stateful_modules.items() if how == "_memories"}
    assert _neuron_paths(model) <= found
    assert not summary.leaf_fallbacks  # spikingjelly's layer wrappers are leaves on purpose, not failures


def test_reset_net_resets_the_optimized_module():
    torch.manual_seed(0)
    model = SJVGG()
    x = torch.rand(4, 2, 2, 16, 16)
    gm = fxmemopt.optimize(model, (x,))
    gm(x).sum().backward()
    lif = model.features[2]
    assert isinstance(lif.v, torch.Tensor)
    functional.reset_net(gm)
    assert lif.v == 0.0  # back to v_reset (a float), through the optimized module


def test_spikingjelly_batchnorm_statistics_update_once_per_step():
    torch.manual_seed(0)
    model = SJVGG()
    x = torch.rand(4, 2, 2, 16, 16)
    gm = fxmemopt.optimize(model, (x,), prefer="memory")
    bn = model.features[1]
    assert int(bn.num_batches_tracked) == 0
    gm(x).sum().backward()
    assert int(bn.num_batches_tracked) == 1  # forward and recomputation together: one update


def _plif_net() -> nn.Module:
    """conv-BN-PLIF twice, then a linear PLIF layer: learnable time constants (``w``) in every neuron."""
    return nn.Sequential(
        layer.Conv2d(2, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8), neuron.ParametricLIFNode(detach_reset=True),
        layer.MaxPool2d(2),
        layer.Conv2d(8, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8), neuron.ParametricLIFNode(detach_reset=True),
        layer.Flatten(), layer.Linear(8 * 8 * 8, 10), neuron.ParametricLIFNode(detach_reset=True))


def test_parametric_neurons_are_sliced_one_step_per_slice_and_stay_exact_on_other_inputs():
    """A PLIF's ``w`` gradient adds up step by step: one-step slices keep that order, several steps per slice do
    not (measured 2.4e-4 apart). The plan slices PLIF regions one step per slice only, and the optimized module
    is bitwise exact on inputs it never saw."""
    from fxmemopt.errors import PlanError
    from fxmemopt.planning.plan import Plan

    torch.manual_seed(0)
    model = _plif_net()
    functional.set_step_mode(model, "m")
    x = (torch.rand(6, 2, 2, 16, 16) > 0.7).float()
    ref, spare = copy.deepcopy(model), copy.deepcopy(model)
    gm, summary = fxmemopt.optimize(model, (x,), prefer="memory", return_summary=True)
    plif = [n for n in summary.graph.order if summary.graph[n].module_type == "ParametricLIFNode"]
    assert plif and all(summary.graph[n].time_chunkable and summary.graph[n].step_slices_only for n in plif)
    sliced = [r for r in summary.plan.regions if r.chunks > 1]
    assert sliced and all(r.chunks == 6 for r in sliced)
    for seed in range(3):
        torch.manual_seed(100 + seed)
        xs = (torch.rand(6, 2, 2, 16, 16) > 0.5 + 0.1 * seed).float()
        for m in (ref, gm):
            functional.reset_net(m)
        report = fxmemopt.compare_training_step(ref, gm, (xs,))
        assert report.ok, (seed, str(report))
    coarse = Plan(tuple(dataclasses.replace(r, chunks=2) if r.chunks > 1 else r for r in summary.plan.regions))
    with pytest.raises(PlanError, match="exact only in one slice per time step"):
        fxmemopt.optimize(spare, (x,), plan=coarse)


# spikingjelly's own example activation_based/examples/rsnn_sequential_fmnist.py, its three nets as written there
# (input [W=28, N, H=28]: an image read column by column; `set_step_mode(net, "m")` leaves the neuron inside the
# recurrent container single-step, as the example's comment says).
class RSNNPlainNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Sequential(layer.Linear(28, 32), neuron.IFNode(surrogate_function=surrogate.ATan()),
                                layer.Linear(32, 10), neuron.IFNode(surrogate_function=surrogate.ATan()))

    def forward(self, x):
        return self.fc(x).mean(0)


class RSNNStatefulSynapseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Sequential(layer.Linear(28, 32), neuron.IFNode(surrogate_function=surrogate.ATan()),
                                layer.SynapseFilter(tau=2.0, learnable=True),
                                layer.Linear(32, 10), neuron.IFNode(surrogate_function=surrogate.ATan()))

    def forward(self, x):
        return self.fc(x).mean(0)


class RSNNFeedBackNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Sequential(
            layer.Linear(28, 32),
            layer.LinearRecurrentContainer(neuron.IFNode(surrogate_function=surrogate.ATan(), detach_reset=True),
                                           in_features=32, out_features=32, bias=True),
            layer.Linear(32, 10), neuron.IFNode(surrogate_function=surrogate.ATan()))

    def forward(self, x):
        return self.fc(x).mean(0)


RSNN = {"plain": RSNNPlainNet, "synapse": RSNNStatefulSynapseNet, "feedback": RSNNFeedBackNet}
RSNN_CALLS = {"default": {}, "memory": {"prefer": "memory"}, "speed": {"prefer": "speed"},
              "balanced": {"prefer": "balanced"}, "level1": {"level": 1}, "level2": {"level": 2},
              "level3": {"level": 3}, "level4": {"level": 4}}


def _rsnn(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    net = RSNN[name]()
    functional.set_step_mode(net, step_mode="m")
    return net, torch.rand(28, 3, 28)  # [W, N, H], pixel intensities as the example feeds them


@pytest.mark.parametrize("call", RSNN_CALLS)
@pytest.mark.parametrize("name", RSNN)
def test_rsnn_example_nets_train_exactly(name, call):
    net, x = _rsnn(name)
    reference = copy.deepcopy(net)
    gm = fxmemopt.optimize(net, (x,), never_worse=False, **RSNN_CALLS[call])
    for _ in range(2):  # a second step after reset_net, as the example's training loop does
        report = fxmemopt.compare_training_step(reference, gm, (x,))
        assert report.ok, report.mismatches
        functional.reset_net(gm)
        functional.reset_net(reference)


def test_recurrent_container_is_sliced_with_its_inner_neurons_state():
    """FeedBackNet's ``LinearRecurrentContainer`` keeps its output ``y`` in its own memory and the inner IFNode's
    membrane in the IFNode's: time slices must start from both. Carrying only the container's own (as the runtime
    once did) recomputed each slice from the inner neuron's final membrane: every gradient before the container
    was wrong, silently. The entry state here also still references the graph of an earlier step (the net ran
    before optimize), which the slice check must not trip over."""
    net, x = _rsnn("feedback")
    net(x).sum().backward()  # state from an earlier step, its graph freed: optimize must cope
    functional.reset_net(net)
    net.zero_grad(set_to_none=True)
    reference = copy.deepcopy(net)
    gm, summary = fxmemopt.optimize(net, (x,), prefer="memory", never_worse=False, return_summary=True)
    assert summary.graph["fc_1"].time_chunkable
    sliced = {r.name: r.chunks for r in summary.plan.regions if r.chunks > 1}
    assert sliced.get("ckpt_fc_1") == 28  # the container has trainable parameters: one step per slice
    region = gm.get_submodule("ckpt_fc_1")
    assert [p for p, _ in region.neuron_states] == ["", "sub_module"]
    for seed in range(3):  # inputs the plan never saw, too
        torch.manual_seed(10 + seed)
        xs = torch.rand(28, 3, 28) * (1 + seed)
        report = fxmemopt.compare_training_step(reference, gm, (xs,))
        assert report.ok, (seed, report.mismatches)
        functional.reset_net(gm)
        functional.reset_net(reference)
