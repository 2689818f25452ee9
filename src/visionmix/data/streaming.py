"""The streaming loader: a dataset decoded batch by batch in DataLoader workers, so memory does not grow with it.

:class:`StreamingLoader` has ``BatchLoader``'s interface (``len()`` = steps per epoch, ``epoch(e, start_step)``)
and yields **uint8** ``(b, C, S, S)`` images and int64 labels from a source of :mod:`visionmix.data.sources`
(ImageFolder, WebDataset shards, in-memory); the caller normalises and augments on its device. Indexable sources are
read through a batch sampler (:class:`_FolderSteps`), shard sources by one reader per DataLoader worker and rank.

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

import itertools
import math
import random
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from visionmix.checks import check_positive
from visionmix.data.seeds import stable_seed
from visionmix.data.sources import IndexedSource, WebDatasetSource
from visionmix.data.transforms import Transform
from visionmix.errors import BadImageWarning, DataError, InvalidType, InvalidValue, UnreadableImage
from visionmix.transfers import host_side, to_device


def _decode_size(transform: Transform) -> int | None:
    """The output size a transform declares (``.size``, an int or (height, width): the larger side), used to draft
    JPEGs; ``None`` if it declares none."""
    size = getattr(transform, "size", None)
    if isinstance(size, tuple) and len(size) == 2 and all(isinstance(s, int) for s in size):
        size = max(size)
    return size if isinstance(size, int) and size > 0 else None


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

    def __init__(self, source: IndexedSource, transform: Transform, seed: int, repeats: int = 1) -> None:
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
        with host_side():  # the sampler's indices live on the host
            if self.train:
                generator = torch.Generator().manual_seed(stable_seed(self.seed, self.epoch))
                order = torch.randperm(self.n, generator=generator)
                order = (order.repeat_interleave(k) * k + torch.arange(self.n * k) % k)[: self.n]
            else:
                order = torch.arange(r, self.n, w)
        for step in range(self.start_step, self.steps):
            with host_side():
                keys = order[step * b: (step + 1) * b][slice(r, None, w) if self.train else slice(None)].tolist()
            yield self.epoch, keys

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


class StreamingLoader:
    """Yields ``(images, labels)``: uint8 (b, C, S, S) and int64 (b,) on ``device``, decoded in ``workers``
    DataLoader processes (0: in this process), at most ``workers * prefetch`` batches ahead.

    ``batch_size`` is the global batch when training (rank ``r`` takes rows ``r::world_size`` of it; the last
    partial global batch is dropped) and the per-process batch when evaluating, as in ``BatchLoader``. A batch is
    shorter by the unreadable images it met (see the module docstring for those, sharding and resume).
    ``repeats`` > 1: repeated augmentation when training (see :class:`_FolderSteps`; indexable sources only).
    """

    def __init__(self, source: IndexedSource | WebDatasetSource, batch_size: int, *, train: bool,
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
        batches = self._iterate()
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
            images, labels = to_device(images, self.device), to_device(labels, self.device)
            yield images, labels
            del images, labels

    def _iterate(self) -> Iterator[Batch | _ReaderFailure]:
        """The DataLoader's iterator, made with the training device current: its pin-memory thread pins for the
        device current when it starts (``cuda:0`` for a run on ``cuda:N`` otherwise)."""
        if self.device.type == "cuda" and self.device.index is not None:
            with torch.accelerator.device_index(self.device.index):
                return iter(self._loader)
        return iter(self._loader)

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
