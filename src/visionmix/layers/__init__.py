"""Layers anyone can drop into their own network; each cites its paper. See SPEC.md section 1."""

from visionmix.layers.attention import ULSAM, SelectiveKernel, SEModule, SplitAttention
from visionmix.layers.basic import ConvBN, ConvMlp, DropPath, LayerScale, Mlp, PatchEmbed, drop_path
from visionmix.layers.diverse_branch import DiverseBranchBlock
from visionmix.layers.dynamic_conv import CondConv2d, WeightNetConv2d
from visionmix.layers.mixing import Attention, ConvPosEnc, LocalMHRA, TokenMixingMLP, spatial_shift
from visionmix.layers.overparam import DOConv2d
from visionmix.layers.poly_scale import PSConv2d
from visionmix.layers.repmlp import RepMLPBlock

__all__ = [
    "Attention",
    "CondConv2d",
    "ConvBN",
    "ConvMlp",
    "ConvPosEnc",
    "DOConv2d",
    "DiverseBranchBlock",
    "DropPath",
    "LayerScale",
    "LocalMHRA",
    "Mlp",
    "PSConv2d",
    "PatchEmbed",
    "RepMLPBlock",
    "SEModule",
    "SelectiveKernel",
    "SplitAttention",
    "TokenMixingMLP",
    "ULSAM",
    "WeightNetConv2d",
    "drop_path",
    "spatial_shift",
]
