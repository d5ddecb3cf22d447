"""Time steps taken apart in one operation: what the traced graph calls where the model indexed every step.

A loop over time written ``for t in range(T): f(x[t])`` (norse's ``Lift``, snntorch's loops in ``forward``) traces
to ``T`` selects of ``x``. Autograd's backward of each select is a tensor the size of all of ``x``, zeros but for
step ``t``, and the ``T`` of them are summed into ``x``'s gradient: on a lifted convolution that transient sets the
peak of the whole step. :func:`fxmemopt.analysis.trace.trace` replaces such selects with one :func:`unbind_steps`,
whose backward stacks the step gradients into one tensor.

Exactly: forward, ``unbind_steps(x)[t]`` is the same view of ``x`` as ``x[t]``. Backward, each element of ``x``'s
gradient receives one step's value and zeros for every other step; the sum of those is that value, except that
``-0.0 + 0.0`` is ``+0.0`` (round to nearest), so with two or more selects autograd's sum turns ``-0.0`` into
``+0.0``. The stacked gradient gets ``+ 0.0`` for the same result, bit for bit; with one select there is no sum and
nothing is rewritten.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["unbind_steps", "TimeAxis", "TIME_MAJOR", "STEPS_ATTRIBUTES", "BATCH_ATTRIBUTES", "DERIVED"]


class _Identity(torch.autograd.Function):
    """Identity forward (a view); the subclasses say what backward does to the gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)


class _AsSummed(_Identity):
    """Backward adds ``+0.0``, as summing select gradients does."""

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad + 0.0


