"""Poly-scale convolution (PSConv, 2007.06191), with the official parameter layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from visionmix.checks import check_conv_channels, check_input, check_positive, to_pair
from visionmix.errors import InvalidValue


def _swap_halves(t: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    """Split ``dim`` into ``groups`` equal groups and swap the two halves of each."""
    return t.unflatten(dim, (groups, 2, -1)).flip(dim + 1).flatten(dim, dim + 2)


class PSConv2d(nn.Module):
    """Poly-scale convolution (PSConv, 2007.06191, sec. 3.2), NCHW in and out; covers PSConv2d and PSGConv2d.

    Every (output, input) channel pair has its own dilation, cycling with period ``parts`` = P over both axes, so one
    layer sees several scales. Channel -> dilation map (the official implementation's): within a conv group, input
    channel i lies in part ``p_in = i // (C_in/(groups*P))`` and output channel o in part
    ``p_out = (o mod C_out/groups) // (C_out/(groups*P))``; with ``s = (p_in - p_out) mod P`` the pair's dilation is
    ``dilation`` if s == 0, ``2*dilation`` if s == P/2, and 1 otherwise. For P = 4 an output part sees its input
    parts, from its own onwards, at dilations (d, 1, 2d, 1).

    Fast form (the official one), all with "same" padding:
    ``conv`` dense kernel at dilation 1 with the d / 2d pairs masked out (``dense_mask``, a non-persistent buffer)
    + ``gwconv`` (groups*P groups, dilation d: the s == 0 pairs)
    + ``gwconv_shift`` (groups*P groups, dilation 2d) on the input with the two halves of every group swapped
    (the s == P/2 pairs; we swap its output rows instead, which sums the same without copying the input).
    With P = 2 every pair is a d or 2d pair and ``conv`` keeps no active entry. Official shapes: gwconv /
    gwconv_shift (C_out, C_in/(groups*P), k, k), conv (C_out, C_in/groups, k, k); the layer's effective parameters
    equal a plain conv's, C_out*C_in/groups*k*k.
    The mask multiplies the dense kernel in ``forward``, so masked entries never act and get zero gradient.
    ``bias=True`` adds one bias, ``conv.bias`` (the official code would add three redundant ones).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int | tuple[int, int] = 1,
                 padding: int | None = None, dilation: int = 2, groups: int = 1, *, parts: int = 4,
                 bias: bool = False) -> None:
        super().__init__()
        check_positive("groups", groups)
        if check_positive("parts", parts) % 2:
            raise InvalidValue(f"parts must be even (the 2*dilation pairs swap half of the parts), got {parts}")
        check_conv_channels(in_channels, out_channels, groups * parts, "groups*parts")
        if check_positive("kernel_size", kernel_size) % 2 == 0:
            raise InvalidValue(f"kernel_size must be odd (every dilation must keep the same centre), got {kernel_size}")
        half = (kernel_size - 1) // 2
        if padding is not None and padding != half:
            raise InvalidValue(f"padding must be None or (kernel_size-1)//2={half}: the three dilations only give "
                               f"equal output sizes with 'same' padding, got {padding}")
        self.dilation = check_positive("dilation", dilation)
        self.in_channels, self.out_channels, self.groups, self.parts = in_channels, out_channels, groups, parts
        self.kernel_size, self.stride = kernel_size, to_pair("stride", stride)
        self.gwconv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, half * dilation, dilation,
                                groups * parts, bias=False)
        self.gwconv_shift = nn.Conv2d(in_channels, out_channels, kernel_size, stride, half * 2 * dilation,
                                      2 * dilation, groups * parts, bias=False)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, half, groups=groups, bias=bias)
        shift = self._part_shift()
        self.register_buffer("dense_mask", ((shift != 0) & (shift != parts // 2))[:, :, None, None],
                             persistent=False)
        with torch.no_grad():
            self.conv.weight.mul_(self.dense_mask)

    def _part_shift(self) -> torch.Tensor:
        """(C_out, C_in/groups) long tensor of ``s = (p_in - p_out) mod P`` (see the class docstring)."""
        out_per_group, in_per_group = self.out_channels // self.groups, self.in_channels // self.groups
        p_out = torch.arange(self.out_channels) % out_per_group // (out_per_group // self.parts)
        p_in = torch.arange(in_per_group) // (in_per_group // self.parts)
        return (p_in[None, :] - p_out[:, None]) % self.parts

    def dilation_map(self) -> torch.Tensor:
        """(C_out, C_in/groups) long tensor: the dilation of every (output, input-within-group) channel pair."""
        shift = self._part_shift()
        return torch.where(shift == 0, self.dilation, torch.where(shift == self.parts // 2, 2 * self.dilation, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels)
        c, s = self.conv, self.gwconv_shift
        out = F.conv2d(x, c.weight * self.dense_mask, c.bias, c.stride, c.padding, 1, self.groups)
        out += self.gwconv(x)  # in place: a conv's backward does not need its output
        # gwconv_shift(half-swapped x) equals gwconv_shift with half-swapped output rows applied to x, its output
        # halves then swapped back: added below through views, so x is never copied.
        shifted = F.conv2d(x, _swap_halves(s.weight, self.groups, dim=0), None, s.stride, s.padding, s.dilation,
                           s.groups)
        out_halves, shifted_halves = out.unflatten(1, (self.groups, 2, -1)), shifted.unflatten(1, (self.groups, 2, -1))
        out_halves[:, :, 0] += shifted_halves[:, :, 1]
        out_halves[:, :, 1] += shifted_halves[:, :, 0]
        return out

    def poly_kernel(self) -> torch.Tensor:
        """The (C_out, C_in/groups, k, k) kernel of every channel pair; pair (o, i) acts at ``dilation_map()[o, i]``."""
        shift = self._part_shift()
        part_in = self.in_channels // (self.groups * self.parts)
        # gwconv_shift's group for output part p reads input part p + P/2: the same slot after the half swap.
        i_local = torch.arange(self.in_channels // self.groups) % part_in
        kernel = self.conv.weight * self.dense_mask
        for weight, s in ((self.gwconv.weight, 0), (self.gwconv_shift.weight, self.parts // 2)):
            kernel = torch.where((shift == s)[:, :, None, None], weight[:, i_local], kernel)
        return kernel

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Slow, obviously correct form for tests: one single-channel conv per (output, input) pair, summed."""
        kernel, dilations = self.poly_kernel(), self.dilation_map().tolist()
        in_per_group, out_per_group = self.in_channels // self.groups, self.out_channels // self.groups
        outputs = []
        for o in range(self.out_channels):
            first_in = o // out_per_group * in_per_group
            acc = 0
            for i in range(in_per_group):
                d = dilations[o][i]
                acc = acc + F.conv2d(x[:, first_in + i: first_in + i + 1], kernel[o, i][None, None], None,
                                     self.stride, d * (self.kernel_size - 1) // 2, d)
            outputs.append(acc)
        out = torch.cat(outputs, dim=1)
        return out if self.conv.bias is None else out + self.conv.bias[:, None, None]

    @property
    def num_effective_parameters(self) -> int:
        """Trainable entries that act: both group kernels, the unmasked dense entries and the bias."""
        k2 = self.kernel_size ** 2
        bias = 0 if self.conv.bias is None else self.conv.bias.numel()
        return self.gwconv.weight.numel() + self.gwconv_shift.weight.numel() + int(self.dense_mask.sum()) * k2 + bias

    def extra_repr(self) -> str:
        return f"parts={self.parts}, dilation=(1, {self.dilation}, {2 * self.dilation})"
