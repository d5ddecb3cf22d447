"""Small-size builders for the models of ``spikingjelly.activation_based.model`` (spikingjelly 2.0.0).

``ZOO`` maps a name to a factory ``() -> (model, example_inputs)``. Each factory

* seeds torch (``torch.manual_seed(0)``) so that model and inputs are deterministic,
* builds the model with spikingjelly's own code, unmodified: only constructor arguments are chosen. Where a named
  builder fixes widths that are too big for a CPU test (``qkformer_10_384``, ``sdt_8_384``, ``spikformer_cifar10``,
  ``maxformer_*``, ``max_resnet18``) the model class is called with that builder's structure at narrow widths,
* puts it in multi-step mode (``functional.set_step_mode(model, "m")`` where the model does not do it itself),
* uses ``neuron.LIFNode(surrogate_function=surrogate.ATan(), detach_reset=True)`` where the builder needs a
  ``spiking_neuron``; models whose default neuron already is their paper's multi-step LIFNode keep that default,
* returns the model in ``train()`` mode and the inputs in the layout its ``forward`` expects: ``[T, N, C, H, W]``
  (T=4, N=2 unless stated) for the classic builders and the event-data nets, ``[N, C, H, W]`` images for the models
  that repeat a static image over T themselves (``_to_sequence``).

Sizes are chosen so that one forward + backward of the unoptimized model takes well under a second on one CPU
core. Exceptions, because the sizes are hard-coded: the spiking VGGs (fixed 512*7*7 -> 4096 -> 4096 classifier,
about 1 s) and ``spike_dhs`` (fixed T=6, 576-channel head, 32x32 input, about 1.2 s at N=1).

Left out (not in ``ZOO``):

* ``snas_net.SNASNet``: single-step only. Its forward loops over ``args.timestep`` itself, calling single-step
  neurons on ``[N, C, H, W]`` between plain ``nn.Conv2d``/``nn.BatchNorm2d``, and keeps the previous step's tensors
  as plain attributes (``Neuronal_Cell_backward.last_x*``). ``set_step_mode(model, "m")`` does not raise but makes
  its neurons treat the batch dimension as time, which is wrong. (It builds and trains single-step on CPU:
  ``args.dataset="cifar100"``, 128-256 channels at 32x32, about 0.6 s for timestep=2, N=2.)
* ``spiking_vggws_ottt``'s default ``OTTTLIFNode`` is single-step only (it raises for ``step_mode="m"``), so
  ``ottt_spiking_vggws`` is built with a multi-step ``LIFNode`` instead; the ``ottt_spiking_vgg11..19(_ws)``
  builders are left out: same layers plus the fixed 512*7*7 -> 4096 -> 4096 classifier of ``spiking_vgg*``.
* The other depths/widths of the classic ResNets/VGGs (``sew_resnet34/50/101/152``, ``sew_resnext*``,
  ``sew_wide_resnet*``, ``spiking_resnet34..152``, ``spiking_resnext*``, ``spiking_wide_resnet*``,
  ``spiking_vgg13..19(_bn)``) and the full-size named builders of the new models (``qkformer_10_384``,
  ``sdt_8_384``, ``spikformer_ti/_s/_cifar10``, ``maxformer_10_384``, ``maxformer_cifar``): same code as the
  entries here (BasicBlock and Bottleneck, cfg "A" with and without BN, the same model classes), only deeper or
  wider.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable

import torch
from torch import nn

T = 4
N = 2

Factory = Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]


def install_torchvision_stub() -> bool:
    """Put a tiny stand-in ``torchvision`` into ``sys.modules`` if the real one cannot be imported.

    spikingjelly's classic builders (``sew_resnet``, ``spiking_resnet``, ``spiking_vgg``) import torchvision only
    for ``load_state_dict_from_url`` (pretrained weights). The stand-in provides just that, as
    ``torchvision.models.utils`` and ``torchvision._internally_replaced_utils``, delegating to
    ``torch.hub.load_state_dict_from_url`` (the function torchvision re-exports). Returns True if it installed it.
    """
    try:
        importlib.import_module("torchvision")
        return False
    except ImportError:
        pass
    from torch.hub import load_state_dict_from_url

    def module(name: str, **attrs) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        mod.__fxmemopt_stub__ = True
        sys.modules[name] = mod
        return mod

    root = module("torchvision", __path__=[], __version__="0.0.0+stub")
    models = module("torchvision.models", __path__=[])
    utils = module("torchvision.models.utils", load_state_dict_from_url=load_state_dict_from_url)
    replaced = module("torchvision._internally_replaced_utils", load_state_dict_from_url=load_state_dict_from_url)
    root.models = models
    root._internally_replaced_utils = replaced
    models.utils = utils
    return True


install_torchvision_stub()

import spikingjelly.activation_based.model.masnn as sj_masnn  # noqa: E402
import spikingjelly.activation_based.model.maxformer as sj_maxformer  # noqa: E402
import spikingjelly.activation_based.model.ms_resnet as sj_ms_resnet  # noqa: E402
import spikingjelly.activation_based.model.parametric_lif_net as sj_parametric_lif_net  # noqa: E402
import spikingjelly.activation_based.model.qkformer as sj_qkformer  # noqa: E402
import spikingjelly.activation_based.model.sew_resnet as sj_sew_resnet  # noqa: E402
import spikingjelly.activation_based.model.spike_dhs as sj_spike_dhs  # noqa: E402
import spikingjelly.activation_based.model.spike_driven_transformer as sj_spike_driven_transformer  # noqa: E402
import spikingjelly.activation_based.model.spikformer as sj_spikformer  # noqa: E402
import spikingjelly.activation_based.model.spiking_resnet as sj_spiking_resnet  # noqa: E402
import spikingjelly.activation_based.model.spiking_vgg as sj_spiking_vgg  # noqa: E402
import spikingjelly.activation_based.model.spiking_vggws_ottt as sj_spiking_vggws_ottt  # noqa: E402
from spikingjelly.activation_based import functional, neuron, surrogate  # noqa: E402


def _lif_kwargs() -> dict:
    """``spiking_neuron`` + neuron kwargs for the builders that pass ``**kwargs`` to their neurons."""
    return {"spiking_neuron": neuron.LIFNode, "surrogate_function": surrogate.ATan(), "detach_reset": True}


def _plif_kwargs() -> dict:
    """The neuron of the Parametric-LIF paper's nets: ``ParametricLIFNode`` with a learnable tau."""
    return {"spiking_neuron": neuron.ParametricLIFNode, "init_tau": 2.0, "surrogate_function": surrogate.ATan(),
            "detach_reset": True}


