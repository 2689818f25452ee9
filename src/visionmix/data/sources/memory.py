"""An in-memory split as a source."""

from __future__ import annotations

import torch

from visionmix.data.memory import ImageDataset


class MemorySource:
    """An in-memory :class:`~visionmix.data.memory.ImageDataset` as a source, so the per-sample transforms of a
    recipe (RandomResizedCrop) apply to it too; workers share its tensor (fork)."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset, self.name, self.split = dataset, dataset.name, dataset.split
        self.classes = self.class_names = dataset.classes
        self.channels, self.hflip = dataset.channels, dataset.hflip
        self.mean, self.std = dataset.mean, dataset.std

    def __len__(self) -> int:
        return len(self.dataset)

    def path(self, i: int) -> str:
        return f"{self.name} {self.split} image {i}"

    def label(self, i: int) -> int:
        return int(self.dataset.labels[i])

    def load(self, i: int, size: int | None = None) -> torch.Tensor:
        return self.dataset.images[i]
