"""Hand-placed regions (fxmemopt.Checkpointed, the seed's GCContainer): exact, and they keep less."""

from __future__ import annotations

import copy

import torch
from torch import nn

import fxmemopt
from fxmemopt.profiling.verify import compare_training_step
from fxmemopt.snn import ConvBNNeuron, reset_net


class Plain(nn.Module):
    """The same parameter names as Checkpointed (``module.``), without checkpointing: the reference."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args):
        return self.module(*args)


def _net(wrap) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(wrap(ConvBNNeuron(3, 8)), wrap(nn.Sequential(nn.Dropout(0.2), ConvBNNeuron(8, 8))),
                         wrap(ConvBNNeuron(8, 8)))


def test_checkpointed_layers_train_exactly_and_keep_less():
    model, reference = _net(fxmemopt.Checkpointed), _net(Plain)
    reference.load_state_dict(model.state_dict())
    x = torch.rand(4, 2, 3, 16, 16)
    report = compare_training_step(reference, model, (x,), between=lambda: torch.rand(3))
    assert report.ok, report.mismatches
    assert model[1].stats.checkpointed_calls == 1 and model[1].stats.recomputations == 1
    assert model[1].stats.packed_bytes > 0 and model[0].stats.packed_bytes == 0  # spikes packed, real input kept
    assert model[0].stats.unpacked_fallbacks == 0  # hand-placed: no plan to fall back from, no warning
    reset_net(model)
    reset_net(reference)
    model.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    peak = fxmemopt.measure_step(model, (x,), repeats=0).peak_bytes
    base = fxmemopt.measure_step(reference, (x,), repeats=0).peak_bytes
    assert peak < base * 0.8


def test_checkpointed_in_eval_and_no_grad_runs_plainly():
    model = _net(fxmemopt.Checkpointed).eval()
    x = torch.rand(4, 2, 3, 16, 16)
    with torch.no_grad():
        model(x)
    assert all(m.stats.plain_calls == 1 and m.stats.checkpointed_calls == 0 for m in model)


def test_checkpointed_state_dict_and_parameters_are_the_modules():
    inner = ConvBNNeuron(3, 8)
    wrapped = fxmemopt.Checkpointed(inner)
    assert [n for n, _ in wrapped.named_parameters()] == [f"module.{n}" for n, _ in inner.named_parameters()]
    assert set(wrapped.state_dict()) == {f"module.{k}" for k in inner.state_dict()}
    assert copy.deepcopy(wrapped)(torch.rand(2, 1, 3, 8, 8)).shape == (2, 1, 8, 8, 8)