def _images(c: int = 3, hw: int = 32, n: int = N) -> torch.Tensor:
    """Static images ``[N, C, H, W]`` in [0, 1)."""
    return torch.rand(n, c, hw, hw)


def _image_seq(c: int = 3, hw: int = 32, t: int = T, n: int = N) -> torch.Tensor:
    """Independent float frames ``[T, N, C, H, W]`` in [0, 1)."""
    return torch.rand(t, n, c, hw, hw)


def _spikes(c: int = 2, hw: int = 32, t: int = T, n: int = N, p: float = 0.2) -> torch.Tensor:
    """Event-camera style binary spike frames ``[T, N, C, H, W]`` (float 0/1, firing rate ``p``)."""
    return (torch.rand(t, n, c, hw, hw) < p).float()


def _finish(model: nn.Module, *inputs: torch.Tensor, set_step_mode: bool = True):
    if set_step_mode:
        functional.set_step_mode(model, "m")
    model.train()
    return model, tuple(inputs)


# --------------------------------------------------------------------------------------------------------------
# classic torchvision-derived builders (need spiking_neuron; layers default to single-step)
# --------------------------------------------------------------------------------------------------------------


def sew_resnet18():
    """``sew_resnet18(cnf="ADD")``, LIFNode: the builder as is (widths 64..512, [2, 2, 2, 2] BasicBlocks, 11M
    params), 10 classes. Input: images ``[T=4, N=2, 3, 32, 32]``; output ``[T, N, 10]``."""
    torch.manual_seed(0)
    model = sj_sew_resnet.sew_resnet18(cnf="ADD", num_classes=10, **_lif_kwargs())
    return _finish(model, _image_seq())


