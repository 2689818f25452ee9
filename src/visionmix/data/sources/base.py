"""What every data source is (:class:`Source`), and what the indexable ones add (:class:`IndexedSource`).

A source is one split (``train`` or ``val``) of a dataset: its classes, channel count, recorded statistics and
length. An indexable source (ImageFolder, in-memory) also loads image ``i``; a shard source (WebDataset) is read
shard by shard instead (:class:`~visionmix.data.sources.webdataset.WebDatasetSource`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from visionmix.errors import InvalidValue


@runtime_checkable
class Source(Protocol):
    """One split of a dataset that :class:`~visionmix.data.streaming.StreamingLoader` reads.

    ``classes`` are the label names in label order (folder names), ``class_names`` their display names;
    ``mean``/``std`` the training statistics the source records (``None`` when it records none); ``hflip`` whether
    a horizontal flip keeps the label."""

    name: str
    split: str
    classes: tuple[str, ...]
    class_names: tuple[str, ...]
    channels: int
    hflip: bool
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    def __len__(self) -> int: ...


@runtime_checkable
class IndexedSource(Source, Protocol):
    """A source whose images are read one by one, by index."""

    def path(self, i: int) -> Path | str:
        """What names image ``i`` in messages."""
        ...

    def label(self, i: int) -> int: ...

    def load(self, i: int, size: int | None = None) -> torch.Tensor:
        """Image ``i`` as uint8 (C, H, W); ``size`` is the decode hint. :class:`UnreadableImage` if it cannot be
        decoded."""
        ...


def split_name(split: str) -> str:
    if split not in ("train", "val", "test"):
        raise InvalidValue(f"split must be 'train' or 'val' ('test' is accepted for 'val'), got {split!r}")
    return "train" if split == "train" else "val"
