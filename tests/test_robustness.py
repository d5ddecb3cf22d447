"""Run-time robustness of the optimized module: other shapes than the examples, integer / bool / no-grad inputs,
non-binary "spikes", models that reset their neurons inside forward; and optimize() under faults leaves the
caller's model exactly as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from test_pipeline import PlainLIF
from torch import nn

import fxmemopt
from fxmemopt.profiling.verify import compare_training_step, module_states
from fxmemopt.snn import DeepConvSNN, LIFNode, SeqToANNContainer, SpikingVGG11, reset_net


@pytest.mark.parametrize("prefer", [None, "memory", "speed"])
@pytest.mark.parametrize("shape", [(2, 2, 3, 16, 16), (3, 5, 3, 16, 16), (11, 1, 3, 16, 16), (8, 3, 3, 24, 24)])
def test_other_batch_size_and_T_than_the_examples_stay_exact(prefer, shape):
    torch.manual_seed(0)
    model = DeepConvSNN(num_blocks=3, channels=4)
    gm, summary = fxmemopt.optimize(model, (torch.rand(8, 2, 3, 16, 16),), prefer=prefer, return_summary=True)
    if prefer == "memory":
        assert any(r.chunks > 2 for r in summary.regions)  # chunks get clamped to T=2 and T=3 below
    reference = copy.deepcopy(model)
    x = torch.rand(shape)
    report = compare_training_step(reference, gm, (x,))
    assert report.ok, report.mismatches


class TokenSNN(nn.Module):
    """Token ids [T, N] -> embedding -> Linear+LIF -> Linear: an integer input that never requires grad."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc = SeqToANNContainer(nn.Linear(16, 16))
        self.sn = LIFNode()
        self.out = nn.Linear(16, 4)

    def forward(self, ids):
        return self.out(self.sn(self.fc(self.emb(ids))))


class BoolSNN(nn.Module):
    """A bool event tensor as input, converted inside."""

    def __init__(self):
        super().__init__()
        self.fc1 = SeqToANNContainer(nn.Linear(8, 8), nn.BatchNorm1d(8))
        self.sn1 = LIFNode()
        self.fc2 = SeqToANNContainer(nn.Linear(8, 8))
        self.sn2 = LIFNode()

    def forward(self, events):
        return self.sn2(self.fc2(self.sn1(self.fc1(events.float()))))


@pytest.mark.parametrize("prefer", [None, "memory"])
def test_integer_token_inputs(prefer):
    torch.manual_seed(0)
    model = TokenSNN()
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 50, (4, 3))
    gm = fxmemopt.optimize(model, (ids,), prefer=prefer)
    report = compare_training_step(reference, gm, (ids,))
    assert report.ok, report.mismatches
    reset_net(gm)
    reset_net(reference)
    model.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    other = torch.randint(0, 50, (6, 2))  # other T and batch
    assert compare_training_step(reference, gm, (other,)).ok


@pytest.mark.parametrize("prefer", [None, "memory"])
def test_bool_inputs(prefer):
    torch.manual_seed(0)
    model = BoolSNN()
    reference = copy.deepcopy(model)
    events = torch.rand(4, 3, 8) > 0.5
    gm, summary = fxmemopt.optimize(model, (events,), prefer=prefer, return_summary=True)
    report = compare_training_step(reference, gm, (events,))
    assert report.ok, report.mismatches


def test_inputs_that_do_not_require_grad():
    torch.manual_seed(0)
    model = SpikingVGG11(width=0.125)
    reference = copy.deepcopy(model)
    x = torch.rand(4, 2, 2, 48, 48)
    gm = fxmemopt.optimize(model, (x,))
    for module in (reference, gm):
        torch.manual_seed(1)
        module(x).sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(p.grad, q.grad), n
    assert x.grad is None and not x.requires_grad


class SelfResetting(nn.Module):
    """Resets its neurons at the start of every forward (a common training-loop shortcut)."""

    def __init__(self):
        super().__init__()
        self.net = DeepConvSNN(num_blocks=2, channels=4)

    def forward(self, x):
        reset_net(self)
        return self.net(x)


def test_a_model_that_resets_its_neurons_inside_forward_keeps_doing_so():
    torch.manual_seed(0)
    model = SelfResetting()
    x = torch.rand(4, 2, 3, 16, 16)
    with torch.no_grad():
        model(x)  # states are non-trivial now; optimize must leave them so
    before = {k: v.clone() for k, v in module_states(model).items() if isinstance(v, torch.Tensor)}
    reference = copy.deepcopy(model)
    gm, summary = fxmemopt.optimize(model, (x,), return_summary=True)
    after = module_states(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any("resets" in n for n in summary.notes)
    for _ in range(3):  # no reset between steps: the model's own reset must still happen in every forward
        report = compare_training_step(reference, gm, (x,))
        assert report.ok, report.mismatches


class PlainSelfResetting(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = SeqToANNContainer(nn.Linear(6, 6))
        self.sn1 = PlainLIF()
        self.fc2 = SeqToANNContainer(nn.Linear(6, 6))
        self.sn2 = PlainLIF()

    def forward(self, x):
        self.sn1.v = 0.0  # the reset, written by hand
        self.sn2.v = 0.0
        return self.sn2(self.fc2(self.sn1(self.fc1(x))))


def test_a_plain_model_that_resets_by_assignment_keeps_doing_so():
    torch.manual_seed(0)
    model = PlainSelfResetting()
    x = torch.rand(3, 2, 6) * 2
    reference = copy.deepcopy(model)
    gm, summary = fxmemopt.optimize(model, (x,), return_summary=True)
    assert set(summary.stateful_modules) == {"sn1", "sn2"}
    assert any("resets sn1, sn2" in n for n in summary.notes)
    for _ in range(3):
        report = compare_training_step(reference, gm, (x,))
        assert report.ok, report.mismatches
        for m in (model, reference):  # detach the carried state so the next step starts graph-free
            for sn in (m.sn1, m.sn2):
                sn.v = sn.v.detach()
