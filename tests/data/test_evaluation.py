"""The one evaluation transform: timm's resize + centre crop geometry, the resolver's decisions per recipe, and the
same tensors whether an image file goes through predict's path or the streaming loader's."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from kornia.geometry.transform import resize
from PIL import Image

from visionmix.data.evaluation import EvalTransform, resolve_eval_transform
from visionmix.data.sources import ImageFolderSource
from visionmix.data.streaming import StreamingLoader

CFG = {"input_size": (3, 16, 16), "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.3, 0.4), "crop_pct": 0.875,
       "interpolation": "bicubic"}


def image(c: int = 3, h: int = 24, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("h", "w"), [(20, 30), (30, 20), (18, 18), (21, 21), (40, 25)])
def test_eval_transform_matches_timm_offsets(h: int, w: int) -> None:
    size, crop_pct = 16, 0.875
    img = image(3, h, w)
    short = math.floor(size / crop_pct)  # 18
    new = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    if new == (h, w):
        resized = img
    else:
        resized = resize(img[None].float(), new, interpolation="bicubic", antialias=True)[0].round().clamp(0, 255)
    top, left = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    expected = resized.to(torch.uint8)[:, top: top + size, left: left + size]
    out = EvalTransform(3, (size, size), CFG["mean"], CFG["std"], crop_pct, "bicubic")(img, None)
    assert out.shape == (3, size, size) and out.dtype == torch.uint8
    assert torch.equal(out, expected)


def test_the_resolver_per_recipe_and_overrides() -> None:
    timm = resolve_eval_transform(CFG)
    assert timm == EvalTransform(3, (16, 16), CFG["mean"], CFG["std"], 0.875, "bicubic")
    small = resolve_eval_transform(CFG, "small", in_chans=1, image_size=28, mean=(0.3,), std=(0.4,), crop_pct=0.9)
    assert small == EvalTransform(1, (28, 28), (0.3,), (0.4,), None, "bilinear")  # crop_pct does not apply
    deit = resolve_eval_transform(CFG, "deit", image_size=(24, 24))
    assert (deit.size, deit.crop_pct, deit.interpolation) == ((24, 24), 0.875, "bicubic")
    assert resolve_eval_transform(CFG, "deit", crop_pct=0.95).crop_pct == 0.95
    with pytest.raises(ValueError, match="recipe"):
        resolve_eval_transform(CFG, "large")
    with pytest.raises(ValueError, match="crop_pct"):
        resolve_eval_transform(CFG, crop_pct=1.5)
    with pytest.raises(ValueError, match="interpolation"):
        resolve_eval_transform(CFG, interpolation="lanczos")
    with pytest.raises(ValueError, match="uint8"):
        timm(torch.zeros(3, 8, 8))


@pytest.mark.parametrize("recipe", ["small", "deit"])
def test_a_file_gives_the_loaders_tensor(tmp_path: Path, recipe: str) -> None:
    """predict (``read``: decode, transform, normalise) and the run's streamed evaluation (the source decodes, the
    loader transforms, the pipeline normalises) give the same tensor for the same PNG and JPEG files."""
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i, (h, w) in enumerate([(30, 41), (45, 23), (16, 16)]):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "train" / cls / f"{i}.{'png' if i % 2 else 'jpg'}")
    source = ImageFolderSource(tmp_path, "train")
    transform = resolve_eval_transform(CFG, recipe, image_size=16)
    loader = StreamingLoader(source, len(source), train=False, transform=transform, workers=0)
    (images, labels), = list(loader.epoch(0))
    streamed = transform.normalize(images)
    read = torch.stack([transform.read(source.path(i)) for i in range(len(source))])
    assert torch.equal(read, streamed)
