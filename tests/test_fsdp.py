"""FSDP2 per block with 2 processes on the gloo backend (CPU): optimize with ``keep_modules``, shard each block then
the root (``fxmemopt.distributed.fully_shard``), and compare two training steps with unoptimized FSDP2 sharded the
same way: every gradient (gathered to full tensors) and BatchNorm statistic bitwise equal, no hang; and one rank's
measured peak against ``fxmemopt.distributed.predicted_peak_per_rank``, where activations dominate and where
parameters do.

One spawn runs every configuration (spawning ranks costs most of the time); each rank saves what it saw.
"""

from __future__ import annotations

import copy
import datetime
import faulthandler
import os
import warnings

import pytest
import torch
import torch.distributed as dist
from fsdp_models import Block, BlockNet
from ranks import spawn_ranks

import fxmemopt
from fxmemopt.errors import ShardingError
from fxmemopt.snn import reset_net

WORLD = 2
TIMEOUT_S = 240

#: Activations dominate (the usual SNN case): channels 8 on 16x16, T=4, batch 2.
ACTIVATIONS = (8, (4, 2, 3, 16, 16))
#: Parameters dominate: channels 48 on 4x4, T=2, batch 1 (the sharding itself shows in the peak).
PARAMETERS = (48, (2, 1, 3, 4, 4))

#: (name, optimize options, fully_shard options, neuron library, (channels, input shape))
CONFIGS = [
    ("default", {}, {"reshard_after_forward": True}, "fxmemopt", ACTIVATIONS),
    ("memory-noreshard", {"prefer": "memory"}, {"reshard_after_forward": False}, "fxmemopt", ACTIVATIONS),
    ("memory-spikingjelly", {"prefer": "memory"}, {"reshard_after_forward": True}, "spikingjelly", ACTIVATIONS),
    ("params-reshard", {"never_worse": False}, {"reshard_after_forward": True}, "fxmemopt", PARAMETERS),
    ("params-noreshard", {"never_worse": False}, {"reshard_after_forward": False}, "fxmemopt", PARAMETERS),
]
#: config name -> its (channels, input shape)
SIZE_OF = {name: size for name, *_, size in CONFIGS}


def _neuron(library: str):
    if library == "spikingjelly":
        from spikingjelly.activation_based import neuron

        return lambda: neuron.LIFNode(step_mode="m")
    from fxmemopt.snn import LIFNode

    return LIFNode


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    faulthandler.dump_traceback_later(TIMEOUT_S - 10, exit=True)  # a hang prints where it is, then ends the rank
    warnings.filterwarnings("ignore")  # FSDP2's "returned a view" note about the head, the same unoptimized
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        results = {name: _run_config(rank, *rest) for name, *rest in CONFIGS if _available(rest[2])}
        results["errors"] = _errors()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _available(library: str) -> bool:
    if library == "fxmemopt":
        return True
    try:
        __import__(library)
        return True
    except ImportError:
        return False


def _shard_like_users(model: torch.nn.Module, mesh, **kw) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)


def _run_config(rank: int, options: dict, shard: dict, library: str, size: tuple) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(0)  # same weights and example on every rank
    channels, shape = size
    model = BlockNet(c=channels, n=3, neuron=_neuron(library))
    reference = copy.deepcopy(model)
    example = torch.rand(*shape)
    gm = fxmemopt.distributed.optimize_distributed(model, (example,), keep_modules=(Block,), **options)
    per_rank = fxmemopt.distributed.predicted_peak_per_rank(gm, WORLD, **shard)
    kept = gm.fxmemopt_units
    regions = {path: sorted(n for n, m in gm.get_submodule(path).named_children() if n.startswith("ckpt_"))
               for path in kept}
    plain = []  # the same two peaks before sharding
    for module in (reference, gm):
        plain.append(fxmemopt.measure_step(module, (example,), repeats=0).peak_bytes)
        reset_net(module)
    fxmemopt.distributed.fully_shard(gm, mesh=mesh, **shard)
    _shard_like_users(reference, mesh, **shard)
    torch.manual_seed(100 + rank)  # each rank trains on its own data
    grads, grads_ref, peaks = [], [], []
    for _ in range(2):
        x = torch.rand(*shape)
        for module, sink in ((gm, grads), (reference, grads_ref)):
            module.zero_grad(set_to_none=True)
            (module(x) * torch.linspace(0, 1, 10)).sum().backward()
            sink.append([p.grad.full_tensor() for p in module.parameters()])
            reset_net(module)
    for module in (reference, gm):  # per-rank peak of one step, sharded parameters (CPU storage tracker)
        peaks.append(fxmemopt.measure_step(module, (example,), repeats=0).peak_bytes)
        reset_net(module)
    summary = gm.fxmemopt_summary
    return {"predicted": (summary.predicted_peak_before, summary.predicted_peak_after), "per_rank": per_rank,
            "kept": kept, "regions": regions, "grads": grads, "grads_ref": grads_ref, "peaks": peaks, "plain": plain,
            "buffers": [b.clone() for b in gm.buffers()], "buffers_ref": [b.clone() for b in reference.buffers()]}


