"""The optimizer's state, for the whole training step's peak (``optimize(..., optimizer=opt)``).

An optimizer keeps state per parameter once it has stepped (Adam: two tensors the size of each parameter), alive
across steps, so it sits under every step's peak as the parameters do and a GPU's allocator counts it. The storage
tracker only sees what the step allocates; :attr:`fxmemopt.report.summary.Summary.resident` lists it beside the
parameters, buffers and inputs, and :attr:`~fxmemopt.report.summary.Summary.whole_step_peaks` adds it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..compat import storage_key
from ..errors import InvalidOptionError, format_error

__all__ = ["distinct_storage_bytes", "optimizer_state_bytes"]


def distinct_storage_bytes(tensors: Iterable[torch.Tensor], seen: set[Any] | None = None) -> int:
    """Bytes of the storages under ``tensors``, each storage once (views and aliases add nothing); ``seen``: the
    storages counted already, shared between calls. A tensor without a storage (a sharded DTensor) counts its
    elements."""
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            total += t.numel() * t.element_size()
            continue
        key = storage_key(storage)
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def _copies(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> int | None:
    """Tensors the size of each parameter that ``optimizer`` keeps per parameter of ``group`` once it has stepped
    (torch's own optimizers, from their ``step``); ``None``: not known."""
    o = torch.optim
    if isinstance(optimizer, (o.Adam, o.AdamW)):
        return 3 if group.get("amsgrad") else 2
    if isinstance(optimizer, (o.NAdam, o.RAdam, o.Adamax, o.Adadelta, o.Rprop)):
        return 2
    if isinstance(optimizer, o.SGD):
        return 1 if group.get("momentum", 0) else 0
    if isinstance(optimizer, o.RMSprop):
        return 1 + bool(group.get("momentum", 0)) + bool(group.get("centered"))
    if isinstance(optimizer, o.Adagrad):
        return 1
    return None


def optimizer_state_bytes(optimizer: Any) -> int:
    """The bytes of the state ``optimizer`` keeps for its parameters: what it holds where it has stepped, else what
    torch's optimizer of that kind allocates in its first step (each storage counted once).

    Raises:
        InvalidOptionError: not a ``torch.optim.Optimizer``, or one whose state before its first step is not known.

    Example:
        >>> model = torch.nn.Linear(256, 256)
        >>> optimizer_state_bytes(torch.optim.Adam(model.parameters())) == 2 * (256 * 256 + 256) * 4
        True
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise InvalidOptionError(format_error("optimizer", "is not a torch optimizer",
                                              expected="a torch.optim.Optimizer (or None)",
                                              got=type(optimizer).__name__))
    seen: set[Any] = set()
    total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state:
                total += distinct_storage_bytes((t for t in state.values() if isinstance(t, torch.Tensor)), seen)
                continue
            copies = _copies(optimizer, group)
            if copies is None:
                raise InvalidOptionError(format_error(
                    "optimizer", f"{type(optimizer).__name__} has no state yet, and how much it keeps is not known",
                    expected="a torch optimizer, or any optimizer after one step",
                    got=f"{type(optimizer).__name__} before its first step",
                    fix="Pass it after one optimizer.step() (its state is then counted as it is), or leave "
                        "optimizer out (the whole step's peak then leaves its state out)."))
            total += copies * p.numel() * p.element_size()
    return total
