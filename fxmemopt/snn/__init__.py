"""A small reference spiking-neural-network library (multi-step, time-first ``[T, N, ...]``).

It provides what :mod:`fxmemopt` needs to be demonstrated and tested without external SNN
dependencies: surrogate spike functions, stateful neurons following the ``_memories`` state
convention, a per-time-step layer container, and reference models that torch.fx can trace.

Example:
    >>> import torch
    >>> from fxmemopt import snn
    >>> net = snn.DeepConvSNN(num_blocks=2, channels=4)
    >>> x = torch.rand(4, 2, 3, 8, 8)  # [T, N, C, H, W]
    >>> logits = net(x).mean(0)        # average the per-step logits over time
    >>> logits.shape
    torch.Size([2, 10])
    >>> snn.reset_net(net)             # before the next, independent batch
"""

from . import functional, surrogate
from .functional import is_memory_module, reset_net
from .layer import SeqToANNContainer, TimeDistributed
from .models import (
    ConvBNNeuron,
    DeepConvSNN,
    SEWBasicBlock,
    SEWResNet18,
    Spikformer,
    SpikformerBlock,
    SpikformerMLP,
    SpikformerPatchEmbed,
    SpikingSelfAttention,
    SpikingVGG11,
    TokenLinearBN,
    make_neuron,
)
from .neuron import BaseNode, IFNode, LIFNode, MemoryModule, ParametricLIFNode

__all__ = [
    "surrogate",
    "functional",
    "MemoryModule",
    "BaseNode",
    "IFNode",
    "LIFNode",
    "ParametricLIFNode",
    "reset_net",
    "is_memory_module",
    "SeqToANNContainer",
    "TimeDistributed",
    "make_neuron",
    "ConvBNNeuron",
    "TokenLinearBN",
    "SpikingVGG11",
    "SEWBasicBlock",
    "SEWResNet18",
    "SpikingSelfAttention",
    "SpikformerMLP",
    "SpikformerBlock",
    "SpikformerPatchEmbed",
    "Spikformer",
    "DeepConvSNN",
]
