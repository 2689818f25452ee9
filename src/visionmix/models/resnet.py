"""ResNet (He et al., 1512.03385) with pluggable 3x3 convolutions and attention, for fair comparisons of the parts.

Widths and block layouts are torchvision's (ResNet-v1.5: the bottleneck strides in its 3x3 conv).
``conv_layer`` picks the form of every 3x3 conv+BN inside the residual blocks (the stem, the 1x1 convs and the
projection shortcuts stay plain conv+BN, the DBB-ResNet rule "1 < K < 7"):

- ``conv``: ``nn.Conv2d`` + BN (:class:`~visionmix.layers.ConvBN`);
- ``doconv``: DO-Conv (2006.12030) + BN, folds to one conv;
- ``dbb``: Diverse Branch Block (2103.13425), BN inside every branch, folds to one conv;
- ``psconv``: poly-scale conv (2007.06191) + BN (dilation 2, 4 parts, as PS-ResNet);
- ``condconv``: CondConv (1904.04971, 4 experts, routing from the conv's own input) + BN;
- ``weightnet``: WeightNet (2007.11823, M=2, G=2) + BN.

``attn_layer``: ``se`` (SE, 1709.01507, reduction 16) or ``ulsam`` (2006.15102, 4 subspaces) on the residual
branch just before the addition; ``sk`` (1903.06586) replaces the block's first 3x3 conv+BN+ReLU by a selective-kernel
conv (branches 3x3 and dilated 3x3, reduction 16, L=32). ``skresnet50`` is the paper's SKNet-50: a ResNeXt-50 32x4d
trunk whose grouped 3x3 convs are SK convs with 32 groups.

State-dict layout: the official DBB ResNet's (``stage0.conv1`` stem, ``stage{i}.{j}.conv1/conv2[/conv3]``,
``shortcut``, ``linear``), so DBB-ResNet checkpoints load with ``strict=True``; :meth:`ResNet.checkpoint_filter_fn`
maps torchvision/timm ResNet keys (``conv1``, ``bn1``, ``layer{i}``, ``downsample``, ``fc``) onto it.
``visionmix.reparameterize`` folds every conv+BN / DO-Conv / DBB into a single conv. All variants compile with
``torch.compile`` (checked with ``backend="eager"`` in tests/models/test_resnet.py).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from visionmix.checks import check_choice, check_input, check_positive
from visionmix.errors import InvalidValue
from visionmix.layers.attention import ULSAM, SelectiveKernel, SEModule
from visionmix.layers.basic import ConvBN, DropPath
from visionmix.layers.diverse_branch import DiverseBranchBlock
from visionmix.layers.dynamic_conv import CondConv2d, WeightNetConv2d
from visionmix.layers.overparam import DOConv2d
from visionmix.layers.poly_scale import PSConv2d
from visionmix.models._base import ClassifierModel, stochastic_depth_rates
from visionmix.models._registry import Reference, register_model, register_variant

__all__ = ["ATTN_LAYERS", "CONV_LAYERS", "BasicBlock", "Bottleneck", "ResNet"]

ULSAM_GROUPS = 4


ConvNormBuilder = Callable[..., nn.Module]  # (in_channels, out_channels, stride, groups, **conv_kwargs)


def _conv(cin: int, cout: int, stride: int, groups: int, **conv_kwargs: Any) -> nn.Module:
    return ConvBN(cin, cout, 3, stride, groups=groups, **conv_kwargs)


def _doconv(cin: int, cout: int, stride: int, groups: int, **conv_kwargs: Any) -> nn.Module:
    unit = ConvBN(cin, cout, 3, stride, groups=groups)  # ConvBN folds any conv exposing nn.Conv2d's weight
    unit.conv = DOConv2d(cin, cout, 3, stride, groups=groups, **conv_kwargs)
    return unit


def _dbb(cin: int, cout: int, stride: int, groups: int, **conv_kwargs: Any) -> nn.Module:
    return DiverseBranchBlock(cin, cout, 3, stride, groups=groups, **conv_kwargs)


def _dynamic_conv_bn(conv: Callable[..., nn.Module]) -> ConvNormBuilder:
    """Builder of ``conv + BN`` for an input-dependent conv: the BN stays (nothing to fold into), same keys."""

    def build(cin: int, cout: int, stride: int, groups: int, **conv_kwargs: Any) -> nn.Module:
        conv_module = conv(cin, cout, 3, stride, groups=groups, **conv_kwargs)
        return nn.Sequential(OrderedDict(conv=conv_module, bn=nn.BatchNorm2d(cout)))

    return build


# name -> builder(in_channels, out_channels, stride, groups, **conv_kwargs) of a block's 3x3 conv followed by BN
CONV_LAYERS: dict[str, ConvNormBuilder] = {
    "conv": _conv,
    "doconv": _doconv,
    "dbb": _dbb,
    "psconv": _dynamic_conv_bn(PSConv2d),
    "condconv": _dynamic_conv_bn(CondConv2d),
    "weightnet": _dynamic_conv_bn(WeightNetConv2d),
}
ATTN_LAYERS = (None, "se", "sk", "ulsam")


def _attn(kind: str | None, channels: int) -> nn.Module:
    """The attention module applied to the residual branch before the addition (identity for None / sk)."""
    if kind == "se":
        return SEModule(channels)
    if kind == "ulsam":
        return ULSAM(channels, ULSAM_GROUPS)
    return nn.Identity()


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    """Projection shortcut (1x1 conv + BN, torchvision's option B) when the shape changes, else identity."""
    return ConvBN(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN (ReLU between) + shortcut, then ReLU (1512.03385 fig. 2 left). NCHW in and out."""

    expansion = 1

    def __init__(self, in_chs: int, planes: int, stride: int = 1, *, conv_layer: str = "conv",
                 conv_kwargs: Mapping[str, Any] | None = None, attn_layer: str | None = None, groups: int = 1,
                 width_per_group: int = 64, drop_path: float = 0.0) -> None:
        super().__init__()
        if groups != 1 or width_per_group != 64:
            raise InvalidValue(f"BasicBlock supports only groups=1 and width_per_group=64 (use the bottleneck), got "
                               f"groups={groups}, width_per_group={width_per_group}")
        conv = partial(CONV_LAYERS[conv_layer], **(conv_kwargs or {}))
        self.shortcut = _shortcut(in_chs, planes, stride)
        if attn_layer == "sk":  # SK's branches end in BN + ReLU already
            self.conv1: nn.Module = SelectiveKernel(in_chs, planes, stride=stride)
            self.act1: nn.Module = nn.Identity()
        else:
            self.conv1 = conv(in_chs, planes, stride, 1)
            self.act1 = nn.ReLU(inplace=True)
        self.conv2 = conv(planes, planes, 1, 1)
        self.attn = _attn(attn_layer, planes)
        self.drop_path = DropPath(drop_path)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.attn(self.conv2(self.act1(self.conv1(x))))
        return self.act(self.drop_path(out) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, groups) -> 1x1 (x4) conv+BN with ReLUs + shortcut, then ReLU (ResNet-v1.5). NCHW."""

    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1, *, conv_layer: str = "conv",
                 conv_kwargs: Mapping[str, Any] | None = None, attn_layer: str | None = None, groups: int = 1,
                 width_per_group: int = 64, drop_path: float = 0.0) -> None:
        super().__init__()
        if attn_layer == "sk" and conv_layer != "conv":
            raise InvalidValue(f"attn_layer='sk' replaces the bottleneck's only 3x3 conv, so conv_layer={conv_layer!r} "
                               "would have no effect; use conv_layer='conv' with it")
        width = planes * width_per_group // 64 * groups
        out_chs = planes * self.expansion
        self.shortcut = _shortcut(in_chs, out_chs, stride)
        self.conv1 = ConvBN(in_chs, width, 1)
        self.act1 = nn.ReLU(inplace=True)
        if attn_layer == "sk":
            self.conv2: nn.Module = SelectiveKernel(width, width, stride=stride, groups=groups)
            self.act2: nn.Module = nn.Identity()
        else:
            self.conv2 = CONV_LAYERS[conv_layer](width, width, stride, groups, **(conv_kwargs or {}))
            self.act2 = nn.ReLU(inplace=True)
        self.conv3 = ConvBN(width, out_chs, 1)
        self.attn = _attn(attn_layer, out_chs)
        self.drop_path = DropPath(drop_path)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.attn(self.conv3(self.act2(self.conv2(self.act1(self.conv1(x))))))
        return self.act(self.drop_path(out) + self.shortcut(x))


BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(ClassifierModel):
    """ResNet classifier, NCHW input (B, in_chans, H, W) of any size -> logits (B, num_classes).

    ``layers`` gives the blocks per stage and ``widths`` the stage widths (``planes``; a bottleneck outputs 4x).
    ``conv_layer`` (one of :data:`CONV_LAYERS`) and ``attn_layer`` (one of :data:`ATTN_LAYERS`) are described in the
    module docstring; ``conv_kwargs`` go to the chosen conv layer (e.g. ``num_experts``, ``D_mul``, ``parts``).
    Stem: 7x7 s2 conv+BN+ReLU and 3x3 s2 max-pool (``stage0.conv1``, ``stage0.maxpool``), or with ``small_input`` a
    3x3 s1 conv+BN+ReLU and no pooling, for 28-32 px images. ``groups``/``width_per_group`` give ResNeXt bottlenecks.
    ``drop_path_rate`` rises linearly over the blocks; ``drop_rate`` is dropout before the classifier ``linear``.
    ``forward_features`` returns the last stage's map (B, C, H/s, W/s). Feature levels (timm's): the stem's ReLU
    output, then every stage end. ``global_pool=""`` needs ``num_classes=0`` (unpooled maps out).
    """

    head_name = "linear"

    def __init__(self, block: str = "basic", layers: Sequence[int] = (2, 2, 2, 2), *,
                 widths: Sequence[int] = (64, 128, 256, 512), stem_width: int = 64, small_input: bool = False,
                 conv_layer: str = "conv", conv_kwargs: Mapping[str, Any] | None = None,
                 attn_layer: str | None = None, groups: int = 1, width_per_group: int = 64, num_classes: int = 1000,
                 in_chans: int = 3, img_size: int | tuple[int, int] | None = None,
                 global_pool: str = "avg", drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        check_choice("block", block, BLOCKS)
        check_choice("conv_layer", conv_layer, CONV_LAYERS)
        check_choice("attn_layer", attn_layer, ATTN_LAYERS)
        layers, widths = tuple(layers), tuple(widths)
        if len(layers) != len(widths) or not layers:
            raise InvalidValue(f"layers and widths need one entry per stage, got {len(layers)} and {len(widths)}")
        for name, values in (("layers", layers), ("widths", widths)):
            for v in values:
                check_positive(name, v)
        check_positive("in_chans", in_chans)
        check_positive("stem_width", stem_width)
        check_positive("groups", groups)
        check_positive("width_per_group", width_per_group)
        if img_size is not None:  # any size works; a given one is only validated
            for side in (img_size,) if isinstance(img_size, int) else img_size:
                check_positive("img_size", side)
        self.conv_layer, self.attn_layer = conv_layer, attn_layer

        stem: list[tuple[str, nn.Module]] = [
            ("conv1", ConvBN(in_chans, stem_width, 3 if small_input else 7, 1 if small_input else 2)),
            ("relu", nn.ReLU(inplace=True))]
        if not small_input:
            stem.append(("maxpool", nn.MaxPool2d(3, 2, 1)))
        self.stage0 = nn.Sequential(OrderedDict(stem))
        block_cls = BLOCKS[block]
        dpr = iter(stochastic_depth_rates(drop_path_rate, sum(layers)))
        make = partial(block_cls, conv_layer=conv_layer, conv_kwargs=conv_kwargs, attn_layer=attn_layer,
                       groups=groups, width_per_group=width_per_group)
        chs = stem_width
        for i, (depth, planes) in enumerate(zip(layers, widths, strict=True), start=1):
            blocks = []
            for j in range(depth):
                blocks.append(make(chs, planes, 2 if j == 0 and i > 1 else 1, drop_path=next(dpr)))
                chs = planes * block_cls.expansion
            self.add_module(f"stage{i}", nn.Sequential(*blocks))
        self._init_head(chs, num_classes, in_chans, global_pool, drop_rate)
        # Level 0 is the stem's ReLU output (timm's ``act1``); the max-pool opens stage 1.
        stem_reduction = 1 if small_input else 2
        levels = [(["stage0.conv1", "stage0.relu"], stem_width, stem_reduction, "stage0.relu")]
        pool = [] if small_input else ["stage0.maxpool"]
        reduction = stem_reduction * (1 if small_input else 2)
        for i, (depth, planes) in enumerate(zip(layers, widths, strict=True), start=1):
            reduction *= 2 if i > 1 else 1
            names = [*(pool if i == 1 else []), *(f"stage{i}.{j}" for j in range(depth))]
            levels.append((names, planes * block_cls.expansion, reduction, f"stage{i}"))
        self._init_features(["stage0"], levels, norm=None)
        for m in self.modules():  # torchvision's init for the conv+BN units; other layers keep their own scheme
            if isinstance(m, ConvBN) and type(m.conv) is nn.Conv2d:
                nn.init.kaiming_normal_(m.conv.weight, mode="fan_out", nonlinearity="relu")

    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_chans)
        return x  # the stem is feature level 0

    @staticmethod
    def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """Rename torchvision/timm ResNet keys to this layout; keys already in it pass through unchanged.

        ``conv1``/``bn1`` -> ``stage0.conv1.conv/bn``; ``layer{i}.{j}.conv{k}``/``bn{k}`` ->
        ``stage{i}.{j}.conv{k}.conv/bn``; ``downsample.0/1`` -> ``shortcut.conv/bn``; ``se.*`` -> ``attn.*``;
        ``fc`` -> ``linear``.
        """
        rules = [
            (r"^conv1\.", "stage0.conv1.conv."), (r"^bn1\.", "stage0.conv1.bn."), (r"^fc\.", "linear."),
            (r"^layer(\d+)\.(\d+)\.conv(\d)\.", r"stage\1.\2.conv\3.conv."),
            (r"^layer(\d+)\.(\d+)\.bn(\d)\.", r"stage\1.\2.conv\3.bn."),
            (r"^layer(\d+)\.(\d+)\.downsample\.0\.", r"stage\1.\2.shortcut.conv."),
            (r"^layer(\d+)\.(\d+)\.downsample\.1\.", r"stage\1.\2.shortcut.bn."),
            (r"^layer(\d+)\.(\d+)\.se\.", r"stage\1.\2.attn."),
        ]
        out = {}
        for key, value in state_dict.items():
            for pattern, repl in rules:
                key, hits = re.subn(pattern, repl, key)
                if hits:
                    break
            out[key] = value
        return out


def _resnet(defaults: dict, kwargs: dict) -> ResNet:
    return ResNet(**{**defaults, **kwargs})


_CFG = dict(first_conv="stage0.conv1.conv", classifier="linear", paper_ids="arXiv:1512.03385")
_NANO_CFG = dict(_CFG, input_size=(1, 28, 28), num_classes=10, mean=(0.5,), std=(0.5,), crop_pct=1.0)
_R18 = dict(block="basic", layers=(2, 2, 2, 2))
_R34 = dict(block="basic", layers=(3, 4, 6, 3))
_R50 = dict(block="bottleneck", layers=(3, 4, 6, 3))
# 28 px: 3x3 s1 stem, BasicBlocks 2-2-2 at 28, 14, 7 px with widths 28-56-112 (0.53M params, 62 MMACs).
_NANO = dict(block="basic", layers=(2, 2, 2), widths=(28, 56, 112), stem_width=28, small_input=True,
             num_classes=10, in_chans=1)


# Figures: torchvision's ResNet docs (params, GFLOPs = MACs, ImageNet top-1 of the V1 weights), SPEC.md section 2
# (SE-ResNet-50, DBB-ResNet-18/50 train -> deploy), the SKNet paper (1903.06586 table 2: 27.5M, 4.47 GFLOPs, 79.21%).
@register_model(cfg=_CFG, reference=Reference(params=11_689_512, gmacs=1.81, top1=69.758, deploy_params=11_680_000))
def resnet18(**kwargs) -> ResNet:
    """ResNet-18; ``conv_layer=``/``attn_layer=`` swap its parts."""
    return _resnet(_R18, kwargs)


@register_model(cfg=_CFG, reference=Reference(params=21_797_672, gmacs=3.66, top1=73.314))
def resnet34(**kwargs) -> ResNet:
    """ResNet-34; ``conv_layer=``/``attn_layer=`` swap its parts."""
    return _resnet(_R34, kwargs)


@register_model(cfg=_CFG, reference=Reference(params=25_557_032, gmacs=4.09, top1=76.130, deploy_params=25_530_000))
def resnet50(**kwargs) -> ResNet:
    """ResNet-50 (v1.5); ``conv_layer=``/``attn_layer=`` swap its parts (``conv_layer="dbb"``: DBB-ResNet-50)."""
    return _resnet(_R50, kwargs)


@register_model(cfg=_CFG, reference=Reference(params=28_090_000, gmacs=4.09))
def seresnet50(**kwargs) -> ResNet:
    """SE-ResNet-50 (1709.01507): SE with reduction 16 after each bottleneck's last BN."""
    return _resnet(dict(_R50, attn_layer="se"), kwargs)


@register_model(cfg=_CFG, reference=Reference(params=27_500_000, gmacs=4.47, top1=79.21))
def skresnet50(**kwargs) -> ResNet:
    """SKNet-50 (1903.06586 table 1): ResNeXt-50 32x4d with SK[M=2, G=32, r=16] convs as the 3x3 convs."""
    return _resnet(dict(_R50, attn_layer="sk", groups=32, width_per_group=4), kwargs)


@register_model(cfg=_CFG, reference=Reference(params=26_290_000, deploy_params=11_680_000))
def dbb_resnet18(**kwargs) -> ResNet:
    """DBB-ResNet-18 (2103.13425): every 3x3 conv+BN of the blocks is a Diverse Branch Block."""
    return _resnet(dict(_R18, conv_layer="dbb"), kwargs)


@register_model(cfg=_CFG, reference=Reference(deploy_params=11_680_000))
def doconv_resnet18(**kwargs) -> ResNet:
    """DO-ResNet-18 (2006.12030): every 3x3 conv of the blocks is a DO-Conv (D_mul = 9)."""
    return _resnet(dict(_R18, conv_layer="doconv"), kwargs)


@register_model(cfg=_CFG)
def psresnet50(**kwargs) -> ResNet:
    """PS-ResNet-50 (2007.06191): the bottlenecks' 3x3 convs are PSConv (dilation 2, 4 parts).

    Stored parameters exceed the effective ones (the dense kernel keeps its masked entries, as the official layout).
    """
    return _resnet(dict(_R50, conv_layer="psconv"), kwargs)


@register_model(cfg=_CFG)
def condconv_resnet18(**kwargs) -> ResNet:
    """ResNet-18 with CondConv (1904.04971, 4 experts) as every 3x3 conv of the blocks."""
    return _resnet(dict(_R18, conv_layer="condconv"), kwargs)


# The pluggable parts on one 28 px trunk, so they compare at equal deployed cost. Figures measured at 1x1x28x28 with
# 10 classes, eval mode (MACs of the train-time form; deploy_params after visionmix.reparameterize).
# CondConv uses 2 experts here so that the model stays under 1.5M parameters (4 experts: 2.1M).
_NANO_PRESETS: dict[str, tuple[dict, Reference]] = {
    "resnet_nano": ({}, Reference(params=533_326, gmacs=0.061664, deploy_params=532_346)),
    "dbb_resnet_nano": (dict(conv_layer="dbb"), Reference(params=1_233_270, gmacs=0.146640, deploy_params=532_346)),
    "doconv_resnet_nano": (dict(conv_layer="doconv"),
                           Reference(params=590_026, gmacs=0.066364, deploy_params=532_346)),
    "psresnet_nano": (dict(conv_layer="psconv"), Reference(params=794_398, gmacs=0.09209, deploy_params=794_202)),
    "condconv_resnet_nano": (dict(conv_layer="condconv", conv_kwargs=dict(num_experts=2)),
                             Reference(params=1_056_894, gmacs=0.06271, deploy_params=1_056_698)),
    "weightnet_resnet_nano": (dict(conv_layer="weightnet"),
                              Reference(params=571_374, gmacs=0.062223, deploy_params=571_178)),
    "seresnet_nano": (dict(attn_layer="se"), Reference(params=538_000, gmacs=0.061669, deploy_params=537_020)),
    "skresnet_nano": (dict(attn_layer="sk"), Reference(params=797_918, gmacs=0.089361, deploy_params=796_546)),
    "ulsam_resnet_nano": (dict(attn_layer="ulsam"),
                          Reference(params=534_942, gmacs=0.061818, deploy_params=533_962)),
}
for _name, (_overrides, _reference) in _NANO_PRESETS.items():
    register_variant(_name, ResNet, {**_NANO, **_overrides}, cfg=_NANO_CFG, reference=_reference,
                     doc=f"ResNet for 28-32 px input (3x3 stem, no max-pool, BasicBlocks 2-2-2, widths 28-56-112)"
                         f"{' with ' + str(_overrides) if _overrides else ''}.")
