"""Packing image datasets for streaming: ImageFolder trees into WebDataset tar shards, and the installed
Fashion-MNIST into an ImageFolder tree or shards (``visionmix data pack``).

Shards are ``OUT_DIR/{split}-{000000..}.tar`` (samples in a fixed shuffled order, ``__key__`` = 8-digit index,
the image bytes as they were under their extension, ``cls`` = label) plus ``OUT_DIR/info.json`` (format in
:mod:`visionmix.data.streaming`). Nothing of the user's is overwritten or deleted: OUT_DIR must be new or empty, or
hold only what pack wrote for other splits; ``force`` replaces pack's own files (its naming pattern) and leaves
every other file alone. Each file is written to a temporary name and renamed, info.json last.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visionmix.checks import check_choice, check_positive
from visionmix.data.datasets import FASHION_MNIST_CLASSES, DataError, build_dataset, channel_stats
from visionmix.data.loader import stable_seed
from visionmix.data.streaming import (
    INFO_FORMAT,
    INFO_NAME,
    BadImageWarning,
    ImageFolderSource,
    _read_info,
)
from visionmix.files import atomic_write_json, staged, write_new

FORMATS = ("shards", "imagefolder")
IMAGE_FORMATS = ("png", "jpeg")
DEFAULT_SHARD_SIZE = 1000
_SHARD_RE = re.compile(r"(?P<split>train|val)-\d{6}\.tar")

Record = tuple[str, bytes, int]  # (extension, encoded image, label)


def safe_class_names(names: tuple[str, ...]) -> tuple[str, ...]:
    """Folder names for classes, in label order when sorted: ``<index>_<name>`` with characters other than letters,
    digits, ``.``, ``-``, ``_`` and space replaced by ``_`` (``"T-shirt/top"`` -> ``"0_T-shirt_top"``)."""
    width = len(str(len(names) - 1))
    return tuple(f"{i:0{width}d}_{re.sub(r'[^A-Za-z0-9._ -]', '_', n)}" for i, n in enumerate(names))


def _check_out_dir(out_dir: Path, is_own: Callable[[Path], bool], force: bool) -> None:
    """OUT_DIR may exist only as a directory holding nothing but pack's files (anything, with ``force``)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if not out_dir.is_dir() or force:
        return
    foreign = sorted(p.name for p in out_dir.iterdir() if not is_own(p))
    if foreign:
        raise FileExistsError(f"{out_dir} holds files pack did not write ({', '.join(foreign[:3])}"
                              f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty directory, or pass "
                              f"--force (which replaces only pack's own files)")


def _is_shard_output(path: Path) -> bool:
    return path.is_file() and (path.name == INFO_NAME or _SHARD_RE.fullmatch(path.name) is not None)


def _image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header, ``None`` if it cannot be read."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (OSError, SyntaxError, ValueError):
        return None


def _merge_info(out_dir: Path, split: str, entry: dict[str, Any], meta: dict[str, Any], force: bool) -> None:
    """Add ``split`` to ``out_dir/info.json`` (created if absent); replacing a split needs ``force``."""
    info = _read_info(out_dir) or {}
    if info.get("classes", meta["classes"]) != meta["classes"]:
        if not force:
            raise DataError(f"{out_dir / INFO_NAME} lists other classes than {split}'s; pack into a new directory")
        info = {}
    if split in info.get("splits", {}) and not force:
        raise FileExistsError(f"{out_dir} already holds a {split} split; pass --force to replace it")
    splits = {**info.get("splits", {}), split: entry}
    size = meta["image_size"] if not info.get("splits") or info.get("image_size") == meta["image_size"] else None
    known = {k: v for k, v in meta.items() if v is not None}
    atomic_write_json(out_dir / INFO_NAME, {"format": INFO_FORMAT, "version": 1, **info, **known,
                                            "image_size": size, "splits": splits})


def _write_shards(records: Iterator[Record], out_dir: Path, split: str, shard_size: int, meta: dict[str, Any],
                  force: bool) -> Path:
    """Shards of ``shard_size`` records (the last may be shorter; at least one shard) and the info.json entry."""
    import webdataset as wds

    if not force and out_dir.is_dir():
        taken = sorted(p.name for p in out_dir.glob(f"{split}-*.tar") if _SHARD_RE.fullmatch(p.name))
        if taken:
            raise FileExistsError(f"{out_dir} already holds {split} shards ({taken[0]}, ...); pass --force to "
                                  f"replace them")
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    sizes: set[tuple[int, int] | None] = set()
    index, records = 0, iter(records)
    first = next(records, None)
    while first is not None or not shards:
        name = f"{split}-{len(shards):06d}.tar"
        with staged(out_dir / name, force) as tmp, tmp.open("wb") as f:
            writer = wds.TarWriter(f, mtime=0)
            written = 0
            while first is not None and written < shard_size:
                ext, data, label = first
                writer.write({"__key__": f"{index:08d}", ext: data, "cls": label})
                sizes.add(_image_size(data))
                index, written, first = index + 1, written + 1, next(records, None)
            writer.close()
            f.flush()
            os.fsync(f.fileno())
        shards.append({"name": name, "count": written})
    entry = {"pattern": f"{split}-{{000000..{len(shards) - 1:06d}}}.tar", "count": index, "shards": shards}
    size = next(iter(sizes)) if len(sizes) == 1 else None
    _merge_info(out_dir, split, entry, {**meta, "image_size": list(size) if size else None}, force)
    return out_dir / INFO_NAME


