"""optimize(profile=...): measured peaks confirm the prediction, and a profiling worker that hangs, raises, dies or
cannot receive the model never stops optimize: it returns in bounded time with the candidates rejected."""

from __future__ import annotations

import copy
import os
import time

import pytest
import torch
from torch import nn

import fxmemopt
from fxmemopt.errors import InvalidOptionError
from fxmemopt.profiling.verify import compare_training_step, module_states
from fxmemopt.profiling.workers import WORKER_ENV_VAR
from fxmemopt.snn import IFNode, SeqToANNContainer


def _in_worker() -> bool:
    return os.environ.get(WORKER_ENV_VAR) == "1"


class Misbehave(nn.Module):
    """Does nothing in the calling process; inside a profiling worker it hangs, raises or exits, per `fault`."""

    def __init__(self, fault: str):
        super().__init__()
        self.fault = fault

    def forward(self, x):
        if _in_worker():
            if self.fault == "sleep":
                time.sleep(3600)
            elif self.fault == "raise":
                raise RuntimeError("boom in the worker")
            elif self.fault == "exit":
                os._exit(3)
            elif self.fault == "oom":
                raise MemoryError("simulated out of memory")
        return x


class Net(nn.Module):
    """Two Linear+IF layers behind a guard that misbehaves only inside a profiling worker."""

    def __init__(self, fault: str = "none", width: int = 8):
        super().__init__()
        self.guard = Misbehave(fault)
        self.fc1 = SeqToANNContainer(nn.Linear(width, width))
        self.sn1 = IFNode(v_threshold=0.5)
        self.fc2 = SeqToANNContainer(nn.Linear(width, 4))
        self.sn2 = IFNode(v_threshold=0.5)

    def forward(self, x):
        return self.sn2(self.fc2(self.sn1(self.fc1(self.guard(x)))))


def _net(fault: str) -> nn.Module:
    return Net(fault)


def test_profile_in_a_worker_confirms_the_prediction():
    torch.manual_seed(0)
    x = torch.rand(8, 8, 256)
    model = Net(width=256)
    gm, s = fxmemopt.optimize(model, (x,), measure="worker", return_summary=True)
    assert s.rejected == []
    assert s.measured_peak_before == fxmemopt.measure_step(model, (x,), repeats=0).peak_bytes
    assert s.measured_peak_after == fxmemopt.measure_step(gm, (x,), repeats=0).peak_bytes
    assert s.measured_step_time_ratio > 0
    assert s.prediction_error < 0.10 and s.prediction_error_before < 0.01
    assert "worker" in s.measurement


def test_profile_in_process():
    x = torch.rand(4, 3, 8)
    model = _net("none")
    gm, s = fxmemopt.optimize(model, (x,), measure="in-process", return_summary=True)
    assert s.measured_peak_after == fxmemopt.measure_step(gm, (x,)).peak_bytes
    assert s.measured_peak_before == fxmemopt.measure_step(model, (x,)).peak_bytes


@pytest.mark.parametrize("fault, status, bound_s", [
    ("sleep", "timeout", 30.0),
    ("raise", "error", 20.0),
    ("exit", "crashed", 20.0),
    ("oom", "oom", 20.0),
])
def test_faulty_workers_are_rejected_and_optimize_returns(fault, status, bound_s):
    torch.manual_seed(0)
    model = _net(fault)
    x = torch.rand(4, 3, 8)
    model(x).sum().backward()  # gradients and neuron states are non-trivial: optimize must leave them as they are
    for m in model.modules():
        for k, v in getattr(m, "_memories", {}).items():
            m._memories[k] = v.detach() if isinstance(v, torch.Tensor) else v  # graph-free, so deepcopy works
    ref = copy.deepcopy(model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    states = {k: v.clone() for k, v in module_states(model).items() if isinstance(v, torch.Tensor)}
    params = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    t0 = time.perf_counter()
    # The guard's branch must run at call time, not at trace time: keep it a leaf.
    gm, s = fxmemopt.optimize(model, (x,), measure="worker", measure_timeout_s=3.0, leaf_modules=(Misbehave,),
                              return_summary=True)
    assert time.perf_counter() - t0 < bound_s
    assert [(name, st) for name, st, _ in s.rejected] == [("unoptimized", status), ("optimized", status)]
    if fault == "raise":
        assert "boom in the worker" in s.rejected[0][2]
    if fault == "exit":
        assert "3" in s.rejected[0][2]
    assert s.measured_peak_after is None and s.predicted_peak_after is not None
    assert "rejected optimized" in str(s)
    # the caller's model is as it was: parameters, buffers, gradients, neuron states, the global RNG
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters())
    assert states and all(torch.equal(states[k], v) for k, v in module_states(model).items() if k in states)
    assert torch.equal(rng, torch.get_rng_state())
    model.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    assert compare_training_step(ref, gm, (x,)).ok  # the rewrite itself is unaffected


def test_unpicklable_model_is_rejected_without_a_worker():
    model = _net("none")
    model.fc1.tag = lambda: None  # lambdas do not pickle (fc1 is shared by the optimized module too)
    x = torch.rand(4, 3, 8)
    t0 = time.perf_counter()
    gm, s = fxmemopt.optimize(model, (x,), measure="worker", return_summary=True)
    assert time.perf_counter() - t0 < 10
    assert [st for _, st, _ in s.rejected] == ["unpicklable", "unpicklable"]
    assert "in-process" in s.rejected[0][2]


@pytest.mark.parametrize("kw", [{"measure": "gpu"}, {"measure": "worker", "measure_timeout_s": 0}])
def test_profile_options_are_checked(kw):
    with pytest.raises(InvalidOptionError):
        fxmemopt.optimize(_net("none"), (torch.rand(2, 1, 8),), **kw)
