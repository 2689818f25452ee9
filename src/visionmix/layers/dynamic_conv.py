"""Sample-dependent convolutions: CondConv (1904.04971) and WeightNet (2007.11823).

Both build one kernel per sample and run the whole batch as ONE grouped convolution: the batch is folded into the
channel axis, (B, C_in, H, W) -> (1, B*C_in, H, W), the B kernels are stacked to (B*C_out, C_in/g, kh, kw) and the
conv runs with ``groups = B*g``, so sample b only meets its own kernel. No per-sample Python loop.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from visionmix.checks import check_conv_channels, check_divisible, check_input, check_positive, to_pair
from visionmix.errors import InvalidValue

IntPair = int | tuple[int, int]


def _conv_geometry(in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair,
                   padding: IntPair | None, dilation: IntPair, groups: int
                   ) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Check ``nn.Conv2d``-style arguments; return (kernel, stride, padding, dilation) pairs.

    ``padding=None`` is "same" for odd kernels: ``dilation * (k - 1) // 2`` per axis.
    """
    check_conv_channels(in_channels, out_channels, groups)
    kernel, stride_, dilation_ = (to_pair(name, value) for name, value in
                                  (("kernel_size", kernel_size), ("stride", stride), ("dilation", dilation)))
    if padding is None:
        return kernel, stride_, (dilation_[0] * (kernel[0] - 1) // 2, dilation_[1] * (kernel[1] - 1) // 2), dilation_
    pad = (padding, padding) if isinstance(padding, int) else tuple(padding)
    if len(pad) != 2 or any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in pad):
        raise InvalidValue(f"padding must be None (same), a non-negative int or a pair of them, got {padding!r}")
    return kernel, stride_, pad, dilation_  # type: ignore[return-value]


