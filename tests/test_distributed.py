"""DistributedDataParallel with 2 processes on the gloo backend (CPU): plan on rank 0, broadcast, apply, wrap in DDP.

After all-reduce, every gradient equals the unoptimized DDP's bitwise; no "marked ready twice", no static_graph.
"""

from __future__ import annotations

import copy
import datetime
import faulthandler
import gc
import os

import pytest
import torch
import torch.distributed as dist
from ranks import spawn_ranks
from torch.nn.parallel import DistributedDataParallel as DDP

import fxmemopt
from fxmemopt.distributed import optimize_distributed
from fxmemopt.snn import DeepConvSNN, reset_net

WORLD = 2
TIMEOUT_S = 120


def _worker(rank: int, init_file: str, out_dir: str, mode: str) -> None:
    faulthandler.dump_traceback_later(TIMEOUT_S - 10, exit=True)  # a hang prints where it is, then ends the rank
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        _run_rank(rank, out_dir, mode)
        # Tear down only once every rank is done with collectives and this rank's DDP objects are gone: destroying
        # the process group while a DDP reducer is alive can block in its destructor.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_rank(rank: int, out_dir: str, mode: str) -> None:
    torch.manual_seed(0)  # same weights and example on every rank, as after a broadcast
    model = DeepConvSNN(num_blocks=3, channels=4)
    reference = copy.deepcopy(model)
    example = torch.rand(4, 2, 3, 16, 16)
    if mode == "fail":
        bad = "not-a-preset" if rank == 0 else "memory"  # planning fails on rank 0 only
        try:
            optimize_distributed(model, (example,), prefer=bad)
        except Exception as e:
            torch.save({"error": f"{type(e).__name__}: {e}"}, os.path.join(out_dir, f"rank{rank}.pt"))
        return
    gm = optimize_distributed(model, (example,), prefer="memory")
    ddp, ddp_ref = DDP(gm), DDP(reference)  # default options: no static_graph, no find_unused_parameters
    torch.manual_seed(100 + rank)  # each rank trains on its own data
    xs = [torch.rand(4, 2, 3, 16, 16) for _ in range(2)]
    grads, grads_ref = [], []
    for x in xs:  # two steps, reset in between, as a training loop does
        for module, sink in ((ddp, grads), (ddp_ref, grads_ref)):
            module.zero_grad(set_to_none=True)
            (module(x) * torch.linspace(0, 1, 10)).sum().backward()
            sink.append([p.grad.clone() for p in module.parameters()])
            reset_net(module)
    torch.save({"grads": grads, "grads_ref": grads_ref, "code": gm.code,
                "steps": gm.fxmemopt_summary.search.applied_steps,
                "buffers": [b.clone() for b in gm.buffers()],
                "buffers_ref": [b.clone() for b in ddp_ref.buffers()]},
               os.path.join(out_dir, f"rank{rank}.pt"))


def _run(tmp_path, mode: str) -> list[dict]:
    return spawn_ranks(_worker, (str(tmp_path / "init"), str(tmp_path), mode), tmp_path, WORLD, TIMEOUT_S)


def test_ddp_two_ranks_gloo_gradients_equal_unoptimized_ddp(tmp_path):
    results = _run(tmp_path, "ok")
    r0, r1 = results
    assert r0["steps"] != ["saved_plan"] and r1["steps"] == ["saved_plan"]  # rank 0 searched, rank 1 applied
    assert r0["code"] == r1["code"]  # the same rewritten graph on every rank
    for r in results:
        for step, (got, want) in enumerate(zip(r["grads"], r["grads_ref"])):
            assert len(got) == len(want)
            for k, (a, b) in enumerate(zip(got, want)):
                assert torch.equal(a, b), (step, k)
        for a, b in zip(r["buffers"], r["buffers_ref"]):
            assert torch.equal(a, b)  # BatchNorm statistics (each rank's own data), updated once per step
    for a, b in zip(r0["grads"][-1], r1["grads"][-1]):
        assert torch.equal(a, b)  # all-reduced: every rank holds the same averaged gradient
    assert not torch.equal(r0["buffers"][0], r1["buffers"][0])  # (the ranks did see different data)


def test_planning_failure_reaches_every_rank_instead_of_hanging(tmp_path):
    r0, r1 = _run(tmp_path, "fail")
    assert "InvalidOptionError" in r0["error"] and "prefer" in r0["error"]
    assert "planning failed on rank 0" in r1["error"] and "InvalidOptionError" in r1["error"]


def test_needs_a_process_group():
    with pytest.raises(fxmemopt.FxMemOptError, match="process group"):
        fxmemopt.distributed.optimize_distributed(DeepConvSNN(num_blocks=1, channels=2), (torch.rand(2, 1, 3, 8, 8),))
