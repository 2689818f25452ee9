"""The built-in datasets, loaded into memory (:class:`~visionmix.data.memory.ImageDataset`).

Readers: Fashion-MNIST IDX files (raw or ``.gz``), CIFAR-10/100 python batches (through a restricted unpickler)
and scikit-learn's bundled 8x8 digits (upsampled to 28x28 so every nano model takes them); ImageFolder trees and
WebDataset shards are streamed (:mod:`visionmix.data.sources`, :mod:`visionmix.data.streaming`). Every reader
checks what it reads and raises :class:`DataError` with a one-line message naming the file.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import pickle
import zlib
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from visionmix.data.decode import resize_uint8
from visionmix.data.memory import ImageDataset, check_fits_in_memory
from visionmix.data.stats import channel_stats
from visionmix.errors import DataError

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagefolder", "webdataset", "digits")
SPLITS = ("train", "test")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DIGITS_TEST_FRACTION = 0.2


def build_dataset(name: str, split: str = "train", data_dir: str | Path | None = None,
                  max_samples: int | None = None, *, image_size: int | None = None) -> ImageDataset:
    """Load split ``split`` of dataset ``name`` (one of :data:`DATASETS`) into memory.

    ``data_dir`` defaults to Debian's Fashion-MNIST directory for ``fashion-mnist``; the other file-based datasets
    need it. ``image_size`` resizes (bilinear) to a square size; by default images keep their size, except digits
    (8 -> 28). ``imagefolder`` and ``webdataset`` are streamed, not loaded: a :class:`DataError` says so.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if image_size is not None and image_size <= 0:
        raise DataError(f"image_size must be positive, got {image_size}")
    if name == "fashion-mnist":
        ds = load_fashion_mnist(data_dir or FASHION_MNIST_DIR, split)
    elif name in ("cifar10", "cifar100"):
        ds = load_cifar(name, data_dir, split)
    elif name in ("imagefolder", "webdataset"):
        raise DataError(f"{name} data are streamed from disk, not loaded into memory: read them with "
                        f"visionmix.data.sources.open_source (visionmix train --data {name} does)")
    else:
        ds = load_digits(split, image_size or 28)
    ds = ds.subset(max_samples)
    if image_size is not None and ds.image_size != (image_size, image_size):
        check_fits_in_memory(len(ds), ds.channels, image_size, f"{name} {split}")
        ds = replace(ds, images=resize_uint8(ds.images, image_size))
    return ds


# --------------------------------------------------------------------------------------------------- IDX files
_IDX_UBYTE = 0x08


def _read_bytes(path: Path) -> bytes:
    """Whole file, gunzipped when it ends in .gz; a damaged gzip stream is a :class:`DataError`."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"{path}: damaged or truncated gzip file ({exc}); re-install or re-download it") from exc


def read_idx(path: str | Path, ndim: int) -> torch.Tensor:
    """Read an IDX file of unsigned bytes with ``ndim`` dimensions (LeCun's MNIST format) into a uint8 tensor.

    Layout: magic ``0x00 0x00 0x08 ndim``, ``ndim`` big-endian uint32 sizes, then the row-major data.
    """
    path = Path(path)
    raw = _read_bytes(path)
    header = 4 + 4 * ndim
    expected_magic = (_IDX_UBYTE << 8) | ndim
    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes is too short for an IDX file")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DataError(f"{path}: bad magic number 0x{magic:08x}; an IDX file of {ndim}-d unsigned bytes starts "
                        f"with 0x{expected_magic:08x}")
    if len(raw) < header:
        raise DataError(f"{path}: truncated header ({len(raw)} of {header} bytes)")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    size = int(np.prod(dims))
    if len(raw) - header != size:
        state = "truncated" if len(raw) - header < size else "longer than its header says"
        raise DataError(f"{path}: {state}: header says {'x'.join(map(str, dims))} = {size} bytes of data, "
                        f"the file holds {len(raw) - header}")
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, count=size, offset=header).reshape(dims).copy())


def _find_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def load_fashion_mnist(data_dir: str | Path, split: str) -> ImageDataset:
    """Fashion-MNIST (1708.07747) from the four standard IDX files, ``.gz`` or uncompressed, in ``data_dir``."""
    data_dir = Path(data_dir)
    prefix = "train" if split == "train" else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    found = [_find_file(data_dir, stem) for stem in stems]
    missing = [stem for stem, path in zip(stems, found, strict=True) if path is None]
    if missing:
        where = "is not a directory" if not data_dir.is_dir() else "lacks " + ", ".join(f"{m}[.gz]" for m in missing)
        raise DataError(f"Fashion-MNIST {split} split not found: {data_dir} {where}; install it with "
                        f"'sudo apt-get install dataset-fashion-mnist' (files go to {FASHION_MNIST_DIR}) "
                        f"or pass --data-dir DIR holding the four IDX files")
    images, labels = read_idx(found[0], 3), read_idx(found[1], 1)
    if len(images) != len(labels):
        raise DataError(f"Fashion-MNIST {split}: {found[0].name} holds {len(images)} images but "
                        f"{found[1].name} holds {len(labels)} labels")
    return ImageDataset("fashion-mnist", split, images.unsqueeze(1), labels.long(), FASHION_MNIST_CLASSES,
                        mean=(0.2860,), std=(0.3530,), hflip=True, crop_padding=2)


# ------------------------------------------------------------------------------------------------- CIFAR batches
_CIFAR_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol 2
}


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR python batch is made of: dicts, lists, ints, bytes/str and uint8 numpy arrays."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}")
        return super().find_class(module, name)


def read_cifar_batch(path: str | Path) -> dict[str, object]:
    """Unpickle one CIFAR python batch (a dict) without executing anything but numpy array reconstruction.

    Keys come back as ``str`` whether the file was written by Python 2 (bytes keys) or Python 3.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            obj = _CifarUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DataError(f"{path}: not a CIFAR python batch ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR python batch (holds a {type(obj).__name__}, expected a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _cifar_arrays(path: Path, label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    batch = read_cifar_batch(path)
    data, labels = batch.get("data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {got}")
    if not isinstance(labels, list | np.ndarray) or len(labels) != len(data):
        count = len(labels) if isinstance(labels, list | np.ndarray) else type(labels).__name__
        raise DataError(f"{path}: {len(data)} images but {count} entries under {label_key!r}")
    try:
        targets = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    except (ValueError, TypeError, OverflowError) as exc:
        raise DataError(f"{path}: {label_key!r} must hold integers ({exc})") from exc
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), targets


def _cifar_names(meta_path: Path, key: str, fallback: Sequence[str]) -> tuple[str, ...]:
    if not meta_path.is_file():
        return tuple(fallback)
    names = read_cifar_batch(meta_path).get(key)
    if not isinstance(names, list) or len(names) != len(fallback):
        raise DataError(f"{meta_path}: expected {len(fallback)} names under {key!r}")
    return tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)


