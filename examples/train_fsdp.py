"""Train with FSDP2 per block and fxmemopt: keep the blocks as modules, plan once on rank 0, shard each block then
the root, train.

    python examples/train_fsdp.py           # 2 processes on CPU (gloo); on GPUs use "nccl" and a "cuda" mesh

A SEW ResNet-18 (``fxmemopt.snn``) at a small width stands in for your model, random data for a dataset. The usual
FSDP2 recipe is ``fully_shard(block)`` for each block, then ``fully_shard(model)``; on an optimized module the
blocks must be kept as modules (``keep_modules``: otherwise their code is inlined into the root and FSDP2's hooks
on them never run), and ``fxmemopt.distributed.fully_shard`` does the recipe on every kept block. (FSDP2 warns
once per rank that the root returns a view: the model's own reshape, which the unoptimized model returns too.)
"""

import datetime
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

import fxmemopt
from fxmemopt.distributed import fully_shard, optimize_distributed, predicted_peak_per_rank
from fxmemopt.snn import SEWBasicBlock, SEWResNet18, reset_net

WORLD, T, N = 2, 4, 2


def main(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        torch.manual_seed(0)  # the same initial weights everywhere
        model = SEWResNet18(num_classes=10, width=0.125)
        example = torch.rand(T, N, 3, 32, 32)
        # rank 0 searches, every rank applies its plan; each SEWBasicBlock stays a module holding its regions
        gm = optimize_distributed(model, (example,), keep_modules=(SEWBasicBlock,), prefer="memory")
        predicted = predicted_peak_per_rank(gm, WORLD, reshard_after_forward=True)  # one rank's step, sharded
        fully_shard(gm, mesh=mesh, reshard_after_forward=True)  # each kept block, then the root
        optimizer = torch.optim.SGD(gm.parameters(), lr=0.05)  # after sharding: the sharded parameters
        torch.manual_seed(rank)  # each rank its own data
        for step in range(3):
            images, labels = torch.rand(T, N, 3, 32, 32), torch.randint(0, 10, (N,))
            loss = F.cross_entropy(gm(images).mean(0), labels)
            optimizer.zero_grad()
            loss.backward()  # gradients reduce-scattered per block, exactly as unoptimized FSDP2
            optimizer.step()
            reset_net(gm)
            if rank == 0:
                print(f"step {step}: loss {loss.item():.4f}")
        peak = fxmemopt.measure_step(gm, (example,), repeats=0).peak_bytes
        reset_net(gm)
        print(f"rank {rank}: peak of one training step {peak / 2**20:.2f} MiB (CPU storage tracker, sharded), "
              f"predicted {predicted / 2**20:.2f} MiB")
        if rank == 0:
            print("kept as modules:", ", ".join(gm.fxmemopt_units))
        dist.barrier()  # every rank done before the process group goes away
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(main, args=(os.path.join(tmp, "init"),), nprocs=WORLD)
