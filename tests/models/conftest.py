"""Fixtures shared by the model-zoo tests: meta-device parameter/MAC counts, toy training, reference files.

The helpers are handed out as fixtures (not imported) so no test depends on which ``conftest`` is importable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from visionmix import reparameterize
from visionmix.bench.profile import count_macs
from visionmix.models import create_model

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"  # key lists copied from the official implementations


@dataclass(frozen=True)
class Stats:
    params: int
    params_no_head: int
    macs: float  # visionmix.bench.profile.count_macs: FlopCounterMode flops / 2


def _model_stats(name: str, input_size: tuple[int, ...] | None = None, *, deploy: bool = False, **kwargs) -> Stats:
    """Parameter counts and MACs of a registered model at batch 1, built on the meta device (no memory, fast).

    MACs come from the package's one counter (``count_macs``, which also counts CPU attention). Eval mode, as MACs
    are counted for inference (and a BN on pooled features, as in selective kernels, needs batch > 1 to train).
    ``deploy=True`` counts the re-parameterised inference form (``visionmix.reparameterize``) instead.
    """
    with torch.device("meta"):
        model = create_model(name, **kwargs).eval()
        if deploy:
            model = reparameterize(model)
        macs = count_macs(model, torch.empty(1, *(input_size or model.pretrained_cfg["input_size"])))
    params = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.get_classifier().parameters())
    return Stats(params, params - head, macs)


def _toy_training_losses(name: str, steps: int = 30, batch: int = 8, seed: int = 0) -> list[float]:
    """Cross-entropy over ``steps`` AdamW steps on one fixed random 10-class batch at the model's default input."""
    torch.manual_seed(seed)
    model = create_model(name, num_classes=10)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *model.pretrained_cfg["input_size"], generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only spins against the other jobs on a shared CPU
    try:
        for _ in range(steps):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    return losses


@pytest.fixture
def reference_dir() -> Path:
    return REFERENCE_DIR


@pytest.fixture
def model_stats():
    """``model_stats(name, input_size=None, **kwargs) -> Stats`` (params, params w/o head, MACs) on meta."""
    return _model_stats


@pytest.fixture
def toy_training_losses():
    """``toy_training_losses(name, steps=30, batch=8) -> list[float]`` on one fixed random batch."""
    return _toy_training_losses
