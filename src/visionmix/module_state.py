"""Using a caller's module without changing it: its train/eval flags and the device it lives on."""

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
