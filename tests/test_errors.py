"""One test per user error: the type is the documented one, and the message names the offending object (module
path, graph node, option or plan field), says what was expected and got, and what to do."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import fxmemopt
from fxmemopt.errors import (
    DoesNotFitError,
    FxMemOptError,
    InvalidInputsError,
    InvalidOptionError,
    PlanError,
    RegionError,
    StaleStateError,
    TargetsMatchNothingError,
    TraceError,
)
from fxmemopt.profiling.verify import compare_training_step
from fxmemopt.snn import DeepConvSNN, IFNode, SeqToANNContainer


def _small():
    return DeepConvSNN(num_blocks=1, channels=2)


X = torch.rand(2, 1, 3, 8, 8)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = SeqToANNContainer(nn.Linear(4, 4))
        self.sn = IFNode()

    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value, in the root module
            x = x * 2
        return self.sn(self.fc(x))


def test_untraceable_model_names_the_module_and_suggests_leaves():
    with pytest.raises(TraceError) as e:
        fxmemopt.optimize(Untraceable(), (torch.rand(2, 1, 4),))
    msg = str(e.value)
    assert "Untraceable (the root module)" in msg and "leaf_modules" in msg and "submodule" in msg


def test_targets_matching_nothing_name_the_classes():
    with pytest.raises(TargetsMatchNothingError) as e:
        fxmemopt.optimize(_small(), (X,), targets=(nn.GRU,))
    assert "GRU" in str(e.value)


@pytest.mark.parametrize("inputs, named", [
    (X, "example_inputs"), ([], "example_inputs"), (("text",), "example_inputs"), ((3, None), "example_inputs"),
])
def test_example_inputs_not_a_tuple_of_tensors(inputs, named):
    with pytest.raises(InvalidInputsError) as e:
        fxmemopt.optimize(_small(), inputs)
    assert named in str(e.value) and ("tuple" in str(e.value) or "tensor" in str(e.value))


def test_example_inputs_the_model_rejects_name_the_model():
    with pytest.raises(InvalidInputsError) as e:
        fxmemopt.optimize(_small(), (torch.rand(2, 1, 5, 8, 8),))
    assert "DeepConvSNN(*example_inputs)" in str(e.value) and "channels" in str(e.value)


class KeepsV(nn.Module):
    """A plain neuron keeping its membrane in ``self.v``, with no reset method (``tests/test_stale_state.py`` has
    the library neurons optimize resets itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.v = None

    def forward(self, x):
        self.v = x if self.v is None else self.v / 2 + x
        return (self.v > 1).float() + self.v - self.v.detach()


def test_stale_state_that_cannot_be_reset_names_the_module_attribute_and_the_reset():
    model = nn.Sequential(nn.Linear(4, 4), KeepsV())
    model(torch.rand(3, 4)).sum().backward()  # a training step: v has the step's (freed) graph; nothing reset it
    with pytest.raises(StaleStateError) as e:
        fxmemopt.optimize(model, (torch.rand(3, 4),))
    msg = str(e.value)
    assert msg.startswith("1 (KeepsV): holds state from an earlier step") and "v: tensor [3, 4] with grad_fn" in msg
    assert "expected a fresh state" in msg and "Reset the model's state before optimize" in msg


class Box:
    """Not a tensor, not a container: a region cannot know whether it changes before backward."""

    def __init__(self, t):
        self.t = t


class MakeBox(nn.Module):
    """A neuron whose output is wrapped in a Box: a region boundary whose value the next region reads."""

    def __init__(self):
        super().__init__()
        self.sn = IFNode(v_threshold=0.5)

    def forward(self, x):
        return Box(self.sn(x))


class Pair(nn.Module):
    """A neuron returning (spikes, input): a tuple that the next region unpacks."""

    def __init__(self):
        super().__init__()
        self.sn = IFNode(v_threshold=0.5)

    def forward(self, x):
        return self.sn(x), x


class UsesLeafOutput(nn.Module):
    def __init__(self, leaf: nn.Module, unpack):
        super().__init__()
        self.fc0 = SeqToANNContainer(nn.Linear(4, 4))
        self.leaf = leaf
        self.unpack = unpack
        self.fc = SeqToANNContainer(nn.Linear(4, 4))
        self.sn = IFNode(v_threshold=0.5)

    def forward(self, x):
        return self.sn(self.fc(self.unpack(self.leaf(self.fc0(x)))))


def test_region_input_that_is_not_a_tensor_names_the_region_and_input():
    model = UsesLeafOutput(MakeBox(), lambda box: box.t)
    # optimize's validation step meets the error, leaves the region out and says why (never a module that fails)
    with pytest.warns(fxmemopt.FxMemOptWarning, match="failed a training step"):
        gm, summary = fxmemopt.optimize(model, (torch.rand(3, 2, 4),), leaf_modules=(MakeBox,), return_summary=True)
    (name, msg), = summary.failed_regions
    assert name == "ckpt_sn" and msg.startswith("RegionError")
    assert "region 'ckpt_sn'" in msg and "input 'leaf'" in msg and "Box" in msg and "leaf_modules" in msg
    gm(torch.rand(3, 2, 4).requires_grad_()).sum().backward()


def test_region_inputs_that_are_containers_of_tensors_work_exactly():
    torch.manual_seed(0)
    model = UsesLeafOutput(Pair(), lambda pair: pair[0] * pair[1])
    reference = copy.deepcopy(model)
    x = torch.rand(3, 2, 4)
    gm, summary = fxmemopt.optimize(model, (x,), leaf_modules=(Pair,), return_summary=True,
                                    never_worse=False)  # a tiny net: the rewrite is under test, not the peak
    last = next(r for r in summary.regions if r.anchor == "sn")
    # the neuron's tuple is unpacked outside the next region: its inputs are the two tensors
    assert [i.shape for i in last.inputs] == [(3, 2, 4), (3, 2, 4)]
    assert compare_training_step(reference, gm, (x,)).ok


def test_plan_that_is_malformed_names_the_field():
    _, summary = fxmemopt.optimize(_small(), (X,), return_summary=True)
    d = json.loads(summary.plan.to_json())
    d["regions"][0]["chunks"] = 0
    with pytest.raises(PlanError) as e:
        fxmemopt.optimize(_small(), (X,), plan=json.dumps(d))
    assert "regions[0].chunks" in str(e.value) and "expected" in str(e.value)


def test_plan_for_another_model_says_so():
    _, summary = fxmemopt.optimize(_small(), (X,), return_summary=True)
    with pytest.raises(PlanError) as e:
        fxmemopt.optimize(DeepConvSNN(num_blocks=2, channels=2), (X,), plan=summary.plan)
    assert "different model" in str(e.value) and "graph fingerprint" in str(e.value)


@pytest.mark.parametrize("kwargs, named", [
    ({"memory_budget": -5}, "memory_budget"),
    ({"memory_budget": "lots"}, "memory_budget"),
    ({"gc_target_budget_ratio": 0.0}, "gc_target_budget_ratio"),
    ({"gc_target_budget_ratio": 1.5}, "gc_target_budget_ratio"),
    ({"prefer": "fast"}, "prefer"),
    ({"profile": "turbo"}, "profile"),
    ({"checkpoint_budget": "all"}, "checkpoint_budget"),
    ({"level": 7}, "level"),
    ({"temporal_split_factor": 1}, "temporal_split_factor"),
    ({"max_gc_wrapped_modules": -1}, "max_gc_wrapped_modules"),
    ({"max_split_rounds": -2}, "max_split_rounds"),
    ({"measure": "gpu"}, "measure"),
    ({"measure_timeout_s": 0}, "measure_timeout_s"),
    ({"exact": "yes"}, "exact"),
    ({"plan": 42}, "plan"),
    ({"leaf_modules": (3,)}, "leaf_modules"),
])
def test_options_out_of_range_name_the_option(kwargs, named):
    with pytest.raises(InvalidOptionError) as e:
        fxmemopt.optimize(_small(), (X,), **kwargs)
    assert str(e.value).startswith(named) or f"{named}:" in str(e.value) or named in str(e.value).split(":")[0]
    assert "expected" in str(e.value) or "Pass" in str(e.value)


def test_every_user_error_is_an_fxmemopt_error():
    for cls in (TraceError, InvalidInputsError, InvalidOptionError, TargetsMatchNothingError, RegionError, PlanError,
                StaleStateError, DoesNotFitError):
        assert issubclass(cls, FxMemOptError)


def test_analysis_that_runs_out_of_memory_names_the_model_and_what_to_change(monkeypatch):
    """The allocator's error while analysing becomes DoesNotFitError (a MemoryError), with the inputs' shapes and
    what to change; under a real limit: tests/test_memory_limit.py (a sinabs net that fixes its batch size)."""
    import fxmemopt.api as api

    def oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 50331648 bytes")

    monkeypatch.setattr(api, "analyze", oom)
    with pytest.raises(DoesNotFitError) as e:
        fxmemopt.optimize(_small(), (X,))
    msg = str(e.value)
    assert msg.startswith("model DeepConvSNN: analysing it (a forward on inputs of (2, 1, 3, 8, 8)") and \
        "can't allocate memory" in msg and "batch size from its input" in msg, msg
    assert isinstance(e.value, MemoryError)
