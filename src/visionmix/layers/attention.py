"""Channel and spatial attention: squeeze-excitation, selective kernel, split attention, ULSAM (SPEC.md §1)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from visionmix.checks import check_divisible, check_input, check_positive
from visionmix.errors import InvalidType, InvalidValue
from visionmix.layers.basic import ConvBN


def _reduced_width(name: str, channels: int, ratio: float, minimum: int = 1) -> int:
    """Bottleneck width ``max(minimum, round(channels * ratio))``; ``ratio`` must be a positive number."""
    if isinstance(ratio, bool) or not isinstance(ratio, int | float):
        raise InvalidType(f"{name} must be a float, got {type(ratio).__name__} ({ratio!r})")
    if not ratio > 0:
        raise InvalidValue(f"{name} must be a positive number, got {ratio}")
    return max(minimum, round(channels * ratio))


class SEModule(nn.Module):
    """Squeeze-and-excitation (Hu et al., 1709.01507, eqs. 2-4), NCHW in and out.

    ``x * sigmoid(fc2(act(fc1(GAP(x)))))`` with ``fc1``: C -> C * rd_ratio and ``fc2``: back to C, both biased 1x1
    convs (timm's names). ``rd_channels`` overrides the reduced width.
    """

    def __init__(self, channels: int, rd_ratio: float = 1 / 16, *, rd_channels: int | None = None,
                 act_layer: Callable[[], nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.channels = check_positive("channels", channels)
        if rd_channels is None:
            rd_channels = _reduced_width("rd_ratio", channels, rd_ratio)
        check_positive("rd_channels", rd_channels)
        self.fc1 = nn.Conv2d(channels, rd_channels, 1)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(rd_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels)
        gate = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * gate.sigmoid()


class SelectiveKernel(nn.Module):
    """Selective-kernel convolution (Li et al., 1903.06586, section 3.1), NCHW in, (B, out, H/stride, W/stride) out.

    Split: one branch per entry of ``kernels``, each ``ReLU(BN(conv))``; a kernel k > 3 is a 3x3 with dilation
    (k - 1) / 2 (the paper's 5x5). Fuse: ``U = sum_m U_m``, ``z = ReLU(BN(fc_reduce(GAP(U))))`` of width
    ``d = max(out * rd_ratio, min_rd)``. Select: ``fc_select`` gives one logit per (branch, channel), a softmax
    across branches gives ``a_m``, and ``V = sum_m a_m * U_m`` (eqs. 1-6). Names follow timm's ``SelectiveKernel``
    (``paths.i.conv/bn``, ``attn.fc_reduce/bn/fc_select``); the attention BN needs batch > 1 in training.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, kernels: Sequence[int] = (3, 5),
                 stride: int = 1, groups: int = 1, *, rd_ratio: float = 1 / 16, min_rd: int = 32) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        kernels = tuple(kernels)
        if len(kernels) < 2:
            raise InvalidValue(f"kernels must list at least two branch sizes to select between, got {kernels!r}")
        for k in kernels:
            if check_positive("kernels", k) < 3 or k % 2 == 0:
                raise InvalidValue(f"kernels must be odd sizes >= 3 (k > 3 becomes a dilated 3x3), got {kernels!r}")
        check_positive("stride", stride)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernels = kernels
        self.paths = nn.ModuleList(
            ConvBN(in_channels, out_channels, 3, stride, dilation=(k - 1) // 2, groups=groups) for k in kernels)
        rd_channels = _reduced_width("rd_ratio", out_channels, rd_ratio, check_positive("min_rd", min_rd))
        self.attn = nn.Sequential()
        self.attn.add_module("fc_reduce", nn.Conv2d(out_channels, rd_channels, 1, bias=False))
        self.attn.add_module("bn", nn.BatchNorm2d(rd_channels))
        self.attn.add_module("act", nn.ReLU(inplace=True))
        self.attn.add_module("fc_select", nn.Conv2d(rd_channels, out_channels * len(kernels), 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels)
        branches = torch.stack([F.relu(path(x)) for path in self.paths], dim=1)  # (B, M, C, H, W)
        logits = self.attn(branches.sum(1).mean((2, 3), keepdim=True))  # (B, M * C, 1, 1)
        weights = logits.unflatten(1, (len(self.kernels), self.out_channels)).softmax(dim=1)  # (B, M, C, 1, 1)
        return (branches * weights).sum(1)


class SplitAttention(nn.Module):
    """Split attention of S2-MLPv2 (Yu et al., 2108.01072, section 3.2; ResNeSt/ViP style), channels last.

    Takes k feature maps (B, H, W, C), as a sequence or stacked into (B, k, H, W, C).
    ``a = mean_{h,w} sum_k x_k`` (the mean, not the sum over space, so the gate does not depend on the image size);
    ``a_hat = mlp2(GELU(mlp1(a)))`` with widths C -> C * hidden_ratio -> k * C, bias-free (this is what gives
    S2-MLPv2's published 25M/55M parameters); softmax over k per channel; returns ``sum_k a_hat_k * x_k``, (B, H, W, C).
    """

    def __init__(self, dim: int, k: int = 3, hidden_ratio: float = 1 / 4) -> None:
        super().__init__()
        self.dim = check_positive("dim", dim)
        self.k = check_positive("k", k)
        hidden = _reduced_width("hidden_ratio", dim, hidden_ratio)
        self.mlp1 = nn.Linear(dim, hidden, bias=False)
        self.act = nn.GELU()
        self.mlp2 = nn.Linear(hidden, dim * k, bias=False)

    def forward(self, xs: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if not isinstance(xs, torch.Tensor):
            if len(xs) != self.k:
                raise InvalidValue(f"expected k={self.k} feature maps, got {len(xs)}")
            xs = torch.stack(tuple(xs), dim=1)
        check_input(xs, self.dim, ndim=5, channel_dim=-1, layout="(B, k, H, W, C)")
        if xs.shape[1] != self.k:
            raise InvalidValue(f"expected k={self.k} feature maps stacked on dim 1, got shape {tuple(xs.shape)}")
        a = xs.sum(1).mean((1, 2))  # (B, C)
        weights = self.mlp2(self.act(self.mlp1(a))).unflatten(1, (self.k, self.dim)).softmax(dim=1)  # (B, k, C)
        return (xs * weights[:, :, None, None, :]).sum(1)


class ULSAM(nn.Module):
    """Ultra-lightweight subspace attention (Saini et al., 2006.15102, eqs. 1-2), NCHW in and out.

    Channels split into ``groups`` subspaces F_n; per subspace
    ``A_n = softmax_{HW}(ReLU(BN(pw(maxpool3x3(ReLU(BN(dw1x1(F_n))))))))`` with ``pw`` mapping the subspace to one
    map, and ``F_hat_n = F_n * A_n + F_n``. The pool acts on the depthwise output as the paper says (the official
    code pools the input). All subspaces run at once: the depthwise conv is per channel anyway and ``pwconv`` is a
    conv with ``groups`` groups producing one map per subspace.
    """

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.channels = check_positive("channels", channels)
        self.groups = check_positive("groups", groups)
        check_divisible("channels", channels, groups, "groups")
        self.dwconv = nn.Conv2d(channels, channels, 1, groups=channels, bias=False)
        self.bn_dw = nn.BatchNorm2d(channels)
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.pwconv = nn.Conv2d(channels, groups, 1, groups=groups, bias=False)
        self.bn_pw = nn.BatchNorm2d(groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels)
        b, c, h, w = x.shape
        maps = F.relu(self.bn_dw(self.dwconv(x)))
        maps = F.relu(self.bn_pw(self.pwconv(self.pool(maps))))  # (B, groups, H, W): one map per subspace
        attn = maps.flatten(2).softmax(dim=-1).reshape(b, self.groups, 1, h, w)
        subspaces = x.reshape(b, self.groups, c // self.groups, h, w)
        return (subspaces * attn + subspaces).reshape(b, c, h, w)
