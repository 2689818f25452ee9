"""Packing image datasets for streaming (``visionmix data pack``): an ImageFolder tree into WebDataset tar shards,
and the installed Fashion-MNIST into an ImageFolder tree or shards.

Shards are ``OUT_DIR/{split}-{000000..}.tar`` (samples in a fixed shuffled order, ``__key__`` = 8-digit index, the
image bytes as they were under their extension, ``cls`` = label) plus ``OUT_DIR/info.json``
(:mod:`visionmix.data.shards`), which also says which files pack wrote. Before anything is written, pack refuses an
OUT_DIR inside SRC (or SRC inside OUT_DIR), a file it did not write where it would write one (even with
``force``), and without ``force`` any file it did not write in OUT_DIR, or a finished split of its own. A split is
marked incomplete in info.json while it is written, so a pack that was killed leaves nothing that looks finished,
and running it again replaces what it left. One pack writes an OUT_DIR at a time
(:func:`visionmix.files.hold_directory`).
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visionmix.checks import check_choice, check_positive
from visionmix.data import shards
from visionmix.data.builtin import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, build_dataset
from visionmix.data.seeds import stable_seed
from visionmix.data.sources import ImageFolderSource
from visionmix.data.stats import channel_stats
from visionmix.errors import BadImageWarning, DataError, InvalidValue
from visionmix.files import atomic_write_json, entries, hold_directory, staged, temporary_target, write_new

FORMATS = ("shards", "imagefolder")
IMAGE_FORMATS = ("png", "jpeg")
DEFAULT_SHARD_SIZE = 1000

Record = tuple[str, bytes, int]  # (extension, encoded image, label)


def safe_class_names(names: tuple[str, ...]) -> tuple[str, ...]:
    """Folder names for classes, in label order when sorted: ``<index>_<name>`` with characters other than letters,
    digits, ``.``, ``-``, ``_`` and space replaced by ``_`` (``"T-shirt/top"`` -> ``"0_T-shirt_top"``)."""
    width = len(str(len(names) - 1))
    return tuple(f"{i:0{width}d}_{re.sub(r'[^A-Za-z0-9._ -]', '_', n)}" for i, n in enumerate(names))


def check_apart(src: str | Path, out_dir: str | Path) -> None:
    """``ValueError`` if OUT_DIR is SRC, lies inside it, or holds it: pack would write into what it reads."""
    s, o = Path(src).resolve(), Path(out_dir).resolve()
    if o == s or o.is_relative_to(s):
        raise InvalidValue(f"OUT_DIR {out_dir} lies inside SRC {src}: pack would write into the dataset it reads; "
                           f"choose an OUT_DIR outside it")
    if s.is_relative_to(o):
        raise InvalidValue(f"SRC {src} lies inside OUT_DIR {out_dir}: pack would write beside the dataset it reads; "
                           f"choose another OUT_DIR")


class _Output:
    """OUT_DIR as pack finds it: its info.json, the files pack wrote there, and the user's files."""

    def __init__(self, out_dir: Path, layout: str, force: bool) -> None:
        self.dir, self.force = out_dir, force
        self.info = shards.read_info(out_dir)
        if self.info is not None and shards.layout(self.info) != layout:
            raise FileExistsError(f"{out_dir} holds a pack of another layout ({shards.layout(self.info)}); pack "
                                  f"into a new directory")
        self.owned = shards.owned_files(out_dir, self.info)
        foreign = [name for name in entries(out_dir) if not self._owned_below(out_dir / name)]
        if foreign and not force:
            raise FileExistsError(f"{out_dir} holds files pack did not write ({', '.join(foreign[:3])}"
                                  f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty directory, or pass "
                                  f"--force (which keeps them and replaces only pack's own files)")

    def _owned_below(self, path: Path) -> bool:
        """Whether ``path`` is pack's file, or a folder holding only pack's files."""
        if path.is_dir() and not path.is_symlink():
            return all(self._owned_below(p) for p in path.iterdir())
        return path in self.owned

    def check_split(self, split: str) -> None:
        """A finished ``split`` of pack's own is replaced only with ``force``; an interrupted one is replaced."""
        entry = (self.info or {}).get("splits", {}).get(split)
        if entry is not None and not entry.get("incomplete") and not self.force:
            raise FileExistsError(f"{self.dir} already holds a {split} split; pass --force to replace it")

    def check_targets(self, targets: list[Path]) -> None:
        """No file that pack did not write may stand where it will write."""
        taken = [p for p in targets if (p.exists() or p.is_symlink()) and p not in self.owned]
        if taken:
            raise FileExistsError(f"{taken[0]} was not written by pack (it is not listed in "
                                  f"{self.dir / shards.INFO_NAME}) and stands where pack would write; move it or "
                                  f"choose another OUT_DIR")

    def start(self, split: str, meta: dict[str, Any]) -> None:
        """Remove the temporary files a killed pack left, then mark ``split`` incomplete in info.json."""
        for path in self.owned:
            if path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
        info = {"format": shards.INFO_FORMAT, "version": 1, **(self.info or {}), **meta}
        info["splits"] = {**info.get("splits", {}), split: {"incomplete": True}}
        self.write(info)

    def finish(self, split: str, entry: dict[str, Any], written: set[Path], extra: dict[str, Any]) -> None:
        """Delete pack's files of ``split`` that this pack did not rewrite, then record the split as finished."""
        for path in self.owned - written:
            if path.name != shards.INFO_NAME and _split_of(self.dir, path) == split:
                path.unlink(missing_ok=True)
        info = dict(self.info or {})
        info.update(extra)
        info["splits"] = {**info.get("splits", {}), split: entry}
        self.write(info)

    def write(self, info: dict[str, Any]) -> None:
        atomic_write_json(self.dir / shards.INFO_NAME, info)
        self.info = info


