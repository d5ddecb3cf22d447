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

from typing import Any

import torch

__all__ = ["unbind_steps"]


class _AsSummed(torch.autograd.Function):
    """Identity forward (a view); backward adds ``+0.0``, as summing select gradients does."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad + 0.0


def unbind_steps(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``x.unbind(0)``, with the gradient of ``x`` bitwise what ``x[0], ..., x[T-1]`` used separately would give."""
    return _AsSummed.apply(x).unbind(0)
