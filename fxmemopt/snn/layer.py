"""Wrappers that apply ordinary (stateless, per-sample) layers to time sequences."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SeqToANNContainer", "TimeDistributed"]


class SeqToANNContainer(nn.Sequential):
    """Apply stateless layers to every time step of a ``[T, N, ...]`` sequence at once.

    Layers such as convolution, pooling, linear or batch norm treat each sample independently, so
    the time and batch dimensions can be merged into one batch of ``T * N`` samples, processed in
    a single call (much faster than looping over ``T``), and split again. Batch norm therefore
    computes its statistics over all ``T * N`` samples.

    The modules are registered as children exactly as in :class:`torch.nn.Sequential`, so their
    ``state_dict`` keys are ``0.weight``, ``1.running_mean`` and so on. The forward pass is
    traceable by :mod:`torch.fx` (it uses no shape unpacking and no data-dependent control flow).

    Args:
        *modules: Layers applied in order to the merged ``[T * N, ...]`` tensor. They must not
            depend on which time step a sample belongs to.

    Shape:
        Input ``[T, N, *in]``, output ``[T, N, *out]`` where ``*out`` is what the modules produce
        for a ``[T * N, *in]`` batch.

    Example:
        >>> layer = SeqToANNContainer(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4))
        >>> layer(torch.rand(5, 3, 2, 8, 8)).shape
        torch.Size([5, 3, 4, 8, 8])
        >>> sorted(layer.state_dict())[:2]
        ['0.bias', '0.weight']
    """

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        y = x_seq.flatten(0, 1)
        y = super().forward(y)
        # Split with the two leading sizes taken one by one: under torch.fx tracing these are
        # proxies, and unflatten accepts a tuple of them, whereas unpacking x_seq.shape would fail.
        return y.unflatten(0, (x_seq.shape[0], x_seq.shape[1]))


TimeDistributed = SeqToANNContainer
"""Alias of :class:`SeqToANNContainer` (the Keras name for the same idea)."""
