"""UniFormer (Li et al., 2201.09450): local MHRA (convolution) in the shallow stages, global MHSA in the deep ones.

Layout NCHW between blocks. The state-dict layout is the official one (Sense-X/UniFormer ``models/uniformer.py``):
``patch_embed{i}.proj/norm``, ``blocks{i}.{j}.*``, final ``norm`` (BatchNorm2d) and ``head``, so the released
ImageNet checkpoints load with ``strict=True``. Any input whose sides divide by the total stride works (32 for the
ImageNet models, 4 for ``uniformer_nano``). The models compile with ``torch.compile`` (checked with
``backend="eager"`` in tests/models/test_uniformer.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from visionmix.checks import check_input, check_positive
from visionmix.errors import InvalidValue
from visionmix.layers.basic import DropPath, Mlp
from visionmix.layers.mixing import Attention, ConvPosEnc, LocalMHRA
from visionmix.models._base import ClassifierModel, stochastic_depth_rates
from visionmix.models._registry import Reference, register_model

__all__ = ["ConvStem", "PatchStem", "SABlock", "UniFormer"]


class SABlock(nn.Module):
    """UniFormer's global block (2201.09450 eqs. 1-3 with global MHRA = MHSA), NCHW in and out.

    ``x += DPE(x)``; on tokens (B, HW, C): ``x += g1 * MHSA(LN(x))``; ``x += g2 * MLP(LN(x))``. The per-channel
    layer scales ``gamma_1``/``gamma_2`` exist only when ``layer_scale_init`` is given (the ``*_ls`` models).
    """

    def __init__(self, dim: int, head_dim: int = 64, mlp_ratio: float = 4.0, *, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 layer_scale_init: float | None = None, norm_eps: float = 1e-6) -> None:
        super().__init__()
        check_positive("dim", dim)
        # Registered first so the state-dict order matches the official checkpoints.
        self.gamma_1 = self.gamma_2 = None
        if layer_scale_init is not None:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        self.pos_embed = ConvPosEnc(dim, 3)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, head_dim=head_dim, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        a = self.attn(self.norm1(t))
        t = t + self.drop_path(a if self.gamma_1 is None else self.gamma_1 * a)
        m = self.mlp(self.norm2(t))
        t = t + self.drop_path(m if self.gamma_2 is None else self.gamma_2 * m)
        return t.transpose(1, 2).reshape(b, c, h, w)


class PatchStem(nn.Module):
    """UniFormer's patch embedding: conv with kernel = stride = ``patch``, then LayerNorm over channels. NCHW in/out.

    ``norm`` is registered before ``proj`` so the state dict lists them in the official order.
    """

    def __init__(self, in_chans: int, out_chans: int, patch: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(out_chans)
        self.proj = nn.Conv2d(in_chans, out_chans, patch, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).permute(0, 2, 3, 1)  # NCHW -> NHWC: the norm acts on channels
        return self.norm(x).permute(0, 3, 1, 2).contiguous()


class ConvStem(nn.Module):
    """UniFormer's convolutional patch embedding (the ``small_plus`` models), NCHW in and out.

    ``first=True`` (stride 4): 3x3 s2 -> BN -> GELU -> 3x3 s2 -> BN with ``out // 2`` hidden channels;
    otherwise (stride 2, between stages): 3x3 s2 -> BN. Convs keep their bias, as in the official ``proj`` Sequential.
    """

    def __init__(self, in_chans: int, out_chans: int, *, first: bool) -> None:
        super().__init__()
        check_positive("in_chans", in_chans)
        check_positive("out_chans", out_chans)
        if first:
            mid = out_chans // 2
            self.proj = nn.Sequential(
                nn.Conv2d(in_chans, mid, 3, 2, 1), nn.BatchNorm2d(mid), nn.GELU(),
                nn.Conv2d(mid, out_chans, 3, 2, 1), nn.BatchNorm2d(out_chans),
            )
        else:
            self.proj = nn.Sequential(nn.Conv2d(in_chans, out_chans, 3, 2, 1), nn.BatchNorm2d(out_chans))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class UniFormer(ClassifierModel):
    """UniFormer image classifier (2201.09450, Table 1), NCHW input (B, in_chans, H, W) -> logits (B, num_classes).

    ``depths``/``embed_dims``/``patch_sizes`` have one entry per stage; the first ``num_conv_stages`` stages use
    local MHRA blocks (:class:`~visionmix.layers.LocalMHRA`), the rest :class:`SABlock`. ``conv_stem`` replaces the
    patch embeddings by :class:`ConvStem` (strides 4, 2, 2, ... only). ``layer_scale_init`` (e.g. 1e-6) adds layer
    scale to the SABlocks. ``drop_rate`` is dropout before the classifier (timm), ``proj_drop_rate`` inside the MLPs
    and attention output, ``attn_drop_rate`` on the attention weights. ``forward_features`` returns (B, C, H/s, W/s)
    after the final BatchNorm; the head averages over space. The feature levels are the stage ends (``blocks{i}``), or
    every block with fewer than 3 stages (timm's minimum).
    """

    def __init__(self, depths: Sequence[int] = (3, 4, 8, 3), embed_dims: Sequence[int] = (64, 128, 320, 512),
                 head_dim: int = 64, mlp_ratio: float = 4.0, *, patch_sizes: Sequence[int] = (4, 2, 2, 2),
                 num_conv_stages: int = 2, conv_stem: bool = False, layer_scale_init: float | None = None,
                 qkv_bias: bool = True, num_classes: int = 1000, in_chans: int = 3,
                 img_size: int | tuple[int, int] | None = None, global_pool: str = "avg", drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        depths, embed_dims, patch_sizes = check_stages(depths, embed_dims, patch_sizes, num_conv_stages)
        check_positive("in_chans", in_chans)
        if conv_stem and patch_sizes != (4,) + (2,) * (len(depths) - 1):
            raise InvalidValue(f"conv_stem=True needs patch_sizes (4, 2, 2, ...), got {patch_sizes}")
        self.stride = math.prod(patch_sizes)
        if img_size is not None:  # the model takes any size divisible by its stride; a given size is checked early
            self._check_size(*((img_size, img_size) if isinstance(img_size, int) else img_size))

        # All embeddings first, then all blocks: the official registration (and state-dict) order.
        stage_inputs = (in_chans, *embed_dims[:-1])
        for i, (prev, dim, patch) in enumerate(zip(stage_inputs, embed_dims, patch_sizes, strict=True), start=1):
            embed = ConvStem(prev, dim, first=i == 1) if conv_stem else PatchStem(prev, dim, patch)
            self.add_module(f"patch_embed{i}", embed)
        dpr = iter(stochastic_depth_rates(drop_path_rate, sum(depths)))
        for i, (depth, dim) in enumerate(zip(depths, embed_dims, strict=True), start=1):
            if i <= num_conv_stages:
                blocks = [LocalMHRA(dim, mlp_ratio, drop=proj_drop_rate, drop_path=next(dpr)) for _ in range(depth)]
            else:
                blocks = [SABlock(dim, head_dim, mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                                  attn_drop=attn_drop_rate, drop_path=next(dpr), layer_scale_init=layer_scale_init)
                          for _ in range(depth)]
            self.add_module(f"blocks{i}", nn.ModuleList(blocks))
        self.norm = nn.BatchNorm2d(embed_dims[-1])
        self._init_head(embed_dims[-1], num_classes, in_chans, global_pool, drop_rate)
        reductions = [math.prod(patch_sizes[:i]) for i in range(1, len(depths) + 1)]
        self._init_stages(["patch_embed1"], [
            ([f"patch_embed{i}"], [f"blocks{i}.{j}" for j in range(depth)], dim, reduction, f"blocks{i}")
            for i, (depth, dim, reduction) in enumerate(zip(depths, embed_dims, reductions, strict=True), start=1)
        ], norm="norm")
        self.apply(init_weights)

    def _check_size(self, height: int, width: int) -> None:
        if height % self.stride or width % self.stride:
            raise InvalidValue(f"input size {height}x{width} must be divisible by the model's total stride "
                               f"{self.stride}")

    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_chans)
        self._check_size(x.shape[-2], x.shape[-1])
        return x  # the patch embeddings open each feature level


def check_stages(depths: Sequence[int], embed_dims: Sequence[int], patch_sizes: Sequence[int],
                 num_conv_stages: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """UniFormer's stage layout, image or video: one positive depth, width and patch size per stage and at most as
    many convolutional (local MHRA) stages as stages; returned as tuples."""
    depths, embed_dims, patch_sizes = tuple(depths), tuple(embed_dims), tuple(patch_sizes)
    if not len(depths) == len(embed_dims) == len(patch_sizes) or not depths:
        raise InvalidValue(f"depths, embed_dims and patch_sizes need one entry per stage, got {len(depths)}, "
                           f"{len(embed_dims)} and {len(patch_sizes)}")
    for name, values in (("depths", depths), ("embed_dims", embed_dims), ("patch_sizes", patch_sizes)):
        for v in values:
            check_positive(name, v)
    if not 0 <= num_conv_stages <= len(depths):
        raise InvalidValue(f"num_conv_stages must be in [0, {len(depths)}], got {num_conv_stages}")
    return depths, embed_dims, patch_sizes


def init_weights(m: nn.Module) -> None:
    """The official initialisation: truncated normal (std 0.02) Linear weights, zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


_SMALL = dict(embed_dims=(64, 128, 320, 512))
# Input sides must be multiples of the total stride (32; 4 for the nano model), so at least that.
_CFG = dict(first_conv="patch_embed1.proj", classifier="head", paper_ids="arXiv:2201.09450",
            min_input_size=(3, 32, 32), input_size_divisor=32)
_CONV_STEM_CFG = dict(_CFG, first_conv="patch_embed1.proj.0")
_NANO_CFG = dict(_CFG, input_size=(1, 28, 28), min_input_size=(1, 4, 4), input_size_divisor=4, num_classes=10,
                 mean=(0.5,), std=(0.5,), crop_pct=1.0)


def _uniformer(defaults: dict, kwargs: dict) -> UniFormer:
    return UniFormer(**{**defaults, **kwargs})


@register_model(cfg=_CFG, reference=Reference(params=21_545_256, gmacs=3.632, top1=82.9))
def uniformer_small(**kwargs) -> UniFormer:
    """UniFormer-S: depths 3-4-8-3, head_dim 64, patch stem."""
    return _uniformer(dict(_SMALL, depths=(3, 4, 8, 3), head_dim=64), kwargs)


@register_model(cfg=_CONV_STEM_CFG, reference=Reference(params=24_032_552, gmacs=4.201, top1=83.4))
def uniformer_small_plus(**kwargs) -> UniFormer:
    """UniFormer-S+ (head_dim 32 as released): depths 3-5-9-3, convolutional stem."""
    return _uniformer(dict(_SMALL, depths=(3, 5, 9, 3), head_dim=32, conv_stem=True), kwargs)


@register_model(cfg=_CONV_STEM_CFG, reference=Reference(params=24_032_552, gmacs=4.201, top1=83.4))
def uniformer_small_plus_dim64(**kwargs) -> UniFormer:
    """UniFormer-S+ with head_dim 64: depths 3-5-9-3, convolutional stem."""
    return _uniformer(dict(_SMALL, depths=(3, 5, 9, 3), head_dim=64, conv_stem=True), kwargs)


@register_model(cfg=_CFG, reference=Reference(params=49_776_552, gmacs=8.249, top1=83.8))
def uniformer_base(**kwargs) -> UniFormer:
    """UniFormer-B: depths 5-8-20-7, head_dim 64, patch stem."""
    return _uniformer(dict(_SMALL, depths=(5, 8, 20, 7), head_dim=64), kwargs)


@register_model(cfg=_CFG, reference=Reference(params=49_796_520, gmacs=8.249, top1=83.9))
def uniformer_base_ls(**kwargs) -> UniFormer:
    """UniFormer-B with layer scale 1e-6 on the attention blocks (per-block parameters, no global switch)."""
    return _uniformer(dict(_SMALL, depths=(5, 8, 20, 7), head_dim=64, layer_scale_init=1e-6), kwargs)


@register_model(cfg=_NANO_CFG, reference=Reference(params=921_290, gmacs=0.059786))
def uniformer_nano(**kwargs) -> UniFormer:
    """UniFormer for 28-32 px input: patch 2 -> 2 local-MHRA blocks (dim 64) at 1/2, patch 2 -> 4 MHSA blocks
    (dim 128, head_dim 32) at 1/4 (7x7 tokens at 28 px). 10 classes, 1 channel by default."""
    return _uniformer(dict(depths=(2, 4), embed_dims=(64, 128), patch_sizes=(2, 2), num_conv_stages=1, head_dim=32,
                           num_classes=10, in_chans=1), kwargs)
