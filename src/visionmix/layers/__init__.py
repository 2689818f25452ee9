"""Layers anyone can drop into their own network; each cites its paper. See SPEC.md section 1."""

from visionmix.layers.attention import ULSAM, SelectiveKernel, SEModule, SplitAttention
from visionmix.layers.basic import ConvBN, ConvMlp, DropPath, LayerScale, Mlp, PatchEmbed, drop_path
from visionmix.layers.mixing import Attention, ConvPosEnc, LocalMHRA, TokenMixingMLP, spatial_shift

__all__ = [
    "Attention",
    "ConvBN",
    "ConvMlp",
    "ConvPosEnc",
    "DropPath",
    "LayerScale",
    "LocalMHRA",
    "Mlp",
    "PatchEmbed",
    "SEModule",
    "SelectiveKernel",
    "SplitAttention",
    "TokenMixingMLP",
    "ULSAM",
    "drop_path",
    "spatial_shift",
]
