"""Test-only models, registered for the test modules that use them (the ``tiny_models`` fixture of conftest.py) and
by the processes tests start (:func:`register`); unregistered afterwards, so the zoo tests never see them.

``tiny_test_net``: conv-BN-GELU stem, a residual conv block behind DropPath, mean pool, linear head: ~1k params,
fast enough for multi-epoch runs in a test, and it uses the global RNG (drop-path) so exact resume must restore it.
``tiny_test_dbb``: the same with a Diverse Branch Block, so ``eval --deploy`` has something to fold.
Knobs for failure and timing tests: ``step_delay`` (seconds slept per training forward; ``later_delay`` from
training forward ``later_from_call`` on), ``nan_at_call`` (the n-th training forward returns NaN logits),
``nan_from_call`` (every one from the n-th on does) and ``inf_grad_at_call`` (the n-th one's logits get infinite
gradients).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from visionmix.layers.basic import DropPath
from visionmix.models import register_model, unregister_model


class _InfGrad(torch.autograd.Function):
    """The identity whose gradient is infinite (an overflow in the backward pass)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, float("inf"))


class TinyNet(nn.Module):
    def __init__(self, *, num_classes: int = 10, in_chans: int = 1, img_size: int = 28, drop_path_rate: float = 0.1,
                 width: int = 8, bn: bool = True, dbb: bool = False, step_delay: float = 0.0,
                 later_delay: float | None = None, later_from_call: int = 0, nan_at_call: int | None = None,
                 nan_from_call: int | None = None, inf_grad_at_call: int | None = None) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_chans, width, 3, stride=2, padding=1, bias=not bn)
        self.norm = nn.BatchNorm2d(width) if bn else nn.Identity()
        if dbb:
            from visionmix.layers.diverse_branch import DiverseBranchBlock

            self.block = DiverseBranchBlock(width, width, 3)
        else:
            self.block = nn.Conv2d(width, width, 3, padding=1)
        self.drop_path = DropPath(drop_path_rate)
        self.head = nn.Linear(width, num_classes)
        self.step_delay, self.nan_at_call, self.calls = step_delay, nan_at_call, 0
        self.nan_from_call, self.inf_grad_at_call = nan_from_call, inf_grad_at_call
        self.knobs = any(v is not None for v in (later_delay, nan_at_call, nan_from_call, inf_grad_at_call)) or bool(
            step_delay)
        self.later_delay, self.later_from_call = later_delay, later_from_call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm(self.stem(x)))
        x = x + self.drop_path(F.gelu(self.block(x)))
        logits = self.head(x.mean((2, 3)))
        if self.training and self.knobs:  # without knobs no Python state: torch.compile traces one graph
            self.calls += 1
            later = self.later_delay is not None and self.calls >= self.later_from_call
            time.sleep(self.later_delay if later else self.step_delay)
            if self.calls == self.nan_at_call or (self.nan_from_call is not None and self.calls >= self.nan_from_call):
                logits = logits * float("nan")
            if self.calls == self.inf_grad_at_call:
                logits = _InfGrad.apply(logits)
        return logits

    def no_weight_decay(self) -> set[str]:
        return {"head.weight"}


def tiny_test_net(**kwargs) -> TinyNet:
    return TinyNet(**kwargs)


def tiny_test_dbb(**kwargs) -> TinyNet:
    return TinyNet(dbb=True, **kwargs)


def register() -> None:
    """Register ``tiny_test_net`` and ``tiny_test_dbb`` (in a process a test starts)."""
    register_model(tiny_test_net)
    register_model(tiny_test_dbb)


@contextmanager
def registered() -> Iterator[None]:
    """The test models registered for the block."""
    register()
    try:
        yield
    finally:
        unregister_model("tiny_test_net")
        unregister_model("tiny_test_dbb")
