"""Fingerprints of saved tensors: how a region checks that its recomputation reproduced the forward's values.

A region's backward runs on tensors recomputed from its kept inputs (NOTE [Checkpoint region invariants], Rule 3).
They are bitwise the forward's when the region is a deterministic function of its inputs, parameters, state and
RNG. Where that fails, a spike threshold turns a last-bit difference into another spike and another gradient,
silently: a convolution algorithm picked anew on autograd's device thread (cuDNN's benchmark cache is per thread),
a nondeterministic kernel, a module whose state the region does not restore. Shapes and dtypes alone do not show
it, so each saved tensor's *fingerprint* is taken when the forward saves it and again when recomputation
produces it, and the two must be equal.

A fingerprint is the int64 sum of the tensor's bit patterns (each element read as an integer of its own width),
over every element (``"full"``) or over :data:`SAMPLE` elements at evenly spaced positions (``"sampled"``: every
``(n - 1) // 63``-th). Integer addition is exact and associative, so the sum is the same whatever order a kernel
adds in, and any single changed element changes a full fingerprint; a sampled one sees a change at the positions it
reads, and a difference in a recomputed value spreads through everything computed from it (the membrane carries it
to every later time step; a convolution algorithm's rounding differs almost everywhere). Parameters and a region's
own inputs, which come back as the same tensors, get none. The costs, measured on CPU with one thread: 4-7 us per
tensor sampled whatever its size, against 15 us for a full fingerprint of 32 Ki float32 values and 0.78 ms of 1 Mi
(five times a multiplication of the same tensor); per training step: ``benchmarks/value_check_bench.py``.

``"off"``: none taken. Which mode a region uses: :func:`resolve_mode`.
"""

from __future__ import annotations

import torch

__all__ = ["MODES", "SAMPLE", "CPU_BUDGET", "fingerprint", "resolve_mode", "sampled_cost_s"]

#: The value-check modes, cheapest first.
MODES = ("off", "sampled", "full")

#: Elements read by a sampled fingerprint (evenly spaced over the flattened tensor, first and last included).
SAMPLE = 64

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def fingerprint(t: torch.Tensor, mode: str) -> torch.Tensor | None:
    """The fingerprint of ``t`` in ``mode`` (``"sampled"`` or ``"full"``): a 0-d int64 tensor on ``t``'s device
    (no host synchronization), or ``None`` for a tensor without one (complex, sparse, a tensor subclass, or
    ``mode="off"``)."""
    if mode == "off" or t.layout != torch.strided or t.is_complex() or type(t) is not torch.Tensor \
            and not isinstance(t, torch.nn.Parameter):
        return None
    iv = _INT_OF_SIZE.get(t.element_size())
    if iv is None:
        return None
    d = t.detach()
    n = d.numel()
    if mode == "sampled" and n > SAMPLE:
        step = (n - 1) // (SAMPLE - 1)
        # one strided view of a dense tensor (the usual saved tensor); a copy only for the others
        d = d.as_strided((SAMPLE,), (step,), d.storage_offset()) if d.is_contiguous() else d.flatten()[::step]
    elif d.dim() != 1:
        d = d.reshape(-1)
    if d.dtype != iv:
        d = d.view(iv)
    return d.sum(dtype=torch.int64)


def resolve_mode(mode: str | None, device_type: str) -> str:
    """The mode a region call uses: ``mode`` when given, else ``"sampled"`` (on an accelerator, where recomputation
    can pick other kernels than the forward did, always; on CPU :func:`fxmemopt.optimize` chooses per model, by the
    check's predicted cost: :data:`CPU_BUDGET`)."""
    return mode if mode is not None else "sampled"


#: On CPU the default turns the check off where its predicted cost is above this share of the step time.
CPU_BUDGET = 0.03

_SAMPLED_COST: list[float] = []


def sampled_cost_s() -> float:
    """Seconds one sampled fingerprint takes on CPU in this process (measured once: the median of 15 rounds of 20
    fingerprints of a 32 Ki-element float32 tensor; the cost does not depend on the size)."""
    if not _SAMPLED_COST:
        import statistics
        import time

        t = torch.rand(1 << 15)
        rounds = []
        for _ in range(15):
            t0 = time.perf_counter()
            for _ in range(20):
                int(fingerprint(t, "sampled"))  # type: ignore[arg-type]
            rounds.append((time.perf_counter() - t0) / 20)
        _SAMPLED_COST.append(statistics.median(rounds))
    return _SAMPLED_COST[0]
