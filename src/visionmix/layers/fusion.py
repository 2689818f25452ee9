"""Pure fusion functions for structural re-parameterisation (DBB, 2103.13425, transforms I-VI; RepMLP, 2105.01883).

Kernels use ``nn.Conv2d``'s layout (out, in/groups, kH, kW). Each function takes tensors/modules and returns new
tensors (``(kernel, bias)`` for the transforms); nothing here mutates its inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from visionmix.errors import InvalidValue


def bn_affine(bn: nn.BatchNorm1d | nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode BN as a per-channel affine map ``x * scale + shift`` (running statistics)."""
    if bn.running_mean is None or bn.running_var is None:
        raise InvalidValue(f"cannot fuse {bn.__class__.__name__} without running statistics "
                           "(it was built with track_running_stats=False); train it with running stats first")
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std if bn.affine else std.reciprocal()
    shift = -bn.running_mean * scale
    if bn.affine:
        shift = shift + bn.bias
    return scale, shift


def fuse_conv_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d | nn.BatchNorm1d,
                 conv_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Transform I: fold an eval-mode BN that follows a conv into the conv's kernel and bias.

    ``BN(W*x + b) = (gamma/std) W*x + beta + (b - mean) gamma/std`` with ``std = sqrt(var + eps)``.
    """
    scale, shift = bn_affine(bn)
    if conv_bias is not None:
        shift = shift + conv_bias * scale
    return kernel * scale.reshape(-1, *([1] * (kernel.dim() - 1))), shift


def fuse_bn_linear(bn: nn.BatchNorm1d | nn.BatchNorm2d, weight: torch.Tensor, bias: torch.Tensor,
                   features_per_channel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BN that *precedes* a linear layer into its (out, in) weight and bias.

    The linear layer reads the BN's C channels flattened channel-major, ``features_per_channel`` features each:
    ``W (s * v + t) + b = (W diag(s)) v + (W t + b)``.
    """
    scale, shift = (p.repeat_interleave(features_per_channel) for p in bn_affine(bn))
    return weight * scale, bias + weight @ shift


def add_branches(*branches: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Transform II: parallel branches of the same shape add up kernel-wise and bias-wise."""
    kernels, biases = zip(*branches, strict=True)
    return torch.stack(kernels).sum(0), torch.stack(biases).sum(0)


def merge_1x1_kxk(kernel1: torch.Tensor, bias1: torch.Tensor, kernel2: torch.Tensor, bias2: torch.Tensor,
                  groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Transform III: a 1x1 conv (mid, in/g, 1, 1) + bias1 followed by a KxK conv (out, mid/g, K, K) + bias2.

    Exact when the KxK conv sees the 1x1 output padded with ``bias1`` (DBB's BN-and-pad), i.e. what the 1x1 conv
    would output on the zero padding of its input. Grouped convs stay grouped: group j of the KxK conv only reads
    group j of the 1x1 output, so ``W[o, i] = sum_m W2[o, m] W1[m, i]`` within each group.
    """
    mid, in_per_group = kernel1.shape[:2]
    out, mid_per_group, kh, kw = kernel2.shape
    if mid_per_group * groups != mid:
        raise InvalidValue(f"the KxK kernel reads {mid_per_group}x{groups} channels but the 1x1 kernel makes {mid}")
    w1 = kernel1.reshape(groups, mid_per_group, in_per_group)
    w2 = kernel2.reshape(groups, out // groups, mid_per_group, kh, kw)
    kernel = torch.einsum("gomuv,gmi->goiuv", w2, w1).reshape(out, in_per_group, kh, kw)
    bias = torch.einsum("gom,gm->go", w2.sum((3, 4)), bias1.reshape(groups, mid_per_group)).reshape(out)
    return kernel, bias + bias2


def avg_pool_kernel(channels: int, kernel_size: int, groups: int = 1, *, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Transform V: ``AvgPool2d(k)`` (with ``count_include_pad``) as a (channels, channels/groups, k, k) conv kernel.

    Output channel o averages input channel o, which sits at position ``o % (channels/groups)`` of its group.
    """
    per_group = channels // groups
    picks = torch.eye(per_group, dtype=dtype, device=device).repeat(groups, 1)  # (channels, channels/groups)
    return picks[:, :, None, None].expand(-1, -1, kernel_size, kernel_size) / kernel_size**2


def pad_kernel(kernel: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Transform VI: zero-pad a smaller odd kernel to ``kernel_size`` around its centre."""
    pad = (kernel_size - kernel.shape[-1]) // 2
    return F.pad(kernel, [pad] * 4) if pad else kernel


def conv_to_fc(kernel: torch.Tensor, bias: torch.Tensor, height: int, width: int, groups: int = 1
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """RepMLP's conv -> FC (2105.01883, eq. 11): a "same"-padded conv on (C, h, w) maps as a grouped FC.

    Returns the FC weight (O*h*w, C*h*w/groups) and bias (O*h*w,), features flattened channel-major like
    ``x.flatten(1)``, found by feeding an identity batch through the conv. The identity has the kernel's dtype and
    device: ``torch.eye`` in the default dtype would silently round a float64 kernel to float32.
    """
    out, in_per_group, kh, kw = kernel.shape
    features = in_per_group * height * width
    # Row b is basis vector b of one group's input, repeated so that every group sees it in the same pass.
    basis = torch.eye(features, dtype=kernel.dtype, device=kernel.device).repeat(1, groups)
    response = F.conv2d(basis.reshape(features, in_per_group * groups, height, width), kernel,
                        padding=(kh // 2, kw // 2), groups=groups)  # (features, O, h, w)
    return response.reshape(features, out * height * width).t(), bias.repeat_interleave(height * width)


def conv2d_from_kernel(kernel: torch.Tensor, bias: torch.Tensor | None, *, stride: int | tuple[int, int] = 1,
                       padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1, groups: int = 1
                       ) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` holding ``kernel`` (out, in/groups, kH, kW) and ``bias`` (detached copies)."""
    out, in_per_group, kh, kw = kernel.shape
    conv = nn.Conv2d(in_per_group * groups, out, (kh, kw), stride, padding, dilation, groups, bias=bias is not None,
                     device=kernel.device, dtype=kernel.dtype)
    with torch.no_grad():
        conv.weight.copy_(kernel)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


def square_conv_geometry(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """``(kernel_size, stride, padding, dilation)`` of a conv that uses one value per axis and zero padding.

    Raises ``ValueError`` for anything a square re-parameterised block cannot stand in for (non-square kernels,
    unequal strides/dilations/paddings, asymmetric "same" padding, non-zero padding modes).
    """
    (kh, kw), padding = conv.kernel_size, conv.padding
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same" and kh % 2 and kw % 2:
        padding = (conv.dilation[0] * (kh - 1) // 2, conv.dilation[1] * (kw - 1) // 2)
    if (kh != kw or isinstance(padding, str) or len({*conv.stride}) != 1 or len({*conv.dilation}) != 1
            or len({*padding}) != 1 or conv.padding_mode != "zeros"):
        raise InvalidValue(f"expected a square kernel with one stride, dilation and zero padding for both axes, "
                           f"got {conv}")
    return kh, conv.stride[0], padding[0], conv.dilation[0]
