"""Depthwise over-parameterised convolution, DO-Conv (Cao et al., 2006.12030)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from visionmix.checks import check_choice, check_conv_channels, check_positive, same_padding
from visionmix.errors import InvalidValue
from visionmix.layers.fusion import conv2d_from_kernel, square_conv_geometry

GROUPINGS = ("visionmix", "official")


class DOConv2d(nn.Module):
    """A KxK conv whose kernel is composed from a depthwise kernel D and a conventional kernel W (2006.12030, eq. 4).

    ``W`` is (out, in/groups, D_mul) and ``D`` is (in, K*K, D_mul). The kernel used in each forward is
    ``kernel[o, c, s] = sum_d (D + d_diag)[i, s, d] * W[o, c, d]``, where ``i`` is the input channel that ``c``
    stands for in o's group; ``d_diag`` is a frozen buffer holding ``D_mul // (K*K)`` identity blocks (then zeros),
    so with ``D`` starting at zero the layer starts as a plain conv with kernel ``sum of W's K*K blocks``.
    Over-parameterisation changes training only: ``reparameterize()`` returns one ``nn.Conv2d`` (bias iff this
    layer has one), so the deployed parameter count equals the plain conv's.

    A 1x1 DO-Conv is a plain conv (``W`` is (out, in/groups, 1), no ``D``). Names and shapes follow the official
    layout (``W``, ``D``, ``d_diag``, ``bias``). ``grouping`` says which D row composes with ``W[o, c]`` when
    groups > 1: ``"visionmix"`` pairs it with the input channel those weights read (``i = group(o) * in/groups +
    c``); ``"official"`` is the official code's reshape of W to (out/groups, in, D_mul), which pairs it with
    ``i = (o * in/groups + c) mod in``, so the official grouped checkpoints compute what they were trained to.
    Both are the same for groups = 1 (see :attr:`grouping_matters`). Input/output NCHW.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int | None = None, dilation: int = 1, groups: int = 1, bias: bool = False, *,
                 D_mul: int | None = None, grouping: str = "visionmix") -> None:
        super().__init__()
        check_conv_channels(in_channels, out_channels, groups)
        check_choice("grouping", grouping, GROUPINGS)
        self.grouping = grouping
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        k = check_positive("kernel_size", kernel_size)
        self.kernel_size = (k, k)
        self.stride = check_positive("stride", stride)
        self.dilation = check_positive("dilation", dilation)
        self.padding = same_padding(k, dilation) if padding is None else padding
        if isinstance(self.padding, bool) or not isinstance(self.padding, int) or self.padding < 0:
            raise InvalidValue(f"padding must be a non-negative int or None ('same'), got {padding!r}")
        taps = k * k
        if taps == 1:
            if D_mul not in (None, 1):
                raise InvalidValue(f"D_mul={D_mul} has no effect on a 1x1 kernel (a 1x1 DO-Conv is a plain conv); "
                                   "leave it None")
            D_mul = 1
        elif D_mul is None:
            D_mul = taps
        elif check_positive("D_mul", D_mul) < taps:
            raise InvalidValue(f"D_mul must be >= kernel_size**2 = {taps} (fewer columns cannot represent every "
                               f"{k}x{k} kernel), got {D_mul}")
        self.D_mul = D_mul
        self.W = nn.Parameter(torch.empty(out_channels, in_channels // groups, D_mul))
        if taps > 1:
            self.D = nn.Parameter(torch.zeros(in_channels, taps, D_mul))
            identity = torch.eye(taps).repeat(1, D_mul // taps)
            identity = F.pad(identity, (0, D_mul % taps))  # (taps, D_mul): identity blocks, then zero columns
            self.register_buffer("d_diag", identity.expand(in_channels, taps, D_mul).clone())
        else:
            self.register_parameter("D", None)
            self.register_buffer("d_diag", None)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Conv2d``'s initialisation for W and bias (fan-in = in/groups * D_mul); D back to zero."""
        nn.init.kaiming_uniform_(self.W, a=math.sqrt(5))
        if self.D is not None:
            nn.init.zeros_(self.D)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.W.shape[1] * self.W.shape[2])
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def weight(self) -> torch.Tensor:
        """The composed kernel (out, in/groups, K, K) this layer convolves with; differentiable in W and D."""
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        if self.D is None:
            return self.W.reshape(shape)
        g = self.groups
        if self.grouping == "official":  # W as (out/g, in, D_mul): row i of D meets W's i-th column block
            conventional = self.W.reshape(self.out_channels // g, self.in_channels, self.D_mul)
            return torch.einsum("isd,oid->ois", self.D + self.d_diag, conventional).reshape(shape)
        depthwise = (self.D + self.d_diag).reshape(g, self.in_channels // g, -1, self.D_mul)  # (g, c, s, d)
        conventional = self.W.reshape(g, self.out_channels // g, self.in_channels // g, self.D_mul)  # (g, o, c, d)
        return torch.einsum("gcsd,gocd->gocs", depthwise, conventional).reshape(shape)

    @property
    def grouping_matters(self) -> bool:
        """Whether the two ``grouping`` conventions compose different kernels for this layer's shape."""
        if self.D is None:
            return False
        per_group = self.in_channels // self.groups
        o = torch.arange(self.out_channels).unsqueeze(1)
        c = torch.arange(per_group).unsqueeze(0)
        visionmix_rows = o // (self.out_channels // self.groups) * per_group + c
        return not torch.equal(visionmix_rows, (o * per_group + c) % self.in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    @torch.no_grad()
    def reparameterize(self) -> nn.Conv2d:
        """Return the plain ``nn.Conv2d`` with the composed kernel (and this layer's bias, if any); exact."""
        return conv2d_from_kernel(self.weight, self.bias, stride=self.stride, padding=self.padding,
                                  dilation=self.dilation, groups=self.groups)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, D_mul: int | None = None, grouping: str = "visionmix") -> DOConv2d:
        """A DO-Conv computing exactly ``conv`` at initialisation: its kernel goes into W's first K*K columns.

        With ``D = 0`` the composed kernel is ``W[..., :K*K]`` plus the other identity blocks of W (set to zero),
        so outputs match ``conv`` in any mode; the extra columns and D then learn.
        """
        k, stride, padding, dilation = square_conv_geometry(conv)
        layer = cls(conv.in_channels, conv.out_channels, k, stride, padding, dilation, conv.groups,
                    conv.bias is not None, D_mul=D_mul, grouping=grouping)
        layer.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            layer.W.zero_()
            layer.W[..., : k * k] = conv.weight.flatten(2)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, D_mul={self.D_mul}, "
                f"bias={self.bias is not None}, grouping={self.grouping!r}")