class _DynamicConv2d(nn.Module):
    """Shared geometry and the batched per-sample convolution of CondConv2d and WeightNetConv2d."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair,
                 padding: IntPair | None, dilation: IntPair, groups: int) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding, self.dilation = _conv_geometry(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups

    @property
    def kernel_shape(self) -> tuple[int, int, int, int]:
        """Shape of one sample's kernel: (C_out, C_in/groups, kh, kw)."""
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def per_sample_conv(self, x: torch.Tensor, kernels: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Convolve sample b of ``x`` (B, C_in, H, W) with ``kernels[b]`` (B, C_out, C_in/g, kh, kw), + ``bias[b]``.

        One grouped conv: (1, B*C_in, H, W) * (B*C_out, C_in/g, kh, kw), groups = B*g -> (B, C_out, H', W').
        An empty batch (B = 0) gives an empty (0, C_out, H', W').
        """
        b, _, h, w = x.shape
        if b == 0:  # groups = B*g would be 0: an empty batch gets its empty output from a plain conv of that shape
            return F.conv2d(x, kernels.new_zeros(self.kernel_shape), None, self.stride, self.padding, self.dilation,
                            self.groups)
        out = F.conv2d(x.reshape(1, b * self.in_channels, h, w), kernels.reshape(b * self.out_channels,
                       *kernels.shape[2:]), None if bias is None else bias.reshape(-1), self.stride, self.padding,
                       self.dilation, b * self.groups)
        return out.view(b, self.out_channels, *out.shape[-2:])

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}")


class CondConv2d(_DynamicConv2d):
    """Conditionally parameterised convolution (CondConv, 1904.04971, eq. 1-2), NCHW in and out.

    ``r = sigmoid(routing(GAP(x)))`` (B, E) is computed inside the layer from its own input (the paper's routing
    function); a block that shares routing between layers (as timm's EfficientNet-CondConv does) passes
    ``routing_weights`` to ``forward`` instead. Sample b's kernel is ``sum_e r[b, e] * weight[e]`` and its bias
    ``sum_e r[b, e] * bias[e]``; the batch runs as one grouped conv (see the module docstring).

    Parameters: ``weight``, the expert kernels (E, C_out, C_in/g, kh, kw) in the state dict, each initialised like
    an ``nn.Conv2d`` kernel, held flat as (E, C_out * C_in/g * kh * kw) (timm's layout: a bank of kernels is not
    an image, and ``model.to(memory_format=torch.channels_last)`` converts every 4-D/5-D tensor it holds);
    :attr:`experts` is the 5-D view. ``bias`` (E, C_out) or None; ``routing`` = Linear(C_in, E).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: IntPair | None = None, dilation: IntPair = 1, groups: int = 1, bias: bool = False, *,
                 num_experts: int = 4) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        self.num_experts = check_positive("num_experts", num_experts)
        self.routing = nn.Linear(in_channels, num_experts)
        self.weight = nn.Parameter(torch.empty(num_experts, math.prod(self.kernel_shape)))
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels)) if bias else None
        self.reset_parameters()

    @property
    def experts(self) -> torch.Tensor:
        """The expert kernels, a (E, C_out, C_in/g, kh, kw) view of ``weight``."""
        return self.weight.view(self.num_experts, *self.kernel_shape)

    def reset_parameters(self) -> None:
        """Each expert gets ``nn.Conv2d``'s default initialisation (kaiming-uniform, a=sqrt(5))."""
        for expert in self.experts:
            nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(math.prod(self.kernel_shape[1:]))
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, C_in, H, W), optional ``routing_weights`` (B, E) -> (B, C_out, H', W')."""
        check_input(x, self.in_channels)
        if routing_weights is None:
            routing_weights = torch.sigmoid(self.routing(x.mean((2, 3))))
        elif routing_weights.shape != (x.shape[0], self.num_experts):
            raise InvalidValue(f"routing_weights must have shape (batch, num_experts) = "
                               f"{(x.shape[0], self.num_experts)}, got {tuple(routing_weights.shape)}")
        kernels = (routing_weights @ self.weight).view(-1, *self.kernel_shape)
        bias = None if self.bias is None else routing_weights @ self.bias
        return self.per_sample_conv(x, kernels, bias)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = destination[prefix + "weight"].view(self.num_experts, *self.kernel_shape)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        weight = state_dict.get(prefix + "weight")
        if weight is not None and weight.shape == (self.num_experts, *self.kernel_shape):
            state_dict[prefix + "weight"] = weight.reshape(self.num_experts, -1)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bias={self.bias is not None}, num_experts={self.num_experts}"


class WeightNetConv2d(_DynamicConv2d):
    """WeightNet convolution (2007.11823, sec. 3.2), NCHW in and out, no bias.

    ``x_gap = reduce(GAP(x))`` (B, R, 1, 1) with R = ``reduce_channels`` = max(16, C_in // 16);
    kernel = ``wn_fc2(sigmoid(wn_fc1(x_gap)))`` reshaped to (B, C_out, C_in/g, kh, kw); one grouped conv.
    ``wn_fc1``: 1x1 conv R -> M*C_out with bias, one group of M gates per output channel.
    ``wn_fc2``: 1x1 conv M*C_out -> C_out * (C_in/g * kh * kw), ``groups = G*C_out``, no bias: each output channel's
    kernel is cut into G equal slices (in C_in, kh, kw order), slice j being a linear map of that channel's gates
    j*M/G ... (j+1)*M/G - 1. Official shapes: wn_fc1 (M*C_out, R, 1, 1), wn_fc2 (C_out*C_in/g*kh*kw, M/G, 1, 1).
    Depthwise (groups == C_in == C_out, WeightNet_DW): the kernel has only kh*kw entries per channel, so
    wn_fc1 gives M/G gates per channel (R -> M/G*C_in) and ``wn_fc2`` has ``groups = C_in`` (one slice).
    Example, ShuffleNetV2 1.0x ``features.0``: WeightNet(24 -> 56, 1x1) has wn_fc1 (112, 16, 1, 1) and wn_fc2
    (1344, 1, 1, 1); the depthwise 3x3 on 56 channels has wn_fc1 (56, 16, 1, 1) and wn_fc2 (504, 1, 1, 1).

    ``reduce`` placement: the official blocks compute ``x_gap`` once per block (``<block>.reduce``, a biased 1x1
    conv C_in -> R) and feed it to all their WeightNets. Standalone (``own_reduce=True``, the default) this layer
    owns a ``reduce`` built the same way; inside such a block use ``own_reduce=False`` (the state dict then holds
    only ``wn_fc1.*`` and ``wn_fc2.weight``) and pass ``x_gap`` to ``forward``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: IntPair | None = None, dilation: IntPair = 1, groups: int = 1, *, M: int = 2, G: int = 2,
                 reduce_channels: int | None = None, own_reduce: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        check_positive("M", M)
        check_divisible("M", M, check_positive("G", G), "G")
        self.M, self.G = M, G
        if reduce_channels is None:
            reduce_channels = max(16, in_channels // 16)
        self.reduce_channels = check_positive("reduce_channels", reduce_channels)
        self.depthwise = groups == in_channels == out_channels
        kernel_numel = math.prod(self.kernel_shape[1:])
        gates, slices = (M // G, 1) if self.depthwise else (M, G)
        if not self.depthwise:
            check_divisible("kernel entries per output channel (in_channels/groups*kh*kw)", kernel_numel, G, "G")
        self.reduce = nn.Conv2d(in_channels, self.reduce_channels, 1) if own_reduce else None
        self.wn_fc1 = nn.Conv2d(self.reduce_channels, gates * out_channels, 1)
        self.wn_fc2 = nn.Conv2d(gates * out_channels, out_channels * kernel_numel, 1, groups=slices * out_channels,
                                bias=False)
        # Start the generated kernel at nn.Conv2d's scale: each entry sums M/G weights times gates of about 1/2.
        bound = 2 / math.sqrt(kernel_numel * self.wn_fc2.weight.shape[1])
        nn.init.uniform_(self.wn_fc2.weight, -bound, bound)

    def forward(self, x: torch.Tensor, x_gap: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, C_in, H, W) -> (B, C_out, H', W'). A given ``x_gap`` (B, R, 1, 1) replaces ``reduce(GAP(x))``."""
        check_input(x, self.in_channels)
        if x_gap is None:
            if self.reduce is None:
                raise InvalidValue("x_gap is required: this WeightNetConv2d was built with own_reduce=False, so the "
                                   "enclosing block must pass reduce(GAP(x)) of shape (B, reduce_channels, 1, 1)")
            x_gap = self.reduce(x.mean((2, 3), keepdim=True))
        elif x_gap.shape != (x.shape[0], self.reduce_channels, 1, 1):
            raise InvalidValue(f"x_gap must have shape (batch, reduce_channels, 1, 1) = "
                               f"{(x.shape[0], self.reduce_channels, 1, 1)}, got {tuple(x_gap.shape)}")
        kernels = self.wn_fc2(torch.sigmoid(self.wn_fc1(x_gap))).view(-1, *self.kernel_shape)
        return self.per_sample_conv(x, kernels, None)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, M={self.M}, G={self.G}, reduce_channels={self.reduce_channels}, "
                f"own_reduce={self.reduce is not None}")
