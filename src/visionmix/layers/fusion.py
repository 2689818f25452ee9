"""Pure fusion functions for structural re-parameterisation (DBB, 2103.13425, transforms I-VI).

Each takes tensors/modules and returns ``(kernel, bias)``; nothing here mutates its inputs.
"""

from __future__ import annotations

import torch
from torch import nn


def fuse_conv_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d | nn.BatchNorm1d,
                 conv_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Transform I: fold an eval-mode BN that follows a conv into the conv's kernel and bias.

    ``BN(W*x + b) = (gamma/std) W*x + beta + (b - mean) gamma/std`` with ``std = sqrt(var + eps)``.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"cannot fuse {bn.__class__.__name__} without running statistics "
                         "(it was built with track_running_stats=False); train it with running stats first")
    std = (bn.running_var + bn.eps).sqrt()
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    scale = gamma / std
    shift = beta - bn.running_mean * scale
    if conv_bias is not None:
        shift = shift + conv_bias * scale
    return kernel * scale.reshape(-1, *([1] * (kernel.dim() - 1))), shift