class _CopiedGrad(_Identity):
    """Backward hands on a contiguous gradient (a copy where it is a strided view)."""

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def unbind_steps(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``x.unbind(0)``, with the gradient of ``x`` bitwise what ``x[0], ..., x[T-1]`` used separately would give."""
    return _AsSummed.apply(x).unbind(0)


#: module attributes that hold a neuron's number of time steps where its input flattens batch and time (sinabs'
#: ``*Squeeze`` layers: ``num_timesteps``); a time slice is called with the attribute set to its own length
STEPS_ATTRIBUTES = ("num_timesteps",)
#: module attributes that hold the batch size of a batch-and-time-flattened input (sinabs' ``batch_size``)
BATCH_ATTRIBUTES = ("batch_size",)

#: how a neuron may derive an observation attribute from its whole output in each call (sinabs' ``firing_rate``:
#: ``spikes.mean()`` or ``spikes.sum() / spikes.numel()``), by name: on slices the last slice's call would leave
#: its own, so the region sets it again from the joined output
DERIVED = {
    "mean": lambda out: out.mean(),
    "sum/numel": lambda out: out.sum() / out.numel(),
}


@dataclass(frozen=True)
class TimeAxis:
    """Where a neuron's input and output keep time, for calling the neuron on consecutive time slices (Rule 8 of
    :mod:`fxmemopt.runtime.checkpoint`).

    * ``TimeAxis()``: time-major, ``[T, ...]`` (spikingjelly's multi-step modules, norse's ``LIF``);
    * ``TimeAxis(dim=1)``: batch first, ``[B, T, ...]`` (sinabs' ``IAF``, ``LIF``, ``ExpLeak``);
    * ``TimeAxis(batch=B)``: batch and time flattened into dim 0 as ``[B * T, ...]``, batch outer (sinabs'
      ``IAFSqueeze``). A slice is ``[B * t, ...]``, a copy (its steps are not contiguous for ``B > 1``), and a
      neuron that learns ``T`` from an attribute (``steps_attr``, e.g. ``num_timesteps``) is called with it set to
      the slice's ``t``; one told ``batch_size`` works ``t`` out itself.

    ``derived`` names the observation attributes the neuron sets from its whole output on each call (``(attribute,
    how)``, ``how`` a key of :data:`DERIVED`): after the last slice they are set from the joined output, as the
    call on all steps sets them.

    Which axis a neuron has is found on the example (:mod:`fxmemopt.analysis.annotate`): the one on which its
    slices reproduce its output, its state and its gradients bitwise.
    """

    dim: int = 0
    batch: int = 0
    steps_attr: str = ""
    derived: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.dim not in (0, 1) or self.batch < 0 or self.batch and self.dim \
                or any(how not in DERIVED for _, how in self.derived):
            raise ValueError(f"TimeAxis: dim must be 0 or 1, batch >= 0 (only with dim 0), derived of "
                             f"{sorted(DERIVED)}; got {self}")

    def describe(self) -> str:
        """How explain names the layout."""
        if self.batch:
            return f"[B*T, ...] (B={self.batch})"
        return "[B, T, ...]" if self.dim == 1 else "[T, ...]"

    def steps(self, x: torch.Tensor) -> int:
        """``T`` of ``x`` (raises ``ValueError`` where ``x`` cannot have this layout)."""
        if self.batch:
            if x.dim() < 1 or x.shape[0] % self.batch:
                raise ValueError(f"a first dimension of {tuple(x.shape)[:1]} is not a multiple of batch {self.batch}")
            return x.shape[0] // self.batch
        if x.dim() <= self.dim:
            raise ValueError(f"a {x.dim()}-d tensor has no time dimension {self.dim}")
        return x.shape[self.dim]

    def _unflat(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(0, (self.batch, -1)) if self.batch else x

    def sizes(self, steps: int, k: int) -> list[int]:
        """The lengths of ``min(k, T)`` consecutive slices of ``T = steps``, the first ``T % k`` one step longer."""
        k = max(1, min(k, steps))
        return [steps // k + (1 if i < steps % k else 0) for i in range(k)]

    def split(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
        """``x`` cut into ``min(k, T)`` consecutive time slices (:meth:`sizes`).

        One ``split_with_sizes``, not ``tensor_split`` (which slices): its backward concatenates the slices'
        gradients once, where each slice's own backward would allocate a zero-filled gradient of the whole of ``x``.
        """
        parts = self._unflat(x).split(self.sizes(self.steps(x), k), dim=1 if self.batch else self.dim)
        return tuple(p.flatten(0, 1) for p in parts) if self.batch else parts

    def narrow(self, x: torch.Tensor, t0: int, t1: int) -> torch.Tensor:
        """Steps ``t0 .. t1 - 1`` of ``x`` (a view, but a copy for the flattened layout with ``B > 1``)."""
        if self.batch:
            return self._unflat(x)[:, t0:t1].flatten(0, 1)
        return x[t0:t1] if self.dim == 0 else x[:, t0:t1]

    def cat(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The slices' outputs joined along time, as the neuron called on all steps at once returns them.

        On the flattened layout with ``B > 1``, each slice's gradient is cut out of the joined one as a strided view
        and flattened: a copy for a slice of two or more steps, a view for a one-step slice (``T % k`` slices are one
        step shorter than the others). Mixed, the views keep the whole gradient alive beside the copies until the
        last of them has been recomputed (a sinabs ``IAFSqueeze`` net at T=12 in 8 slices measured 16.8% above its
        prediction); so every slice's gradient is made a copy, and the whole one dies as soon as it is cut.
        """
        if self.batch:
            if self.batch > 1:
                parts = [_CopiedGrad.apply(p) for p in parts]
            return torch.cat([self._unflat(p) for p in parts], dim=1).flatten(0, 1)
        return torch.cat(parts, dim=self.dim)

    def finish(self, module: nn.Module, out: torch.Tensor) -> None:
        """After the last slice: ``module``'s derived observations (``derived``) as the whole call leaves them."""
        for name, how in self.derived:
            setattr(module, name, DERIVED[how](out))

    @contextlib.contextmanager
    def calling(self, module: nn.Module, steps: int) -> Iterator[None]:
        """While a slice of ``steps`` steps is computed: ``module``'s ``steps_attr`` set to it (and put back)."""
        if not self.steps_attr:
            yield
            return
        old = getattr(module, self.steps_attr)
        setattr(module, self.steps_attr, steps)
        try:
            yield
        finally:
            setattr(module, self.steps_attr, old)


#: the layout of spikingjelly's multi-step modules, and the default
TIME_MAJOR = TimeAxis()
