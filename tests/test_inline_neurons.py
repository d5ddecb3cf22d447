"""Neurons written inline in the root ``forward`` (membranes as local variables, the spike a custom
``autograd.Function`` of the user's own) and regions that buy nothing.

Such a forward used to fail to trace ("custom autograd.Function ... cannot be traced through": there was no
submodule to keep whole). The call is now recorded as one node that runs the Function as it is (its backward too),
recognized as a neuron by what it computed on the example (real values in, spikes out), and seeds a region. Cut
into per-step pieces around the threaded membranes, those regions keep about what they free: the default and
``prefer="memory"`` leave out every region that does not pay for itself (``search.leave_out_idle``), and
``never_worse=False`` keeps them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxmemopt
from fxmemopt.analysis.trace import trace


class SpikeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v):
        ctx.save_for_backward(v)
        return (v > 0).to(v.dtype)

    @staticmethod
    def backward(ctx, grad):
        (v,) = ctx.saved_tensors
        return grad / (1 + 10 * v.abs()) ** 2


class InlineLIF(nn.Module):
    def __init__(self, n_in: int = 40, hidden: int = 32) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(n_in, hidden), nn.Linear(hidden, 10)

    def forward(self, x):
        v1 = v2 = torch.zeros(())
        out = 0.0
        for t in range(x.shape[0]):
            v1 = 0.9 * v1 + self.fc1(x[t])
            s1 = SpikeFn.apply(v1 - 1.0)
            v1 = v1 - s1
            v2 = 0.9 * v2 + self.fc2(s1)
            out = out + v2
        return out


def _model(t: int = 6, n: int = 4):
    torch.manual_seed(0)
    model = InlineLIF().train()
    with torch.no_grad():
        model.fc1.weight.mul_(4.0)
    return model, ((torch.rand(t, n, 40) < 0.3).float(),)


def test_an_inline_custom_function_is_one_node_that_runs_it():
    model, inputs = _model(t=2)
    graph = trace(model, inputs).graph
    calls = [n for n in graph.nodes if n.op == "call_function" and getattr(n.target, "__wrapped_function__", None)]
    assert [n.name for n in calls] == ["spike_fn_apply", "spike_fn_apply_1"]
    assert all(n.target.__wrapped_function__ is SpikeFn and n.target.__name__ == "SpikeFn_apply" for n in calls)


@pytest.mark.parametrize("preset", [{}, {"prefer": "memory"}], ids=["default", "memory"])
def test_inline_spike_functions_seed_regions_exactly_and_idle_ones_leave(preset):
    model, inputs = _model()
    reference = copy.deepcopy(model)
    kept_gm, kept = fxmemopt.optimize(model, inputs, return_summary=True, never_worse=False, **preset)
    anchors = {r.anchor for r in kept.regions}
    assert any(a.endswith("SpikeFn_apply") for a in anchors), anchors
    assert fxmemopt.compare_training_step(reference, kept_gm, inputs).ok
    gm, summary = fxmemopt.optimize(model, inputs, return_summary=True, **preset)
    assert len(summary.regions) < len(kept.regions)
    left = [d for d in summary.decisions if d.action == "unwrap" and d.reason.startswith("buys nothing")]
    assert left and any("left out that lowered the predicted peak" in n and "never_worse=False keeps them" in n
                        for n in summary.notes), summary.notes
    # what they bought: at most 1% of the peak for the default, nothing for prefer="memory"
    tolerance = 0.0 if preset else 0.01
    assert summary.predicted_peak_after <= kept.predicted_peak_after * (1 + tolerance) + 1
    assert fxmemopt.compare_training_step(reference, gm, inputs).ok
    measured = fxmemopt.measure_step(gm, inputs, repeats=0).peak_bytes
    assert measured <= fxmemopt.measure_step(reference, inputs, repeats=0).peak_bytes


def test_a_custom_function_inside_a_submodule_still_keeps_the_submodule_whole():
    class Neuron(nn.Module):
        def forward(self, v):
            return SpikeFn.apply(v - 1.0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.sn = nn.Linear(8, 8), Neuron()

        def forward(self, x):
            return self.sn(self.fc(x))

    graph = trace(Net(), (torch.rand(2, 8),)).graph
    assert [n.target for n in graph.nodes if n.op == "call_module"] == ["fc", "sn"]
