"""UniFormer for video (Li et al., 2201.09450, sec. 3 in 3D): input (B, C, T, H, W), NCTHW between blocks.

The image stages made 3D: a (3,4,4)/stride (2,4,4) stem, (1,2,2) patch embeddings (``(3,2,2)`` with ``std``), 3x3x3
depthwise position encoding, 5x5x5 depthwise local MHRA with BatchNorm3d, global MHRA over all T*H*W tokens (or, with
``split``, temporal then spatial attention). The state-dict layout is the official one (Sense-X/UniFormer
``video_classification/slowfast/models/uniformer.py``), so its Kinetics/Something-Something checkpoints load with
``strict=True``; an ImageNet checkpoint of the image model is inflated (:func:`inflate_weight`) by
``create_model(name, checkpoint_path=...)`` or :meth:`UniFormerVideo.inflate`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from visionmix.checks import check_input, check_positive
from visionmix.errors import InvalidValue
from visionmix.layers.basic import DropPath, Mlp
from visionmix.layers.mixing import Attention
from visionmix.models._base import ClassifierModel, stochastic_depth_rates
from visionmix.models._registry import Reference, register_variant
from visionmix.models.uniformer import check_stages, init_weights

__all__ = ["LocalMHRA3d", "PatchEmbed3d", "SABlock3d", "SplitSABlock3d", "UniFormerVideo", "inflate_weight"]


def _dw3d(dim: int, k: int) -> nn.Conv3d:
    return nn.Conv3d(dim, dim, k, padding=k // 2, groups=dim)


class PatchEmbed3d(nn.Module):
    """Conv3d with kernel (kt, p, p), stride (st, p, p), temporal padding kt // 2, then LayerNorm over channels;
    NCTHW in and out. ``norm`` is registered before ``proj`` (the official order)."""

    def __init__(self, in_chans: int, out_chans: int, patch: int, *, t_kernel: int = 1, t_stride: int = 1) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(out_chans)
        self.proj = nn.Conv3d(in_chans, out_chans, (t_kernel, patch, patch), (t_stride, patch, patch),
                              (t_kernel // 2, 0, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).permute(0, 2, 3, 4, 1)  # NCTHW -> NTHWC: the norm acts on channels
        return self.norm(x).permute(0, 4, 1, 2, 3).contiguous()


class ConvMlp3d(nn.Module):
    """``fc2(drop(GELU(fc1(x))))`` with 1x1x1 convs, then dropout; NCTHW."""

    def __init__(self, dim: int, hidden: int, *, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Conv3d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv3d(hidden, dim, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class LocalMHRA3d(nn.Module):
    """UniFormer's local block in 3D (2201.09450 eqs. 1-4): ``x += DPE(x)`` (dw 3x3x3),
    ``x += conv2(dw5x5x5(conv1(BN(x))))``, ``x += ConvMlp(BN(x))``; NCTHW in and out."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, *, drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        check_positive("dim", dim)
        self.pos_embed = _dw3d(dim, 3)
        self.norm1 = nn.BatchNorm3d(dim)
        self.conv1 = nn.Conv3d(dim, dim, 1)
        self.conv2 = nn.Conv3d(dim, dim, 1)
        self.attn = _dw3d(dim, 5)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.BatchNorm3d(dim)
        self.mlp = ConvMlp3d(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        x = x + self.drop_path(self.conv2(self.attn(self.conv1(self.norm1(x)))))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SABlock3d(nn.Module):
    """UniFormer's global block over space-time (2201.09450 eqs. 1-3): ``x += DPE(x)``; on the T*H*W tokens
    ``x += MHSA(LN(x))``, ``x += MLP(LN(x))``; NCTHW in and out."""

    def __init__(self, dim: int, head_dim: int = 64, mlp_ratio: float = 4.0, *, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        check_positive("dim", dim)
        self.pos_embed = _dw3d(dim, 3)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, head_dim=head_dim, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        b, c, t, h, w = x.shape
        u = x.flatten(2).transpose(1, 2)  # (B, C, T, H, W) -> (B, THW, C)
        u = u + self.drop_path(self.attn(self.norm1(u)))
        u = u + self.drop_path(self.mlp(self.norm2(u)))
        return u.transpose(1, 2).reshape(b, c, t, h, w)


class SplitSABlock3d(nn.Module):
    """The divided variant (official ``SplitSABlock``): ``x += DPE(x)``; ``a = x + TA(LN_t(x))`` attending over T
    per position; ``y = x + SA(LN_1(a))`` attending over H*W per frame (added to ``x``, not to ``a``, as officially);
    ``y += MLP(LN_2(y))``. The temporal attention starts as the identity map's complement: its qkv weights zero and
    its projection weights one (the official initialisation). NCTHW in and out."""

    def __init__(self, dim: int, head_dim: int = 64, mlp_ratio: float = 4.0, *, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        check_positive("dim", dim)
        self.pos_embed = _dw3d(dim, 3)
        self.t_norm = nn.LayerNorm(dim, eps=1e-6)
        self.t_attn = Attention(dim, head_dim=head_dim, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, head_dim=head_dim, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        b, c, t, h, w = x.shape
        # (B, C, T, H, W) -> (B*H*W, T, C): attention over time at each position
        a = x.permute(0, 3, 4, 2, 1).reshape(b * h * w, t, c)
        a = a + self.drop_path(self.t_attn(self.t_norm(a)))
        a = a.reshape(b, h * w, t, c).transpose(1, 2).reshape(b * t, h * w, c)  # -> (B*T, HW, C): over space
        residual = x.permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)
        y = (residual + self.drop_path(self.attn(self.norm1(a)))).reshape(b, t * h * w, c)
        y = y + self.drop_path(self.mlp(self.norm2(y)))
        return y.transpose(1, 2).reshape(b, c, t, h, w)


def inflate_weight(weight: torch.Tensor, time: int, *, center: bool = False) -> torch.Tensor:
    """A 2D conv kernel (O, I, kh, kw) made 3D, (O, I, time, kh, kw): repeated over time and divided by ``time``
    (I3D's inflation, 1705.07750, the official UniFormer initialisation: a clip of identical frames then gives the
    image response wherever the temporal window lies inside the clip), or with ``center`` placed at the middle tap
    ``time // 2`` and zero elsewhere (identical frames give the image response at every frame, borders included)."""
    if weight.dim() != 4:
        raise InvalidValue(f"weight must be a 2D conv kernel (O, I, kh, kw), got shape {tuple(weight.shape)}")
    check_positive("time", time)
    if center:
        out = weight.new_zeros(weight.shape[0], weight.shape[1], time, *weight.shape[2:])
        out[:, :, time // 2] = weight
        return out
    return weight.unsqueeze(2).repeat(1, 1, time, 1, 1) / time


class UniFormerVideo(ClassifierModel):
    """UniFormer video classifier, (B, in_chans, T, H, W) -> logits (B, num_classes) (2201.09450, Table 5).

    As :class:`~visionmix.models.uniformer.UniFormer` with 3D stages: the first ``num_conv_stages`` stages use
    :class:`LocalMHRA3d`, the rest :class:`SABlock3d` (:class:`SplitSABlock3d` with ``split``). The stem halves T;
    ``std`` gives the later patch embeddings a 3-tap temporal kernel. ``forward_features`` returns the
    (B, C, T/2, H/s, W/s) map after BatchNorm3d; the head averages over time and space. ``num_frames`` only sets the
    default clip length in ``pretrained_cfg`` (any T works). Feature levels are the stage ends, 5-D maps
    (``feature_info`` reductions are spatial; T is halved once, by the stem).
    """

    def __init__(self, depths: Sequence[int] = (3, 4, 8, 3), embed_dims: Sequence[int] = (64, 128, 320, 512),
                 head_dim: int = 64, mlp_ratio: float = 4.0, *, patch_sizes: Sequence[int] = (4, 2, 2, 2),
                 num_conv_stages: int = 2, split: bool = False, std: bool = False, qkv_bias: bool = True,
                 num_classes: int = 400, in_chans: int = 3, num_frames: int = 8,
                 img_size: int | tuple[int, int] | None = None, global_pool: str = "avg", drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        depths, embed_dims, patch_sizes = check_stages(depths, embed_dims, patch_sizes, num_conv_stages)
        check_positive("in_chans", in_chans)
        self.num_frames = check_positive("num_frames", num_frames)
        self.stride = math.prod(patch_sizes)
        if img_size is not None:
            self._check_size(*((img_size, img_size) if isinstance(img_size, int) else img_size))

        stage_inputs = (in_chans, *embed_dims[:-1])
        for i, (prev, dim, patch) in enumerate(zip(stage_inputs, embed_dims, patch_sizes, strict=True), start=1):
            t_kernel, t_stride = (3, 2) if i == 1 else (3 if std else 1, 1)
            self.add_module(f"patch_embed{i}", PatchEmbed3d(prev, dim, patch, t_kernel=t_kernel, t_stride=t_stride))
        dpr = iter(stochastic_depth_rates(drop_path_rate, sum(depths)))
        global_block = SplitSABlock3d if split else SABlock3d
        for i, (depth, dim) in enumerate(zip(depths, embed_dims, strict=True), start=1):
            if i <= num_conv_stages:
                blocks = [LocalMHRA3d(dim, mlp_ratio, drop=proj_drop_rate, drop_path=next(dpr)) for _ in range(depth)]
            else:
                blocks = [global_block(dim, head_dim, mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                                       attn_drop=attn_drop_rate, drop_path=next(dpr)) for _ in range(depth)]
            self.add_module(f"blocks{i}", nn.ModuleList(blocks))
        self.norm = nn.BatchNorm3d(embed_dims[-1])
        self._init_head(embed_dims[-1], num_classes, in_chans, global_pool, drop_rate)
        reductions = [math.prod(patch_sizes[:i]) for i in range(1, len(depths) + 1)]
        self._init_features(["patch_embed1"], [
            ([f"patch_embed{i}", *(f"blocks{i}.{j}" for j in range(depth))], dim, reduction, f"blocks{i}")
            for i, (depth, dim, reduction) in enumerate(zip(depths, embed_dims, reductions, strict=True), start=1)
        ], norm="norm")
        self.apply(init_weights)
        for m in self.modules():
            if isinstance(m, SplitSABlock3d):
                for p in (m.t_attn.qkv.weight, m.t_attn.qkv.bias, m.t_attn.proj.bias):
                    if p is not None:
                        nn.init.zeros_(p)
                nn.init.ones_(m.t_attn.proj.weight)

    def _check_size(self, height: int, width: int) -> None:
        if height % self.stride or width % self.stride:
            raise InvalidValue(f"input size {height}x{width} must be divisible by the model's total stride "
                               f"{self.stride}")

    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_chans, ndim=5, layout="NCTHW")
        self._check_size(x.shape[-2], x.shape[-1])
        return x

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Mean (or max) over time and space of (B, C, T, H, W) features, ``global_pool=""``: unchanged."""
        if not self.global_pool:
            return x
        return x.mean((2, 3, 4)) if self.global_pool == "avg" else x.amax((2, 3, 4))

    def _to_map(self, x: torch.Tensor, reduction: int, size: tuple[int, int], output_fmt: str) -> torch.Tensor:
        """A level's (B, C, T', H', W') map, or (B, T', H', W', C) for ``"NHWC"``."""
        return x.permute(0, 2, 3, 4, 1) if output_fmt == "NHWC" else x

    def no_weight_decay(self) -> set[str]:
        """The base set (norms) and every 3x3x3 position encoding, as UniFormer's 2D DPE."""
        return super().no_weight_decay() | {n for n, _ in self.named_parameters() if ".pos_embed." in n}

    def inflate(self, image_state_dict: Mapping[str, torch.Tensor], *, center: bool = False
                ) -> dict[str, torch.Tensor]:
        """This model's state dict from an image UniFormer's: every 2D kernel whose key is a 3D kernel here is
        inflated to that kernel's temporal size (:func:`inflate_weight`; 3 for the stem and DPE, 5 for local MHRA,
        1 for the 1x1 convs), everything else is copied. A classifier of another class count is replaced by this
        model's own (fresh) one, as the official fine-tuning does; keys absent here are left out."""
        own = self.state_dict()
        out = {}
        for key, value in image_state_dict.items():
            if key not in own:
                continue
            if value.dim() == 4 and own[key].dim() == 5 and value.shape[2:] == own[key].shape[3:]:
                value = inflate_weight(value, own[key].shape[2], center=center)
            elif key.startswith(f"{self.head_name}.") and value.shape != own[key].shape:
                value = own[key]
            out[key] = value
        return out

    @staticmethod
    def checkpoint_filter_fn(state: dict[str, torch.Tensor], model: UniFormerVideo) -> dict[str, torch.Tensor]:
        """Inflate an image checkpoint (2D kernels where this model has 3D ones), saying so; pass a video one."""
        own = model.state_dict()
        flat = [k for k, v in state.items() if k in own and v.dim() == 4 and own[k].dim() == 5]
        if not flat:
            return state
        head = [k for k, v in state.items() if k.startswith(f"{model.head_name}.") and k in own
                and v.shape != own[k].shape]
        note = f"; its {state[head[0]].shape[0]}-class head replaced by a fresh {model.num_classes}-class one" \
            if head else ""
        warnings.warn(f"inflated an image checkpoint to video: {len(flat)} 2D kernels repeated over time and divided "
                      f"by their temporal size (the official UniFormer initialisation){note}", stacklevel=3)
        return model.inflate(state)


_CFG = dict(first_conv="patch_embed1.proj", classifier="head", paper_ids="arXiv:2201.09450", crop_pct=1.0,
            mean=(0.45, 0.45, 0.45), std=(0.225, 0.225, 0.225), interpolation="bilinear")
_SMALL = dict(depths=(3, 4, 8, 3))
_BASE = dict(depths=(5, 8, 20, 7))
_PARAMS = {("small", 400): 21_400_400, ("base", 400): 49_813_200}
# name: (size, dataset, classes, frames, stride, README GFLOPs per view, README top-1)
_VIDEO = {
    "uniformer_small_k400_8x8": ("small", "Kinetics-400", 400, 8, 8, None, None),
    "uniformer_small_k400_16x4": ("small", "Kinetics-400", 400, 16, 4, 167 / 4, 80.8),
    "uniformer_small_k400_16x8": ("small", "Kinetics-400", 400, 16, 8, 167 / 4, 80.8),
    "uniformer_small_k400_32x4": ("small", "Kinetics-400", 400, 32, 4, 438 / 4, 82.0),
    "uniformer_small_k600_16x4": ("small", "Kinetics-600", 600, 16, 4, 167 / 4, 82.8),
    "uniformer_small_k600_16x8": ("small", "Kinetics-600", 600, 16, 8, 167 / 4, 82.7),
    "uniformer_small_sthv2_16": ("small", "Something-Something V2", 174, 16, None, 125 / 3, 67.7),
    "uniformer_small_sthv2_32": ("small", "Something-Something V2", 174, 32, None, 329 / 3, 69.0),
    "uniformer_base_k400_8x8": ("base", "Kinetics-400", 400, 8, 8, None, None),
    "uniformer_base_k400_16x4": ("base", "Kinetics-400", 400, 16, 4, 387 / 4, 82.0),
    "uniformer_base_k400_16x8": ("base", "Kinetics-400", 400, 16, 8, 387 / 4, 81.7),
    "uniformer_base_k400_32x4": ("base", "Kinetics-400", 400, 32, 4, 1036 / 4, 82.9),
    "uniformer_base_k600_16x4": ("base", "Kinetics-600", 600, 16, 4, 387 / 4, 84.0),
    "uniformer_base_k600_16x8": ("base", "Kinetics-600", 600, 16, 8, 387 / 4, 83.4),
    "uniformer_base_k600_32x4": ("base", "Kinetics-600", 600, 32, 4, 1036 / 4, 84.5),
    "uniformer_base_sthv2_16": ("base", "Something-Something V2", 174, 16, None, 290 / 3, 70.4),
    "uniformer_base_sthv2_32": ("base", "Something-Something V2", 174, 32, None, 777 / 3, 71.1),
}


def _video_params(size: str, classes: int) -> int:
    """The official count with a ``classes``-way head (the 400-class counts of the issue, head 512 * n + n)."""
    return _PARAMS[(size, 400)] + 513 * (classes - 400)


for _name, (_size, _data, _classes, _frames, _stride, _gflops, _top1) in _VIDEO.items():
    register_variant(
        _name, UniFormerVideo, dict(_SMALL if _size == "small" else _BASE, num_classes=_classes, num_frames=_frames),
        cfg=dict(_CFG, input_size=(3, _frames, 224, 224), num_classes=_classes),
        reference=Reference(params=_video_params(_size, _classes),
                            gmacs=None if _gflops is None else round(_gflops, 3), top1=_top1),
        doc=f"UniFormer-{_size[0].upper()} video, {_data}: {_frames} frames"
            + (f" sampled every {_stride}" if _stride else " (segment sampling)") + ", 224 px.")

register_variant(
    "uniformer_video_nano", UniFormerVideo,
    dict(depths=(2, 4), embed_dims=(64, 128), patch_sizes=(4, 1), num_conv_stages=1, head_dim=32, num_classes=10,
         in_chans=1, num_frames=4),
    cfg=dict(_CFG, input_size=(1, 4, 28, 28), num_classes=10, mean=(0.5,), std=(0.5,)),
    reference=Reference(params=923_850, gmacs=0.099300),
    doc="UniFormer video for 4x28x28 clips: stem to 2x7x7, local MHRA (dim 64), then 4 MHSA blocks over 2x7x7 tokens.")