def _split_of(out_dir: Path, path: Path) -> str | None:
    """The split a file of pack's belongs to: a shard's name prefix, or an ImageFolder file's top folder."""
    relative = path.relative_to(out_dir).parts
    if len(relative) > 1:
        return relative[0]
    match = shards.SHARD_RE.fullmatch(temporary_target(path.name) or path.name)
    return match["split"] if match else None


def _image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header, ``None`` if it cannot be read."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0
    tar.addfile(info, io.BytesIO(data))


def _shard_names(split: str, count: int) -> list[str]:
    return [f"{split}-{i:06d}.tar" for i in range(count)]


def _write_shards(records: Iterator[Record], output: _Output, split: str, shard_size: int, total: int,
                  meta: dict[str, Any]) -> None:
    """Shards of ``shard_size`` records (the last may be shorter; at least one) for at most ``total`` records,
    with the split's info.json entry. Each shard is a plain tar written to a temporary name and renamed."""
    output.check_targets([output.dir / n for n in _shard_names(split, max(1, -(-total // shard_size)))])
    output.start(split, meta)
    names: list[dict[str, Any]] = []
    sizes: set[tuple[int, int] | None] = set()
    index, records = 0, iter(records)
    first = next(records, None)
    while first is not None or not names:
        name = f"{split}-{len(names):06d}.tar"
        with staged(output.dir / name, force=True) as tmp, tmp.open("wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                written = 0
                while first is not None and written < shard_size:
                    ext, data, label = first
                    _tar_member(tar, f"{index:08d}.{ext}", data)
                    _tar_member(tar, f"{index:08d}.cls", str(label).encode())
                    sizes.add(_image_size(data))
                    index, written, first = index + 1, written + 1, next(records, None)
            f.flush()
            os.fsync(f.fileno())
        names.append({"name": name, "count": written})
    entry = {"pattern": f"{split}-{{000000..{len(names) - 1:06d}}}.tar", "count": index, "shards": names}
    size = next(iter(sizes)) if len(sizes) == 1 else None
    previous = (output.info or {}).get("image_size")
    others = [s for s, e in (output.info or {}).get("splits", {}).items() if s != split and not e.get("incomplete")]
    same = not others or previous == (list(size) if size else None)
    output.finish(split, entry, {output.dir / n["name"] for n in names},
                  {"image_size": list(size) if size and same else None})


def _pack_split(source: ImageFolderSource, output: _Output, shard_size: int) -> None:
    output.check_split(source.split)
    meta = {"layout": "shards", "classes": list(source.classes), "class_names": list(source.class_names),
            "channels": source.channels, "mean": list(source.mean) if source.mean else None,
            "std": list(source.std) if source.std else None}
    if output.info is not None and output.info.get("classes", meta["classes"]) != meta["classes"]:
        raise DataError(f"{output.dir / shards.INFO_NAME} lists other classes than {source.split}'s; pack "
                               f"into a new directory")
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

    _write_shards(records(), output, source.split, shard_size, len(source),
                  {k: v for k, v in meta.items() if v is not None})
    if skipped:
        info = dict(output.info or {})
        info["splits"][source.split]["skipped"] = skipped
        output.write(info)


def pack_shards(src: str | Path, out_dir: str | Path, *, shard_size: int = DEFAULT_SHARD_SIZE,
                split: str = "train", force: bool = False) -> Path:
    """Write split ``split`` of the ImageFolder tree ``src`` as tar shards of ``shard_size`` samples in ``out_dir``
    and add it to ``out_dir/info.json``; returns that file's path.

    Images are stored byte for byte in a fixed shuffled order (the loader only shuffles within a buffer); a file
    whose header cannot be read is left out with a warning (``info.json`` counts them under ``skipped``).
    """
    return pack_imagefolder(src, out_dir, shard_size=shard_size, splits=(split,), force=force)


def pack_imagefolder(src: str | Path, out_dir: str | Path, *, shard_size: int = DEFAULT_SHARD_SIZE,
                     splits: tuple[str, ...] | None = None, force: bool = False) -> Path:
    """Pack the ``splits`` of the ImageFolder tree ``src`` (default: train, and val or test where the tree has one)
    into shards in ``out_dir``, holding it throughout (see :func:`pack_shards`); returns info.json's path."""
    check_positive("shard_size", shard_size)
    src, out_dir = Path(src), Path(out_dir)
    if not src.is_dir():
        raise InvalidValue(f"SRC {src} is not a directory")
    check_apart(src, out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if splits is None:
        splits = ("train", *(("val",) if (src / "val").is_dir() or (src / "test").is_dir() else ()))
    sources = [ImageFolderSource(src, split) for split in splits]  # every split readable before anything is written
    with hold_directory(out_dir, "visionmix data pack"):
        output = _Output(out_dir, "shards", force)
        for source in sources:
            _pack_split(source, output, shard_size)
    return out_dir / shards.INFO_NAME


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
    check_apart(data_dir or FASHION_MNIST_DIR, out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    classes = safe_class_names(FASHION_MNIST_CLASSES)
    ext = "png" if image_format == "png" else "jpg"
    datasets = {name: build_dataset("fashion-mnist", split, data_dir, max_samples, image_size=image_size)
                for split, name in (("train", "train"), ("test", "val"))}
    mean, std = channel_stats(datasets["train"].images)
    meta: dict[str, Any] = {"layout": layout, "classes": list(classes), "class_names": list(FASHION_MNIST_CLASSES),
                            "channels": 1, "mean": list(mean), "std": list(std)}
    with hold_directory(out_dir, "visionmix data pack"):
        output = _Output(out_dir, layout, force)
        for name, ds in datasets.items():
            output.check_split(name)
            images, labels = ds.images[:, 0].numpy(), ds.labels.tolist()
            if layout == "shards":
                order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(stable_seed("pack", name)))
                records = ((ext, _encode(images[i], image_format), labels[i]) for i in order.tolist())
                _write_shards(records, output, name, shard_size, len(labels), meta)
                continue
            paths = [out_dir / name / classes[label] / f"{i:05d}.{ext}" for i, label in enumerate(labels)]
            output.check_targets(paths)
            output.start(name, meta)
            for cls in classes:  # every class folder, even one a small subset leaves empty: labels stay in place
                (out_dir / name / cls).mkdir(parents=True, exist_ok=True)
            for i, path in enumerate(paths):
                write_new(path, _encode(images[i], image_format), force=True)
            output.finish(name, {"count": len(labels)}, set(paths), {"image_size": [image_size, image_size]})
    return out_dir / shards.INFO_NAME