def sew_resnet_bottleneck_iand():
    """``SEWResNet(Bottleneck, [1, 1, 1, 1], cnf="IAND")``, LIFNode: the class behind ``sew_resnet50`` with one
    Bottleneck per stage (widths 64..512, x4 expansion, a spiking downsample in every stage) and the IAND
    connection. Input: images ``[T=4, N=2, 3, 32, 32]``; output ``[T, N, 10]``."""
    torch.manual_seed(0)
    model = sj_sew_resnet.SEWResNet(sj_sew_resnet.Bottleneck, [1, 1, 1, 1], num_classes=10, cnf="IAND", **_lif_kwargs())
    return _finish(model, _image_seq())


def spiking_resnet18():
    """``spiking_resnet18``, LIFNode: the builder as is (widths 64..512, [2, 2, 2, 2] BasicBlocks), 10 classes.
    Input: images ``[T=4, N=2, 3, 32, 32]``; output ``[T, N, 10]``."""
    torch.manual_seed(0)
    model = sj_spiking_resnet.spiking_resnet18(num_classes=10, **_lif_kwargs())
    return _finish(model, _image_seq())


def spiking_vgg11_bn():
    """``spiking_vgg11_bn``, LIFNode: the builder as is (cfg "A" 64..512 with BatchNorm, and its fixed
    AdaptiveAvgPool(7x7) -> 25088 -> 4096 -> 4096 classifier: 129M params, ~0.5 GB; the classifier cannot be
    made smaller through the constructor). Input: images ``[T=4, N=2, 3, 32, 32]``; output ``[T, N, 10]``."""
    torch.manual_seed(0)
    model = sj_spiking_vgg.spiking_vgg11_bn(num_classes=10, **_lif_kwargs())
    return _finish(model, _image_seq())


def spiking_vgg11():
    """``spiking_vgg11``, LIFNode: as ``spiking_vgg11_bn`` without BatchNorm (same fixed 129M-param classifier).
    Input: images ``[T=4, N=2, 3, 32, 32]``; output ``[T, N, 10]``."""
    torch.manual_seed(0)
    model = sj_spiking_vgg.spiking_vgg11(num_classes=10, **_lif_kwargs())
    return _finish(model, _image_seq())


def ottt_spiking_vggws():
    """``ottt_spiking_vggws`` with a multi-step LIFNode instead of its single-step-only ``OTTTLIFNode``: cfg "S"
    (64, 128, A, 256, 256, A, 512, 512, A, 512, 512) of weight-standardized ``WSConv2d`` + ``Scale(2.74)``, in
    ``OTTTSequential`` containers, light classifier. Input: images ``[T=4, N=2, 3, 8, 8]``; output ``[T, N, 10]``."""
    torch.manual_seed(0)
    model = sj_spiking_vggws_ottt.ottt_spiking_vggws(num_classes=10, **_lif_kwargs())
    return _finish(model, _image_seq(hw=8))


# --------------------------------------------------------------------------------------------------------------
# Parametric-LIF nets (parametric_lif_net.py): input size fixed by their Linear layers, width by ``channels``
# --------------------------------------------------------------------------------------------------------------


def plif_mnist():
    """``MNISTNet(channels=8)``, ParametricLIFNode: conv-BN-PLIF x2 with max-pools, 392 -> 2048 -> 100 FC,
    VotingLayer. Input: images ``[T=4, N=2, 1, 28, 28]``; output ``[T, N, 10]``."""
    torch.manual_seed(0)
    model = sj_parametric_lif_net.MNISTNet(channels=8, **_plif_kwargs())
    return _finish(model, _image_seq(c=1, hw=28))


def plif_fashion_mnist():
    """``FashionMNISTNet(channels=8)`` (an alias of MNISTNet), ParametricLIFNode. Input: images
    ``[T=4, N=2, 1, 28, 28]``; output ``[T, N, 10]``."""
    torch.manual_seed(0)
    model = sj_parametric_lif_net.FashionMNISTNet(channels=8, **_plif_kwargs())
    return _finish(model, _image_seq(c=1, hw=28))


