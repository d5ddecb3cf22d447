"""torch.compile on the optimized module (Rule 10 in fxmemopt/runtime.py): regions run eagerly, the code between
them is compiled, and a training step stays bitwise equal to the unoptimized model run eagerly."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

import fxmemopt
from fxmemopt.runtime.checkpoint import CheckpointRegion
from fxmemopt.snn import DeepConvSNN, SpikingVGG11, reset_net

BACKENDS = ["eager", "aot_eager"] + (["inductor"] if shutil.which("g++") or shutil.which("c++") else [])


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_optimized_module_trains_exactly(backend):
    torch.manual_seed(0)
    model = DeepConvSNN(num_blocks=2, channels=4)
    x = torch.rand(4, 2, 3, 16, 16)
    reference = copy.deepcopy(model)
    gm = fxmemopt.optimize(model, (x,), prefer="memory")
    compiled = torch.compile(gm, backend=backend)
    for _ in range(2):  # the second step runs the cached compiled code
        report = fxmemopt.compare_training_step(reference, compiled, (x,))
        assert report.ok, report.mismatches
        reset_net(reference)
        reset_net(gm)


@pytest.mark.parametrize("kwargs", [{"level": 0}, {"prefer": "speed"}])
def test_compiled_with_neurons_outside_regions(kwargs):
    """Neurons left outside regions (level 0, or unwrapped for speed) are compiled like any module."""
    torch.manual_seed(0)
    model = SpikingVGG11(width=0.125)
    x = torch.rand(4, 2, 2, 48, 48)
    reference = copy.deepcopy(model)
    gm = fxmemopt.optimize(model, (x,), **kwargs)
    report = fxmemopt.compare_training_step(reference, torch.compile(gm, backend="aot_eager"), (x,))
    assert report.ok, report.mismatches


def test_regions_are_opaque_to_dynamo():
    torch.manual_seed(0)
    model = DeepConvSNN(num_blocks=2, channels=4)
    x = torch.rand(4, 2, 3, 16, 16)
    gm = fxmemopt.optimize(model, (x,))
    regions = [m for m in gm.modules() if isinstance(m, CheckpointRegion)]
    assert regions
    explanation = torch._dynamo.explain(gm)(x)
    code = "\n".join(g.code for g in explanation.graphs)
    # Only the head is compiled: every convolution, BatchNorm and neuron is inside a region, which runs eagerly.
    assert "linear" in code and "conv" not in code and "batch_norm" not in code
    assert "saved_tensors_hooks" not in code and "rng_state" not in code
    reset_net(gm)
