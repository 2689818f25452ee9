"""Shared by the layer tests (``from training import ...``): a few SGD steps toward a target; random weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from visionmix.reparam import randomize_batchnorm


def sgd_losses(module: nn.Module, inputs: torch.Tensor, target: torch.Tensor, lr: float, steps: int = 8
               ) -> list[float]:
    """MSE of ``module(inputs)`` against ``target``, recorded before each of ``steps`` plain SGD steps."""
    opt = torch.optim.SGD(module.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(module(inputs), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def randomized(block: nn.Module, scale: float, seed: int = 0) -> nn.Module:
    """``block`` in eval mode with N(0, scale^2) parameters in float64 and random BN statistics and affines."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale)
    return randomize_batchnorm(block, seed).eval()
