"""SPACH (Zhao et al., "A Battle of Network Structures", 2108.13002) with the official (microsoft/SPACH) layout.

MixingBlock on (B, H, W, C) tokens (section 3 of the paper)::

    y = x + γ ⊙ F_s(LN(x)) + CPE(x)        γ: layer scale, init 1e-4; CPE: depthwise 3x3 conv on the block input
    y = y + F_c(LN(y))                     F_c: channel MLP, ratio R, GELU

``F_s`` is ``"conv"`` (no extra spatial function: the CPE's depthwise 3x3 is the convolution; the official name is
``"pass"``, accepted too), ``"attn"`` (MHSA with qkv bias) or ``"mlp"`` (token MLP with hidden N/2, which fixes the
input size). Single-stage models (``blocks``) keep C and N; multi-stage ones (``layer1..layerK``) start every stage
after the first with a 2x2 stride-2 conv + GroupNorm(1, C) that halves H, W and doubles C; heads stay constant.
Parameter names and shapes equal the official checkpoints (``cpe_net.net.1``, ``layerK.0.net.1.{0,1}``), so they load
with ``strict=True``.

``torch.compile``: works (checked with ``backend="eager"`` on the nano models in the tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from einops.layers.torch import Rearrange
from torch import nn

from visionmix.checks import check_choice, check_input, check_positive
from visionmix.errors import InvalidValue
from visionmix.layers import Attention, ConvPosEnc, DropPath, Mlp, PatchEmbed, TokenMixingMLP
from visionmix.models._base import ClassifierModel, stochastic_depth_rates
from visionmix.models._registry import Reference, register_variant

__all__ = ["Conv4PatchEmbed", "MixingBlock", "NCHWApply", "Spach"]

SPATIAL_TYPES = ("conv", "attn", "mlp")
_ALIASES = {"pass": "conv"}  # the official registry's name for a block whose only spatial op is the CPE
_LayerNorm = partial(nn.LayerNorm, eps=1e-6)

StageArch = Sequence[tuple[str, int]]


def _spatial_type(name: str) -> str:
    name = _ALIASES.get(name, name)
    check_choice("spatial function type", name, SPATIAL_TYPES)
    return name


class NCHWApply(nn.Module):
    """Run an NCHW module on a (B, H, W, C) tensor; the module sits at ``net.1`` as in the official layout."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.net = nn.Sequential(Rearrange("b h w c -> b c h w"), module, Rearrange("b c h w -> b h w c"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Conv4PatchEmbed(PatchEmbed):
    """SPACH's ``conv4`` stem: 7x7 s2 → 3x3 → 3x3 (64 channels, each BN + ReLU), then a k = s = patch/2 conv.

    Same interface and size checks as :class:`PatchEmbed`; ``proj`` is the 10-layer ``nn.Sequential`` of the
    official layout (``stem.proj.0`` … ``stem.proj.9``). The patch size must be even.
    """

    def __init__(self, img_size: int | tuple[int, int] | None = 224, patch_size: int | tuple[int, int] = 16,
                 in_chans: int = 3, embed_dim: int = 768, *, hidden_chans: int = 64, output_fmt: str = "NHWC",
                 strict_img_size: bool = True) -> None:
        super().__init__(img_size, patch_size, in_chans, embed_dim, output_fmt=output_fmt,
                         strict_img_size=strict_img_size)
        if any(p % 2 for p in self.patch_size):
            raise InvalidValue(f"the conv4 stem needs an even patch_size, got {self.patch_size}")
        sub_patch = (self.patch_size[0] // 2, self.patch_size[1] // 2)
        hidden = check_positive("hidden_chans", hidden_chans)
        self.proj = nn.Sequential(  # replaces PatchEmbed's single patch conv
            nn.Conv2d(in_chans, hidden, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, embed_dim, sub_patch, stride=sub_patch),
        )


class MixingBlock(nn.Module):
    """SPACH's mixing block on (B, H, W, C) tokens; see the module docstring for the equations.

    ``spatial`` is a type name, or an existing module to share between blocks (``shared_spatial_func``).
    ``num_tokens`` (H·W) is needed for ``"mlp"`` only.
    """

    def __init__(self, dim: int, spatial: str | nn.Module = "conv", *, num_tokens: int | None = None,
                 num_heads: int = 1, token_ratio: float = 0.5, channel_ratio: float = 2.0,
                 init_values: float = 1e-4, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        check_positive("dim", dim)
        if isinstance(spatial, str):
            spatial = _make_spatial_func(_spatial_type(spatial), dim, num_tokens, num_heads=num_heads,
                                         token_ratio=token_ratio, drop=drop, attn_drop=attn_drop)
        if spatial is not None:
            self.gamma_1 = nn.Parameter(torch.full((1, 1, dim), float(init_values)))
            self.spatial_func = spatial
            self.norm1 = _LayerNorm(dim)
        else:
            self.spatial_func = None
        self.channel_func = Mlp(dim, int(dim * channel_ratio), drop=drop)
        self.norm2 = _LayerNorm(dim)
        self.drop_path = DropPath(drop_path)
        self.cpe_net = NCHWApply(ConvPosEnc(dim, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x + self.cpe_net(x)
        if self.spatial_func is not None:
            mixed = self.spatial_func(self.norm1(x).flatten(1, 2))  # (B, N, C)
            out = out + self.drop_path((self.gamma_1 * mixed).view_as(x))
        return out + self.drop_path(self.channel_func(self.norm2(out)))


def _make_spatial_func(kind: str, dim: int, num_tokens: int | None, *, num_heads: int, token_ratio: float,
                       drop: float, attn_drop: float) -> nn.Module | None:
    if kind == "attn":
        return Attention(dim, num_heads, qkv_bias=True, attn_drop=attn_drop, proj_drop=drop)
    if kind == "mlp":
        if num_tokens is None:
            raise InvalidValue("a spatial 'mlp' needs num_tokens (the fixed H*W of its stage)")
        return TokenMixingMLP(num_tokens, int(num_tokens * token_ratio), drop=drop)
    return None


class Spach(ClassifierModel):
    """SPACH network: stem → LN → stages of :class:`MixingBlock` → LN → mean over tokens → head (zero-init).

    ``net_arch`` lists stages, each a list of ``(spatial type, depth)``: one stage gives the single-stage SPACH
    (``blocks``, stochastic depth constant over blocks as in the official code), several give SPACH-MS
    (``layer1..``, C doubling per stage, stochastic depth rising linearly). ``forward_features`` returns
    (B, H, W, C). Feature levels: every stage end of SPACH-MS, every block with fewer than 3 stages (timm's rule).
    Input sides must be multiples of the patch and at least ``min_size`` (one token in the last stage), unless a
    stage uses ``"mlp"``, which fixes the size to ``img_size``.
    """

    feature_fmt = "NHWC"

    def __init__(self, *, net_arch: Sequence[StageArch], num_classes: int = 1000, img_size: int | tuple[int, int] = 224,
                 in_chans: int = 3, patch_size: int = 16, hidden_dim: int = 384, num_heads: int = 12,
                 token_ratio: float = 0.5, channel_ratio: float = 2.0, stem_type: str = "conv1",
                 shared_spatial_func: bool = False, init_values: float = 1e-4, global_pool: str = "avg",
                 drop_rate: float = 0.0, proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        check_choice("stem_type", stem_type, ("conv1", "conv4"))
        check_positive("hidden_dim", hidden_dim)
        arch = [[(_spatial_type(kind), check_positive("depth", depth)) for kind, depth in stage] for stage in net_arch]
        if not arch or not all(arch):
            raise InvalidValue(f"net_arch must be a non-empty list of non-empty stages, got {net_arch!r}")
        fixed_size = any(kind == "mlp" for stage in arch for kind, _ in stage)
        stem_cls = PatchEmbed if stem_type == "conv1" else Conv4PatchEmbed
        self.stem = stem_cls(img_size, patch_size, in_chans, hidden_dim, output_fmt="NHWC",
                             strict_img_size=fixed_size)
        self.norm1 = _LayerNorm(hidden_dim)

        depth = sum(d for stage in arch for _, d in stage)
        multi_stage = len(arch) > 1
        rates = iter(stochastic_depth_rates(drop_path_rate, depth) if multi_stage else [drop_path_rate] * depth)
        block_kwargs = dict(num_heads=num_heads, token_ratio=token_ratio, channel_ratio=channel_ratio,
                            init_values=init_values, drop=proj_drop_rate, attn_drop=attn_drop_rate)
        dim, (grid_h, grid_w) = hidden_dim, self.stem.grid_size
        stage_names = ["blocks"] if not multi_stage else [f"layer{i + 1}" for i in range(len(arch))]
        stages = []  # (lead-in, blocks, num_chs, reduction, name) per stage
        reduction = self.stem.patch_size[0]
        for index, (stage_name, stage) in enumerate(zip(stage_names, arch, strict=True)):
            layers: list[nn.Module] = []
            if index > 0:
                layers.append(NCHWApply(nn.Sequential(nn.Conv2d(dim, 2 * dim, 2, stride=2, bias=False),
                                                      nn.GroupNorm(1, 2 * dim))))
                dim, grid_h, grid_w, reduction = 2 * dim, grid_h // 2, grid_w // 2, 2 * reduction
            kinds = {kind for kind, _ in stage}
            shared = None
            if shared_spatial_func and kinds != {"conv"}:
                if len(stage) != 1:
                    raise InvalidValue(f"shared_spatial_func needs a single spatial type per stage; stage {index + 1} "
                                       f"is {stage}")
                shared = _make_spatial_func(stage[0][0], dim, grid_h * grid_w, num_heads=num_heads,
                                            token_ratio=token_ratio, drop=proj_drop_rate, attn_drop=attn_drop_rate)
            layers.extend(
                MixingBlock(dim, shared if shared is not None else kind, num_tokens=grid_h * grid_w,
                            drop_path=next(rates), **block_kwargs)
                for kind, d in stage for _ in range(d)
            )
            self.add_module(stage_name, nn.Sequential(*layers))
            names = [f"{stage_name}.{j}" for j in range(len(layers))]
            stages.append((names[:bool(index)], names[bool(index):], dim, reduction, stage_name))
        self.norm2 = _LayerNorm(dim)
        self.min_size = self.stem.patch_size[0] * 2 ** (len(arch) - 1), self.stem.patch_size[1] * 2 ** (len(arch) - 1)
        self._init_head(dim, num_classes, in_chans, global_pool, drop_rate)
        self._init_stages(["stem", "norm1"], stages, norm="norm2")
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official init: Xavier-uniform linears, Kaiming-normal (fan-out) convs, zero biases and head."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                init = nn.init.zeros_ if name == self.head_name else nn.init.xavier_uniform_
                init(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_chans)
        if x.shape[-2] < self.min_size[0] or x.shape[-1] < self.min_size[1]:
            raise InvalidValue(f"input size {x.shape[-2]}x{x.shape[-1]} is below the model's smallest input "
                               f"{self.min_size[0]}x{self.min_size[1]} (one token in the last stage)")
        return self.norm1(self.stem(x))


# ---------------------------------------------------------------------------------------------------------------
# Registry: the official configs (models/registry.py of microsoft/SPACH) with SPEC.md's reference figures.

def _register_spach(name: str, arch: list[list[tuple[str, int]]], ref: Reference, cfg: dict | None = None, *,
                    patch_size: int, **defaults: object) -> None:
    fixed = any(kind == "mlp" for stage in arch for kind, _ in stage)  # a token MLP fixes the input size
    in_chans = (cfg or {}).get("input_size", (3,))[0]
    smallest = patch_size * 2 ** (len(arch) - 1)  # one token in the last stage
    # Input sides must be multiples of the patch (the stem checks it); each downsampling halves the grid, rounding down.
    cfg = {"fixed_input_size": fixed, "min_input_size": None if fixed else (in_chans, smallest, smallest),
           "input_size_divisor": patch_size, "first_conv": "stem.proj", "classifier": "head",
           "paper_ids": "arXiv:2108.13002", **(cfg or {})}
    register_variant(name, Spach, {"net_arch": arch, "patch_size": patch_size, **defaults}, cfg=cfg, reference=ref,
                     doc=f"SPACH {name}: net_arch={arch}, patch_size={patch_size}, {defaults} (2108.13002).")


# Single-stage, patch 16: (size, type) -> (C, heads, R, depth, params, GMACs, top-1)
_SS = {
    ("xxs", "conv"): (384, 12, 2.0, 12, 7_828_840, 1.454, None),
    ("xxs", "attn"): (192, 6, 2.0, 12, 3_931_048, 0.904, None),
    ("xxs", "mlp"): (384, 12, 2.0, 12, 8_307_184, 1.631, None),
    ("xs", "conv"): (384, 12, 2.0, 24, 14_975_848, 2.849, None),
    ("xs", "attn"): (384, 12, 2.0, 12, 14_938_984, 3.195, None),
    ("xs", "mlp"): (384, 12, 2.0, 24, 15_932_536, 3.203, None),
    ("s", "conv"): (512, 16, 3.0, 24, 38_854_120, 7.498, None),
    ("s", "attn"): (512, 16, 3.0, 12, 32_507_368, 6.726, None),
    ("s", "mlp"): (512, 16, 3.0, 24, 39_820_024, 7.970, 79.5),
}
# Multi-stage, patch 4: (size, type) -> (C, heads, R, depths, params, GMACs, top-1); stage 1 is always conv.
_MS = {
    ("xxs", "conv"): (64, 2, 2.0, (2, 2, 6, 2), 5_085_224, 0.712, 73.1),
    ("xxs", "attn"): (32, 1, 2.0, (2, 2, 6, 2), 2_372_744, 0.530, 65.4),
    ("xxs", "mlp"): (64, 2, 2.0, (2, 2, 6, 2), 6_562_446, 0.931, 74.5),
    ("xs", "conv"): (96, 3, 2.0, (3, 4, 12, 3), 17_302_120, 2.755, None),
    ("xs", "attn"): (64, 2, 2.0, (3, 4, 12, 3), 14_479_080, 3.082, None),
    ("xs", "mlp"): (96, 3, 2.0, (3, 4, 12, 3), 20_260_283, 3.409, None),
    ("s", "conv"): (128, 4, 3.0, (3, 4, 12, 3), 43_576_168, 7.141, 81.6),
    ("s", "attn"): (96, 3, 3.0, (3, 4, 12, 3), 39_537_544, 7.532, 82.9),
    ("s", "mlp"): (128, 4, 3.0, (3, 4, 12, 3), 46_542_011, 8.014, 82.1),
}
# Hybrids (MS, conv then attention blocks per stage): size -> (C, heads, R, net_arch, params, GMACs, top-1)
_HYBRID = {
    "xs": (96, 3, 2.0, [[("conv", 3)], [("conv", 4)], [("conv", 2), ("attn", 10)], [("conv", 1), ("attn", 2)]],
           27_956_584, 4.444, 82.4),
    "s": (128, 4, 3.0, [[("conv", 3)], [("conv", 2), ("attn", 2)], [("conv", 2), ("attn", 10)],
                        [("conv", 1), ("attn", 2)]], 63_028_584, 11.051, 83.7),
}

for (_size, _kind), (_dim, _heads, _ratio, _depth, _params, _gmacs, _top1) in _SS.items():
    _register_spach(f"spach_{_size}_patch16_224_{_kind}", [[(_kind, _depth)]],
                    Reference(params=_params, gmacs=_gmacs, top1=_top1),
                    patch_size=16, hidden_dim=_dim, num_heads=_heads, channel_ratio=_ratio)
for (_size, _kind), (_dim, _heads, _ratio, _depths, _params, _gmacs, _top1) in _MS.items():
    _register_spach(f"spach_ms_{_size}_patch4_224_{_kind}",
                    [[("conv", _depths[0])], *([(_kind, d)] for d in _depths[1:])],
                    Reference(params=_params, gmacs=_gmacs, top1=_top1),
                    patch_size=4, hidden_dim=_dim, num_heads=_heads, channel_ratio=_ratio)
for _size, (_dim, _heads, _ratio, _arch, _params, _gmacs, _top1) in _HYBRID.items():
    _register_spach(f"spach_ms_{_size}_patch4_224_hybrid", _arch, Reference(params=_params, gmacs=_gmacs, top1=_top1),
                    patch_size=4, hidden_dim=_dim, num_heads=_heads, channel_ratio=_ratio)

# Hybrid-MS-S+ (README: 83.9, 63M, 12.3G; the file spach_ms_hybrid_s+.pth of release v1.0): the S hybrid with the
# official --stem-type conv4. Not shared_spatial_func: the official SpachMS asserts one spatial type per stage for it,
# and the hybrid's stages 2-4 mix conv and attention.
_register_spach("spach_ms_s_plus_patch4_224_hybrid", _HYBRID["s"][3],
                Reference(params=63_138_728, gmacs=12.177, top1=83.9), patch_size=4, hidden_dim=128, num_heads=4,
                channel_ratio=3.0, stem_type="conv4")

# Nano models for 28x28 grey input (10 classes): patch 4 -> 7x7 tokens (single stage, C=192), or patch 2 -> 14x14
# then 7x7 (two stages, C=96 then 192). Attention blocks carry twice the weights of conv/mlp blocks, so the attention
# variants have half the blocks: the three mixing types then match in parameters and MACs (SPACH's fairness rule).
# Reference figures here are at the nano default (1x1x28x28, 10-class head), not 224.
_NANO_CFG = {"input_size": (1, 28, 28), "num_classes": 10, "mean": (0.5,), "std": (0.5,)}
_NANO_ARGS = {"num_classes": 10, "in_chans": 1, "img_size": 28, "num_heads": 6, "channel_ratio": 2.0}
_NANO = {  # type -> (single-stage depth, multi-stage stage-2 depth, SS reference, MS reference)
    "conv": (8, 6, Reference(params=1_208_650, gmacs=0.0586), Reference(params=1_055_722, gmacs=0.0623)),
    "attn": (4, 3, Reference(params=1_202_506, gmacs=0.0620), Reference(params=1_051_114, gmacs=0.0649)),
    "mlp": (8, 6, Reference(params=1_232_658, gmacs=0.0622), Reference(params=1_073_728, gmacs=0.0650)),
}
for _kind, (_ss_depth, _ms_depth, _ss_ref, _ms_ref) in _NANO.items():
    _register_spach(f"spach_nano_{_kind}", [[(_kind, _ss_depth)]], _ss_ref, _NANO_CFG,
                    patch_size=4, hidden_dim=192, **_NANO_ARGS)
    _register_spach(f"spach_ms_nano_{_kind}", [[("conv", 2)], [(_kind, _ms_depth)]], _ms_ref, _NANO_CFG,
                    patch_size=2, hidden_dim=96, **_NANO_ARGS)
