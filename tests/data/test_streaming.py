"""Streamed ImageFolder and WebDataset sources through StreamingLoader: iteration, exact resume, once-per-epoch
coverage across ranks and workers, unreadable images, the memory bound and the statistics."""

from __future__ import annotations

import multiprocessing
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from visionmix.data.pack import pack_shards
from visionmix.data.seeds import stable_seed
from visionmix.data.sources import ImageFolderSource, WebDatasetSource
from visionmix.data.stats import estimate_stats
from visionmix.data.streaming import StreamingLoader
from visionmix.data.transforms import resize_to
from visionmix.errors import BadImageWarning, DataError


def make_tree(root: Path, per_class: int = 8, classes: tuple[str, ...] = ("a", "b"), splits=("train", "val"),
              mode: str = "RGB", ext: str = "png") -> None:
    """Random images of 10 to 13 px per class and split."""
    rng = np.random.default_rng(0)
    for split in splits:
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                side = 10 + i % 4
                shape = (side, side) if mode == "L" else (side, side, 3)
                pixels = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i:03d}.{ext}")


def png_header(path: Path, side: int) -> Path:
    """A small PNG whose header claims side x side grey pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(1000)))
                     + chunk(b"IEND", b""))
    return path


def collect(loader: StreamingLoader, epoch: int = 0, start_step: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader.epoch(epoch, start_step)]


@dataclass(frozen=True)
class Tagged:
    """A transform that resizes to 8 px and writes the sample's index into pixel (0, 0, 0..1) to identify it."""

    size: int = 8

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        out = resize_to(self.size)(image, generator).clone()
        index = int(torch.randint(0, 2**16, (1,), generator=generator))  # a function of (seed, epoch, index)
        out[0, 0, 0], out[0, 0, 1] = index // 256, index % 256
        return out


# --------------------------------------------------------------------------------------------------- sources
def test_image_folder_source_lists_classes_labels_and_decodes(tmp_path: Path) -> None:
    make_tree(tmp_path, mode="L")
    train, val = ImageFolderSource(tmp_path, "train"), ImageFolderSource(tmp_path, "test")
    assert train.classes == ("a", "b") and len(train) == 16 and len(val) == 16 and val.split == "val"
    assert train.channels == 1 and train.hflip and train.label(0) == 0 and train.label(15) == 1
    image = train.load(1)
    assert image.dtype == torch.uint8 and image.shape == (1, 11, 11)
    assert torch.equal(image[0], torch.from_numpy(np.array(Image.open(train.path(1)))))
    (tmp_path / "val" / "zebra").mkdir()
    with pytest.raises(DataError, match="classes missing from .*train: zebra"):
        ImageFolderSource(tmp_path, "val")


def test_val_fraction_is_a_fixed_stratified_split(tmp_path: Path) -> None:
    make_tree(tmp_path / "tree", per_class=10, splits=("train",))
    train = ImageFolderSource(tmp_path / "tree", "train", val_fraction=0.2)
    val = ImageFolderSource(tmp_path / "tree", "val", val_fraction=0.2)
    again = ImageFolderSource(tmp_path / "tree", "val", val_fraction=0.2)
    paths = lambda s: {s.path(i) for i in range(len(s))}  # noqa: E731
    assert len(train) == 16 and len(val) == 4 and paths(val) == paths(again) and not paths(val) & paths(train)
    assert sorted(val.label(i) for i in range(len(val))) == [0, 0, 1, 1] and train.channels == 3
    make_tree(tmp_path / "tree", splits=("val",))
    with pytest.raises(DataError, match="its own val folder"):
        ImageFolderSource(tmp_path / "tree", "val", val_fraction=0.2)


def test_webdataset_source_needs_info_json(tmp_path: Path) -> None:
    (tmp_path / "train-000000.tar").write_bytes(b"")
    with pytest.raises(DataError, match="info.json not found"):
        WebDatasetSource(str(tmp_path / "train-{000000..000000}.tar"), "train")


# ----------------------------------------------------------------------------------------------- imagefolder
def test_image_folder_epoch_shapes_and_exact_resume(tmp_path: Path) -> None:
    make_tree(tmp_path, per_class=12)
    source = ImageFolderSource(tmp_path, "train")
    loader = StreamingLoader(source, 6, train=True, transform=Tagged(), seed=3, workers=0)
    assert len(loader) == 4
    full = collect(loader, epoch=1)
    assert all(x.dtype == torch.uint8 and x.shape == (6, 3, 8, 8) and y.dtype == torch.int64 for x, y in full)
    tail = collect(loader, epoch=1, start_step=2)
    assert len(tail) == 2 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                  for a, b in zip(full[2:], tail, strict=True))
    assert not torch.equal(collect(loader, epoch=2)[0][0], full[0][0])  # another epoch, another order
    workers = StreamingLoader(source, 6, train=True, transform=Tagged(), seed=3, workers=2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full, collect(workers, epoch=1), strict=True))


