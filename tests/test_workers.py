"""fxmemopt.profiling.workers: measurements in a worker equal in-process ones, and every fault returns in bounded time.

Models that misbehave only inside a worker are defined at module top level, so the spawned worker can import them
by name (pytest puts this directory on sys.path and spawn passes sys.path on); they detect the worker through the
FXMEMOPT_WORKER environment variable the worker sets.
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time

import pytest
import torch
from torch import nn

import fxmemopt
from fxmemopt.errors import InvalidInputsError, InvalidOptionError
from fxmemopt.profiling.workers import (
    WORKER_ENV_VAR,
    FactorySpec,
    ProfileJob,
    ProfileResult,
    WorkerPool,
    WorkerPoolClosedError,
    make_job,
    pack_module,
    run_in_process,
)
from fxmemopt.snn import DeepConvSNN

SLACK_S = 10.0  # bound on what a fault may cost beyond its timeout: a kill, a reap, and on a loaded machine a restart


def _in_worker() -> bool:
    return os.environ.get(WORKER_ENV_VAR) == "1"


class Tiny(nn.Module):
    """A linear layer; ``mode`` says how it misbehaves when (and only when) it runs in a worker."""

    def __init__(self, mode: str = "ok") -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "raise":  # everywhere, so run_in_process sees it too
            raise ValueError("boom from Tiny")
        if _in_worker():
            if self.mode == "sleep":
                while True:
                    time.sleep(1.0)
            if self.mode == "exit":
                os._exit(3)
            if self.mode == "memory":
                raise MemoryError("simulated allocation failure")
        return self.lin(x)


class BreaksInWorker(nn.Module):
    """Pickles fine in the parent, but cannot be unpickled in a worker."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def __setstate__(self, state: dict) -> None:
        if _in_worker():
            raise RuntimeError("cannot be rebuilt here")
        super().__setstate__(state)


class HoldsLambda(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = lambda t: t * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.lin(x))


TINY_X = (torch.rand(3, 4),)
SNN_KWARGS = {"num_blocks": 2, "channels": 4}


def _snn() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return DeepConvSNN(**SNN_KWARGS), (torch.rand(2, 2, 3, 8, 8),)


@pytest.fixture(scope="module")
def pool():
    """One pool shared by the tests whose faults leave the worker alive (saves an interpreter start per test)."""
    with WorkerPool(start_timeout_s=60) as p:
        yield p


def _good(pool: WorkerPool) -> ProfileResult:
    result = pool.run(make_job("good", Tiny(), TINY_X, repeats=1, timeout_s=60))
    assert result.ok, result.message
    return result


# ----------------------------------------------------------------------------------------------------------------
# ok: same numbers as in process, for both routes
# ----------------------------------------------------------------------------------------------------------------


def test_worker_peak_equals_in_process_peak_plain_optimized_and_factory(pool):
    model, x = _snn()
    gm = fxmemopt.optimize(model, x)
    expected_plain = fxmemopt.measure_step(model, x).peak_bytes
    expected_opt = fxmemopt.measure_step(gm, x).peak_bytes
    assert expected_opt < expected_plain  # the pass works, so the comparison below means something

    plain = pool.run(make_job("plain", model, x))
    optimized = pool.run(make_job("optimized", gm, x))
    spec = FactorySpec("fxmemopt.snn.models:DeepConvSNN", SNN_KWARGS, model.state_dict(), optimize_kwargs={})
    factory = pool.run(make_job("factory", spec, x))
    factory_plain = pool.run(make_job("factory-plain", FactorySpec("fxmemopt.snn.models:DeepConvSNN", SNN_KWARGS,
                                                                   model.state_dict()), x))

    for r in (plain, optimized, factory, factory_plain):
        assert r.ok, r.message
        assert r.method == "cpu-storage-tracker" and r.step_time_s > 0 and r.wall_s > 0 and r.message == ""
    assert plain.peak_bytes == expected_plain
    assert optimized.peak_bytes == expected_opt
    assert factory.peak_bytes == optimized.peak_bytes
    assert factory_plain.peak_bytes == plain.peak_bytes


