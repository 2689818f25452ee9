"""Batches of an in-memory :class:`~visionmix.data.memory.ImageDataset`, sharded like a DistributedSampler.

Epoch ``e`` visits ``randperm(N)`` drawn from ``stable_seed(seed, e)``; global batch ``k`` is positions
``[k*B, (k+1)*B)`` of it and rank ``r`` of ``W`` takes every W-th of those rows, so the union of the W shards is
exactly the single-process batch, and a W-process run with global batch B follows the single-process run. The
augmentation of batch ``k`` is drawn for all B rows from ``stable_seed(seed, e, k)`` and sliced the same way. No
state beyond (epoch, step) is needed to resume in the middle of an epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from visionmix.checks import check_choice
from visionmix.data.memory import ImageDataset
from visionmix.data.seeds import stable_seed
from visionmix.data.transforms import AUGMENTATIONS, CropFlip, normalize
from visionmix.errors import InvalidValue
from visionmix.transfers import to_device


class BatchLoader:
    """Yields ``(images, labels)``: float32 normalised (b, C, H, W) and int64 (b,) on ``device``.

    ``train=True``: shuffled each epoch, the last partial global batch dropped, augmented by ``augment``
    (``"crop-flip"``: random crop with the dataset's padding + its flip; ``"flip"``: the flip only; ``"none"``);
    ``batch_size`` is the global batch and must be divisible by ``world_size``. ``train=False``: the dataset in
    order, rank ``r`` evaluating samples ``r, r + W, ...`` in batches of ``batch_size``.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, *, train: bool, augment: str = "crop-flip",
                 seed: int = 0, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu") -> None:
        if batch_size <= 0:
            raise InvalidValue(f"batch_size must be positive, got {batch_size}")
        if train and batch_size % world_size:
            raise InvalidValue(f"batch_size={batch_size} must be divisible by the number of processes ({world_size})")
        if train and batch_size > len(dataset):
            raise InvalidValue(f"batch_size={batch_size} exceeds the {len(dataset)} training images; use a smaller "
                               f"--batch-size or more --max-train-samples")
        self.dataset = dataset
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.images = dataset.images.to(self.device)
        self.labels = dataset.labels.to(self.device)
        check_choice("augment", augment, AUGMENTATIONS)
        padding = dataset.crop_padding if augment == "crop-flip" else 0
        hflip = dataset.hflip and augment != "none"
        self.augment = CropFlip(padding, hflip) if train and (padding or hflip) else None

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    def __len__(self) -> int:
        """Steps per epoch."""
        if self.train:
            return len(self.dataset) // self.batch_size
        shard = len(range(self.rank, len(self.dataset), self.world_size))
        return -(-shard // self.batch_size)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start_step, start_step + 1, ...`` of epoch ``epoch``."""
        n, b, r, w = len(self.dataset), self.batch_size, self.rank, self.world_size
        if self.train:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(stable_seed(self.seed, epoch)))
        else:
            order = torch.arange(r, n, w, device=self.device)
        order = to_device(order, self.device) if self.train else order  # once per epoch, not per batch
        for step in range(start_step, len(self)):
            index = order[step * b: (step + 1) * b]
            if self.train:
                index = index[r::w]
            images = self.images[index]
            if self.augment is not None:
                generator = torch.Generator().manual_seed(stable_seed(self.seed, epoch, step))
                offsets, flips = self.augment.sample_to(b, generator, self.device, slice(r, None, w))
                images = self.augment(images, offsets, flips)
            yield normalize(images, self.dataset.mean, self.dataset.std), self.labels[index]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)
