"""Streamed image datasets: decoded batch by batch in DataLoader workers, so memory does not grow with the dataset.

Two sources and one loader:

- :class:`ImageFolderSource`: ``root/{train,val}/<class>/<image>`` (``test`` accepted for ``val``), read file by
  file; or a single tree (``root/<class>/*`` or ``root/train``) split by ``val_fraction``.
- :class:`WebDatasetSource`: tar shards (``shards/train-{000000..000099}.tar``) with an ``info.json`` beside them.
- :class:`StreamingLoader`: ``BatchLoader``'s interface (``len()`` = steps per epoch, ``epoch(e, start_step)``)
  yielding **uint8** ``(b, C, S, S)`` images and int64 labels; the caller normalises and augments on its device.

``info.json`` (written by ``visionmix data pack``) is described in :mod:`visionmix.data.shards`.

Sharding (WebDataset): ``S = world_size * max(workers, 1)`` readers; reader ``slot = rank * workers + worker``
reads shards ``order[slot::S]``, where ``order`` is ``randperm(num_shards)`` from ``stable_seed(seed, epoch)`` when
training (the natural order when evaluating), through a shuffle buffer seeded by ``(seed, epoch, slot)``. Fewer
shards than readers is a :class:`DataError`. Training: every reader yields the same number of local batches,
``m // b`` where ``m`` is the smallest share any reader can be dealt (the sum of the ``num_shards // S`` smallest
shards) and ``b = batch_size // world_size``; so every rank yields ``workers * (m // b)`` batches per epoch (DDP
needs equal counts) and a reader's samples past its quota are left out that epoch (other ones each epoch, as the
shard order changes). Equal shards in a multiple of ``S`` and of ``b`` leave nothing out: every sample is then seen
exactly once per epoch across the job. Evaluation reads every sample once, in order; ranks may then differ by a
batch or so, as ``BatchLoader``'s do.

Resume: ImageFolder epochs are a fixed function of (seed, epoch), so ``epoch(e, start_step)`` yields exactly the
tail of the full epoch. A WebDataset reader skips, without decoding, the raw samples of the batches it already
produced, and DataLoader workers are rotated so that batch ``start_step`` comes first: the training tail is exact
too (the documented guarantee is weaker: nothing repeated or skipped beyond one prefetch window); an evaluation
resume re-reads and drops the first ``start_step`` batches.

Augmentation: ``transform(image_uint8_chw, generator) -> uint8 (C, S, S)`` runs per sample in the worker with
``torch.Generator().manual_seed(stable_seed(seed, epoch, index))`` (``index``: the sample's position in the source,
for shards its position in shard order), whatever the number of workers or processes.

Unreadable images (corrupt, truncated, undecodable, decompression bombs): skipped (the batch is one shorter), one
:class:`BadImageWarning` per file in the main process, and a :class:`DataError` once the distinct files this loader
met exceed ``max_bad_images`` (default ``max(1, ceil(0.001 * len(source)))``; each process counts its own share).
A training batch whose images are all unreadable is a :class:`DataError` (yielding an empty batch would break the
step, skipping one would desynchronise DDP); such an evaluation batch is left out.
"""

from __future__ import annotations

import io
import itertools
import math
import random
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from visionmix.checks import check_positive
from visionmix.data import shards
from visionmix.data.datasets import (
    IMAGE_EXTENSIONS,
    ImageDataset,
    decode_image,
    image_mode,
    resize_uint8,
)
from visionmix.data.loader import stable_seed
from visionmix.errors import BadImageWarning, DataError, InvalidType, InvalidValue, UnreadableImage

DEFAULT_DECODE_SIZE = 256  # JPEG draft size when the transform says none (see _decode_size)
DEFAULT_SHUFFLE_BUFFER = 1000
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
IMAGE_KEYS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _split_name(split: str) -> str:
    if split not in ("train", "val", "test"):
        raise InvalidValue(f"split must be 'train' or 'val' ('test' is accepted for 'val'), got {split!r}")
    return "train" if split == "train" else "val"