def test_image_folder_ranks_split_the_global_batch_and_eval_covers_all(tmp_path: Path) -> None:
    make_tree(tmp_path, per_class=6)
    source = ImageFolderSource(tmp_path, "train")
    single = collect(StreamingLoader(source, 4, train=True, transform=Tagged(), workers=0))
    ranks = [collect(StreamingLoader(source, 4, train=True, transform=Tagged(), rank=r, world_size=2, workers=0))
             for r in range(2)]
    for k, (x, _) in enumerate(single):
        assert torch.equal(x[0::2], ranks[0][k][0]) and torch.equal(x[1::2], ranks[1][k][0])
    evals = [StreamingLoader(ImageFolderSource(tmp_path, "val"), 5, train=False, transform=resize_to(8), rank=r,
                             world_size=2, workers=0) for r in range(2)]
    assert [len(e) for e in evals] == [2, 2] and sum(len(y) for e in evals for _, y in collect(e)) == 12


# ------------------------------------------------------------------------------------------------ webdataset
@pytest.fixture()
def shards(tmp_path: Path) -> Path:
    make_tree(tmp_path / "tree", per_class=24, splits=("train",))  # 48 images -> 8 shards of 6
    pack_shards(tmp_path / "tree", tmp_path / "shards", shard_size=6, split="train")
    return tmp_path / "shards"


