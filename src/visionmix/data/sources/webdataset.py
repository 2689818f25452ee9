"""WebDataset tar shards (``shards/train-{000000..000099}.tar``) with the ``info.json`` that ``visionmix data pack``
writes beside them (:mod:`visionmix.data.shards`), read shard by shard."""

from __future__ import annotations

import io
import itertools
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from visionmix.checks import check_positive
from visionmix.data import shards
from visionmix.data.decode import DEFAULT_DECODE_SIZE, IMAGE_EXTENSIONS, decode_image, to_tensor
from visionmix.data.sources.base import split_name
from visionmix.errors import DataError, UnreadableImage

DEFAULT_SHUFFLE_BUFFER = 1000
IMAGE_KEYS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)


class _NamedBytes(io.BytesIO):
    """Encoded image bytes that print as ``shard.tar:key.ext`` in decode_image's messages."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.label = name

    def __str__(self) -> str:
        return self.label


class WebDatasetSource:
    """Tar shards (``pattern`` a brace pattern, or the directory ``visionmix data pack`` wrote) read with
    ``webdataset``: per sample ``__key__``, the image under ``png``/``jpg``/``jpeg``/... and the label under ``cls``.

    Sample counts and classes come from ``info.json`` beside the shards (format in the module docstring); without
    it this is a DataError (``visionmix data pack`` writes one). ``shuffle_buffer`` raw (still encoded) samples are
    held per reader when training.
    """

    hflip = True

    def __init__(self, pattern: str | Path, split: str, *, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER) -> None:
        from braceexpand import braceexpand

        self.split, self.name = split_name(split), "webdataset"
        self.shuffle_buffer = check_positive("shuffle_buffer", shuffle_buffer)
        directory = Path(pattern) if Path(pattern).is_dir() else Path(next(iter(braceexpand(str(pattern))))).parent
        info = shards.read_info(directory)
        if info is None:
            raise DataError(f"webdataset: {directory / shards.INFO_NAME} not found (or not written by visionmix): the "
                            f"sample counts and classes come from it; pack the data with 'visionmix data pack' or "
                            f"write one (format: see visionmix.data.shards)")
        entry = info.get("splits", {}).get(self.split)
        if entry is None:
            raise DataError(f"webdataset: {directory / shards.INFO_NAME} has no {self.split!r} split "
                            f"(it has {', '.join(info.get('splits', {})) or 'none'})")
        if entry.get("incomplete"):
            raise DataError(f"webdataset: the {self.split} split in {directory} was being packed when the pack "
                            f"stopped; run that 'visionmix data pack' again")
        if Path(pattern).is_dir():
            pattern = directory / entry["pattern"]
        counts = {s["name"]: int(s["count"]) for s in entry["shards"]}
        urls = list(braceexpand(str(pattern)))
        unknown = [u for u in urls if Path(u).name not in counts]
        if unknown:
            raise DataError(f"webdataset: {unknown[0]} is not a {self.split} shard listed in "
                            f"{directory / shards.INFO_NAME}")
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise DataError(f"webdataset: shard {missing[0]} not found ({len(missing)} of {len(urls)} missing)")
        broken = [u for u in urls if not tarfile.is_tarfile(u)]
        if broken:
            raise DataError(f"webdataset: shard {broken[0]} is not a tar file ({len(broken)} of {len(urls)}); re-run "
                            f"'visionmix data pack'")
        self.shards = urls
        self.shard_counts = [counts[Path(u).name] for u in urls]
        self.offsets = [0, *itertools.accumulate(self.shard_counts)][:-1]
        self.classes = tuple(map(str, info["classes"]))
        self.class_names = shards.class_names(info, self.classes)
        self.channels = int(info.get("channels", 3))
        self._mode = "L" if self.channels == 1 else "RGB"
        self.mean, self.std = shards.stats(info, self.channels)

    def __len__(self) -> int:
        return sum(self.shard_counts)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def raw_samples(self, shards: Iterable[int]) -> Iterator[dict[str, Any]]:
        """Undecoded samples of the given shards in order, each with ``__index__`` (its position in the source);
        a shard that is not a readable tar file, or holds another count than info.json lists, is a DataError."""
        import webdataset as wds

        for i in shards:
            url, offset, count = self.shards[i], self.offsets[i], self.shard_counts[i]
            position = 0
            try:
                for sample in wds.tarfile_to_samples()(iter([{"url": url}])):
                    if position >= count:
                        raise DataError(f"webdataset: {url} holds more samples than the {count} its info.json "
                                        f"lists; re-run 'visionmix data pack'")
                    sample["__index__"] = offset + position
                    position += 1
                    yield sample
            except tarfile.TarError as exc:
                raise DataError(f"webdataset: {url} is not a readable tar file ({exc}); re-run 'visionmix data "
                                f"pack'") from exc
            if position != count:
                raise DataError(f"webdataset: {url} holds {position} samples, its info.json lists {count}; re-run "
                                f"'visionmix data pack'")

    @staticmethod
    def sample_name(sample: dict[str, Any]) -> str:
        ext = next((k for k in IMAGE_KEYS if k in sample), "?")
        return f"{sample.get('__url__')}:{sample.get('__key__')}.{ext}"

    def decode(self, sample: dict[str, Any], size: int | None = None) -> tuple[torch.Tensor, int]:
        """(uint8 (C, H, W), label) of a raw sample; :class:`UnreadableImage` if its image cannot be decoded."""
        name = self.sample_name(sample)
        try:
            label = int(sample["cls"])
        except (KeyError, ValueError, TypeError) as exc:
            raise DataError(f"webdataset: {name} has no integer label under 'cls'") from exc
        if not 0 <= label < len(self.classes):
            raise DataError(f"webdataset: {name} has label {label}, expected [0, {len(self.classes) - 1}]")
        ext = next((k for k in IMAGE_KEYS if k in sample), None)
        if ext is None:
            raise UnreadableImage(f"{name} has no image (expected one of {', '.join(IMAGE_KEYS)})")
        s = size or DEFAULT_DECODE_SIZE
        return to_tensor(decode_image(_NamedBytes(sample[ext], name), self._mode, (s, s))), label  # type: ignore
