"""Per-channel image statistics (mean and std of images in [0, 1]) that normalise a model's inputs: of a uint8
batch held in memory, and of a streamed source (recorded in its ``info.json``, else estimated from a fixed subset)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch

from visionmix.checks import check_positive
from visionmix.data.sources import IndexedSource, WebDatasetSource
from visionmix.data.transforms import resize_to
from visionmix.errors import DataError, UnreadableImage


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 (N, C, H, W) images scaled to [0, 1], in float64."""
    x = images.transpose(0, 1).reshape(images.shape[1], -1).double() / 255.0
    return tuple(x.mean(1).tolist()), tuple(x.std(1).clamp_min(1e-3).tolist())


def _stat_images(source: IndexedSource | WebDatasetSource, max_images: int,
                 size: int) -> Iterator[torch.Tensor]:
    if isinstance(source, WebDatasetSource):  # pack shuffles before sharding: the first samples are a fair subset
        for sample in itertools.islice(source.raw_samples(range(len(source.shards))), max_images):
            try:
                yield source.decode(sample, size)[0]
            except UnreadableImage:
                continue  # the loaders count and report unreadable images
        return
    pick = torch.randperm(len(source), generator=torch.Generator().manual_seed(0))[:max_images].sort().values
    for i in pick.tolist():
        try:
            yield source.load(i, size)
        except UnreadableImage:
            continue  # the loaders count and report unreadable images


def estimate_stats(source: IndexedSource | WebDatasetSource, transform_size: int,
                   max_images: int = 2000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of images in [0, 1]: the ones ``info.json`` stores, else estimated from a fixed
    subset of at most ``max_images`` images resized to ``transform_size`` (the same subset every call)."""
    if source.mean is not None and source.std is not None:
        return source.mean, source.std
    check_positive("max_images", max_images)
    resize = resize_to(transform_size)
    total = torch.zeros(source.channels, dtype=torch.float64)
    squares = torch.zeros_like(total)
    count = 0
    for image in _stat_images(source, max_images, transform_size):
        x = resize(image).reshape(source.channels, -1).double() / 255.0
        total += x.sum(1)
        squares += (x * x).sum(1)
        count += x.shape[1]
    if count == 0:
        raise DataError(f"{source.name} {source.split}: no readable image to estimate the statistics from")
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt().clamp_min(1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())