def plif_nmnist():
    """``NMNISTNet(channels=8)``, ParametricLIFNode: MNISTNet with 2 input channels and 34x34 events.
    Input: spikes ``[T=4, N=2, 2, 34, 34]``; output ``[T, N, 10]``."""
    torch.manual_seed(0)
    model = sj_parametric_lif_net.NMNISTNet(channels=8, **_plif_kwargs())
    return _finish(model, _spikes(c=2, hw=34))


def plif_cifar10():
    """``CIFAR10Net(channels=8)``, ParametricLIFNode: 2 x (3 x conv-BN-PLIF, max-pool), 512 -> 2048 -> 100 FC,
    VotingLayer(10). Input: images ``[T=4, N=2, 3, 32, 32]``; output ``[T, N, 10]``."""
    torch.manual_seed(0)
    model = sj_parametric_lif_net.CIFAR10Net(channels=8, **_plif_kwargs())
    return _finish(model, _image_seq())


def plif_cifar10_dvs():
    """``CIFAR10DVSNet(channels=4)``, ParametricLIFNode: 4 x (conv-BN-PLIF, max-pool) on 128x128 events (the size
    is fixed by its Linear), 256 -> 512 -> 100 FC. Input: spikes ``[T=4, N=2, 2, 128, 128]``; output
    ``[T, N, 10]``."""
    torch.manual_seed(0)
    model = sj_parametric_lif_net.CIFAR10DVSNet(channels=4, **_plif_kwargs())
    return _finish(model, _spikes(c=2, hw=128, p=0.05))


def plif_dvs_gesture():
    """``DVSGestureNet(channels=4)``, ParametricLIFNode: 5 x (conv-BN-PLIF, max-pool) on 128x128 events (fixed by
    its Linear), 64 -> 512 -> 110 FC, VotingLayer(10). Input: spikes ``[T=4, N=2, 2, 128, 128]``; output
    ``[T, N, 11]``."""
    torch.manual_seed(0)
    model = sj_parametric_lif_net.DVSGestureNet(channels=4, **_plif_kwargs())
    return _finish(model, _spikes(c=2, hw=128, p=0.05))


# --------------------------------------------------------------------------------------------------------------
# models exported by spikingjelly.activation_based.model (multi-step by construction, paper LIF by default)
# --------------------------------------------------------------------------------------------------------------


def ms_resnet18():
    """``ms_resnet18(T=4, base_channels=8, stem_kernel_size=3, stem_stride=1)``: membrane-shortcut ResNet-18
    ([2, 2, 2, 2], widths 8..64), its default LIF (tau 4/3, Rect surrogate). Input: images ``[N=2, 3, 32, 32]``
    (repeated over T inside); output ``[N, 10]``."""
    torch.manual_seed(0)
    model = sj_ms_resnet.ms_resnet18(T=T, num_classes=10, base_channels=8, stem_kernel_size=3, stem_stride=1)
    return _finish(model, _images(), set_step_mode=False)


def ms_resnet34():
    """``ms_resnet34(T=4, base_channels=8, stem_kernel_size=3, stem_stride=1)``: [3, 4, 6, 3] blocks, widths
    8..64. Input: images ``[N=2, 3, 32, 32]``; output ``[N, 10]``."""
    torch.manual_seed(0)
    model = sj_ms_resnet.ms_resnet34(T=T, num_classes=10, base_channels=8, stem_kernel_size=3, stem_stride=1)
    return _finish(model, _images(), set_step_mode=False)


def max_resnet18():
    """``MaxResNet`` with ``max_resnet18``'s structure (layers (3, 3, 2), 3x3 stride-1 stem, max-pool transition
    blocks) at narrow widths: ``base_channels=16, stage_channels=(16, 32, 64)`` (the builder fixes 128/256/512).
    Input: images ``[N=2, 3, 32, 32]``; output ``[N, 10]``."""
    torch.manual_seed(0)
    model = sj_ms_resnet.MaxResNet(T=T, num_classes=10, layers=(3, 3, 2), base_channels=16, stage_channels=(16, 32, 64),
                                stem_kernel_size=3, stem_stride=1, stem_pool=False)
    return _finish(model, _images(), set_step_mode=False)


