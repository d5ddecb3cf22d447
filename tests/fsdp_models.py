"""Models for the FSDP2 tests: several blocks, each a unit users shard (``fully_shard(block)``, then the root)."""

from __future__ import annotations

from torch import nn

from fxmemopt.snn import LIFNode, SeqToANNContainer


class Block(nn.Module):
    """conv-BN-LIF twice with a residual add: two neurons, so two regions per block."""

    def __init__(self, c: int, neuron=LIFNode):
        super().__init__()
        self.conv1 = SeqToANNContainer(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.sn1 = neuron()
        self.conv2 = SeqToANNContainer(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.sn2 = neuron()

    def forward(self, x):
        return self.sn2(self.conv2(self.sn1(self.conv1(x)))) + x


class BlockNet(nn.Module):
    """stem (conv-LIF), ``n`` :class:`Block` in a ``ModuleList``, mean over space, linear head. Input ``[T, N, 3, H,
    W]``; output ``[T, N, classes]``."""

    def __init__(self, c: int = 8, n: int = 3, classes: int = 10, neuron=LIFNode):
        super().__init__()
        self.stem = SeqToANNContainer(nn.Conv2d(3, c, 3, padding=1))
        self.sn = neuron()
        self.blocks = nn.ModuleList(Block(c, neuron) for _ in range(n))
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        x = self.sn(self.stem(x))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean((3, 4)))