def load_cifar(name: str, data_dir: str | Path | None, split: str) -> ImageDataset:
    """CIFAR-10 or CIFAR-100 from the "python version" batches (Krizhevsky 2009), fine labels for CIFAR-100."""
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    how = (f"download cifar-{name[5:]}-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extract it "
           f"and pass --data-dir pointing at {folder}")
    if data_dir is None:
        raise DataError(f"{name} needs --data-dir: {how}")
    root = Path(data_dir)
    if (root / folder).is_dir():
        root = root / folder
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key, meta, meta_key, fallback = "labels", "batches.meta", "label_names", CIFAR10_CLASSES
    else:
        files = [split]
        label_key, meta, meta_key, fallback = "fine_labels", "meta", "fine_label_names", tuple(map(str, range(100)))
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise DataError(f"{name} {split} split not found: {root} lacks {', '.join(missing)}; {how}")
    arrays = [_cifar_arrays(root / f, label_key) for f in files]
    images, labels = torch.cat([a[0] for a in arrays]), torch.cat([a[1] for a in arrays])
    classes = _cifar_names(root / meta, meta_key, fallback)
    if name == "cifar10":
        stats = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    else:
        stats = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    return ImageDataset(name, split, images, labels, classes, *stats, hflip=True, crop_padding=4)


# ------------------------------------------------------------------------------------------------------ digits
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) pixel values 0..16 and labels, read from scikit-learn's bundled ``digits.csv.gz`` without
    importing scikit-learn (2 s); :func:`sklearn.datasets.load_digits` if that file is not where it used to be."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise DataError("the digits dataset needs scikit-learn: pip install 'visionmix[data]'")
    path = Path(next(iter(spec.submodule_search_locations or [""]))) / "datasets" / "data" / "digits.csv.gz"
    if path.is_file():
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    return bunch.images.astype(np.int64), bunch.target.astype(np.int64)


def load_digits(split: str, image_size: int = 28) -> ImageDataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, 17 grey levels) as uint8, upsampled bilinearly to
    ``image_size`` (default 28, the nano models' input). A fixed shuffle puts 20% in ``test``. No flips."""
    pixels, targets = digits_arrays()
    images = torch.from_numpy(np.rint(pixels * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(targets)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_test = round(len(labels) * DIGITS_TEST_FRACTION)
    train_idx, test_idx = order[n_test:], order[:n_test]
    check_fits_in_memory(len(images), 1, image_size, "digits")
    images = resize_uint8(images, image_size)
    mean, std = channel_stats(images[train_idx])
    keep = train_idx if split == "train" else test_idx
    return ImageDataset("digits", split, images[keep], labels[keep], tuple(map(str, range(10))), mean, std,
                        hflip=False, crop_padding=max(1, image_size // 14))
