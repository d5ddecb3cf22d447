"""A plan must fit where it will train: what ``optimize`` does when the chosen plan is predicted above the memory
this process has left (fxmemopt.profiling.available), or its measured step runs out of memory. Both take the plan
with the lowest predicted peak, never a higher one, and say so. The real-limit version of the first is in
tests/test_memory_limit.py; here the limit and the out-of-memory error are injected, so every branch runs."""

from __future__ import annotations

import copy
import resource

import pytest
import torch

import fxmemopt
from fxmemopt import api
from fxmemopt.profiling.available import available_bytes
from fxmemopt.profiling.verify import compare_training_step
from fxmemopt.snn import reset_net
from fxmemopt.snn.models import DeepConvSNN


@pytest.fixture
def model_and_x():
    torch.manual_seed(0)
    return DeepConvSNN(num_blocks=3, channels=8), (torch.rand(4, 16, 3, 16, 16) > 0.5).float()


def _peaks(model, x):
    _, speed = fxmemopt.optimize(model, (x,), prefer="speed", return_summary=True)
    _, memory = fxmemopt.optimize(model, (x,), prefer="memory", return_summary=True)
    assert memory.predicted_peak_after < speed.predicted_peak_after  # the case needs two distinct plans
    return speed, memory


def test_available_bytes_reads_this_process_bounds():
    free = available_bytes("cpu")
    assert free is not None and free > 0  # Linux: MemAvailable at least
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    assert soft != resource.RLIM_INFINITY or free <= api.available_bytes.__globals__["_meminfo_available"]()
    assert available_bytes("meta") is None


def test_a_plan_predicted_above_what_is_left_gives_way_to_the_lowest_peak_plan(model_and_x, monkeypatch):
    model, x = model_and_x
    speed, memory = _peaks(model, x)
    left = (speed.predicted_peak_after + memory.predicted_peak_after) // 2
    monkeypatch.setattr(api, "available_bytes", lambda device: left)
    reference = copy.deepcopy(model)
    gm, s = fxmemopt.optimize(model, (x,), prefer="speed", return_summary=True)
    assert s.plan.regions == memory.plan.regions and s.predicted_peak_after == memory.predicted_peak_after
    assert any("was taken instead" in n and "prefer='memory'" in n for n in s.notes), s.notes
    reset_net(reference), reset_net(gm)
    assert compare_training_step(reference, gm, (x,)).ok
    # nothing lower than the lowest: it stays, and the warning says the step may not fit
    monkeypatch.setattr(api, "available_bytes", lambda device: memory.predicted_peak_after // 2)
    with pytest.warns(fxmemopt.errors.FxMemOptWarning, match="no plan is predicted lower"):
        _, s = fxmemopt.optimize(model, (x,), prefer="memory", return_summary=True)
    assert s.plan.regions == memory.plan.regions
    # enough left: the plan asked for (prefer="speed" plans on measured times, so its regions may differ run to run)
    monkeypatch.setattr(api, "available_bytes", lambda device: 2 * speed.predicted_peak_after)
    _, s = fxmemopt.optimize(model, (x,), prefer="speed", return_summary=True)
    assert not any("was taken instead" in n for n in s.notes), s.notes


def test_out_of_memory_in_the_measured_step_takes_the_lowest_peak_plan(model_and_x, monkeypatch):
    model, x = model_and_x
    speed, memory = _peaks(model, x)
    monkeypatch.setattr(api, "available_bytes", lambda device: None)
    monkeypatch.setattr(api, "EXTRAPOLATED_MEASURE_ABOVE", 0.0)  # measure every result at full size
    real, failed = api.measure_step, []

    def out_of_memory_once(gm, inputs, **kwargs):
        if inputs[0].shape == x.shape and gm is not model and not failed:
            failed.append(gm)
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
                               "tried to allocate 1048576 bytes. Error code 12 (Cannot allocate memory)")
        return real(gm, inputs, **kwargs)

    monkeypatch.setattr(api, "measure_step", out_of_memory_once)
    reference = copy.deepcopy(model)
    gm, s = fxmemopt.optimize(model, (x,), prefer="speed", return_summary=True)
    assert failed, "the full-size step was never measured"
    assert s.plan.regions == memory.plan.regions and s.predicted_peak_after == memory.predicted_peak_after
    assert any("ran out of memory" in n and "was taken instead" in n for n in s.notes), s.notes
    reset_net(reference), reset_net(gm)
    assert compare_training_step(reference, gm, (x,)).ok
    # a step that fails for another reason is not out of memory: the plan stays
    failed.clear()

    def other_error_once(gm, inputs, **kwargs):
        if inputs[0].shape == x.shape and gm is not model and not failed:
            failed.append(gm)
            raise RuntimeError("a kernel the machine lacks")
        return real(gm, inputs, **kwargs)

    monkeypatch.setattr(api, "measure_step", other_error_once)
    _, s = fxmemopt.optimize(model, (x,), prefer="speed", return_summary=True)
    assert failed and not any("ran out of memory" in n for n in s.notes), s.notes
