"""Tracing with automatic leaf fallback, stateful-module detection, region formation, typed errors, and the
promise that optimize() leaves the caller's model exactly as it found it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxmemopt
from fxmemopt.errors import InvalidInputsError, InvalidOptionError, TargetsMatchNothingError, TraceError
from fxmemopt.profiling.verify import compare_training_step, module_states
from fxmemopt.snn import (
    ConvBNNeuron,
    DeepConvSNN,
    IFNode,
    LIFNode,
    SeqToANNContainer,
    SEWResNet18,
    Spikformer,
    SpikingVGG11,
    reset_net,
)


class UsualSeqToANN(nn.Module):
    """The way many users write it: shape unpacking that torch.fx cannot trace."""

    def __init__(self, *mods: nn.Module):
        super().__init__()
        self.m = nn.Sequential(*mods)

    def forward(self, x):
        T, N = x.shape[:2]
        y = self.m(x.flatten(0, 1))
        return y.reshape(T, N, *y.shape[1:])


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value
            return x * 2
        return x


class UsualNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = UsualSeqToANN(nn.Linear(6, 6), nn.BatchNorm1d(6))
        self.sn1 = LIFNode()
        self.dd = DataDependent()
        self.fc2 = UsualSeqToANN(nn.Linear(6, 3))
        self.sn2 = IFNode()

    def forward(self, x):
        return self.sn2(self.fc2(self.dd(self.sn1(self.fc1(x)))))


def test_untraceable_submodules_become_leaves_and_stay_exact():
    torch.manual_seed(0)
    model = UsualNet()
    ref = copy.deepcopy(model)
    x = torch.rand(3, 2, 6)
    gm, summary = fxmemopt.optimize(model, (x,), return_summary=True)
    # shape unpacking traces now (under guards on the ranks it reads); control flow on tensor data still cannot
    paths = [f.path for f in summary.leaf_fallbacks]
    assert paths == ["dd"]
    assert "TraceError" in summary.leaf_fallbacks[0].reason and "tensor" in summary.leaf_fallbacks[0].reason
    assert "dd" in str(summary) and "kept whole" in str(summary)
    assert {g.kind for g in summary.guards} == {"len"}
    # leaves are call_module nodes in the graph and inside regions
    assert [r.anchor for r in summary.regions] == ["sn1", "sn2"]
    assert compare_training_step(ref, gm, (x,)).ok


class TopLevelDataBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.sn = IFNode()

    def forward(self, x):
        if x.sum() > 0:  # control flow on tensor data in the root's own code
            x = x * 2
        return self.sn(x)


def test_top_level_trace_failure_is_a_typed_error_naming_the_module():
    with pytest.raises(TraceError, match="TopLevelDataBranch") as info:
        fxmemopt.optimize(TopLevelDataBranch(), (torch.rand(2, 2, 3),))
    assert "submodule" in str(info.value) and "tensor" in str(info.value)


class PlainLIF(nn.Module):
    """A neuron written in plain PyTorch: state is an attribute the forward rebinds."""

    def __init__(self):
        super().__init__()
        self.v = 0.0

    def forward(self, x):
        out = []
        for t in range(x.shape[0]):
            self.v = self.v * 0.5 + x[t]
            s = (self.v >= 1.0).to(x) + 0.0 * self.v  # keeps a gradient path
            self.v = self.v * (1 - s)
            out.append(s)
        return torch.stack(out)


def test_plain_pytorch_neurons_are_detected_as_stateful():
    torch.manual_seed(0)
    model = nn.Sequential(SeqToANNContainer(nn.Linear(4, 4)), PlainLIF(), SeqToANNContainer(nn.Linear(4, 4)),
                          PlainLIF())
    x = torch.rand(3, 2, 4) * 2
    ref = copy.deepcopy(model)
    gm, summary = fxmemopt.optimize(model, (x,), return_summary=True)
    assert summary.stateful_modules == {"1": "updates v", "3": "updates v"}
    assert summary.region_count == 2
    report = compare_training_step(ref, gm, (x,))
    assert report.ok, str(report)
    assert torch.equal(model[1].v, ref[1].v)


class InPlaceLIF(nn.Module):
    """A neuron that keeps its membrane potential in one tensor and updates it in place (never rebinding it)."""

    def __init__(self, shape):
        super().__init__()
        self.v = torch.zeros(shape)

    def forward(self, x):
        out = []
        for t in range(x.shape[0]):
            h = self.v * 0.5 + x[t]
            s = (h >= 1.0).to(x) + 0.0 * h
            with torch.no_grad():
                self.v.copy_(h * (1 - s))  # state carried without a gradient path, updated in place
            out.append(s)
        return torch.stack(out)


class Opaque(nn.Module):
    """Keeps its state in a float it only changes on the second call: the example run cannot see it."""

    def __init__(self):
        super().__init__()
        self.calls = 0.0
        self.gain = 1.0

    def forward(self, x):
        self.calls = self.calls + 1.0
        if self.calls > 1.0:
            self.gain = self.gain * 0.5
        return x * self.gain


def test_neurons_updating_state_in_place_are_detected_and_left_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(SeqToANNContainer(nn.Linear(4, 4)), InPlaceLIF((2, 4)),
                          SeqToANNContainer(nn.Linear(4, 4)), InPlaceLIF((2, 4)))
    x = torch.rand(3, 2, 4) * 2
    model(x)  # non-trivial state, which optimize must not change
    ref = copy.deepcopy(model)
    before = model[1].v.clone()
    gm, summary = fxmemopt.optimize(model, (x,), return_summary=True)
    assert summary.stateful_modules == {"1": "updates v", "3": "updates v"}
    assert torch.equal(model[1].v, before)
    report = compare_training_step(ref, gm, (x,))
    assert report.ok, str(report)
    assert torch.equal(model[3].v, ref[3].v)


def test_declared_stateful_modules_are_snapshotted_even_when_the_example_does_not_show_it():
    torch.manual_seed(0)
    model = nn.Sequential(SeqToANNContainer(nn.Linear(4, 4)), Opaque(), SeqToANNContainer(nn.Linear(4, 4)),
                          PlainLIF())
    x = torch.rand(3, 2, 4) * 2
    _, auto = fxmemopt.optimize(model, (x,), return_summary=True)
    assert auto.stateful_modules["1"] == "updates calls"  # 'gain' changed on no example call
    gm, declared = fxmemopt.optimize(model, (x,), stateful_modules=(Opaque,), return_summary=True)
    assert declared.stateful_modules["1"] == "declared"
    ref = copy.deepcopy(model)
    for _ in range(2):  # the second call changes 'gain': recomputation must replay the entry value
        report = compare_training_step(ref, gm, (x,))
        assert report.ok, str(report)
        model[3].v = ref[3].v = 0.0  # reset the neuron between steps, as training does


def test_optimize_leaves_the_model_untouched():
    torch.manual_seed(0)
    model = SEWResNet18(width=0.125)
    x = torch.rand(2, 2, 3, 32, 32)
    model(x).sum().backward()  # grads and non-trivial neuron states / BN stats present
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    neuron = {k: v.clone() for k, v in module_states(model).items()}
    rng = torch.get_rng_state()
    attrs = set(model.__dict__)

    fxmemopt.optimize(model, (x,))

    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters())
    assert all(torch.equal(neuron[k], v) for k, v in module_states(model).items())
    assert torch.equal(rng, torch.get_rng_state())
    assert set(model.__dict__) == attrs


@pytest.mark.parametrize("factory, shape", [
    (lambda: DeepConvSNN(num_blocks=3, channels=4), (2, 2, 3, 8, 8)),
    (lambda: SpikingVGG11(width=0.0625, dropout=0.3), (2, 2, 2, 48, 48)),
    (lambda: SEWResNet18(width=0.0625), (2, 2, 3, 32, 32)),
    (lambda: Spikformer(embed_dim=16, num_heads=2, depth=1), (2, 2, 3, 16, 16)),
])
def test_reference_models_are_exact(factory, shape):
    torch.manual_seed(0)
    model = factory()
    ref = copy.deepcopy(model)
    x = torch.rand(shape)
    # every region kept (never_worse=False): the default leaves out those that lower the peak by less than 1%,
    # which at these sizes are some; exactness is checked on all of them
    gm, summary = fxmemopt.optimize(model, (x,), return_summary=True, never_worse=False)
    # one region per neuron, plus regions without one where a layer's output is also a shortcut (a stem's pooling)
    neuron_regions = sum(1 for r in summary.regions if r.stateful_modules)
    assert neuron_regions == sum(1 for m in model.modules() if hasattr(m, "v_threshold"))
    assert summary.packed_input_count >= neuron_regions - 1
    report = compare_training_step(ref, gm, (x,), between=lambda: torch.rand(3))
    assert report.ok, str(report)


def test_sew_add_inputs_pack_at_two_bits():
    model = SEWResNet18(width=0.0625)
    gm, summary = fxmemopt.optimize(model, (torch.rand(1, 2, 3, 32, 32),), return_summary=True)
    sets = {i.value_set: i.bits for r in summary.regions for i in r.inputs if i.bits}
    assert sets["{0,1}"] == 1 and sets["{0..2}"] == 2


def test_targets_group_whole_blocks():
    model = DeepConvSNN(num_blocks=3, channels=4)
    x = torch.rand(2, 2, 3, 8, 8)
    ref = copy.deepcopy(model)
    gm, summary = fxmemopt.optimize(model, (x,), targets=(ConvBNNeuron,), return_summary=True)
    assert [r.anchor for r in summary.regions] == ["stem", "blocks.0", "blocks.1", "blocks.2"]
    assert [r.name for r in summary.regions] == ["ckpt_stem", "ckpt_blocks_0", "ckpt_blocks_1", "ckpt_blocks_2"]
    assert compare_training_step(ref, gm, (x,)).ok


def test_targets_that_match_nothing_raise():
    with pytest.raises(TargetsMatchNothingError, match="nn.GRU|GRU"):
        fxmemopt.optimize(DeepConvSNN(num_blocks=1, channels=2), (torch.rand(1, 1, 3, 4, 4),), targets=(nn.GRU,))


@pytest.mark.parametrize("bad, match", [
    (torch.rand(2, 1, 3, 4, 4), "Wrap a single tensor"),
    ([], "contains no tensor"),
    ((3,), "contains no tensor"),
])
def test_example_inputs_must_be_a_tuple_of_tensors(bad, match):
    with pytest.raises(InvalidInputsError, match=match):
        fxmemopt.optimize(DeepConvSNN(num_blocks=1, channels=2), bad)


def test_model_failing_on_example_inputs_is_a_typed_error():
    with pytest.raises(InvalidInputsError, match="DeepConvSNN"):
        fxmemopt.optimize(DeepConvSNN(num_blocks=1, channels=2), (torch.rand(1, 1, 5, 4, 4),))


def test_option_types_are_checked():
    with pytest.raises(InvalidOptionError, match="targets"):
        fxmemopt.optimize(DeepConvSNN(num_blocks=1, channels=2), (torch.rand(1, 1, 3, 4, 4),), targets=("blocks",))


def test_no_neurons_means_no_regions_and_a_note():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    gm, summary = fxmemopt.optimize(model, (torch.rand(2, 3),), return_summary=True)
    assert summary.region_count == 0 and "no stateful module" in summary.notes[0]
    assert torch.equal(gm(torch.ones(2, 3)), model(torch.ones(2, 3)))


def test_memory_is_much_lower_on_a_deep_network():
    """Deterministic (CPU storage tracker), small version of the DeepConvSNN benchmark."""
    torch.manual_seed(0)
    model = DeepConvSNN(num_blocks=8, channels=8)
    x = torch.rand(4, 4, 3, 16, 16)
    gm = fxmemopt.optimize(model, (x,))
    base = fxmemopt.measure_step(model, (x,), repeats=0, warmup=0)
    opt = fxmemopt.measure_step(gm, (x,), repeats=0, warmup=0)
    again = fxmemopt.measure_step(gm, (x,), repeats=0, warmup=0)
    assert opt.peak_bytes == again.peak_bytes  # deterministic
    assert base.peak_bytes / opt.peak_bytes > 3.0
    reset_net(model)


class MSBlock(nn.Module):
    """A membrane-shortcut block (MS-ResNet): the neuron first, a real-valued residual stream between blocks, the
    last BatchNorm's weight initialised to zero (as MS-ResNet's is), and a 1x1 shortcut where ``downsample``."""

    def __init__(self, c: int, downsample: bool = False):
        super().__init__()
        self.sn1, self.c1 = LIFNode(), SeqToANNContainer(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.sn2, self.c2 = LIFNode(), SeqToANNContainer(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        nn.init.zeros_(self.c2[1].weight)
        self.down = SeqToANNContainer(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)) if downsample else None

    def forward(self, x):
        y = self.c2(self.sn2(self.c1(self.sn1(x))))
        return (self.down(x) if self.down is not None else x) + y


class MSNet(nn.Module):
    def __init__(self, c: int = 4, blocks: int = 3):
        super().__init__()
        self.stem = SeqToANNContainer(nn.Conv2d(2, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.blocks = nn.Sequential(*[MSBlock(c, downsample=i == 0) for i in range(blocks)])
        self.head_sn = LIFNode()
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        return self.fc(self.head_sn(self.blocks(self.stem(x))).mean((0, 3, 4)))


@pytest.mark.parametrize("prefer", [None, "memory"])
def test_membrane_shortcut_blocks_get_one_output_regions(prefer):
    """The region grown back from a block's first neuron would take the previous residual sum, whose value is also
    the next shortcut: two outputs, not sliceable in time. The neuron's region starts at the sum instead (its one
    input, a value alive anyway), and the layers that fed the sum form regions without a neuron."""
    torch.manual_seed(0)
    model = MSNet()
    x = torch.rand(4, 2, 2, 8, 8)
    reference = copy.deepcopy(model)
    gm, summary = fxmemopt.optimize(model, (x,), prefer=prefer, never_worse=False, return_summary=True)
    regions = {r.anchor: r for r in summary.regions}
    assert all(len(r.outputs) == 1 for r in summary.regions), [(r.name, r.outputs) for r in summary.regions]
    for k in range(3):
        first = regions[f"blocks.{k}.sn1"]
        assert first.stateful_modules == (f"blocks.{k}.sn1",) and len(first.nodes) == 1
        (inp,) = first.inputs
        assert inp.value_set == "real" and inp.bits == 0
    # the stem's conv+bn, the 1x1 shortcut's and each block's last conv+bn are regions of their own, without a
    # neuron; except the last block's, whose sum feeds only the head's neuron and stays in the head's region
    chains = sorted(r.anchor for r in summary.regions if not r.stateful_modules)
    assert chains == ["blocks.0.c2.1", "blocks.0.down.1", "blocks.1.c2.1", "stem.1"], chains
    assert not any("outputs besides the neuron's" in d.reason for d in summary.decisions)
    if prefer == "memory":
        assert any(r.chunks > 1 for r in summary.plan.regions if r.name.endswith("sn1")), summary.table()
    reset_net(reference)
    reset_net(gm)
    report = compare_training_step(reference, gm, (x,))
    assert report.ok, str(report)


class StepLoop(nn.Module):
    """A single-step neuron run over T by a time loop: ``stack([sn(x[t]) for t])``."""

    def __init__(self):
        super().__init__()
        self.sn = IFNode(step_mode="s")

    def forward(self, x):
        return torch.stack([self.sn(x[t]) for t in range(x.shape[0])])


class LoopThenShortcut(nn.Module):
    """A layer whose neuron is a time loop, then an empty ``nn.Identity`` (a layer's unused pooling slot), whose
    value a residual block reads twice: its first layer's input and its shortcut."""

    def __init__(self, c: int = 2):
        super().__init__()
        self.c0, self.loop, self.post = SeqToANNContainer(nn.Conv2d(1, c, 3, padding=1)), StepLoop(), nn.Identity()
        self.c1, self.sn1 = SeqToANNContainer(nn.Conv2d(c, c, 3, padding=1)), IFNode()
        self.c2, self.sn2 = SeqToANNContainer(nn.Conv2d(c, c, 3, padding=1)), IFNode()

    def forward(self, x):
        h = self.post(self.loop(self.c0(x)))
        return self.sn2(self.c2(self.sn1(self.c1(h)))) + h


@pytest.mark.parametrize("T", [1, 2])
def test_a_chain_of_pass_through_layers_forms_no_region(T):
    """Growing back from the block's first neuron takes the loop's ``stack`` and the ``nn.Identity``, whose value
    the shortcut also reads: they are cut out. As a region of their own they would keep the loop's spikes and
    recompute nothing (a stack and an identity save nothing for backward), so they stay outside regions (found by
    the property run: ``_PASS_THROUGH_CHAIN`` in tests/test_exactness_property.py). Every region recomputes."""
    torch.manual_seed(0)
    model = LoopThenShortcut()
    x = torch.rand(T, 1, 1, 2, 2) * 4
    reference = copy.deepcopy(model)
    gm, summary = fxmemopt.optimize(model, (x,), never_worse=False, return_summary=True)
    # the only region without a neuron is the first convolution, cut out where the loop reads its steps (T >= 2)
    chains = [r.anchor for r in summary.regions if not r.stateful_modules]
    assert chains == ([] if T == 1 else ["c0.0"]), summary.table()
    report = compare_training_step(reference, gm, (x,))
    assert report.ok, str(report)
    chunks = {r.name: r.chunks for r in summary.regions}
    for name, stats in summary.runtime.items():
        assert stats.checkpointed_calls == 1 and stats.recomputations >= chunks[name], (name, stats)


def test_a_zero_initialised_batchnorm_is_not_taken_for_a_neuron():
    """Its output is all zeros on the example, small integers from real input as a silent neuron's would be; but a
    torch.nn layer (or a subclass, such as spikingjelly's) is never a neuron."""
    from fxmemopt.api import analyze

    model = MSNet()
    an = analyze(model, (torch.rand(4, 2, 2, 8, 8),))
    bns = [i for i in an.annotated.nodes.values() if i.op == "call_module" and i.target.endswith("c2.1")]
    assert bns and not any(i.spiking or i.seeds_region for i in bns)
    assert all(str(i.value_set) == "real" for i in bns)


def test_the_region_blamed_for_a_peak_is_the_last_region_event_before_it():
    """Measured never-worse leaves out the region active at a peak above the unoptimized step's: the last region
    event (forward entry or exit, recomputation start or end) before the op with the most live bytes."""
    from fxmemopt.api import _region_at_peak

    timeline = [("mark:enter:a", 10), ("conv", 50), ("mark:exit:a", 40), ("mark:backward", 40),
                ("mark:recompute:b", 40), ("mul", 90), ("mark:recompute-end:b", 80), ("mul", 95), ("add", 20)]
    assert _region_at_peak(timeline, {"a", "b"}) == "b"  # after b's recomputation ended, its tensors still live
    assert _region_at_peak(timeline[:3], {"a", "b"}) == "a"
    assert _region_at_peak(timeline, {"a"}) == "a"  # only regions still in the plan count
    assert _region_at_peak([("conv", 5)], {"a"}) is None
    assert _region_at_peak([], {"a"}) is None
