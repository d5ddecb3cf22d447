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
