"""S2-MLPv2 (Yu et al., 2108.01072): spatial-shift MLP with split attention, two stages, channels last.

Block on (B, H, W, C) tokens (section 3 of the paper)::

    [a | b | c] = fc1(LN(x))                            fc1: C -> 3C
    x = x + fc2(SplitAttn(shift1(a), shift2(b), c))      shift1/2: the two spatial-shift patterns; fc2: C -> C
    x = x + MLP(LN(x))                                  ratio 3, GELU

Network: a k = s = 7 patch conv (224 -> 32x32 tokens), stage 1, a k = s = 2 patch-merge conv (-> 16x16), stage 2,
LayerNorm, mean over tokens, linear head. No layer depends on the token count, so any input size divisible by the
patch works. There is no official code; parameter counts equal the paper's (25.11M / 55.27M with the bias-free C/4
split-attention MLP of :class:`visionmix.layers.SplitAttention`).

``torch.compile``: works (checked with ``backend="eager"`` on ``s2mlpv2_nano`` in the tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from visionmix.checks import check_divisible, check_input, check_positive
from visionmix.errors import InvalidValue
from visionmix.layers import DropPath, Mlp, PatchEmbed, SplitAttention, spatial_shift
from visionmix.models._base import ClassifierModel, stochastic_depth_rates
from visionmix.models._registry import Reference, register_model

__all__ = ["PatchMerge", "S2MLPv2", "S2MLPv2Block", "ShiftSplitMixing"]

_LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class ShiftSplitMixing(nn.Module):
    """S2-MLPv2's spatial mixing: ``fc2(SplitAttn(shift1(a), shift2(b), c))`` with ``[a|b|c] = fc1(x)``, (B,H,W,C)."""

    def __init__(self, dim: int, *, drop: float = 0.0) -> None:
        super().__init__()
        check_divisible("dim", check_positive("dim", dim), 4, "4 (spatial shift moves four channel groups)")
        self.fc1 = nn.Linear(dim, 3 * dim)
        self.split_attn = SplitAttention(dim, k=3)
        self.fc2 = nn.Linear(dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = self.fc1(x).chunk(3, dim=-1)
        x = self.split_attn(torch.stack((spatial_shift(a, 1), spatial_shift(b, 2), c), dim=1))
        return self.drop(self.fc2(x))


class S2MLPv2Block(nn.Module):
    """Pre-norm residual block: :class:`ShiftSplitMixing`, then a channel MLP (ratio 3). (B, H, W, C) in and out."""

    def __init__(self, dim: int, *, mlp_ratio: float = 3.0, drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _LayerNorm(dim)
        self.mixing = ShiftSplitMixing(dim, drop=drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = _LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mixing(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerge(PatchEmbed):
    """Non-overlapping k = s = ``size`` conv between stages, (B, H, W, C_in) -> (B, H/size, W/size, C_out)."""

    def __init__(self, in_dim: int, out_dim: int, size: int) -> None:
        super().__init__(None, size, in_dim, out_dim, output_fmt="NHWC", strict_img_size=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 3, 1, 2))  # NHWC -> NCHW view (channels-last memory)


class S2MLPv2(ClassifierModel):
    """S2-MLPv2: patch conv, then stages of :class:`S2MLPv2Block` joined by k = s = ``merge_size`` patch-merge convs.

    ``embed_dims``/``depths`` give one entry per stage (the paper uses two). ``forward_features`` returns
    (B, H, W, C); the feature levels are the stage ends, or every block with fewer than 3 stages (timm's minimum).
    Stochastic depth rises linearly over all blocks. Inputs must divide by the total stride
    (``patch_size * merge_size ** (stages - 1)``).
    """

    feature_fmt = "NHWC"

    def __init__(self, *, embed_dims: Sequence[int] = (192, 384), depths: Sequence[int] = (4, 14),
                 num_classes: int = 1000, img_size: int | tuple[int, int] = 224, in_chans: int = 3,
                 patch_size: int = 7, merge_size: int = 2, mlp_ratio: float = 3.0, global_pool: str = "avg",
                 drop_rate: float = 0.0, proj_drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if len(embed_dims) != len(depths) or not depths:
            raise InvalidValue(f"embed_dims and depths need one entry per stage, got {embed_dims} and {depths}")
        for depth in depths:
            check_positive("depth", depth)
        self.stem = PatchEmbed(img_size, patch_size, in_chans, embed_dims[0], output_fmt="NHWC",
                               strict_img_size=False)
        rates = iter(stochastic_depth_rates(drop_path_rate, sum(depths)))
        stages = []
        for index, (dim, depth) in enumerate(zip(embed_dims, depths, strict=True)):
            layers: list[nn.Module] = []
            if index > 0:
                layers.append(PatchMerge(embed_dims[index - 1], dim, merge_size))
            layers.extend(S2MLPv2Block(dim, mlp_ratio=mlp_ratio, drop=proj_drop_rate, drop_path=next(rates))
                          for _ in range(depth))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.norm = _LayerNorm(embed_dims[-1])
        self._init_head(embed_dims[-1], num_classes, in_chans, global_pool, drop_rate)
        patch = self.stem.patch_size
        self.stride = (patch[0] * merge_size ** (len(depths) - 1), patch[1] * merge_size ** (len(depths) - 1))
        self._init_stages(["stem"], [
            ([f"stages.{i}.0"] if i else [], [f"stages.{i}.{j}" for j in range(bool(i), len(stage))], dim,
             patch[0] * merge_size ** i, f"stages.{i}")
            for i, (stage, dim) in enumerate(zip(stages, embed_dims, strict=True))], norm="norm")
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Xavier-uniform linears with zero bias (MLP-Mixer's reference init; the paper names none), convs keep
        PyTorch's init. ViT's truncated normal (std 0.02) learns far slower at small widths: ``s2mlpv2_nano``, 2
        epochs of 20k Fashion-MNIST images, 77.3% test accuracy with it, 83.9% with Xavier."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_chans)
        if x.shape[-2] % self.stride[0] or x.shape[-1] % self.stride[1]:
            raise InvalidValue(f"input size {x.shape[-2]}x{x.shape[-1]} must be divisible by the model's total stride "
                               f"{self.stride[0]}x{self.stride[1]} (patch size times the patch merges)")
        return self.stem(x)


def _s2mlp_cfg(stride: int = 14, **overrides: object) -> dict:
    """The cfg of a model whose input sides must be multiples of its total ``stride`` (so at least ``stride``)."""
    return {"first_conv": "stem.proj", "classifier": "head", "paper_ids": "arXiv:2108.01072",
            "min_input_size": (3, stride, stride), "input_size_divisor": stride, **overrides}


@register_model(cfg=_s2mlp_cfg(), reference=Reference(params=25_110_000, gmacs=6.9, top1=82.0))
def s2mlpv2_small(**kwargs: object) -> S2MLPv2:
    """S2-MLPv2-Small: 192 x 4 then 384 x 14 (2108.01072, table 1)."""
    return S2MLPv2(**{"embed_dims": (192, 384), "depths": (4, 14), **kwargs})


@register_model(cfg=_s2mlp_cfg(), reference=Reference(params=55_270_000, gmacs=16.3, top1=83.6))
def s2mlpv2_medium(**kwargs: object) -> S2MLPv2:
    """S2-MLPv2-Medium: 256 x 7 then 512 x 17 (2108.01072, table 1)."""
    return S2MLPv2(**{"embed_dims": (256, 512), "depths": (7, 17), **kwargs})


# Nano, 28x28 grey input: patch 2 -> 14x14 (C=64), merge -> 7x7 (C=128). Figures at 1x1x28x28 with 10 classes.
@register_model(cfg=_s2mlp_cfg(4, input_size=(1, 28, 28), min_input_size=(1, 4, 4), num_classes=10, mean=(0.5,),
                               std=(0.5,)),
                reference=Reference(params=1_035_210, gmacs=0.0579))
def s2mlpv2_nano(**kwargs: object) -> S2MLPv2:
    """S2-MLPv2 for 28x28 inputs: patch 2, 64 x 2 then 128 x 5."""
    return S2MLPv2(**{"num_classes": 10, "in_chans": 1, "img_size": 28, "patch_size": 2, "embed_dims": (64, 128),
                      "depths": (2, 5), **kwargs})
