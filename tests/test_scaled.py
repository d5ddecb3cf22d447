"""The step recorded at small batches and extrapolated (fxmemopt.profiling.scaled) against the step recorded at the
examples' size: every storage's size, and so every prediction's bytes, must be the same to the byte; where the
batch cannot be sliced, the full recording with the reason; ``recording="reduced"`` raises there."""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch
from sj_zoo import ZOO
from torch import nn

import fxmemopt
from fxmemopt.api import analyze
from fxmemopt.errors import RecordingError
from fxmemopt.planning.costgraph import build_cost_graph, simulate
from fxmemopt.planning.search import resolve_options, search_without_cost
from fxmemopt.profiling.record import record_step
from fxmemopt.profiling.scaled import MIN_BATCH, extrapolate, find_batch_dim, peak_of, record_scaled, slice_batch
from fxmemopt.profiling.verify import compare_training_step
from fxmemopt.snn.models import DeepConvSNN, SEWResNet18, Spikformer, SpikingVGG11


def _time_steps(an) -> set[int]:
    return {i.time_steps for i in an.annotated.nodes.values() if i.time_steps}


def _batched(inputs: tuple, n: int = MIN_BATCH) -> tuple:
    """The example inputs repeated along their batch dimension to ``n`` samples (dimension 1 of a [T, N, ...]
    sequence, else 0), random values drawn anew so the samples differ."""
    out = []
    for a in inputs:
        if isinstance(a, torch.Tensor) and a.dim() >= 2:
            d = 1 if a.dim() == 5 else 0
            reps = [1] * a.dim()
            reps[d] = -(-n // a.shape[d])
            b = a.repeat(*reps).narrow(d, 0, n)
            a = ((torch.rand_like(b) < 0.3).to(b.dtype) if set(a.unique().tolist()) <= {0.0, 1.0} else
                 torch.rand_like(b))
        out.append(a)
    return tuple(out)


def _same_step(model: nn.Module, inputs: tuple) -> None:
    an = analyze(model, inputs)
    full = record_step(an.traced, inputs, an.stateful, timing_repeats=0)
    scaled, how = record_scaled(an.traced, inputs, an.stateful, time_steps=_time_steps(an))
    assert how.method == "extrapolated", how
    assert [s.nbytes for s in scaled.storages] == [s.nbytes for s in full.storages]
    assert scaled.storages == full.storages and scaled.events == full.events
    assert scaled.peak_bytes == full.peak_bytes == peak_of(full)
    cost_full, cost_scaled = build_cost_graph(an.annotated, full), build_cost_graph(an.annotated, scaled)
    plan = search_without_cost(list(an.regions), an.annotated, resolve_options()).plan
    assert simulate(cost_scaled, plan).peak_bytes == simulate(cost_full, plan).peak_bytes


@pytest.mark.parametrize("make", [
    lambda: (DeepConvSNN(num_blocks=4, channels=8), (torch.rand(4, 8, 3, 16, 16) > 0.5).float()),
    lambda: (SpikingVGG11(width=0.25, dropout=0.2), torch.rand(4, 8, 2, 32, 32)),
    lambda: (SEWResNet18(width=0.25), torch.rand(4, 8, 3, 32, 32)),
    lambda: (Spikformer(embed_dim=32, num_heads=2, depth=1), torch.rand(4, 8, 3, 32, 32)),
], ids=["deepconv", "vgg11", "sew_resnet18", "spikformer"])
def test_reference_models_extrapolate_to_the_byte(make):
    torch.manual_seed(0)
    model, x = make()
    _same_step(model, (x,))


#: The whole zoo takes about 5 minutes on 2 cores (FXMEMOPT_WHOLE_ZOO=1 runs it; all 29 passed on 2026-12-07);
#: the suite runs a model of each family: a VGG, a ResNet, a PLIF net, a transformer.
ZOO_IN_SUITE = ("spiking_vgg11", "spiking_resnet18", "plif_mnist", "spikformer_cifar", "spike_driven_transformer")


@pytest.mark.parametrize("name", sorted(ZOO) if os.environ.get("FXMEMOPT_WHOLE_ZOO") else ZOO_IN_SUITE)
def test_spikingjelly_zoo_extrapolates_to_the_byte(name):
    torch.manual_seed(0)
    model, inputs = ZOO[name]()
    _same_step(model, _batched(tuple(inputs), 12))  # 12: batch 2, 4 and 6 where batch 1 runs other ops


class FixedBatch(nn.Module):
    """Writes its batch size into its code (as sinabs' ``IAFSqueeze(batch_size=...)`` does)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.sn = fxmemopt.snn.neuron.LIFNode()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sn(self.fc(x).reshape(4, 8, 4))


def test_a_model_that_fixes_its_batch_is_recorded_at_full_size_and_says_why():
    model, x = FixedBatch(), torch.rand(4, 8, 6)
    an = analyze(model, (x,))
    trace, how = record_scaled(an.traced, (x,), an.stateful, time_steps=_time_steps(an))
    assert how.method == "full" and "failed" in how.why
    assert trace.peak_bytes == record_step(an.traced, (x,), an.stateful).peak_bytes
    with pytest.raises(RecordingError, match="recording='full'"):
        record_scaled(an.traced, (x,), an.stateful, recording="reduced", time_steps=_time_steps(an))
    gm, s = fxmemopt.optimize(model, (x,), return_summary=True)
    assert "examples' size" in s.recording


def test_small_batches_and_full_are_recorded_at_the_examples_size():
    model = DeepConvSNN(num_blocks=2, channels=4)
    x = (torch.rand(4, MIN_BATCH - 1, 3, 8, 8) > 0.5).float()
    _, s = fxmemopt.optimize(model, (x,), return_summary=True)
    assert "examples' size" in s.recording and f"below {MIN_BATCH}" in s.recording
    _, s = fxmemopt.optimize(model, (x,), return_summary=True, recording="full")
    assert s.recording == "recorded at the examples' size"
    with pytest.raises(fxmemopt.errors.InvalidOptionError, match="recording"):
        fxmemopt.optimize(model, (x,), recording="tiny")


def test_optimize_says_how_it_recorded_and_trains_exactly():
    torch.manual_seed(0)
    model = DeepConvSNN(num_blocks=3, channels=8)
    x = (torch.rand(4, 12, 3, 16, 16) > 0.5).float()
    reference = copy.deepcopy(model)
    gm, s = fxmemopt.optimize(model, (x,), return_summary=True)
    assert "extrapolated to 12" in s.recording and "cost model: recorded at batch 1, 2" in str(s)
    assert s.report()["totals"]["recording"] == s.recording
    ref = compare_training_step(reference, gm, (x,))
    assert ref.ok, ref


def test_batch_dimension_and_slices():
    x = torch.rand(4, 16, 3)
    assert find_batch_dim((x,), {4}) == 1 and find_batch_dim((x,)) == 0 and find_batch_dim((torch.rand(5),)) is None
    y = torch.rand(4, 16, 3, requires_grad=True)
    (a, b, c) = slice_batch((y, torch.rand(4, 7), 3), 1, 2, 16)
    assert a.shape == (4, 2, 3) and a.is_contiguous() and a.requires_grad and a.is_leaf
    assert torch.equal(a, y[:, :2]) and b.shape == (4, 7) and c == 3


def test_extrapolate_refuses_a_size_that_is_not_affine():
    model, x = DeepConvSNN(num_blocks=1, channels=4), (torch.rand(4, 3, 3, 8, 8) > 0.5).float()
    an = analyze(model, (x,))
    traces = [record_step(an.traced, slice_batch((x,), 1, n, 3), an.stateful, timing_repeats=0) for n in (1, 2, 3)]
    ok, why = extrapolate(traces, (1, 2, 3), 30)
    assert ok is not None and why == ""
    first = traces[2].storages[0]
    bent = dataclasses.replace(traces[2], storages=(dataclasses.replace(first, nbytes=first.nbytes + 4),)
                               + traces[2].storages[1:])
    none, why = extrapolate([traces[0], traces[1], bent], (1, 2, 3), 30)
    assert none is None and "not affine" in why
    none, why = extrapolate([traces[0], traces[1], dataclasses.replace(bent, events=bent.events[:-1])], (1, 2, 3), 30)
    assert none is None and "op sequence differs" in why
