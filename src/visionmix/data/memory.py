"""An image classification split held in memory: uint8 images (N, C, H, W) and int64 labels, and the check that
a split of a given size fits in memory before it is loaded or resized."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from visionmix.errors import DataError


@dataclass(frozen=True)
class ImageDataset:
    """An in-memory split: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,) in ``[0, num_classes)``.

    ``mean``/``std`` (per channel, for images scaled to [0, 1]) normalise inputs; ``hflip`` says whether a
    horizontal flip keeps the label (clothes, objects: yes; digits: no); ``crop_padding`` is the padding of the
    random-crop augmentation.
    """

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool
    crop_padding: int

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"{self.name} {self.split}: images must be a uint8 (N, C, H, W) tensor, "
                            f"got {self.images.dtype} of shape {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise DataError(f"{self.name} {self.split}: {len(self.images)} images but labels of shape "
                            f"{tuple(self.labels.shape)} ({self.labels.dtype}); they must be int64 (N,)")
        _check_label_range(self.labels, len(self.classes), f"{self.name} {self.split}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise DataError(f"{self.name}: mean/std need {self.channels} entries, got {self.mean} / {self.std}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.images.shape[2], self.images.shape[3])

    def subset(self, max_samples: int | None) -> ImageDataset:
        """At most ``max_samples`` images, a fixed random choice (the same for every call and seed)."""
        if max_samples is None or max_samples >= len(self):
            return self
        if max_samples <= 0:
            raise DataError(f"max_samples must be positive, got {max_samples}")
        keep = torch.randperm(len(self), generator=torch.Generator().manual_seed(0))[:max_samples].sort().values
        return replace(self, images=self.images[keep], labels=self.labels[keep])

    def to(self, device: torch.device | str) -> ImageDataset:
        """The split with its images and labels on ``device`` (the same tensors where they are already): one copy
        that every loader of the split on ``device`` then shares."""
        moved = copy.copy(self)  # already checked: no second pass over the labels on the device
        object.__setattr__(moved, "images", self.images.to(device))
        object.__setattr__(moved, "labels", self.labels.to(device))
        return moved

    def with_stats(self, mean: Sequence[float], std: Sequence[float]) -> ImageDataset:
        """The same images normalised with other statistics (a test split uses its training split's)."""
        return replace(self, mean=tuple(mean), std=tuple(std))


def available_memory() -> int:
    """Bytes of memory available to new allocations (``MemAvailable`` of /proc/meminfo, else physical memory)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits_in_memory(num_images: int, channels: int, image_size: int, what: str) -> None:
    """:class:`DataError` if ``num_images`` uint8 images of ``image_size`` squared cannot be held in memory."""
    need = num_images * channels * image_size * image_size
    have = available_memory()
    if need > have:
        raise DataError(f"{what}: {num_images:,} images of {channels}x{image_size}x{image_size} need "
                        f"{_bytes(need)} in memory, {_bytes(have)} is available; choose a smaller --image-size "
                        f"or fewer images (--max-train-samples)")


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    raise AssertionError("unreachable")


def _check_label_range(labels: torch.Tensor, num_classes: int, what: str) -> None:
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(f"{what}: labels span [{int(labels.min())}, {int(labels.max())}], expected [0, "
                        f"{num_classes - 1}]")
