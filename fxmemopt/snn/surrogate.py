"""Surrogate-gradient spike functions.

A spiking neuron fires when its membrane potential crosses the threshold, i.e. the spike is a
Heaviside step of ``v - v_threshold``. The step has a zero derivative almost everywhere, so
training replaces it, *in the backward pass only*, by the derivative of a smooth function that
approximates the step (the "surrogate"). The forward pass stays an exact 0/1 step.

Every spike function here is a :class:`torch.autograd.Function` that keeps its input for the
backward pass with ``ctx.save_for_backward``. That matters for :mod:`fxmemopt`: the optimizer
intercepts saved activations through :func:`torch.autograd.graph.saved_tensors_hooks`, which only
sees tensors that go through ``save_for_backward`` (a tensor stored as a plain ``ctx`` attribute
would be invisible to it and stay resident in memory).

Example:
    >>> import torch
    >>> sg = ATan(alpha=2.0)
    >>> x = torch.tensor([-0.5, 0.0, 0.5], requires_grad=True)
    >>> sg(x)
    tensor([0., 1., 1.], grad_fn=<ATanSpikeBackward>)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["heaviside", "ATanSpike", "SigmoidSpike", "ATan", "Sigmoid"]


def heaviside(x: torch.Tensor) -> torch.Tensor:
    """Return the Heaviside step of ``x`` in the dtype of ``x``: 1 where ``x >= 0``, else 0.

    Args:
        x: Any floating-point tensor.

    Returns:
        A tensor of the same shape and dtype as ``x`` holding only 0 and 1.

    Example:
        >>> heaviside(torch.tensor([-1.0, 0.0, 2.0]))
        tensor([0., 1., 1.])
    """
    # x == 0 counts as a spike, so a neuron sitting exactly on the threshold fires.
    return (x >= 0).to(x.dtype)


class ATanSpike(torch.autograd.Function):
    """Heaviside forward, arctangent surrogate backward.

    The surrogate is ``g(x) = arctan(pi/2 * alpha * x) / pi + 1/2``, whose derivative is
    ``alpha / 2 / (1 + (pi/2 * alpha * x)^2)``. Call it as ``ATanSpike.apply(x, alpha)`` with
    ``alpha`` a Python float, or use the module wrapper :class:`ATan`.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.alpha = alpha  # a Python float, not a tensor: safe to keep on ctx
        return heaviside(x)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        (x,) = ctx.saved_tensors
        alpha = ctx.alpha
        grad_x = alpha / 2 / (1 + (math.pi / 2 * alpha * x).square())
        return grad_output * grad_x, None


class SigmoidSpike(torch.autograd.Function):
    """Heaviside forward, sigmoid surrogate backward.

    The surrogate is ``g(x) = sigmoid(alpha * x)``, whose derivative is
    ``alpha * sg * (1 - sg)`` with ``sg = sigmoid(alpha * x)``. Call it as
    ``SigmoidSpike.apply(x, alpha)`` with ``alpha`` a Python float, or use :class:`Sigmoid`.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return heaviside(x)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        (x,) = ctx.saved_tensors
        alpha = ctx.alpha
        # Recompute the sigmoid from the saved input instead of saving it in forward: the
        # forward pass then keeps a single tensor alive (x), which is what the optimizer expects.
        sg = torch.sigmoid(alpha * x)
        grad_x = alpha * sg * (1 - sg)
        return grad_output * grad_x, None


class ATan(nn.Module):
    """Spike function with an arctangent surrogate gradient.

    Forward: ``(x >= 0)`` as ``x.dtype``. Backward: ``alpha / 2 / (1 + (pi/2 * alpha * x)^2)``.
    Larger ``alpha`` gives a sharper, more step-like surrogate. The module holds no parameters or
    buffers, so it can be shared or copied freely.

    Args:
        alpha: Sharpness of the surrogate; the derivative peaks at ``alpha / 2`` at ``x = 0``.

    Shape:
        Input: any shape. Output: same shape and dtype as the input.

    Example:
        >>> sg = ATan(alpha=2.0)
        >>> x = torch.zeros(3, requires_grad=True)
        >>> sg(x).sum().backward()
        >>> x.grad
        tensor([1., 1., 1.])
    """

    def __init__(self, alpha: float = 2.0) -> None:
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ATanSpike.apply(x, self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class Sigmoid(nn.Module):
    """Spike function with a sigmoid surrogate gradient.

    Forward: ``(x >= 0)`` as ``x.dtype``. Backward: ``alpha * sg * (1 - sg)`` with
    ``sg = sigmoid(alpha * x)``; the derivative peaks at ``alpha / 4`` at ``x = 0``.

    Args:
        alpha: Sharpness of the surrogate.

    Shape:
        Input: any shape. Output: same shape and dtype as the input.

    Example:
        >>> sg = Sigmoid(alpha=4.0)
        >>> x = torch.zeros(2, requires_grad=True)
        >>> sg(x).sum().backward()
        >>> x.grad
        tensor([1., 1.])
    """

    def __init__(self, alpha: float = 4.0) -> None:
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return SigmoidSpike.apply(x, self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"
