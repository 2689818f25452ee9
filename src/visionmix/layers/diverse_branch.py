"""Diverse Branch Block (Ding et al., "Diverse Branch Block: Building a Convolution as an Inception-like Unit",
2103.13425): four BN-terminated branches in training, one KxK conv at inference."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from visionmix.checks import check_conv_channels, check_divisible, check_positive
from visionmix.errors import InvalidValue
from visionmix.layers.basic import ConvBN
from visionmix.layers.fusion import (
    add_branches,
    avg_pool_kernel,
    bn_affine,
    conv2d_from_kernel,
    fuse_conv_bn,
    merge_1x1_kxk,
    pad_kernel,
    square_conv_geometry,
)


class BNAndPad(nn.Module):
    """BN, then pad by ``pad`` pixels with the value the BN gives a zero input (2103.13425, section 3.3).

    Placed between a bias-free 1x1 conv and a KxK/avg-pool stage that itself pads nothing, this reproduces what the
    merged KxK conv sees on its zero-padded input, which makes transform III exact at the borders. The pad value
    ``beta - mean * gamma / std`` uses the running statistics (as the official code), so the equivalence is exact in
    eval mode. The BN is the child ``bn`` (keys ``bn.*``).
    """

    def __init__(self, num_features: int, pad: int) -> None:
        super().__init__()
        self.pad = pad
        self.bn = nn.BatchNorm2d(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(x)
        if self.pad == 0:
            return x
        p = self.pad
        n, c, h, w = x.shape
        out = bn_affine(self.bn)[1].reshape(1, c, 1, 1).expand(n, c, h + 2 * p, w + 2 * p).clone()
        out[:, :, p:-p, p:-p] = x
        return out

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class AvgPoolConv(nn.Module):
    """``nn.AvgPool2d(k, stride, padding)`` (zero padding counted) run as a depthwise conv with a constant 1/k^2
    kernel: the same numbers, about 2x faster than ``avg_pool2d`` on CPU NCHW tensors (measured at 32x64x58x58)."""

    def __init__(self, kernel_size: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, k = x.shape[1], self.kernel_size
        return F.conv2d(x, x.new_full((c, 1, k, k), 1 / k**2), None, self.stride, self.padding, groups=c)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class IdentityConv1x1(nn.Conv2d):
    """A grouped 1x1 conv learning a residual on the identity: kernel = ``weight + I`` with ``weight`` zero-init.

    Key ``weight`` (channels, channels/groups, 1, 1); the identity is a non-persistent buffer.
    """

    def __init__(self, channels: int, groups: int = 1) -> None:
        super().__init__(channels, channels, 1, groups=groups, bias=False)
        nn.init.zeros_(self.weight)
        per_group = channels // groups
        identity = torch.eye(per_group).repeat(groups, 1)[:, :, None, None]  # channel o keeps input o
        self.register_buffer("identity", identity, persistent=False)

    @property
    def kernel(self) -> torch.Tensor:
        return self.weight + self.identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel, None, groups=self.groups)


class DiverseBranchBlock(nn.Module):
    """KxK conv as a sum of four BN-terminated branches (2103.13425, fig. 2); ``reparameterize()`` -> one conv.

    Branches (names/keys as the official DBB, so its checkpoints load with ``strict=True``):

    - ``dbb_origin``: KxK conv + BN;
    - ``dbb_1x1``: 1x1 conv + BN (only if groups < out_channels);
    - ``dbb_avg``: 1x1 conv -> BN-and-pad -> avg-pool(K, stride) -> BN (``conv``, ``bn``, ``avg``, ``avgbn``); in the
      depthwise case (groups == out_channels) just zero-padded avg-pool -> BN;
    - ``dbb_1x1_kxk``: 1x1 conv (``idconv1``, identity-initialised, when internal_channels == in_channels, else a plain
      ``conv1``) -> BN-and-pad -> KxK conv (no padding) -> BN.

    ``internal_channels`` defaults to in_channels, or 2 * in_channels for depthwise blocks (as the paper).
    Any padding in [0, K//2] is exact (the 1x1 branch reads the cropped input when padding < K//2).
    Input/output NCHW.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int | None = None, dilation: int = 1, groups: int = 1, *,
                 internal_channels: int | None = None) -> None:
        super().__init__()
        check_conv_channels(in_channels, out_channels, groups)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        k = self.kernel_size = check_positive("kernel_size", kernel_size)
        if k % 2 == 0:
            raise InvalidValue(f"kernel_size must be odd (the 1x1 and avg branches are centred in it), got {k}")
        self.stride = check_positive("stride", stride)
        if check_positive("dilation", dilation) != 1:
            raise InvalidValue(f"dilation must be 1 (the average-pooling branch has no dilated form), got {dilation}")
        self.padding = k // 2 if padding is None else padding
        if isinstance(self.padding, bool) or not isinstance(self.padding, int) or not 0 <= self.padding <= k // 2:
            raise InvalidValue(f"padding must be an int in [0, {k // 2}] (kernel_size // 2) or None, got {padding!r}")
        depthwise = groups == out_channels
        if depthwise and in_channels != out_channels:
            raise InvalidValue(f"a depthwise DBB (groups == out_channels == {out_channels}) needs in_channels == "
                               f"out_channels, got in_channels={in_channels}")
        if internal_channels is None:
            internal_channels = 2 * in_channels if depthwise else in_channels
        check_divisible("internal_channels", check_positive("internal_channels", internal_channels), groups,
                        "groups")
        p = self.padding

        self.dbb_origin = ConvBN(in_channels, out_channels, k, stride, p, groups=groups)
        if depthwise:
            self.dbb_avg = nn.Sequential(OrderedDict(
                avg=AvgPoolConv(k, stride, p), avgbn=nn.BatchNorm2d(out_channels)))
            self.register_module("dbb_1x1", None)
        else:
            self.dbb_avg = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, 1, groups=groups, bias=False),
                bn=BNAndPad(out_channels, p), avg=AvgPoolConv(k, stride), avgbn=nn.BatchNorm2d(out_channels)))
            self.dbb_1x1 = ConvBN(in_channels, out_channels, 1, stride, 0, groups=groups)
        self.crop = k // 2 - p  # the 1x1 branch reads the pixel under the KxK kernel's centre
        first = (("idconv1", IdentityConv1x1(in_channels, groups)) if internal_channels == in_channels else
                 ("conv1", nn.Conv2d(in_channels, internal_channels, 1, groups=groups, bias=False)))
        self.dbb_1x1_kxk = nn.Sequential(OrderedDict([
            first, ("bn1", BNAndPad(internal_channels, p)),
            ("conv2", nn.Conv2d(internal_channels, out_channels, k, stride, 0, groups=groups, bias=False)),
            ("bn2", nn.BatchNorm2d(out_channels))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dbb_origin(x) + self.dbb_avg(x) + self.dbb_1x1_kxk(x)
        if self.dbb_1x1 is not None:
            c = self.crop
            out = out + self.dbb_1x1(x[..., c:-c, c:-c] if c else x)
        return out

    @torch.no_grad()
    def reparameterize(self) -> nn.Sequential:
        """Fold all branches into one biased KxK conv (transforms I, II, III, V, VI); exact in eval mode.

        Returns ``Sequential(dbb_reparam=<nn.Conv2d>)`` so that deployed keys read ``<name>.dbb_reparam.weight``,
        the official deploy layout.
        """
        k, g = self.kernel_size, self.groups
        branches = [fuse_conv_bn(self.dbb_origin.conv.weight, self.dbb_origin.bn)]
        if self.dbb_1x1 is not None:
            kernel, bias = fuse_conv_bn(self.dbb_1x1.conv.weight, self.dbb_1x1.bn)
            branches.append((pad_kernel(kernel, k), bias))
        avg = self.dbb_avg
        weight = branches[0][0]
        avg_kernel = avg_pool_kernel(self.out_channels, k, g, dtype=weight.dtype, device=weight.device)
        if hasattr(avg, "conv"):
            branches.append(merge_1x1_kxk(*fuse_conv_bn(avg.conv.weight, avg.bn.bn),
                                          *fuse_conv_bn(avg_kernel, avg.avgbn), groups=g))
        else:
            branches.append(fuse_conv_bn(avg_kernel, avg.avgbn))
        seq = self.dbb_1x1_kxk
        first = seq.idconv1.kernel if hasattr(seq, "idconv1") else seq.conv1.weight
        branches.append(merge_1x1_kxk(*fuse_conv_bn(first, seq.bn1.bn), *fuse_conv_bn(seq.conv2.weight, seq.bn2),
                                      groups=g))
        kernel, bias = add_branches(*branches)
        conv = conv2d_from_kernel(kernel, bias, stride=self.stride, padding=self.padding, groups=g)
        return nn.Sequential(OrderedDict(dbb_reparam=conv))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d | ConvBN, *, internal_channels: int | None = None) -> DiverseBranchBlock:
        """A DBB whose eval-mode output equals ``conv``'s at conversion.

        A :class:`ConvBN` becomes ``dbb_origin`` as is. A bare conv's kernel goes into ``dbb_origin.conv`` and its BN
        is set to ``x + conv.bias`` in eval mode (gamma = sqrt(1 + eps), beta = bias). The other branches start with
        BN gamma = 0, so they add exactly zero in either mode until training moves their gammas. In train mode the
        origin BN normalises with batch statistics, so train-mode outputs differ from the conv by design.
        """
        source = conv.conv if isinstance(conv, ConvBN) else conv
        k, stride, padding, dilation = square_conv_geometry(source)
        block = cls(source.in_channels, source.out_channels, k, stride, padding, dilation, source.groups,
                    internal_channels=internal_channels)
        block.to(device=source.weight.device, dtype=source.weight.dtype)
        with torch.no_grad():
            if isinstance(conv, ConvBN):
                block.dbb_origin.load_state_dict(conv.state_dict())
            else:
                block.dbb_origin.conv.weight.copy_(source.weight)
                bn = block.dbb_origin.bn
                bn.weight.fill_(1 + bn.eps).sqrt_()
                if source.bias is not None:
                    bn.bias.copy_(source.bias)
            for bn in block.branch_output_bns()[1:]:
                bn.weight.zero_()
        return block

    def branch_output_bns(self) -> list[nn.BatchNorm2d]:
        """The BN ending each branch, ``dbb_origin``'s first (their gammas scale the branches)."""
        bns = [self.dbb_origin.bn, self.dbb_avg.avgbn, self.dbb_1x1_kxk.bn2]
        return bns if self.dbb_1x1 is None else [*bns, self.dbb_1x1.bn]

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, groups={self.groups}"