def keys(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
    return [int(x[0, 0, 0]) * 256 + int(x[0, 0, 1]) for images, _ in batches for x in images]


def test_webdataset_every_sample_once_per_epoch_over_two_ranks_and_two_workers(shards: Path) -> None:
    source = WebDatasetSource(str(shards / "train-{000000..000007}.tar"), "train", shuffle_buffer=4)
    assert len(source) == 48 and source.classes == ("a", "b") and source.channels == 3
    every = sorted(keys(collect(StreamingLoader(source, 8, train=True, transform=Tagged(), workers=0))))
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            loader = StreamingLoader(source, 8, train=True, transform=Tagged(), rank=rank, world_size=2, workers=2)
            assert len(loader) == 6
            batches = collect(loader, epoch)
            assert len(batches) == 6 and all(x.shape == (4, 3, 8, 8) for x, _ in batches)
            seen += keys(batches)
        assert len(seen) == 48 and len(set(seen)) == 48
        if epoch == 0:
            assert sorted(seen) == every  # the same samples (and their augmentation) whatever the worker layout


def test_webdataset_resume_and_eval(shards: Path) -> None:
    source = WebDatasetSource(shards, "train", shuffle_buffer=4)
    loader = StreamingLoader(source, 4, train=True, transform=Tagged(), workers=2)
    full = keys(collect(loader, epoch=1))
    tail = keys(collect(loader, epoch=1, start_step=3))
    window = 2 * loader.workers * 2 * 4  # two prefetch windows' worth of slack in samples
    assert len(tail) == len(full) - 3 * 4 and len(set(tail) ^ set(full[12:])) <= window
    assert tail == full[12:]  # in fact exact
    evaluation = StreamingLoader(source, 5, train=False, transform=Tagged(), workers=2)
    assert sum(len(y) for _, y in collect(evaluation)) == 48
    with pytest.raises(DataError, match="8 train shards cannot feed 3 processes x 3 workers"):
        StreamingLoader(source, 9, train=True, transform=Tagged(), world_size=3, workers=3)


# ------------------------------------------------------------------------------------------ unreadable images
@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_images_are_skipped_with_a_warning_then_an_error(tmp_path: Path, workers: int) -> None:
    make_tree(tmp_path, per_class=10, ext="jpg")
    bad = tmp_path / "train" / "a"
    (bad / "000.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    truncated = bad / "001.jpg"
    truncated.write_bytes(truncated.read_bytes()[:60])
    png_header(bad / "bomb.png", 12_000)
    source = ImageFolderSource(tmp_path, "train")
    loader = StreamingLoader(source, 21, train=True, transform=resize_to(8), workers=workers, max_bad_images=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (images, labels), = collect(loader)
    messages = [str(w.message) for w in caught if issubclass(w.category, BadImageWarning)]
    assert len(images) == len(labels) == 18 and len(messages) == 3
    for name in ("000.jpg", "001.jpg", "bomb.png"):
        assert sum(name in m for m in messages) == 1
    strict = StreamingLoader(source, 21, train=True, transform=resize_to(8), workers=workers, max_bad_images=2)
    with pytest.warns(BadImageWarning), pytest.raises(DataError, match=r"3 unreadable images, more than "
                                                                       r"max_bad_images=2 \(the last: .*"):
        collect(strict)


# ------------------------------------------------------------------------------------------------ memory bound
@dataclass(frozen=True)
class Counting:
    """resize_to(8) that counts the decoded images in flight (shared across worker processes)."""

    live: Any
    peak: Any

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        with self.live.get_lock():
            self.live.value += 1
            self.peak.value = max(self.peak.value, self.live.value)
        return resize_to(8)(image, generator)


@pytest.mark.parametrize("workers, kind", [(0, "folder"), (2, "folder"), (2, "shards")])
def test_memory_holds_at_most_the_prefetch_window(shards: Path, workers: int, kind: str) -> None:
    live, peak = multiprocessing.Value("i", 0), multiprocessing.Value("i", 0)
    source = ImageFolderSource(shards.parent / "tree", "train", val_fraction=0.5) if kind == "folder" else \
        WebDatasetSource(shards, "train", shuffle_buffer=2)
    loader = StreamingLoader(source, 2, train=True, transform=Counting(live, peak), workers=workers, prefetch=2)
    steps = 0
    for images, _ in loader.epoch(0):
        steps += 1
        with live.get_lock():
            live.value -= len(images)
    assert steps == len(loader) >= 12 and live.value == 0
    assert peak.value <= (workers * 2 + 1) * 2 < steps * 2  # never the whole epoch


# -------------------------------------------------------------------------------------------------- statistics
def test_estimate_stats_is_deterministic_and_matches_the_pixels(tmp_path: Path) -> None:
    make_tree(tmp_path, per_class=4, mode="L")
    source = ImageFolderSource(tmp_path, "train")
    mean, std = estimate_stats(source, 8)
    assert len(mean) == 1 and estimate_stats(source, 8) == (mean, std)
    pixels = torch.cat([resize_to(8)(source.load(i)).flatten() for i in range(len(source))]).double() / 255
    assert mean[0] == pytest.approx(pixels.mean().item(), abs=1e-6)
    assert std[0] == pytest.approx(pixels.std().item(), rel=0.05)


def test_repeated_augmentation_draws_each_image_several_times_with_its_own_augmentation(tmp_path: Path) -> None:
    """repeats=3 (DeiT's repeated augmentation): an epoch of N draws holds N/3 images, each 3 times in a row of the
    global order (so on consecutive ranks), each copy differently augmented; resume stays exact."""
    make_tree(tmp_path, per_class=12)  # 24 training images
    source = ImageFolderSource(tmp_path, "train")
    loader = StreamingLoader(source, 6, train=True, transform=Tagged(), seed=1, workers=0, repeats=3)
    batches = collect(loader)
    assert len(batches) == 4
    order = torch.randperm(24, generator=torch.Generator().manual_seed(stable_seed(1, 0)))
    expected = order.repeat_interleave(3)[:24]
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert labels.tolist() == [source.label(int(i)) for i in expected]
    for first in range(0, 24, 3):  # the three copies of one image: same label, other augmentation tags
        tags = {(int(images[j, 0, 0, 0]), int(images[j, 0, 0, 1])) for j in range(first, first + 3)}
        assert len(tags) == 3
    tail = collect(loader, 0, 2)
    for (a, b), (c, d) in zip(batches[2:], tail, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)
    shards = tmp_path.parent / f"{tmp_path.name}-shards"  # beside the tree: pack refuses to write into it
    pack_shards(tmp_path, shards, shard_size=4)
    with pytest.raises(ValueError, match="indexable source"):
        StreamingLoader(WebDatasetSource(shards, "train"), 4, train=True, transform=Tagged(), workers=0, repeats=3)


def test_every_source_is_a_source(tmp_path: Path, shards: Path) -> None:
    """ImageFolder, WebDataset and in-memory sources all answer the one Source protocol; the indexable ones the
    IndexedSource protocol the streaming loader reads them through."""
    from visionmix.data import load_digits
    from visionmix.data.sources import IndexedSource, MemorySource, Source

    imagefolder = ImageFolderSource(tmp_path / "tree", "train")
    webdataset = WebDatasetSource(shards, "train")
    memory = MemorySource(load_digits("test"))
    for source in (imagefolder, webdataset, memory):
        assert isinstance(source, Source)
    assert isinstance(imagefolder, IndexedSource) and isinstance(memory, IndexedSource)
    assert not isinstance(webdataset, IndexedSource)


def test_the_pin_memory_thread_starts_on_the_training_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """DataLoader's pin-memory thread pins for the device current when its iterator is made: the loader makes it
    with the training device current (``cuda:1`` here), not cuda:0. No GPU needed: the device switch is recorded."""
    import contextlib

    import visionmix.data.streaming as streaming
    from visionmix.data import build_dataset
    from visionmix.data.sources import MemorySource

    switched: list[int] = []

    @contextlib.contextmanager
    def device_index(index: int):
        switched.append(index)
        yield

    monkeypatch.setattr(torch.accelerator, "device_index", device_index)
    monkeypatch.setattr(streaming, "to_device", lambda tensor, device: tensor, raising=False)  # no GPU here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pin_memory without an accelerator
        loader = StreamingLoader(MemorySource(build_dataset("digits", "train", max_samples=64)), 16, train=True,
                                 transform=resize_to(28), workers=0, device="cuda:1")
        images, labels = next(loader.epoch(0))
    assert switched == [1] and images.shape == (16, 1, 28, 28)
