"""ImageFolder trees, ``root/{train,val}/<class>/<image>`` (``test`` accepted for ``val``), read file by file; or a
single tree (``root/<class>/*`` or ``root/train``) split by ``val_fraction``."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from visionmix.data import shards
from visionmix.data.decode import DEFAULT_DECODE_SIZE, IMAGE_EXTENSIONS, decode_image, image_mode, to_tensor
from visionmix.data.seeds import stable_seed
from visionmix.data.sources.base import split_name
from visionmix.errors import DataError, InvalidValue, UnreadableImage

GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


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
        self.root, self.split, self.name = root, split_name(split), "imagefolder"
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
        return to_tensor(decode_image(self.path(i), self._mode, (s, s)))
