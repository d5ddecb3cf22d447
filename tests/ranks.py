"""Run a test's ranks as spawned processes (gloo, CPU) with a bounded wait, and collect what each rank saved."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp


def spawn_ranks(worker: Callable[..., None], args: tuple[Any, ...], out_dir: Path, world: int,
                timeout_s: float) -> list[dict]:
    """Start ``worker(rank, *args)`` on ``world`` spawned processes and wait at most ``timeout_s`` (a rank that is
    still alive then is killed and the test fails); return ``torch.load(out_dir / f"rank{r}.pt")`` per rank."""
    ctx = mp.start_processes(worker, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world}-rank run did not finish within {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]
