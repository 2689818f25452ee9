"""Spatial mixing operators: spatial shift (S2-MLP), token-mixing MLP (Mixer), MHSA, UniFormer's local MHRA, CPE."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from visionmix.checks import check_choice, check_divisible, check_input, check_positive
from visionmix.errors import InvalidValue
from visionmix.layers.basic import ConvMlp, DropPath, Mlp


def _shift_into(dst: torch.Tensor, src: torch.Tensor, dim: int, step: int) -> None:
    """Write ``src`` shifted by one position along ``dim`` (``step`` = +1 or -1) into ``dst``; the vacated border
    keeps its own value."""
    n = src.shape[dim]
    if step > 0:  # dst[i] = src[i - 1] for i >= 1, dst[0] = src[0]
        dst.narrow(dim, 1, n - 1).copy_(src.narrow(dim, 0, n - 1))
        dst.narrow(dim, 0, 1).copy_(src.narrow(dim, 0, 1))
    else:  # dst[i] = src[i + 1] for i < n - 1, dst[n - 1] = src[n - 1]
        dst.narrow(dim, 0, n - 1).copy_(src.narrow(dim, 1, n - 1))
        dst.narrow(dim, n - 1, 1).copy_(src.narrow(dim, n - 1, 1))


def spatial_shift(x: torch.Tensor, pattern: int = 1) -> torch.Tensor:
    """Spatial shift of S2-MLP (2106.07477) / S2-MLPv2 (2108.01072), out of place.

    ``x`` is (B, H, W, C) with C divisible by 4. The four channel quarters move one pixel:
    pattern 1: +W, -W, +H, -H; pattern 2: +H, -H, +W, -W. "+W" means ``out[:, :, w] = x[:, :, w - 1]`` (w >= 1)
    and the border column keeps its own value. The input is never written (autograd-safe); every output element is
    written once from a fresh tensor, so the op costs one read and one write of ``x``.
    """
    check_choice("pattern", pattern, (1, 2))
    check_input(x, None, ndim=4, layout="NHWC")
    check_divisible("channels (last dim of x)", x.shape[-1], 4, "4 (one quarter per shift direction)")
    h_dim, w_dim = 1, 2
    first, second = (w_dim, h_dim) if pattern == 1 else (h_dim, w_dim)
    out, quarter = torch.empty_like(x), x.shape[-1] // 4
    for i, (dim, step) in enumerate(((first, 1), (first, -1), (second, 1), (second, -1))):
        # narrow gives single views that autograd lets us write into (chunk's multi-output views it does not)
        _shift_into(out.narrow(-1, i * quarter, quarter), x.narrow(-1, i * quarter, quarter), dim, step)
    return out


class TokenMixingMLP(Mlp):
    """Mixer's token-mixing MLP (2105.01601, eq. 1): an :class:`Mlp` applied across tokens, (B, N, C) -> (B, N, C)."""

    def __init__(self, num_tokens: int, hidden_features: int | None = None, *,
                 act_layer: Callable[[], nn.Module] = nn.GELU, drop: float = 0.0) -> None:
        check_positive("num_tokens", num_tokens)
        super().__init__(num_tokens, hidden_features, act_layer=act_layer, drop=drop)
        self.num_tokens = num_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] != self.num_tokens:
            raise InvalidValue(f"expected (B, N={self.num_tokens}, C) tokens, got shape {tuple(x.shape)}; token-mixing "
                               "MLPs are built for one input size")
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention (1706.03762) on (B, N, C) tokens, names ``qkv``/``proj`` as in ViT/SPACH/UniFormer.

    Give ``num_heads`` or ``head_dim`` (UniFormer's convention, ``num_heads = dim // head_dim``).
    """

    def __init__(self, dim: int, num_heads: int | None = 8, *, head_dim: int | None = None, qkv_bias: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        check_positive("dim", dim)
        if head_dim is not None:
            check_divisible("dim", dim, check_positive("head_dim", head_dim), "head_dim")
            num_heads = dim // head_dim
        check_divisible("dim", dim, check_positive("num_heads", num_heads), "num_heads")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.dim, ndim=3, channel_dim=2, layout="(B, N, C)")
        b, n, c = x.shape
        # (B, N, 3C) -> (3, B, heads, N, head_dim)
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class ConvPosEnc(nn.Conv2d):
    """Conditional / dynamic position encoding (CPE 2102.10882, UniFormer's DPE): a depthwise KxK conv, NCHW.

    Returns the encoding only; the caller adds it to its input (``x + cpe(x)``).
    """

    def __init__(self, dim: int, kernel_size: int = 3) -> None:
        check_positive("dim", dim)
        if check_positive("kernel_size", kernel_size) % 2 == 0:
            raise InvalidValue(f"kernel_size must be odd so the encoding keeps the size, got {kernel_size}")
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)


class LocalMHRA(nn.Module):
    """UniFormer's local block (CBlock, 2201.09450 eqs. 1-4), NCHW in and out.

    ``x += DPE(x)``; ``x += conv2(attn(conv1(BN(x))))`` with ``attn`` a depthwise 5x5 conv (local affinity);
    ``x += ConvMlp(BN(x))``. Sub-module names follow the official layout.
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, *, kernel_size: int = 5, drop: float = 0.0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        check_positive("dim", dim)
        if check_positive("kernel_size", kernel_size) % 2 == 0:
            raise InvalidValue(f"kernel_size must be odd so the residual keeps the size, got {kernel_size}")
        self.dim = dim
        self.pos_embed = ConvPosEnc(dim, 3)
        self.norm1 = nn.BatchNorm2d(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.conv2 = nn.Conv2d(dim, dim, 1)  # registered before attn: the official state-dict order
        self.attn = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        x = x + self.drop_path(self.conv2(self.attn(self.conv1(self.norm1(x)))))
        return x + self.drop_path(self.mlp(self.norm2(x)))
