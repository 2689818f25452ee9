"""Building blocks every family shares: MLPs, patch embedding, stochastic depth, layer scale, conv+BN."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from visionmix.checks import (
    check_choice,
    check_conv_channels,
    check_divisible,
    check_input,
    check_positive,
    to_pair,
)
from visionmix.errors import InvalidValue
from visionmix.layers.fusion import conv2d_from_kernel, fuse_conv_bn


class Mlp(nn.Module):
    """Two-layer perceptron ``fc2(drop(act(fc1(x))))`` on the last dim (timm's names: fc1, act, fc2)."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 *, act_layer: Callable[[], nn.Module] = nn.GELU, drop: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        check_positive("in_features", in_features)
        hidden_features = check_positive("hidden_features", in_features if hidden_features is None else hidden_features)
        out_features = check_positive("out_features", in_features if out_features is None else out_features)
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class ConvMlp(nn.Module):
    """The same perceptron as 1x1 convolutions on NCHW tensors (UniFormer's CMlp)."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 *, act_layer: Callable[[], nn.Module] = nn.GELU, drop: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        check_positive("in_features", in_features)
        hidden_features = check_positive("hidden_features", in_features if hidden_features is None else hidden_features)
        out_features = check_positive("out_features", in_features if out_features is None else out_features)
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Conv2d(hidden_features, out_features, 1, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: conv with kernel = stride = patch, then an optional norm over channels.

    Input (B, C_in, H, W). Output ``output_fmt``: "NCHW" (B, D, H/p, W/p), "NHWC", or "NLC" (B, N, D).
    With ``img_size`` set and ``strict_img_size`` the input must have exactly that size (token-MLP models);
    otherwise any size divisible by the patch is accepted.
    """

    def __init__(self, img_size: int | tuple[int, int] | None = 224, patch_size: int | tuple[int, int] = 16,
                 in_chans: int = 3, embed_dim: int = 768, *, norm_layer: Callable[[int], nn.Module] | None = None,
                 output_fmt: str = "NCHW", strict_img_size: bool = True, bias: bool = True) -> None:
        super().__init__()
        check_choice("output_fmt", output_fmt, ("NCHW", "NHWC", "NLC"))
        self.patch_size = to_pair("patch_size", patch_size)
        self.in_chans = check_positive("in_chans", in_chans)
        check_positive("embed_dim", embed_dim)
        self.img_size = None if img_size is None else to_pair("img_size", img_size)
        if self.img_size is not None:
            for axis, size, patch in zip("HW", self.img_size, self.patch_size, strict=True):
                check_divisible(f"img_size ({axis})", size, patch, "patch_size")
            self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
            self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = strict_img_size and self.img_size is not None
        self.output_fmt = output_fmt
        self.proj = nn.Conv2d(in_chans, embed_dim, self.patch_size, stride=self.patch_size, bias=bias)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else nn.Identity()

    def check_size(self, height: int, width: int) -> None:
        if self.strict_img_size and (height, width) != self.img_size:
            raise InvalidValue(f"expected input size {self.img_size[0]}x{self.img_size[1]} (this model's img_size), "
                               f"got {height}x{width}")
        if height % self.patch_size[0] or width % self.patch_size[1]:
            raise InvalidValue(f"input size {height}x{width} must be divisible by the patch size "
                               f"{self.patch_size[0]}x{self.patch_size[1]}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_chans)
        self.check_size(x.shape[-2], x.shape[-1])
        x = self.proj(x).permute(0, 2, 3, 1)  # NCHW -> NHWC so the norm acts on channels
        x = self.norm(x)
        if self.output_fmt == "NCHW":
            return x.permute(0, 3, 1, 2).contiguous()  # not a channels-last view: later convs keep NCHW
        if self.output_fmt == "NLC":
            return x.flatten(1, 2)
        return x


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True
              ) -> torch.Tensor:
    """Stochastic depth (Huang et al., 1603.09382): zero whole samples of a residual branch with ``drop_prob``."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep_prob)
    if scale_by_keep and keep_prob > 0.0:
        mask.div_(keep_prob)
    return x * mask


class DropPath(nn.Module):
    """Module form of :func:`drop_path`; identity in eval mode."""

    def __init__(self, drop_prob: float = 0.0, *, scale_by_keep: bool = True) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise InvalidValue(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class LayerScale(nn.Module):
    """Per-channel learnable scale ``gamma * x`` on the last dim (CaiT, 2103.17239); ``gamma`` starts at init_values."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((check_positive("dim", dim),), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class ConvBN(nn.Module):
    """``BN(conv(x))`` with a bias-free conv; ``reparameterize()`` folds the BN into one biased conv.

    Parameter names ``conv.*`` and ``bn.*`` follow the DBB/RepVGG layouts; the deployed form keeps the name
    (``conv.weight``, ``conv.bias``) as the official deploy checkpoints do.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int | None = None, dilation: int = 1, groups: int = 1) -> None:
        super().__init__()
        check_conv_channels(in_channels, out_channels, groups)
        check_positive("kernel_size", kernel_size)
        check_positive("stride", stride)
        check_positive("dilation", dilation)
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    @torch.no_grad()
    def reparameterize(self) -> nn.Sequential:
        """Return ``Sequential(conv=<biased nn.Conv2d>)``, equal to this module in eval mode.

        ``self.conv`` may be any conv exposing nn.Conv2d's ``weight``/``bias``/geometry (e.g. a DOConv2d).
        """
        c = self.conv
        kernel, bias = fuse_conv_bn(c.weight, self.bn, c.bias)
        fused = conv2d_from_kernel(kernel, bias, stride=c.stride, padding=c.padding, dilation=c.dilation,
                                   groups=c.groups)
        return nn.Sequential(OrderedDict(conv=fused))