def att_ms_resnet18():
    """``att_ms_resnet18(T=4, base_channels=8, stem_kernel_size=3, stem_stride=1)``: MS-ResNet-18 with
    channel+spatial MultiDimensionalAttention in every block (reduction_c=8), widths 8..64, dropout 0.2 before an
    ``nn.Linear`` head. Input: images ``[N=2, 3, 32, 32]``; output ``[N, 10]``."""
    torch.manual_seed(0)
    model = sj_masnn.att_ms_resnet18(T=T, num_classes=10, base_channels=8, stem_kernel_size=3, stem_stride=1)
    return _finish(model, _images(), set_step_mode=False)


def masnn_dvs128_gesture():
    """``masnn_dvs128_gesture(T=5, input_size=(16, 16))``: the builder as is (channels 64/128/128, pools 1/2/2,
    temporal+channel+spatial attention, FC 2048 -> 256 -> 11 with temporal-wise attention). T=5 because its
    ``reduction_t=5`` needs T >= 5. Input: spikes ``[T=5, N=2, 2, 16, 16]``; output ``[N, 11]``."""
    torch.manual_seed(0)
    model = sj_masnn.masnn_dvs128_gesture(T=5, input_size=(16, 16))
    return _finish(model, _spikes(c=2, hw=16, t=5), set_step_mode=False)


def spikformer_cifar():
    """``Spikformer`` with ``spikformer_cifar10``'s structure (32x32, patch_size=4: 8x8 tokens) at small dims:
    ``embed_dims=32, num_heads=2, depths=2`` (the builder fixes 384/12/4). Input: images ``[N=2, 3, 32, 32]``;
    output ``[T, N, 10]``."""
    torch.manual_seed(0)
    model = sj_spikformer.Spikformer(T=T, in_channels=3, img_size_h=32, img_size_w=32, patch_size=4, num_classes=10,
                                  embed_dims=32, num_heads=2, mlp_ratio=4.0, depths=2)
    return _finish(model, _images(), set_step_mode=False)


def spikformer_imagenet():
    """``Spikformer`` with ``spikformer_ti``/``spikformer_s``'s patch_size=16 stem (a max-pool in all four stem
    stages) at ``embed_dims=32, num_heads=4, depths=1`` on 32x32 images (2x2 tokens). Input: images
    ``[N=2, 3, 32, 32]``; output ``[T, N, 10]``."""
    torch.manual_seed(0)
    model = sj_spikformer.Spikformer(T=T, in_channels=3, img_size_h=32, img_size_w=32, patch_size=16, num_classes=10,
                                  embed_dims=32, num_heads=4, mlp_ratio=4.0, depths=1)
    return _finish(model, _images(), set_step_mode=False)


def qkformer():
    """``QKFormer`` with ``qkformer_10_384``'s structure (token QK-attention in stages 1-2, spiking self-attention
    in stage 3) at ``embed_dims=32`` (stage dims 8/16/32), ``num_heads=(1, 2, 2), depths=(1, 1, 1)``.
    Input: images ``[N=2, 3, 32, 32]``; output ``[N, 10]``."""
    torch.manual_seed(0)
    model = sj_qkformer.QKFormer(T=T, num_classes=10, embed_dims=32, num_heads=(1, 2, 2), depths=(1, 1, 1))
    return _finish(model, _images(), set_step_mode=False)


def spike_driven_transformer():
    """``SpikeDrivenTransformer`` (``sdt_8_384``'s class) at ``embed_dims=32, num_heads=2, depths=2`` with the
    paper's CIFAR pooling ``pooling_stat="0011"`` (8x8 tokens). Input: images ``[N=2, 3, 32, 32]``; output
    ``[N, 10]``."""
    torch.manual_seed(0)
    model = sj_spike_driven_transformer.SpikeDrivenTransformer(T=T, num_classes=10, embed_dims=32, num_heads=2,
                                                            depths=2, pooling_stat="0011")
    return _finish(model, _images(), set_step_mode=False)


