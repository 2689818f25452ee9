"""RepMLP block, v1 (Ding et al., "RepMLP: Re-parameterizing Convolutions into Fully-connected Layers for Image
Recognition", 2105.01883v1): an FC over image partitions that absorbs parallel convs at inference."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from visionmix.checks import check_conv_channels, check_divisible, check_input, check_positive
from visionmix.errors import InvalidValue
from visionmix.layers.basic import ConvBN
from visionmix.layers.fusion import add_branches, conv_to_fc, fuse_bn_linear, fuse_conv_bn, pad_kernel


def grouped_fc(x: torch.Tensor, fc: nn.Conv2d) -> torch.Tensor:
    """Apply a 1x1 ``nn.Conv2d`` (out, in/groups, 1, 1) as a grouped FC to (N, in) features, giving (N, out).

    Same result as ``fc(x[..., None, None]).flatten(1)``, as one batched matmul: on CPU a grouped 1x1 conv over
    1x1 maps runs about 3x slower.
    """
    if fc.groups == 1:
        return F.linear(x, fc.weight.flatten(1), fc.bias)
    g = fc.groups
    out = torch.einsum("ngi,goi->ngo", x.unflatten(1, (g, -1)), fc.weight.reshape(g, fc.out_channels // g, -1))
    return out.flatten(1) if fc.bias is None else out.flatten(1) + fc.bias


class RepMLPBlock(nn.Module):
    """RepMLP v1 block on (B, C, H, W) -> (B, O, H, W) for one fixed input size H x W (2105.01883v1, section 3).

    The map is cut into (H/h) x (W/w) partitions of h x w pixels.

    - Global Perceptron (when there is more than one partition): ``avg`` (avg-pool to one value per partition and
      channel, then BN) -> ``fc1_fc2`` (fc1 - ReLU - fc2 on the C*(H/h)*(W/w) vector) -> each value is added to every
      pixel of its partition and channel.
    - Partition Perceptron: ``fc3``, a grouped FC (1x1 conv with ``fc3_groups`` groups) from C*h*w to O*h*w per
      partition, then ``fc3_bn`` (BN over the O*h*w features).
    - Local Perceptron: ``repconv{K}`` (conv K x K with padding K//2 and ``fc3_groups`` groups, then BN) on each
      partition for K in ``reparam_conv_k``, added to the Partition Perceptron's output.

    ``reparameterize()`` folds every BN and conv into fc1 and fc3 (conv -> FC by an identity batch, eq. 11) and returns
    the ``deploy=True`` block: keys ``fc1_fc2.fc1.*``, ``fc1_fc2.fc2.*``, ``fc3.weight``, ``fc3.bias`` as in the
    official v1 code, whose train-form keys this layout also matches.
    """

    def __init__(self, in_channels: int, out_channels: int, H: int, W: int, h: int, w: int, *,
                 reparam_conv_k: Sequence[int] | None = (1, 3, 5), fc1_fc2_reduction: int = 1, fc3_groups: int = 1,
                 deploy: bool = False) -> None:
        super().__init__()
        check_conv_channels(in_channels, out_channels, fc3_groups, "fc3_groups")
        self.in_channels, self.out_channels, self.fc3_groups = in_channels, out_channels, fc3_groups
        for name, size, part in (("H", H, h), ("W", W, w)):
            check_divisible(name, check_positive(name, size), check_positive(name.lower(), part), name.lower())
        self.H, self.W, self.h, self.w = H, W, h, w
        self.reparam_conv_k = () if deploy or reparam_conv_k is None else tuple(reparam_conv_k)
        for k in self.reparam_conv_k:
            if check_positive("reparam_conv_k", k) % 2 == 0:
                raise InvalidValue(f"reparam_conv_k must hold odd kernel sizes ('same' padding), "
                                   f"got {reparam_conv_k!r}")
        if len(set(self.reparam_conv_k)) != len(self.reparam_conv_k):
            raise InvalidValue(f"reparam_conv_k has repeated sizes: {reparam_conv_k!r}")
        self.deploy = deploy

        self.num_partitions = (H // h) * (W // w)
        self.fc1_fc2_reduction = check_positive("fc1_fc2_reduction", fc1_fc2_reduction)
        if self.num_partitions > 1:
            features = in_channels * self.num_partitions
            hidden = features // fc1_fc2_reduction
            if hidden == 0:
                raise InvalidValue(f"fc1_fc2_reduction={fc1_fc2_reduction} leaves no hidden units for {features} "
                                   "global features")
            self.fc1_fc2 = nn.Sequential(OrderedDict(
                fc1=nn.Linear(features, hidden), relu=nn.ReLU(), fc2=nn.Linear(hidden, features)))
            pool = nn.AvgPool2d((h, w))
            self.avg = pool if deploy else nn.Sequential(OrderedDict(avg=pool, bn=nn.BatchNorm2d(in_channels)))
        else:
            self.register_module("fc1_fc2", None)
            self.register_module("avg", None)
        self.fc3 = nn.Conv2d(in_channels * h * w, out_channels * h * w, 1, groups=fc3_groups, bias=deploy)
        self.fc3_bn = nn.Identity() if deploy else nn.BatchNorm1d(out_channels * h * w)
        for k in self.reparam_conv_k:
            self.add_module(f"repconv{k}", ConvBN(in_channels, out_channels, k, padding=k // 2, groups=fc3_groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels)
        if x.shape[-2:] != (self.H, self.W):
            raise InvalidValue(f"expected a {self.H}x{self.W} input (RepMLP's FC is built for one size), "
                               f"got {x.shape[-2]}x{x.shape[-1]}")
        b, c, hp, wp = x.shape[0], self.in_channels, self.H // self.h, self.W // self.w
        if self.fc1_fc2 is not None:  # Global Perceptron: one value per (channel, partition), broadcast over it
            glob = self.fc1_fc2(self.avg(x).flatten(1)).reshape(b, c, hp, 1, wp, 1)
            x = (x.reshape(b, c, hp, self.h, wp, self.w) + glob).reshape(b, c, self.H, self.W)
        partitions = rearrange(x, "b c (hp h) (wp w) -> (b hp wp) c h w", h=self.h, w=self.w)
        out = self.fc3_bn(grouped_fc(partitions.reshape(-1, c * self.h * self.w), self.fc3))
        out = out.reshape(-1, self.out_channels, self.h, self.w)
        for k in self.reparam_conv_k:
            out = out + getattr(self, f"repconv{k}")(partitions)
        return rearrange(out, "(b hp wp) o h w -> b o (hp h) (wp w)", hp=hp, wp=wp)

    @torch.no_grad()
    def reparameterize(self) -> RepMLPBlock:
        """The ``deploy=True`` block with every BN and conv folded into fc1/fc3; exact in eval mode.

        A block that is already deployed is returned as is.
        """
        if self.deploy:
            return self
        weight, bias = fuse_conv_bn(self.fc3.weight, self.fc3_bn)  # (O*h*w, C*h*w/groups, 1, 1), (O*h*w,)
        if self.reparam_conv_k:
            size = max(self.reparam_conv_k)
            kernel, conv_bias = add_branches(*(
                (pad_kernel(kernel, size), b) for kernel, b in (
                    fuse_conv_bn(branch.conv.weight, branch.bn) for branch in
                    (getattr(self, f"repconv{k}") for k in self.reparam_conv_k))))
            fc_weight, fc_bias = conv_to_fc(kernel, conv_bias, self.h, self.w, self.fc3_groups)
            weight, bias = weight + fc_weight.reshape_as(weight), bias + fc_bias
        deployed = RepMLPBlock(self.in_channels, self.out_channels, self.H, self.W, self.h, self.w,
                               fc1_fc2_reduction=self.fc1_fc2_reduction, fc3_groups=self.fc3_groups, deploy=True)
        deployed.to(device=weight.device, dtype=weight.dtype)
        if self.fc1_fc2 is not None:
            deployed.fc1_fc2.load_state_dict(self.fc1_fc2.state_dict())
            fc1 = deployed.fc1_fc2.fc1
            fc1_weight, fc1_bias = fuse_bn_linear(self.avg.bn, fc1.weight, fc1.bias, self.num_partitions)
            fc1.weight.copy_(fc1_weight)
            fc1.bias.copy_(fc1_bias)
        deployed.fc3.weight.copy_(weight)
        deployed.fc3.bias.copy_(bias)
        return deployed.train(self.training)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, H={self.H}, W={self.W}, h={self.h}, w={self.w}, "
                f"reparam_conv_k={self.reparam_conv_k}, fc3_groups={self.fc3_groups}, deploy={self.deploy}")

