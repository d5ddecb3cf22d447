"""Helpers that act on whole networks of stateful modules."""

from __future__ import annotations

from torch import nn

from .neuron import MemoryModule

__all__ = ["reset_net", "is_memory_module"]


def is_memory_module(module: nn.Module) -> bool:
    """Return True if ``module`` keeps per-sequence state that :func:`reset_net` should reset.

    A module qualifies if it is a :class:`~fxmemopt.snn.neuron.MemoryModule`, or, by duck typing,
    if it has a callable ``reset`` attribute and a ``_memories`` dict (so neurons from other
    libraries that follow the same convention, e.g. spikingjelly's, are recognised too).

    Args:
        module: Any module.

    Example:
        >>> from fxmemopt.snn.neuron import LIFNode
        >>> is_memory_module(LIFNode()), is_memory_module(nn.ReLU())
        (True, False)
    """
    if isinstance(module, MemoryModule):
        return True
    return callable(getattr(module, "reset", None)) and isinstance(getattr(module, "_memories", None), dict)


def reset_net(net: nn.Module) -> None:
    """Reset the state of every stateful module in ``net``, including ``net`` itself.

    Call it between independent input sequences (typically after each training or evaluation
    batch): neuron potentials otherwise carry over from one batch to the next, and may still
    reference the previous batch's autograd graph.

    Args:
        net: The network; all its submodules are visited.

    Example:
        >>> import torch
        >>> from fxmemopt.snn.neuron import IFNode
        >>> net = nn.Sequential(IFNode())
        >>> _ = net(torch.ones(2, 3))
        >>> isinstance(net[0].v, torch.Tensor)
        True
        >>> reset_net(net)
        >>> net[0].v
        0.0
    """
    for module in net.modules():
        if is_memory_module(module):
            module.reset()
