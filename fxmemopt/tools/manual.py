"""Hand-placed checkpoint regions: :class:`Checkpointed` wraps one module, like the seed's ``GCContainer`` /
``checkpoint_module``, with the same runtime and the same exactness as the regions :func:`fxmemopt.optimize` builds.

Use it when you want to choose the regions yourself without tracing (a model torch.fx cannot trace at all, or
one layer you know is the memory hog)::

    model.layer3 = fxmemopt.Checkpointed(model.layer3)      # keeps only its inputs for backward

Differences from regions found by :func:`fxmemopt.optimize`: nothing is known about the inputs in advance, so each
floating-point input is packed at 1 bit when *this call's* values are all 0/1 (checked bit for bit, one pass) and
kept by reference otherwise, silently; stateful modules are those with a ``_memories`` dict (fxmemopt.snn,
spikingjelly) plus the classes you declare in ``stateful_modules``; every buffer inside is snapshotted at entry
(BatchNorm statistics update once). Parameters and ``state_dict`` keys of the wrapped module appear under
``module.``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..analysis.state import has_memories
from ..errors import InvalidOptionError, format_error
from ..runtime.checkpoint import CheckpointRegion, RegionSpec, RegionStats
from ..runtime.fingerprint import MODES

__all__ = ["Checkpointed"]


class _Body(nn.Module):
    """Calls the wrapped module on the inputs in the box, emptying it (see
    :func:`fxmemopt.runtime.checkpoint.region_args`)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.m = module

    def forward(self, box: list[Any]) -> Any:
        args = list(box)
        box.clear()
        return self.m(*args)


class Checkpointed(nn.Module):
    """``module`` as one checkpoint region: only its inputs (1-bit packed when they are spikes) are kept for
    backward; its interior is recomputed exactly (NOTE [Checkpoint region invariants] in
    :mod:`fxmemopt.runtime.checkpoint`).

    Args:
        module: the module to wrap (it is not copied; the wrapper owns it as ``self.module``).
        compress: pack binary floating-point inputs at 1 bit (checked every call).
        stateful_modules: classes inside ``module`` whose tensor / number attributes are state (beyond modules
            with a ``_memories`` dict, found automatically).
        recompute_check: the recompute value check, as for :func:`fxmemopt.optimize` (``None``: the device's
            default; ``"off"``, ``"sampled"``, ``"full"``). Nothing validates a hand-placed region in advance: a
            recomputation whose values differ raises :class:`~fxmemopt.errors.RecomputationValueError` in backward.

    Example:
        >>> block = fxmemopt.Checkpointed(ConvBNNeuron(16, 32))      # doctest: +SKIP
        >>> y = block(spikes)                                        # doctest: +SKIP
    """

    def __init__(self, module: nn.Module, *, compress: bool = True,
                 stateful_modules: Sequence[type] = (), recompute_check: str | None = None) -> None:
        super().__init__()
        if recompute_check is not None and recompute_check not in MODES:
            raise InvalidOptionError(format_error("recompute_check", "is not a value-check mode",
                                                  expected=f"None or one of {MODES}", got=repr(recompute_check)))
        self.module = module
        self.compress = bool(compress)
        self.value_check = recompute_check
        self.stats = RegionStats()
        declared = tuple(stateful_modules)
        self._stateful: tuple[tuple[str, tuple[str, ...]], ...] = tuple(
            (f"m.{p}" if p else "m",
             () if has_memories(sub) else tuple(sorted(k for k, v in sub.__dict__.items()
                                                        if isinstance(v, (torch.Tensor, float)) and k != "training")))
            for p, sub in module.named_modules() if has_memories(sub) or isinstance(sub, declared))
        self._buffers_inside = tuple((f"m.{p}" if p else "m", name) for p, sub in module.named_modules()
                                     for name, b in sub._buffers.items() if b is not None)
        self.__dict__["_body"] = _Body(module)  # not registered: the parameters are already under `module`
        self.__dict__["_regions"] = {}

    def _region(self, n: int) -> CheckpointRegion:
        region = self.__dict__["_regions"].get(n)
        if region is None:
            name = f"Checkpointed({type(self.module).__name__})"
            spec = RegionSpec(name, type(self.module).__name__, (), tuple(f"input {i}" for i in range(n)),
                              (1 if self.compress else 0,) * n, self._stateful, self._buffers_inside,
                              self._buffers_inside)
            region = CheckpointRegion(self.__dict__["_body"], spec, self.stats)
            region.pack_if_binary = True  # nothing is planned: pack what is binary in this call, quietly
            self.__dict__["_regions"][n] = region
        region.training = self.training
        region.value_check = self.value_check
        return region

    def forward(self, *args: Any) -> Any:
        return self._region(len(args))(list(args))

    def extra_repr(self) -> str:
        return f"compress={self.compress}"