def pack_shards(src: str | Path | ImageFolderSource, out_dir: str | Path, *, shard_size: int = DEFAULT_SHARD_SIZE,
                split: str = "train", force: bool = False) -> Path:
    """Write split ``split`` of an ImageFolder tree (a path or an :class:`ImageFolderSource`) as tar shards of
    ``shard_size`` samples in ``out_dir`` and add it to ``out_dir/info.json``; returns that file's path.

    Images are stored byte for byte in a fixed shuffled order (the loader only shuffles within a buffer); a file
    whose header cannot be read is left out with a warning (``info.json`` counts them under ``skipped``).
    """
    check_positive("shard_size", shard_size)
    source = src if isinstance(src, ImageFolderSource) else ImageFolderSource(src, split)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, _is_shard_output, force)
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(stable_seed("pack", source.split)))
    skipped = 0

    def records() -> Iterator[Record]:
        nonlocal skipped
        for i in order.tolist():
            path = source.path(i)
            data = path.read_bytes()
            if _image_size(data) is None:
                warnings.warn(f"pack: leaving out {path}: not a readable image", BadImageWarning, stacklevel=2)
                skipped += 1
                continue
            yield path.suffix.lower().lstrip("."), data, source.label(i)

    meta = {"classes": list(source.classes), "class_names": list(source.class_names), "channels": source.channels,
            "mean": list(source.mean) if source.mean else None, "std": list(source.std) if source.std else None}
    info = _write_shards(records(), out_dir, source.split, shard_size, meta, force)
    if skipped:
        data = _read_info(out_dir) or {}
        data["splits"][source.split]["skipped"] = skipped
        atomic_write_json(info, data)
    return info


def _encode(image: np.ndarray, image_format: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    pil = Image.fromarray(image)
    if image_format == "png":
        pil.save(buffer, format="PNG", optimize=False)
    else:
        pil.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def pack_fashion_mnist(out_dir: str | Path, *, image_size: int = 28, image_format: str = "png",
                       layout: str = "imagefolder", shard_size: int = DEFAULT_SHARD_SIZE,
                       data_dir: str | Path | None = None, max_samples: int | None = None,
                       force: bool = False) -> Path:
    """Write the installed Fashion-MNIST (train, and test as ``val``) as greyscale PNG/JPEG files resized to
    ``image_size``: ``out_dir/{train,val}/<index>_<class>/<n>.<ext>`` (folder names from
    :func:`safe_class_names`, real names in ``out_dir/info.json``) or tar shards. ``max_samples`` keeps a fixed
    subset of each split. Returns the path of ``info.json``."""
    check_choice("image_format", image_format, IMAGE_FORMATS)
    check_choice("layout", layout, FORMATS)
    check_positive("image_size", image_size)
    check_positive("shard_size", shard_size)
    out_dir = Path(out_dir)
    classes = safe_class_names(FASHION_MNIST_CLASSES)
    ext = "png" if image_format == "png" else "jpg"
    if layout == "shards":
        _check_out_dir(out_dir, _is_shard_output, force)
    else:
        _check_out_dir(out_dir, lambda p: False, force)  # an ImageFolder tree goes into a new directory
    meta: dict[str, Any] = {"classes": list(classes), "class_names": list(FASHION_MNIST_CLASSES), "channels": 1}
    counts = {}
    for split, name in (("train", "train"), ("test", "val")):
        ds = build_dataset("fashion-mnist", split, data_dir, max_samples, image_size=image_size)
        if split == "train":
            mean, std = channel_stats(ds.images)
            meta.update(mean=list(mean), std=list(std))
        images, labels = ds.images[:, 0].numpy(), ds.labels.tolist()
        counts[name] = len(labels)
        if layout == "shards":
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(stable_seed("pack", name)))
            records = ((ext, _encode(images[i], image_format), labels[i]) for i in order.tolist())
            _write_shards(records, out_dir, name, shard_size, meta, force)
            continue
        for cls in classes:  # every class folder, even one a small subset leaves empty: labels stay in place
            (out_dir / name / cls).mkdir(parents=True, exist_ok=True)
        for i, label in enumerate(labels):
            write_new(out_dir / name / classes[label] / f"{i:05d}.{ext}", _encode(images[i], image_format),
                      force=force)
    if layout == "imagefolder":
        atomic_write_json(out_dir / INFO_NAME, {"format": INFO_FORMAT, "version": 1, **meta,
                                               "image_size": [image_size, image_size], "counts": counts})
    return out_dir / INFO_NAME
