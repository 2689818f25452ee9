"""Shared by the layer tests (imported as ``from training import sgd_losses``): a few SGD steps toward a target."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
