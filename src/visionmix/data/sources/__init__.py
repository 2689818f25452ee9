"""Data sources: one split of a dataset that :class:`~visionmix.data.streaming.StreamingLoader` streams.

- :class:`ImageFolderSource`: ``root/{train,val}/<class>/<image>``, read file by file (:mod:`.imagefolder`);
- :class:`WebDatasetSource`: tar shards with an ``info.json`` beside them (:mod:`.webdataset`);
- :class:`MemorySource`: an in-memory split (:mod:`.memory`).

Every one is a :class:`Source` (:mod:`.base`); :func:`open_source` opens the streamed ones by dataset name.
"""

from __future__ import annotations

from pathlib import Path

from visionmix.data.sources.base import IndexedSource, Source, split_name
from visionmix.data.sources.imagefolder import ImageFolderSource
from visionmix.data.sources.memory import MemorySource
from visionmix.data.sources.webdataset import WebDatasetSource
from visionmix.errors import DataError

__all__ = ["ImageFolderSource", "IndexedSource", "MemorySource", "Source", "WebDatasetSource", "open_source"]


def open_source(name: str, data_dir: str | Path | None, split: str, *, val_fraction: float | None = None,
                seed: int = 0) -> ImageFolderSource | WebDatasetSource:
    """The streamed ``split`` (``train``/``val``) of ``name`` (``imagefolder``: a directory; ``webdataset``: a shard
    pattern or the directory ``visionmix data pack`` wrote)."""
    if data_dir is None:
        expected = ("DIR with DIR/train/<class>/<image>" if name == "imagefolder" else
                    "'shards/train-{000000..000009}.tar' or the directory visionmix data pack wrote")
        raise DataError(f"{name} needs --data-dir ({expected})")
    if name == "imagefolder":
        return ImageFolderSource(data_dir, split, val_fraction=val_fraction, seed=seed)
    if name == "webdataset":  # a training pattern names the directory whose info.json lists the val shards
        from braceexpand import braceexpand

        given = Path(data_dir)
        directory = given if given.is_dir() else Path(next(iter(braceexpand(str(data_dir))))).parent
        return WebDatasetSource(data_dir if split_name(split) == "train" else directory, split)
    raise DataError(f"{name!r} is not a streamed dataset; choose imagefolder or webdataset")