def _to_tensor(image: Any) -> torch.Tensor:
    """A PIL image (mode L or RGB) -> uint8 (C, H, W)."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


# ------------------------------------------------------------------------------------------------- ImageFolder
def _images_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _classes_of(tree: Path) -> tuple[str, ...]:
    classes = tuple(sorted(p.name for p in tree.iterdir() if p.is_dir()))
    if len(classes) < 2:
        found = f"only one, {classes[0]!r}" if classes else "none"
        raise DataError(f"imagefolder: {tree} needs a sub-folder per class, at least two; it has {found}")
    return classes


class ImageFolderSource:
    """Files of ``root/{train,val}/<class>/<image>`` as a list of (path, label); images are decoded on demand.

    Classes are the sorted sub-folders of ``train``; a class in ``val`` that ``train`` lacks is a DataError. With
    ``val_fraction`` and a single tree (``root/<class>/*`` or ``root/train/<class>/*``), each class's files are
    split by a fixed permutation drawn from ``stable_seed(seed, "val", class)``: keep ``seed`` fixed (it is the
    split's seed, not the training seed) and the same files are ``val`` every time. ``channels`` is 1 if the first
    training image is greyscale, else 3; every image is converted to that mode.
    """

    hflip = True

    def __init__(self, root: str | Path, split: str, *, val_fraction: float | None = None, seed: int = 0) -> None:
        root = Path(root)
        self.root, self.split, self.name = root, _split_name(split), "imagefolder"
        if not root.is_dir():
            raise DataError(f"imagefolder: {root} is not a directory")
        train_dir = root / "train"
        val_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
        if val_fraction is None:
            if not train_dir.is_dir():
                raise DataError(f"imagefolder: {root} has no train folder (expected {root}/train/<class>/<image>; "
                                f"for a single tree {root}/<class>/<image> pass val_fraction)")
            tree, self.classes = train_dir, _classes_of(train_dir)
            if self.split == "train":
                self._files = self._list(train_dir)
            else:
                if val_dir is None:
                    raise DataError(f"imagefolder: {root} has no val or test folder (expected {root}/val/<class>/"
                                    f"<image>, or pass val_fraction to split the training tree)")
                unknown = sorted({p.name for p in val_dir.iterdir() if p.is_dir()} - set(self.classes))
                if unknown:
                    raise DataError(f"imagefolder: {val_dir} has classes missing from {train_dir}: "
                                    f"{', '.join(unknown)}")
                self._files = self._list(val_dir)
        else:
            if not 0 < val_fraction < 1:
                raise InvalidValue(f"val_fraction must be in (0, 1), got {val_fraction}")
            if val_dir is not None:
                raise DataError(f"imagefolder: {root} has its own {val_dir.name} folder; drop val_fraction to use it")
            tree = train_dir if train_dir.is_dir() else root
            self.classes = _classes_of(tree)
            self._files = self._split(tree, val_fraction, seed)
        if not self._files:
            raise DataError(f"imagefolder: no {self.split} images ({', '.join(IMAGE_EXTENSIONS)}) under "
                            f"{tree if val_fraction is not None or self.split == 'train' else val_dir}/<class>/")
        self.channels = self._first_channels(tree)
        self._mode = "L" if self.channels == 1 else "RGB"
        info = shards.read_info(root)
        if shards.is_incomplete(info):
            raise DataError(f"imagefolder: {root} is a pack that was interrupted (its {shards.INFO_NAME} says so); "
                            f"run the 'visionmix data pack' that wrote it again")
        self.mean, self.std = shards.stats(info, self.channels)
        self.class_names = shards.class_names(info, self.classes)

    def _list(self, directory: Path) -> list[tuple[Path, int]]:
        return [(path, label) for label, cls in enumerate(self.classes) if (directory / cls).is_dir()
                for path in _images_in(directory / cls)]

    def _split(self, tree: Path, val_fraction: float, seed: int) -> list[tuple[Path, int]]:
        files = []
        for label, cls in enumerate(self.classes):
            paths = _images_in(tree / cls)
            n = len(paths)
            n_val = min(n - 1, max(1, round(val_fraction * n))) if n > 1 else 0
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(stable_seed(seed, "val", cls)))
            chosen = set(perm[:n_val].tolist())
            files += [(p, label) for j, p in enumerate(paths) if (j in chosen) == (self.split == "val")]
        return files

    def _first_channels(self, tree: Path, tries: int = 10) -> int:
        """1 if the first readable training image (of the first ``tries``) is greyscale, else 3."""
        first = list(itertools.islice((p for cls in self.classes for p in _images_in(tree / cls)), tries))
        for path in first:
            try:
                return 1 if image_mode(path) in GRAY_MODES else 3
            except UnreadableImage:
                continue  # the loaders skip and report it
        raise DataError(f"imagefolder: none of the first {len(first)} training images under {tree}/<class>/ can be "
                        f"read, so the channel count is unknown")

    def __len__(self) -> int:
        return len(self._files)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def path(self, i: int) -> Path:
        return self._files[i][0]

    def label(self, i: int) -> int:
        return self._files[i][1]

    def load(self, i: int, size: int | None = None) -> torch.Tensor:
        """Image ``i`` as uint8 (C, H, W); ``size`` is the decode hint (a JPEG is drafted to at least that size).
        Raises :class:`UnreadableImage` for a file that cannot be decoded."""
        s = size or DEFAULT_DECODE_SIZE
        return _to_tensor(decode_image(self.path(i), self._mode, (s, s)))


class MemorySource:
    """An in-memory :class:`~visionmix.data.datasets.ImageDataset` as a source, so the per-sample transforms of a
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
        return WebDatasetSource(data_dir if _split_name(split) == "train" else directory, split)
    raise DataError(f"{name!r} is not a streamed dataset; choose imagefolder or webdataset")


# --------------------------------------------------------------------------------------------------- WebDataset
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

        self.split, self.name = _split_name(split), "webdataset"
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
        return _to_tensor(decode_image(_NamedBytes(sample[ext], name), self._mode, (s, s))), label  # type: ignore


# --------------------------------------------------------------------------------------------------- transforms
@dataclass(frozen=True)
class Resize:
    """Deterministic bilinear (antialiased when shrinking) resize of a uint8 (C, H, W) image to (size, size)."""

    size: int

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if tuple(image.shape[-2:]) == (self.size, self.size):
            return image
        return resize_uint8(image[None], self.size)[0]


def resize_to(size: int) -> Resize:
    """The plain transform of :class:`StreamingLoader`: resize the whole image to ``size`` x ``size``."""
    return Resize(check_positive("size", size))


def _decode_size(transform: Transform) -> int | None:
    """The output size a transform declares (``.size``, an int), used to draft JPEGs; ``None`` if it declares none."""
    size = getattr(transform, "size", None)
    return size if isinstance(size, int) and size > 0 else None


# ------------------------------------------------------------------------------------------------------- batches
Batch = tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]


@dataclass(frozen=True)
class _ReaderFailure:
    """What a worker sends instead of a batch when its data are unusable (a damaged shard, a bad label): the main
    process raises it as a :class:`DataError`, one line, rather than DataLoader's wrapped worker traceback."""

    message: str


def _collate(images: list[torch.Tensor], labels: list[int], bad: list[tuple[str, str]]) -> Batch:
    stacked = torch.stack(images) if images else torch.empty(0, dtype=torch.uint8)
    return stacked, torch.tensor(labels, dtype=torch.int64), bad


def _transformed(transform: Transform, image: torch.Tensor, seed: int, epoch: int, index: int) -> torch.Tensor:
    out = transform(image, torch.Generator().manual_seed(stable_seed(seed, epoch, index)))
    if not isinstance(out, torch.Tensor) or out.dtype != torch.uint8 or out.dim() != 3:
        raise InvalidType(f"transform must return a uint8 (C, S, S) tensor, got {getattr(out, 'dtype', type(out))} "
                          f"of shape {tuple(getattr(out, 'shape', ()))}")
    return out


class _FolderBatches:
    """Map-style: item ``(epoch, keys)`` -> one decoded batch (run in a DataLoader worker). A key is
    ``index * repeats + copy``: image ``index``, its ``copy``-th draw of the epoch (repeated augmentation), and the
    seed of that draw's augmentation."""

    def __init__(self, source: ImageFolderSource, transform: Transform, seed: int, repeats: int = 1) -> None:
        self.source, self.transform, self.seed, self.repeats = source, transform, seed, repeats
        self.size = _decode_size(transform)

    def __getitem__(self, item: tuple[int, list[int]]) -> Batch | _ReaderFailure:
        try:
            return self._batch(*item)
        except DataError as exc:
            return _ReaderFailure(str(exc))

    def _batch(self, epoch: int, keys: list[int]) -> Batch:
        images, labels, bad = [], [], []
        for key in keys:
            i = key // self.repeats
            try:
                image = self.source.load(i, self.size)
            except UnreadableImage as exc:
                bad.append((str(self.source.path(i)), str(exc)))
                continue
            images.append(_transformed(self.transform, image, self.seed, epoch, key))
            labels.append(self.source.label(i))
        return _collate(images, labels, bad)


class _FolderSteps:
    """The batch sampler: ``(epoch, keys)`` of steps ``start_step..`` of ``epoch`` for one rank (keys: see
    :class:`_FolderBatches`). With ``repeats`` R > 1 (repeated augmentation, DeiT's RASampler, Hoffer et al.
    1901.09335) an epoch is the first N entries of a permutation with every image repeated R times in a row: N / R
    images, each R times with its own augmentation, the copies in one global batch on consecutive ranks."""

    def __init__(self, n: int, batch_size: int, train: bool, seed: int, rank: int, world_size: int,
                 steps: int, repeats: int = 1) -> None:
        self.n, self.batch_size, self.train, self.seed = n, batch_size, train, seed
        self.rank, self.world_size, self.steps, self.repeats = rank, world_size, steps, repeats
        self.epoch, self.start_step = 0, 0

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        b, r, w, k = self.batch_size, self.rank, self.world_size, self.repeats
        if self.train:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(stable_seed(self.seed, self.epoch)))
            order = (order.repeat_interleave(k) * k + torch.arange(self.n * k) % k)[: self.n]
        else:
            order = torch.arange(r, self.n, w)
        for step in range(self.start_step, self.steps):
            index = order[step * b: (step + 1) * b]
            yield self.epoch, (index[r::w] if self.train else index).tolist()

    def __len__(self) -> int:
        return self.steps - self.start_step


class _ShardBatches(IterableDataset):
    """Iterable: the local batches of one reader (DataLoader worker of one rank) for the epoch in ``state``."""

    def __init__(self, source: WebDatasetSource, transform: Transform, *, seed: int, train: bool, rank: int,
                 world_size: int, readers: int, batch: int, quota: int | None, state: torch.Tensor) -> None:
        super().__init__()
        self.source, self.transform, self.seed, self.train = source, transform, seed, train
        self.rank, self.world_size, self.readers, self.batch, self.quota = rank, world_size, readers, batch, quota
        self.state = state  # shared int64 [epoch, start_step], written by the main process before each epoch
        self.size = _decode_size(transform)

    def slot_shards(self, epoch: int, slot: int) -> list[int]:
        n = len(self.source.shards)
        if self.train:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(stable_seed(self.seed, epoch))).tolist()
        else:
            order = list(range(n))
        return order[slot::self.world_size * self.readers]

    def __iter__(self) -> Iterator[Batch | _ReaderFailure]:
        try:
            yield from self._batches()
        except DataError as exc:
            yield _ReaderFailure(str(exc))

    def _batches(self) -> Iterator[Batch]:
        import webdataset as wds

        info = get_worker_info()
        epoch, start = (int(v) for v in self.state.tolist())
        # rotate the workers so that DataLoader worker 0 (asked first) produces batch ``start``
        reader = ((info.id if info else 0) + start) % self.readers if self.train else (info.id if info else 0)
        slot = self.rank * self.readers + reader
        samples = self.source.raw_samples(self.slot_shards(epoch, slot))
        done = 0
        if self.train:
            rng = random.Random(stable_seed(self.seed, epoch, slot))
            samples = wds.shuffle(bufsize=self.source.shuffle_buffer, initial=self.source.shuffle_buffer,
                                  rng=rng)(samples)
            done = max(0, -(-(start - reader) // self.readers))  # batches this reader made before ``start``
            samples = itertools.islice(samples, done * self.batch, None)  # skipped undecoded
        for _ in range(done, self.quota) if self.quota is not None else itertools.count():
            chunk = list(itertools.islice(samples, self.batch))
            if not chunk:
                return
            yield self._decode(chunk, epoch)

    def _decode(self, chunk: list[dict[str, Any]], epoch: int) -> Batch:
        images, labels, bad = [], [], []
        for sample in chunk:
            try:
                image, label = self.source.decode(sample, self.size)
            except UnreadableImage as exc:
                bad.append((self.source.sample_name(sample), str(exc)))
                continue
            images.append(_transformed(self.transform, image, self.seed, epoch, sample["__index__"]))
            labels.append(label)
        return _collate(images, labels, bad)


def _identity(batch: Batch | _ReaderFailure) -> Batch | _ReaderFailure:
    return batch


# -------------------------------------------------------------------------------------------------------- loader
class StreamingLoader:
    """Yields ``(images, labels)``: uint8 (b, C, S, S) and int64 (b,) on ``device``, decoded in ``workers``
    DataLoader processes (0: in this process), at most ``workers * prefetch`` batches ahead.

    ``batch_size`` is the global batch when training (rank ``r`` takes rows ``r::world_size`` of it; the last
    partial global batch is dropped) and the per-process batch when evaluating, as in ``BatchLoader``. A batch is
    shorter by the unreadable images it met (see the module docstring for those, sharding and resume).
    ``repeats`` > 1: repeated augmentation when training (see :class:`_FolderSteps`; indexable sources only).
    """

    def __init__(self, source: ImageFolderSource | MemorySource | WebDatasetSource, batch_size: int, *, train: bool,
                 transform: Transform, seed: int = 0, rank: int = 0, world_size: int = 1, workers: int = 2,
                 device: torch.device | str = "cpu", prefetch: int = 2, max_bad_images: int | None = None,
                 repeats: int = 1) -> None:
        check_positive("batch_size", batch_size)
        check_positive("world_size", world_size)
        check_positive("prefetch", prefetch)
        check_positive("repeats", repeats)
        if not 0 <= rank < world_size:
            raise InvalidValue(f"rank must be in [0, {world_size}), got {rank}")
        if workers < 0:
            raise InvalidValue(f"workers must be >= 0, got {workers}")
        if max_bad_images is not None and max_bad_images < 0:
            raise InvalidValue(f"max_bad_images must be >= 0 or None, got {max_bad_images}")
        if train and batch_size % world_size:
            raise InvalidValue(f"batch_size={batch_size} must be divisible by the number of processes ({world_size})")
        if train and batch_size > len(source):
            raise InvalidValue(f"batch_size={batch_size} exceeds the {len(source)} training images")
        self.source, self.batch_size, self.train, self.seed = source, batch_size, train, seed
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.device = torch.device(device)
        self.max_bad_images = max(1, math.ceil(0.001 * len(source))) if max_bad_images is None else max_bad_images
        self.bad_images: dict[str, str] = {}  # name -> reason, every distinct unreadable file met so far
        self._local = batch_size // world_size if train else batch_size
        self._sampler: _FolderSteps | None = None
        self._state = torch.zeros(2, dtype=torch.int64).share_memory_()
        repeats = repeats if train else 1
        if isinstance(source, WebDatasetSource):
            if repeats > 1:
                raise InvalidValue("repeated augmentation (repeats > 1) needs an indexable source (imagefolder or "
                                   "in-memory data), not webdataset shards")
            dataset: Any = self._shard_dataset(source, transform)
        else:
            self._sampler = _FolderSteps(len(source), batch_size, train, seed, rank,
                                         world_size, self._folder_steps(), repeats)
            dataset = _FolderBatches(source, transform, seed, repeats)
        self._loader = DataLoader(
            dataset, batch_size=None, sampler=self._sampler, num_workers=workers, collate_fn=_identity,
            pin_memory=self.device.type == "cuda", prefetch_factor=prefetch if workers else None,
            persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(seed))  # its own: the global RNG (drop-path) stays untouched

    def _folder_steps(self) -> int:
        if self.train:
            return len(self.source) // self.batch_size
        return -(-len(range(self.rank, len(self.source), self.world_size)) // self.batch_size)

    def _shard_dataset(self, source: WebDatasetSource, transform: Transform) -> _ShardBatches:
        readers = max(self.workers, 1)
        total = self.world_size * readers
        if len(source.shards) < total:
            raise DataError(f"webdataset: {len(source.shards)} {source.split} shards cannot feed {self.world_size} "
                            f"processes x {readers} workers ({total} readers); use fewer workers or repack with a "
                            f"smaller --shard-size")
        quota = None
        if self.train:
            smallest = sum(sorted(source.shard_counts)[: len(source.shards) // total])
            quota = smallest // self._local
            if quota == 0:
                raise InvalidValue(f"batch_size={self.batch_size}: a process's batch of {self._local} is more than the "
                                   f"{smallest} samples the smallest of {total} shard shares holds; use a smaller "
                                   f"batch, fewer workers or more shards")
        dataset = _ShardBatches(source, transform, seed=self.seed, train=self.train, rank=self.rank,
                                world_size=self.world_size, readers=readers, batch=self._local, quota=quota,
                                state=self._state)
        if self.train:
            self._steps = readers * quota  # type: ignore[operator]
        else:
            self._steps = sum(-(-sum(source.shard_counts[i] for i in dataset.slot_shards(0, self.rank * readers + w))
                                // self._local) for w in range(readers))
        return dataset

    def __len__(self) -> int:
        """Steps per epoch (equal on every rank when training)."""
        return self._sampler.steps if self._sampler is not None else self._steps

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start_step, start_step + 1, ...`` of epoch ``epoch``."""
        if not 0 <= start_step <= len(self):
            raise InvalidValue(f"start_step must be in [0, {len(self)}], got {start_step}")
        first = start_step  # the first batch the DataLoader produces
        if self._sampler is not None:
            self._sampler.epoch, self._sampler.start_step = epoch, start_step
        else:  # shard readers skip what they already produced when training; evaluation re-reads from 0
            first = 0 if not self.train else start_step
            self._state.copy_(torch.tensor([epoch, first]))
        batches = iter(self._loader)
        for step in range(first, len(self)):
            batch = next(batches, None)
            if batch is None:
                return  # an evaluation epoch that left out a batch of unreadable images ends one early
            if isinstance(batch, _ReaderFailure):
                raise DataError(batch.message)
            images, labels, bad = batch
            del batch
            self._count_bad(bad)
            if len(labels) == 0:
                if self.train:
                    raise DataError(f"{self.source.name} {self.source.split}: every image of step {step} on rank "
                                    f"{self.rank} was unreadable (the last: {bad[-1][0]}); repair the dataset")
                continue
            if step < start_step:
                continue
            non_blocking = self.device.type == "cuda"
            images = images.to(self.device, non_blocking=non_blocking)
            labels = labels.to(self.device, non_blocking=non_blocking)
            yield images, labels
            del images, labels

    def _count_bad(self, bad: Sequence[tuple[str, str]]) -> None:
        for name, reason in bad:
            if name in self.bad_images:
                continue
            self.bad_images[name] = reason
            if len(self.bad_images) > self.max_bad_images:
                raise DataError(f"{self.source.name} {self.source.split}: {len(self.bad_images)} unreadable images, "
                                f"more than max_bad_images={self.max_bad_images} (the last: {reason}); repair or "
                                f"remove them, or allow more")
            warnings.warn(f"skipping an unreadable image: {reason}", BadImageWarning, stacklevel=3)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)


# ---------------------------------------------------------------------------------------------------- statistics
def _stat_images(source: ImageFolderSource | WebDatasetSource, max_images: int,
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


def estimate_stats(source: ImageFolderSource | WebDatasetSource, transform_size: int,
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