def maxformer():
    """``MaxFormer`` with ``maxformer_10_384``'s structure (stride-2 embed, DWC blocks with 7x7/5x5 depthwise convs,
    spiking self-attention in stage 3) at ``embed_dims=32`` (stage dims 8/16/32), ``depths=(1, 1, 1)``.
    Input: images ``[N=2, 3, 32, 32]``; output ``[N, 10]``."""
    torch.manual_seed(0)
    model = sj_maxformer.MaxFormer(T=T, num_classes=10, embed_dims=32, depths=(1, 1, 1))
    return _finish(model, _images(), set_step_mode=False)


def maxformer_cifar():
    """``MaxFormer(cifar=True)`` with ``maxformer_cifar``'s structure (CIFAR embed, spatial-MLP stage 1, 3x3 DWC
    stage 2, its own 8-head linear attention ``_MaxCifarSSA`` in stage 3) at ``embed_dims=32``,
    ``depths=(1, 1, 1)``. Input: images ``[N=2, 3, 32, 32]``; output ``[N, 10]``."""
    torch.manual_seed(0)
    model = sj_maxformer.MaxFormer(T=T, num_classes=10, embed_dims=32, depths=(1, 1, 1), cifar=True)
    return _finish(model, _images(), set_step_mode=False)


def spike_dhs():
    """``SpikeDHS`` (spike_dhs.py, Spike-DHS searched network) with ``fea_num_layers=6`` of its 8-cell searched
    path (levels 0, 0, 1, 1, 1, 2: the last cell still reaches the 576-channel level the classifier and the
    auxiliary head are hard-coded for), ``fea_block_multiplier=3, fea_filter_multiplier=48`` (the smallest widths
    giving 576 channels), ``fea_step=3``. Its forward expands the input to its fixed T=6 and, in training, returns
    ``(logits, logits_aux)``; cells build ``Nearest`` interpolation modules inside ``forward``; neurons are
    ``LIFNode``/``save_v_LIFNode`` with the custom ``DSpike`` surrogate. Input: images ``[1, N=1, 3, 32, 32]``
    (32x32 is required by the auxiliary head); output ``([1, 100], [1, 100])``. About 1.2 s per step on one core."""
    torch.manual_seed(0)
    args = types.SimpleNamespace(fea_step=3, fea_num_layers=6, fea_block_multiplier=3, fea_filter_multiplier=48)
    model = sj_spike_dhs.SpikeDHS(init_channels=3, args=args)
    return _finish(model, torch.rand(1, 1, 3, 32, 32))


ZOO: dict[str, Factory] = {
    "sew_resnet18": sew_resnet18,
    "sew_resnet_bottleneck_iand": sew_resnet_bottleneck_iand,
    "spiking_resnet18": spiking_resnet18,
    "spiking_vgg11_bn": spiking_vgg11_bn,
    "spiking_vgg11": spiking_vgg11,
    "ottt_spiking_vggws": ottt_spiking_vggws,
    "plif_mnist": plif_mnist,
    "plif_fashion_mnist": plif_fashion_mnist,
    "plif_nmnist": plif_nmnist,
    "plif_cifar10": plif_cifar10,
    "plif_cifar10_dvs": plif_cifar10_dvs,
    "plif_dvs_gesture": plif_dvs_gesture,
    "ms_resnet18": ms_resnet18,
    "ms_resnet34": ms_resnet34,
    "max_resnet18": max_resnet18,
    "att_ms_resnet18": att_ms_resnet18,
    "masnn_dvs128_gesture": masnn_dvs128_gesture,
    "spikformer_cifar": spikformer_cifar,
    "spikformer_imagenet": spikformer_imagenet,
    "qkformer": qkformer,
    "spike_driven_transformer": spike_driven_transformer,
    "maxformer": maxformer,
    "maxformer_cifar": maxformer_cifar,
    "spike_dhs": spike_dhs,
}