def _errors() -> dict:
    """A block sharded that the optimized module never calls: fxmemopt's error, on every rank, not a DTensor one."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(0)
    model = BlockNet(c=4, n=2)
    example = torch.rand(2, 2, 3, 8, 8)
    out = {}
    flat = fxmemopt.optimize(copy.deepcopy(model), (example,))  # no keep_modules: blocks are inlined
    try:
        fxmemopt.distributed.fully_shard(flat, units=["blocks.0"], mesh=mesh)
    except ShardingError as e:
        out["helper"] = str(e)
    _shard_like_users(flat, mesh)  # the usual recipe on the flat module
    try:
        flat(example)
    except ShardingError as e:
        out["plain"] = str(e)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    tmp_path = tmp_path_factory.mktemp("fsdp")
    return spawn_ranks(_worker, (str(tmp_path / "init"), str(tmp_path)), tmp_path, WORLD, TIMEOUT_S)


@pytest.mark.parametrize("config", [c[0] for c in CONFIGS])
def test_fsdp2_per_block_gradients_equal_unoptimized_fsdp2(results, config):
    if config not in results[0]:
        pytest.skip(f"{config}: its neuron library is not installed")
    for r in results:
        got = r[config]
        assert got["kept"] == ("blocks.0", "blocks.1", "blocks.2")
        assert all(len(names) == 2 for names in got["regions"].values())  # each block's two regions live in it
        for step, (a_step, b_step) in enumerate(zip(got["grads"], got["grads_ref"], strict=True)):
            assert len(a_step) == len(b_step) > 0
            for k, (a, b) in enumerate(zip(a_step, b_step, strict=True)):
                assert torch.equal(a, b), (config, step, k)
        for a, b in zip(got["buffers"], got["buffers_ref"], strict=True):
            assert torch.equal(a, b)  # BatchNorm statistics: updated once per step, as unoptimized
        ref_peak, peak = got["peaks"]
        plain_ref, plain_peak = got["plain"]
        # one rank's peak under FSDP2 as fxmemopt.distributed.predicted_peak_per_rank predicts it (gathered units,
        # the held all-gather buffer, prefetch, sharded gradients; measured within -1% to +7%)
        assert abs(got["per_rank"] / peak - 1) < 0.10, (config, got["per_rank"], peak)
        if SIZE_OF[config] is ACTIVATIONS:
            # lower by about the ratio without FSDP2 (the parameters are a small part)
            assert ref_peak / peak > 0.8 * plain_ref / plain_peak > 0.8, (got["peaks"], got["plain"])
            # and the unsharded prediction already holds per rank (measured within 0.2-4.5%)
            for predicted, measured in zip(got["predicted"], got["peaks"], strict=True):
                assert abs(predicted / measured - 1) < 0.10, (config, got["predicted"], got["peaks"])
    r0, r1 = results
    for a, b in zip(r0[config]["grads"][-1], r1[config]["grads"][-1], strict=True):
        assert torch.equal(a, b)  # reduced: every rank holds the same gradient


def test_sharding_a_block_the_optimized_module_never_calls_is_a_clear_error(results):
    for r in results:
        assert "keep_modules=['blocks.0'" in r["errors"]["helper"]
        assert "never called by the optimized module" in r["errors"]["plain"]
        assert "keep_modules" in r["errors"]["plain"]
