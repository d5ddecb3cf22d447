"""Reference spiking networks for demos, tests and benchmarks.

Every model takes a float sequence shaped ``[T, N, C, H, W]`` (time first; spikes, event counts
or a repeated static image) and returns per-step logits ``[T, N, num_classes]``; the caller
usually averages them over ``T``. Call :func:`fxmemopt.snn.functional.reset_net` between
independent batches.

All models are traceable by :mod:`torch.fx` when the neurons are treated as leaf modules (their
forward loops over time, which a symbolic tracer cannot unroll on an unknown ``T``)::

    class SNNTracer(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return hasattr(m, "_memories") or super().is_leaf_module(m, qualname)

To keep them traceable, the forward passes never unpack shapes or branch on tensor values:
per-step layers go through :class:`~fxmemopt.snn.layer.SeqToANNContainer`, and token-wise layers
through :class:`TokenLinearBN`.

Neuron options shared by all models and blocks:

* ``neuron``: ``"if"``, ``"lif"`` (default) or ``"plif"``, see :func:`make_neuron`;
* ``surrogate``: surrogate spike function module (each neuron gets its own deep copy), or
  ``None`` for the neuron default (:class:`~fxmemopt.snn.surrogate.ATan`);
* ``detach_reset``: passed to every neuron.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .layer import SeqToANNContainer
from .neuron import BaseNode, IFNode, LIFNode, ParametricLIFNode

__all__ = [
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

_NEURONS: dict[str, type[BaseNode]] = {"if": IFNode, "lif": LIFNode, "plif": ParametricLIFNode}

# VGG-11 feature configuration: output channels of each 3x3 conv, "M" for a 2x2 max pool.
_VGG11_CFG: list[int | str] = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


def make_neuron(kind: str = "lif", **kwargs: Any) -> BaseNode:
    """Build a multi-step spiking neuron by name.

    Args:
        kind: ``"if"`` (:class:`~fxmemopt.snn.neuron.IFNode`), ``"lif"``
            (:class:`~fxmemopt.snn.neuron.LIFNode`) or ``"plif"``
            (:class:`~fxmemopt.snn.neuron.ParametricLIFNode`); case-insensitive.
        **kwargs: Constructor arguments of that neuron class (e.g. ``v_threshold``,
            ``surrogate_function``, ``detach_reset``, ``tau`` for LIF).

    Returns:
        The neuron module.

    Raises:
        ValueError: For an unknown ``kind``.

    Example:
        >>> make_neuron("lif", tau=4.0)
        LIFNode(
          tau=4.0, decay_input=True, v_threshold=1.0, v_reset=0.0, detach_reset=False, step_mode='m'
          (surrogate_function): ATan(alpha=2.0)
        )
    """
    try:
        cls = _NEURONS[kind.lower()]
    except KeyError:
        raise ValueError(f"unknown neuron kind {kind!r}; expected one of {sorted(_NEURONS)}") from None
    return cls(**kwargs)


def _neuron(kind: str, surrogate: nn.Module | None, detach_reset: bool, **kwargs: Any) -> BaseNode:
    """make_neuron with the model-level options; each neuron gets its own surrogate instance."""
    if surrogate is not None:
        # A private copy keeps the module tree a tree (no module shared by many parents), which
        # makes named_modules() and per-module rewriting passes behave predictably.
        kwargs["surrogate_function"] = copy.deepcopy(surrogate)
    return make_neuron(kind, detach_reset=detach_reset, **kwargs)


def _scaled(channels: int, width: float) -> int:
    """Channel count scaled by ``width``, rounded, and at least 1."""
    return max(1, int(round(channels * width)))


class ConvBNNeuron(nn.Module):
    """Conv2d + BatchNorm2d applied per time step, followed by a spiking neuron.

    The building block of the convolutional models here. The optimizer's users can name this
    class in ``targets=(ConvBNNeuron,)`` to treat each block as one unit.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Convolution kernel size.
        stride: Convolution stride.
        padding: Convolution zero padding.
        neuron, surrogate, detach_reset: Neuron options (see the module docstring).

    Shape:
        ``[T, N, in_channels, H, W]`` -> ``[T, N, out_channels, H', W']``.

    Attributes:
        conv: ``SeqToANNContainer(Conv2d, BatchNorm2d)``; the conv has no bias since BN follows.
        sn: The neuron.

    Example:
        >>> block = ConvBNNeuron(2, 4)
        >>> block(torch.rand(3, 2, 2, 8, 8)).shape
        torch.Size([3, 2, 4, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        neuron: str = "lif",
        surrogate: nn.Module | None = None,
        detach_reset: bool = False,
    ) -> None:
        super().__init__()
        self.conv = SeqToANNContainer(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.sn = _neuron(neuron, surrogate, detach_reset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sn(self.conv(x))


class TokenLinearBN(nn.Module):
    """Linear + BatchNorm1d over the feature dimension of a token sequence.

    All leading dimensions (time, batch, tokens) are merged into one batch, so batch norm
    normalises each feature over every token of every sample and time step.

    Args:
        in_features: Input feature size ``D_in``.
        out_features: Output feature size ``D_out``.

    Shape:
        ``[T, N, L, D_in]`` -> ``[T, N, L, D_out]``.

    Example:
        >>> TokenLinearBN(8, 16)(torch.rand(2, 3, 5, 8)).shape
        torch.Size([2, 3, 5, 16])
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.bn = nn.BatchNorm1d(out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.linear(x.flatten(0, 2)))
        return y.unflatten(0, (x.shape[0], x.shape[1], x.shape[2]))


class SpikingVGG11(nn.Module):
    """Spiking VGG-11 with batch norm, e.g. for CIFAR10-DVS-shaped input ``[T, N, 2, 48, 48]``.

    Features: the VGG-11 configuration ``[64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M]``
    where each number is a :class:`ConvBNNeuron` (3x3, padding 1) with that many channels times
    ``width`` and ``M`` a 2x2 max pool. Classifier: flatten, optional dropout, linear.

    Args:
        in_channels: Input channels (2 for DVS polarity channels).
        num_classes: Output classes.
        width: Channel multiplier (each layer keeps at least one channel).
        image_size: Input height and width; must be at least 32 (five 2x pools).
        dropout: Dropout probability before the linear layer (0 disables the layer).
        neuron, surrogate, detach_reset: Neuron options (see the module docstring).

    Shape:
        ``[T, N, in_channels, image_size, image_size]`` -> ``[T, N, num_classes]``.

    Example:
        >>> net = SpikingVGG11(width=0.0625, image_size=32)
        >>> net(torch.rand(2, 1, 2, 32, 32)).shape
        torch.Size([2, 1, 10])
    """

    def __init__(
        self,
        in_channels: int = 2,
        num_classes: int = 10,
        width: float = 1.0,
        image_size: int = 48,
        dropout: float = 0.0,
        neuron: str = "lif",
        surrogate: nn.Module | None = None,
        detach_reset: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for item in _VGG11_CFG:
            if item == "M":
                layers.append(SeqToANNContainer(nn.MaxPool2d(2)))
                size //= 2
            else:
                out = _scaled(int(item), width)
                layers.append(ConvBNNeuron(channels, out, 3, 1, 1, neuron, surrogate, detach_reset))
                channels = out
        if size < 1:
            raise ValueError(f"image_size must be at least 32 for five 2x2 poolings, got {image_size}")
        self.features = nn.Sequential(*layers)
        head: list[nn.Module] = [nn.Flatten()]
        if dropout > 0:
            head.append(nn.Dropout(p=dropout))
        head.append(nn.Linear(channels * size * size, num_classes))
        self.classifier = SeqToANNContainer(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _connect(out: torch.Tensor, identity: torch.Tensor, cnf: str) -> torch.Tensor:
    """SEW element-wise connect function between the residual branch and the identity."""
    if cnf == "ADD":
        return out + identity
    if cnf == "AND":
        return out * identity
    # IAND: (not out) and identity.
    return (1.0 - out) * identity


class SEWBasicBlock(nn.Module):
    """Spike-element-wise (SEW) residual basic block.

    ``out = g(sn2(bn2(conv2(sn1(bn1(conv1(x)))))), identity)`` where ``identity`` is ``x``, or
    ``sn(bn(conv1x1(x)))`` when the stride or channel count changes, and ``g`` is the connect
    function: ``"ADD"`` (``a + b``), ``"AND"`` (``a * b``) or ``"IAND"`` (``(1 - a) * b``).

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the first conv (and of the downsample path).
        cnf: Connect function name.
        neuron, surrogate, detach_reset: Neuron options (see the module docstring).

    Shape:
        ``[T, N, in_channels, H, W]`` -> ``[T, N, out_channels, H / stride, W / stride]``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        cnf: str = "ADD",
        neuron: str = "lif",
        surrogate: nn.Module | None = None,
        detach_reset: bool = False,
    ) -> None:
        super().__init__()
        if cnf not in ("ADD", "AND", "IAND"):
            raise ValueError(f"cnf must be 'ADD', 'AND' or 'IAND', got {cnf!r}")
        self.cnf = cnf
        opts = (neuron, surrogate, detach_reset)
        self.conv1 = ConvBNNeuron(in_channels, out_channels, 3, stride, 1, *opts)
        self.conv2 = ConvBNNeuron(out_channels, out_channels, 3, 1, 1, *opts)
        self.downsample: ConvBNNeuron | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = ConvBNNeuron(in_channels, out_channels, 1, stride, 0, *opts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A Python check on a module attribute, fixed at construction: fine for torch.fx.
        identity = x if self.downsample is None else self.downsample(x)
        return _connect(self.conv2(self.conv1(x)), identity, self.cnf)

    def extra_repr(self) -> str:
        return f"cnf={self.cnf!r}"


class SEWResNet18(nn.Module):
    """SEW-ResNet-18: a ResNet-18 whose residual connections add spikes (``cnf="ADD"``).

    Stem: 7x7 stride-2 :class:`ConvBNNeuron`, then 3x3 stride-2 max pool. Four stages of two
    :class:`SEWBasicBlock` each with 64, 128, 256, 512 channels (times ``width``), the last three
    starting with stride 2. Head: global average pool, flatten, linear.

    Args:
        in_channels: Input channels.
        num_classes: Output classes.
        width: Channel multiplier (each layer keeps at least one channel).
        cnf: Connect function of the residual blocks: ``"ADD"``, ``"AND"`` or ``"IAND"``.
        neuron, surrogate, detach_reset: Neuron options (see the module docstring).

    Shape:
        ``[T, N, in_channels, H, W]`` -> ``[T, N, num_classes]`` (any ``H, W``; 64x64 typical).

    Example:
        >>> net = SEWResNet18(width=0.0625)
        >>> net(torch.rand(2, 1, 3, 32, 32)).shape
        torch.Size([2, 1, 10])
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        width: float = 1.0,
        cnf: str = "ADD",
        neuron: str = "lif",
        surrogate: nn.Module | None = None,
        detach_reset: bool = False,
    ) -> None:
        super().__init__()
        opts = (neuron, surrogate, detach_reset)
        stem_channels = _scaled(64, width)
        self.stem = ConvBNNeuron(in_channels, stem_channels, 7, 2, 3, *opts)
        self.maxpool = SeqToANNContainer(nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        channels = stem_channels
        stages: list[nn.Module] = []
        for i, base in enumerate((64, 128, 256, 512)):
            out = _scaled(base, width)
            stride = 1 if i == 0 else 2
            stages.append(
                nn.Sequential(
                    SEWBasicBlock(channels, out, stride, cnf, *opts),
                    SEWBasicBlock(out, out, 1, cnf, *opts),
                )
            )
            channels = out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.head = SeqToANNContainer(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.stem(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.head(x)


class SpikingSelfAttention(nn.Module):
    """Spiking self-attention (SSA) of Spikformer: softmax-free attention on spike tensors.

    ``q, k, v = sn(bn(linear(x)))`` each; per head ``a = (q @ k^T) * scale @ v``; then a neuron
    with threshold ``attn_threshold`` on ``a`` (heads concatenated), and an output projection
    ``sn(bn(linear(.)))``. Since q, k, v are non-negative spikes, no softmax is needed to keep
    the attention scores well behaved.

    Args:
        dim: Token feature size ``D``; must be divisible by ``num_heads``.
        num_heads: Number of attention heads.
        scale: Factor on the attention scores.
        attn_threshold: Threshold of the neuron after the attention product.
        neuron, surrogate, detach_reset: Neuron options (see the module docstring).

    Shape:
        ``[T, N, L, D]`` -> ``[T, N, L, D]``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        scale: float = 0.125,
        attn_threshold: float = 0.5,
        neuron: str = "lif",
        surrogate: nn.Module | None = None,
        detach_reset: bool = False,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = scale
        opts = (neuron, surrogate, detach_reset)
        self.q = TokenLinearBN(dim, dim)
        self.q_sn = _neuron(*opts)
        self.k = TokenLinearBN(dim, dim)
        self.k_sn = _neuron(*opts)
        self.v = TokenLinearBN(dim, dim)
        self.v_sn = _neuron(*opts)
        self.attn_sn = _neuron(*opts, v_threshold=attn_threshold)
        self.proj = TokenLinearBN(dim, dim)
        self.proj_sn = _neuron(*opts)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # [T, N, L, D] -> [T, N, H, L, D / H]
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self._split_heads(self.q_sn(self.q(x)))
        k = self._split_heads(self.k_sn(self.k(x)))
        v = self._split_heads(self.v_sn(self.v(x)))
        attn = (q @ k.transpose(-2, -1)) * self.scale
        y = (attn @ v).transpose(2, 3).flatten(3)  # back to [T, N, L, D]
        y = self.attn_sn(y)
        return self.proj_sn(self.proj(y))


class SpikformerMLP(nn.Module):
    """Token-wise MLP of Spikformer: ``sn(bn(linear(.)))`` twice, ``D -> hidden -> D``.

    Args:
        dim: Token feature size ``D``.
        hidden_dim: Hidden feature size.
        neuron, surrogate, detach_reset: Neuron options (see the module docstring).

    Shape:
        ``[T, N, L, D]`` -> ``[T, N, L, D]``.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        neuron: str = "lif",
        surrogate: nn.Module | None = None,
        detach_reset: bool = False,
    ) -> None:
        super().__init__()
        opts = (neuron, surrogate, detach_reset)
        self.fc1 = TokenLinearBN(dim, hidden_dim)
        self.fc1_sn = _neuron(*opts)
        self.fc2 = TokenLinearBN(hidden_dim, dim)
        self.fc2_sn = _neuron(*opts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2_sn(self.fc2(self.fc1_sn(self.fc1(x))))


class SpikformerBlock(nn.Module):
    """Spikformer encoder block: ``x = x + attn(x)``, then ``x = x + mlp(x)``.

    Args:
        dim: Token feature size ``D``.
        num_heads: Attention heads.
        mlp_ratio: Hidden size of the MLP as a multiple of ``dim``.
        neuron, surrogate, detach_reset: Neuron options (see the module docstring).

    Shape:
        ``[T, N, L, D]`` -> ``[T, N, L, D]``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        mlp_ratio: float = 4,
        neuron: str = "lif",
        surrogate: nn.Module | None = None,
        detach_reset: bool = False,
    ) -> None:
        super().__init__()
        opts: dict[str, Any] = {"neuron": neuron, "surrogate": surrogate, "detach_reset": detach_reset}
        self.attn = SpikingSelfAttention(dim, num_heads, **opts)
        self.mlp = SpikformerMLP(dim, max(1, int(dim * mlp_ratio)), **opts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class SpikformerPatchEmbed(nn.Module):
    """Spiking patch splitting (SPS): a small conv stem that turns an image sequence into tokens.

    Four 3x3 :class:`ConvBNNeuron` stages with ``D/8, D/4, D/2, D`` channels, a 2x2 max pool after
    the third and the fourth (so the token grid is ``H/4 x W/4``), then a relative position
    embedding ``x = x + sn(bn(conv3x3(x)))``. The feature map is finally flattened into tokens.

    Args:
        in_channels: Input channels.
        embed_dim: Token feature size ``D``.
        neuron, surrogate, detach_reset: Neuron options (see the module docstring).

    Shape:
        ``[T, N, C, H, W]`` -> ``[T, N, L, D]`` with ``L = (H // 4) * (W // 4)``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        embed_dim: int = 64,
        neuron: str = "lif",
        surrogate: nn.Module | None = None,
        detach_reset: bool = False,
    ) -> None:
        super().__init__()
        opts = (neuron, surrogate, detach_reset)
        dims = [max(1, embed_dim // 8), max(1, embed_dim // 4), max(1, embed_dim // 2), embed_dim]
        self.stage1 = ConvBNNeuron(in_channels, dims[0], 3, 1, 1, *opts)
        self.stage2 = ConvBNNeuron(dims[0], dims[1], 3, 1, 1, *opts)
        self.stage3 = ConvBNNeuron(dims[1], dims[2], 3, 1, 1, *opts)
        self.pool3 = SeqToANNContainer(nn.MaxPool2d(2))
        self.stage4 = ConvBNNeuron(dims[2], dims[3], 3, 1, 1, *opts)
        self.pool4 = SeqToANNContainer(nn.MaxPool2d(2))
        self.rpe = ConvBNNeuron(embed_dim, embed_dim, 3, 1, 1, *opts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool3(self.stage3(self.stage2(self.stage1(x))))
        x = self.pool4(self.stage4(x))
        x = x + self.rpe(x)
        # [T, N, D, H', W'] -> [T, N, D, L] -> [T, N, L, D]
        return x.flatten(3).transpose(2, 3)


class Spikformer(nn.Module):
    """A small Spikformer: spiking patch embedding, SSA encoder blocks, linear head.

    Args:
        in_channels: Input channels.
        num_classes: Output classes.
        image_size: Input height and width; at least 4 (the patch embedding pools twice).
        embed_dim: Token feature size ``D``; divisible by ``num_heads``.
        num_heads: Attention heads.
        depth: Number of :class:`SpikformerBlock`.
        mlp_ratio: MLP hidden size as a multiple of ``embed_dim``.
        neuron, surrogate, detach_reset: Neuron options (see the module docstring).

    Shape:
        ``[T, N, in_channels, image_size, image_size]`` -> ``[T, N, num_classes]``; the head
        averages the ``(image_size // 4) ** 2`` tokens.

    Example:
        >>> net = Spikformer(embed_dim=16, num_heads=2, depth=1, image_size=16)
        >>> net(torch.rand(2, 1, 3, 16, 16)).shape
        torch.Size([2, 1, 10])
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
        embed_dim: int = 64,
        num_heads: int = 4,
        depth: int = 2,
        mlp_ratio: float = 4,
        neuron: str = "lif",
        surrogate: nn.Module | None = None,
        detach_reset: bool = False,
    ) -> None:
        super().__init__()
        if image_size < 4:
            raise ValueError(f"image_size must be at least 4, got {image_size}")
        opts = (neuron, surrogate, detach_reset)
        self.image_size = image_size
        self.patch_embed = SpikformerPatchEmbed(in_channels, embed_dim, *opts)
        self.blocks = nn.Sequential(
            *[SpikformerBlock(embed_dim, num_heads, mlp_ratio, *opts) for _ in range(depth)]
        )
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.patch_embed(x))
        # Mean over the token dimension: [T, N, L, D] -> [T, N, D]; Linear acts on the last dim.
        return self.head(x.mean(2))


class DeepConvSNN(nn.Module):
    """A plain deep stack of identical conv blocks: a depth benchmark for memory optimisation.

    Stem :class:`ConvBNNeuron` (``in_channels -> channels``), then ``num_blocks`` identical
    :class:`ConvBNNeuron` (``channels -> channels``, 3x3, padding 1, no pooling), then global
    average pool, flatten and linear. Activation memory grows linearly with ``num_blocks`` at a
    fixed resolution, which makes the model a clean stress test.

    Args:
        num_blocks: Number of ``channels -> channels`` blocks after the stem.
        channels: Width of every block.
        in_channels: Input channels.
        num_classes: Output classes.
        neuron, surrogate, detach_reset: Neuron options (see the module docstring).

    Shape:
        ``[T, N, in_channels, H, W]`` -> ``[T, N, num_classes]``.

    Example:
        >>> net = DeepConvSNN(num_blocks=2, channels=4)
        >>> net(torch.rand(2, 1, 3, 8, 8)).shape
        torch.Size([2, 1, 10])
    """

    def __init__(
        self,
        num_blocks: int = 16,
        channels: int = 32,
        in_channels: int = 3,
        num_classes: int = 10,
        neuron: str = "lif",
        surrogate: nn.Module | None = None,
        detach_reset: bool = False,
    ) -> None:
        super().__init__()
        opts = (neuron, surrogate, detach_reset)
        self.stem = ConvBNNeuron(in_channels, channels, 3, 1, 1, *opts)
        self.blocks = nn.Sequential(
            *[ConvBNNeuron(channels, channels, 3, 1, 1, *opts) for _ in range(num_blocks)]
        )
        self.head = SeqToANNContainer(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))
