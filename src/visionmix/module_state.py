"""Using a caller's module without changing it: its train/eval flags, the device it lives on, and the process's
TF32 switches while two models are compared."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode for the block; afterwards every submodule has its own flag back (a model whose BNs
    were frozen in eval mode inside a training model stays so)."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in flags:
            m.training = training


def on_device(module: nn.Module, device: str | torch.device) -> nn.Module:
    """``module`` itself if all its tensors are on ``device``, else a copy moved there (``Module.to`` moves in place,
    which would move the caller's model)."""
    device = torch.device(device)
    tensors = [*module.parameters(), *module.buffers()]
    if all(t.device.type == device.type and (device.index is None or t.device.index == device.index)
           for t in tensors):
        return module
    return copy.deepcopy(module).to(device)


@contextmanager
def no_tf32() -> Iterator[None]:
    """TF32 off for the block, the previous switches restored after: an equivalence check compares float32 results
    at 1e-4 of the output's scale, and TF32 matmuls/convolutions (cuDNN's default on Ampere and later) differ from
    float32 by about 1e-3 (10-bit mantissa), which would fail a correct re-parameterisation on the GPU."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