def test_optimized_graph_module_round_trips_through_pack_module():
    model, x = _snn()
    gm = fxmemopt.optimize(model, x)
    # Regression: DeepConvSNN's forward is annotated under `from __future__ import annotations`, which made fx keep
    # string annotations that GraphModule pickling cannot handle (pytorch/pytorch#167117); tracing drops them.
    assert not any(isinstance(n.type, str) for n in gm.graph.nodes)
    pickle.dumps(gm)  # plain pickle works
    clone = pickle.loads(pack_module(gm))
    assert isinstance(clone, torch.fx.GraphModule)
    torch.testing.assert_close(clone(*x), gm(*x), rtol=0, atol=0)
    assert fxmemopt.measure_step(clone, x).peak_bytes == fxmemopt.measure_step(gm, x).peak_bytes


def test_worker_is_reused_across_jobs(pool):
    first = _good(pool)
    pid = pool.pid
    assert pid is not None and pid != os.getpid()
    second = _good(pool)
    assert pool.pid == pid
    assert second.wall_s < max(first.wall_s, 1.0)  # no interpreter start for the second job


def test_run_many_keeps_order_and_passes_ready_results_through(pool):
    jobs = [make_job("a", Tiny(), TINY_X, repeats=1), make_job("lambda", HoldsLambda(), TINY_X),
            make_job("b", Tiny(), TINY_X, repeats=1)]
    results = pool.run_many(jobs)
    assert [r.name for r in results] == ["a", "lambda", "b"]
    assert [r.status for r in results] == ["ok", "unpicklable", "ok"]


# ----------------------------------------------------------------------------------------------------------------
# faults: bounded time, right status, pool keeps working
# ----------------------------------------------------------------------------------------------------------------


def test_exception_in_job_is_an_error_value_and_worker_survives(pool):
    _good(pool)
    pid = pool.pid
    result = pool.run(make_job("raises", Tiny("raise"), TINY_X, timeout_s=30))
    assert result.status == "error" and not result.ok
    assert "ValueError" in result.message and "boom from Tiny" in result.message and "'raises'" in result.message
    assert result.peak_bytes is None and result.step_time_s is None and result.method is None
    assert pool.pid == pid  # same worker, still alive
    _good(pool)
    assert pool.pid == pid


def test_memory_error_is_oom_and_worker_survives(pool):
    _good(pool)
    pid = pool.pid
    result = pool.run(make_job("oom", Tiny("memory"), TINY_X, timeout_s=30))
    assert result.status == "oom", result.message
    assert "MemoryError" in result.message and "simulated allocation failure" in result.message
    assert pool.pid == pid
    _good(pool)


def test_factory_errors_are_values(pool):
    result = pool.run(make_job("missing", FactorySpec("fxmemopt.snn.models:NoSuchModel"), TINY_X))
    assert result.status == "error" and "NoSuchModel" in result.message
    result = pool.run(make_job("bad-state", FactorySpec("fxmemopt.snn.models:DeepConvSNN", SNN_KWARGS,
                                                        {"nope": torch.zeros(1)}), TINY_X))
    assert result.status == "error" and "state_dict" in result.message
    with pytest.raises(InvalidOptionError, match="package.module:callable"):
        FactorySpec("fxmemopt.snn.models.DeepConvSNN")


def test_sleeping_job_times_out_and_next_job_gets_a_fresh_worker():
    with WorkerPool(start_timeout_s=60) as pool:
        _good(pool)  # start first, so the timeout below measures the job only
        pid = pool.pid
        t0 = time.perf_counter()
        result = pool.run(make_job("sleeps", Tiny("sleep"), TINY_X, timeout_s=3))
        elapsed = time.perf_counter() - t0
        assert result.status == "timeout", result.message
        assert "timeout_s=3" in result.message
        assert 3 <= elapsed < 3 + SLACK_S and abs(result.wall_s - elapsed) < 0.5
        assert pool.pid is None  # killed; nothing left running
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # and reaped: not even a zombie
        _good(pool)
        assert pool.pid not in (None, pid)


def test_os_exit_is_crashed_and_noticed_long_before_the_timeout():
    with WorkerPool(start_timeout_s=60) as pool:
        _good(pool)
        t0 = time.perf_counter()
        result = pool.run(make_job("exits", Tiny("exit"), TINY_X, timeout_s=60))
        elapsed = time.perf_counter() - t0
        assert result.status == "crashed", result.message
        assert "exited with code 3" in result.message
        assert elapsed < 15
        assert pool.pid is None
        _good(pool)


