"""How much more memory this process can have: what a plan's predicted peak must fit in, here.

:func:`fxmemopt.optimize` plans for the step that does not fit; the plan it returns must fit where the user
trains, which is usually where they call it. On CUDA that is the device's free memory
(``torch.cuda.mem_get_info``). On CPU the process is bounded by the smallest of: its address-space limit
(``RLIMIT_AS``, as ``ulimit -v`` and batch schedulers set it) less the address space it already has, its cgroup's
``memory.max`` less ``memory.current`` (containers, systemd, Slurm), and the machine's ``MemAvailable``. Each bound
that cannot be read is skipped; ``None`` means none could be (not Linux, say): nothing is assumed then.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch

__all__ = ["available_bytes"]


def _proc_status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _address_space_left() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    used = _proc_status("VmSize")
    return None if used is None else max(0, soft - used)


def _cgroup_left() -> int | None:
    """cgroup v2: the limit of this process's own group (``/proc/self/cgroup`` names it) less its usage."""
    try:
        rel = Path("/proc/self/cgroup").read_text().strip().split("\n")[0].split("::", 1)[1]
        base = Path("/sys/fs/cgroup") / rel.lstrip("/")
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((base / "memory.current").read_text().strip()))
    except (OSError, ValueError, IndexError):
        return None


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Bytes this process can still allocate on ``device`` (``None``: unknown). See the module docstring."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # no driver in this process, a device it cannot query
            return None
    if device.type != "cpu":
        return None
    bounds = [b for b in (_address_space_left(), _cgroup_left(), _meminfo_available()) if b is not None]
    return min(bounds) if bounds else None
