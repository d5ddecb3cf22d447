"""Train with DistributedDataParallel and fxmemopt: plan once on rank 0, apply on every rank, wrap in DDP.

    python examples/train_ddp.py            # 2 processes on CPU (gloo); use "nccl" and one GPU per rank on GPUs

Random data stands in for a dataset. See fxmemopt/distributed.py for why no static_graph is needed.
"""

import datetime
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import fxmemopt
from fxmemopt.distributed import optimize_distributed
from fxmemopt.snn import DeepConvSNN, reset_net

WORLD, T, N = 2, 4, 4


def main(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts them from rank 0)
        model = DeepConvSNN(num_blocks=4, channels=8, num_classes=10)
        gm = optimize_distributed(model, (torch.rand(T, N, 3, 16, 16),), prefer="memory")  # rank 0 searches
        ddp = DDP(gm)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        torch.manual_seed(rank)  # each rank its own data
        for step in range(3):
            images, labels = torch.rand(T, N, 3, 16, 16), torch.randint(0, 10, (N,))
            loss = F.cross_entropy(ddp(images).mean(0), labels)
            optimizer.zero_grad()
            loss.backward()  # gradients are all-reduced across ranks, exactly as without fxmemopt
            optimizer.step()
            reset_net(ddp)
            if rank == 0:
                print(f"step {step}: loss {loss.item():.4f}")
        if rank == 0:
            print(fxmemopt.explain(gm))
        del ddp, gm
        dist.barrier()  # every rank done before the process group goes away
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(main, args=(os.path.join(tmp, "init"),), nprocs=WORLD)