def test_worker_killed_from_outside_is_crashed_with_killed():
    with WorkerPool(start_timeout_s=60) as pool:
        _good(pool)
        pid = pool.pid
        killer = threading.Timer(0.5, os.kill, (pid, signal.SIGKILL))
        killer.start()
        try:
            t0 = time.perf_counter()
            result = pool.run(make_job("killed", Tiny("sleep"), TINY_X, timeout_s=60))
            elapsed = time.perf_counter() - t0
        finally:
            killer.cancel()
        assert result.status == "crashed", result.message
        assert "killed (possibly out of memory)" in result.message and "SIGKILL" in result.message
        assert elapsed < 15
        _good(pool)


def test_unpicklable_models_and_inputs_never_start_a_worker():
    class LocalModel(nn.Module):  # defined in a function: pickle cannot find it by name
        def forward(self, x):
            return x * 2

    with WorkerPool() as pool:
        for name, module, inputs, what in [
            ("lambda", HoldsLambda(), TINY_X, "module HoldsLambda"),
            ("local", LocalModel(), TINY_X, "module LocalModel"),
            ("inputs", Tiny(), (torch.rand(3, 4), lambda: 0), "inputs of job 'inputs'"),
        ]:
            result = make_job(name, module, inputs)
            assert isinstance(result, ProfileResult) and result.status == "unpicklable"
            assert what in result.message and "top level" in result.message and "in-process" in result.message
            assert pool.run(result) is result
        assert pool.pid is None  # never started


def test_unpickling_failure_in_worker_is_unpicklable(pool):
    result = pool.run(make_job("breaks", BreaksInWorker(), TINY_X))
    assert result.status == "unpicklable" and "cannot be rebuilt here" in result.message
    _good(pool)


def test_worker_that_cannot_start_in_time_is_a_timeout():
    with WorkerPool(start_timeout_s=0.05) as pool:
        t0 = time.perf_counter()
        result = pool.run(make_job("slow-start", Tiny(), TINY_X))
        assert result.status == "timeout" and "start_timeout_s=0.05" in result.message
        assert time.perf_counter() - t0 < SLACK_S
        assert pool.pid is None


# ----------------------------------------------------------------------------------------------------------------
# in process, close, validation
# ----------------------------------------------------------------------------------------------------------------


def test_run_in_process_matches_and_returns_errors_as_values():
    model, x = _snn()
    expected = fxmemopt.measure_step(model, x).peak_bytes
    result = run_in_process(model, x)
    assert result.ok and result.peak_bytes == expected and result.name == "DeepConvSNN"
    job = make_job("job", model, x)
    assert run_in_process(job).peak_bytes == expected
    spec = FactorySpec("fxmemopt.snn.models:DeepConvSNN", SNN_KWARGS, model.state_dict(), optimize_kwargs={})
    assert run_in_process(spec, x).peak_bytes == fxmemopt.measure_step(fxmemopt.optimize(model, x), x).peak_bytes

    error = run_in_process(Tiny("raise"), TINY_X, name="raises")
    assert error.status == "error" and "ValueError: boom from Tiny" in error.message
    assert run_in_process(HoldsLambda(), TINY_X).ok  # the in-process route needs no pickling
    with pytest.raises(InvalidInputsError):
        run_in_process(job, x)


def test_close_stops_the_worker_and_a_closed_pool_refuses_jobs():
    pool = WorkerPool()
    _good(pool)
    pid = pool.pid
    pool.close()
    assert pool.closed and pool.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone and reaped
    with pytest.raises(WorkerPoolClosedError, match="is closed"):
        pool.run(make_job("late", Tiny(), TINY_X))
    pool.close()  # idempotent

    with WorkerPool() as p:
        pass
    with pytest.raises(WorkerPoolClosedError):
        p.run(make_job("late", Tiny(), TINY_X))


@pytest.mark.parametrize("kwargs", [{"repeats": -1}, {"warmup": 1.5}, {"timeout_s": 0}])
def test_job_options_are_validated(kwargs):
    with pytest.raises(InvalidOptionError, match="ProfileJob"):
        ProfileJob("x", b"", b"", **kwargs)


def test_pool_and_job_inputs_are_validated():
    with pytest.raises(InvalidOptionError, match="fork"):
        WorkerPool(context="fork")
    with pytest.raises(InvalidOptionError):
        WorkerPool(start_timeout_s=0)
    with pytest.raises(InvalidInputsError, match="tuple"):
        make_job("x", Tiny(), torch.rand(3, 4))
    with pytest.raises(InvalidOptionError):
        make_job("x", lambda t: t, TINY_X)
