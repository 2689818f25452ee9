"""Dataset readers on small files written here: counts, shapes, label ranges, and clear errors on bad files."""

from __future__ import annotations

import gzip
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionmix.data import FASHION_MNIST_DIR, build_dataset, read_cifar_batch, read_idx
from visionmix.data.builtin import digits_arrays
from visionmix.data.decode import decode_image
from visionmix.data.sources import ImageFolderSource
from visionmix.errors import DataError, UnreadableImage


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write(path: Path, data: bytes) -> Path:
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_fmnist(root: Path, n_train: int = 12, n_test: int = 5, *, gz: bool = True) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    arrays = []
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        ext = ".gz" if gz else ""
        write(root / f"{prefix}-images-idx3-ubyte{ext}", idx_bytes(images))
        write(root / f"{prefix}-labels-idx1-ubyte{ext}", idx_bytes(labels))
        arrays += [images, labels]
    return tuple(arrays)


# ------------------------------------------------------------------------------------------------------ IDX
@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reader_counts_shapes_labels(tmp_path: Path, gz: bool) -> None:
    train_x, train_y, test_x, test_y = write_fmnist(tmp_path, gz=gz)
    train = build_dataset("fashion-mnist", "train", tmp_path)
    test = build_dataset("fashion-mnist", "test", tmp_path)
    assert train.images.shape == (12, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (5, 1, 28, 28) and test.labels.dtype == torch.int64
    assert torch.equal(train.images[:, 0], torch.from_numpy(train_x))
    assert torch.equal(test.labels, torch.from_numpy(test_y).long())
    assert train.num_classes == 10 and int(train.labels.max()) < 10 and train.hflip


def test_read_idx_matches_array_any_rank(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert torch.equal(read_idx(write(tmp_path / "a.gz", idx_bytes(array)), 3), torch.from_numpy(array))
    assert torch.equal(read_idx(write(tmp_path / "b", idx_bytes(array[0, 0])), 1), torch.from_numpy(array[0, 0]))


@pytest.mark.parametrize("name", ["raw", "x.gz"])
def test_truncated_idx_is_a_clear_error(tmp_path: Path, name: str) -> None:
    data = idx_bytes(np.zeros((4, 28, 28), np.uint8))[:-100]
    with pytest.raises(DataError, match=r"truncated: header says 4x28x28 = 3136 bytes of data, the file holds 3036"):
        read_idx(write(tmp_path / name, data), 3)


def test_truncated_gzip_stream_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((4, 28, 28), np.uint8)))[:-30])
    with pytest.raises(DataError, match="damaged or truncated gzip"):
        read_idx(path, 3)


def test_bad_magic_and_trailing_bytes(tmp_path: Path) -> None:
    labels = idx_bytes(np.zeros(4, np.uint8))
    with pytest.raises(DataError, match=r"bad magic number 0x00000801; .* starts with 0x00000803"):
        read_idx(write(tmp_path / "labels", labels), 3)  # a label file where images are expected
    with pytest.raises(DataError, match="longer than its header says"):
        read_idx(write(tmp_path / "long", labels + b"\0"), 1)
    with pytest.raises(DataError, match="too short"):
        read_idx(write(tmp_path / "tiny", b"\0\0"), 1)


def test_mismatched_image_and_label_counts(tmp_path: Path) -> None:
    write_fmnist(tmp_path)
    write(tmp_path / "train-labels-idx1-ubyte.gz", idx_bytes(np.zeros(11, np.uint8)))
    with pytest.raises(DataError, match="holds 12 images but train-labels-idx1-ubyte.gz holds 11 labels"):
        build_dataset("fashion-mnist", "train", tmp_path)


def test_labels_out_of_range(tmp_path: Path) -> None:
    write_fmnist(tmp_path)
    write(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes(np.full(5, 10, np.uint8)))
    with pytest.raises(DataError, match=r"labels span \[10, 10\], expected \[0, 9\]"):
        build_dataset("fashion-mnist", "test", tmp_path)


def test_missing_files_are_named_with_the_fix(tmp_path: Path) -> None:
    write_fmnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as info:
        build_dataset("fashion-mnist", "test", tmp_path)
    message = str(info.value)
    assert "t10k-labels-idx1-ubyte[.gz]" in message and "t10k-images" not in message
    assert "apt-get install dataset-fashion-mnist" in message and "--data-dir" in message and "\n" not in message
    with pytest.raises(DataError, match="is not a directory"):
        build_dataset("fashion-mnist", "train", tmp_path / "nowhere")


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason=f"Fashion-MNIST is not in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)")
def test_installed_fashion_mnist() -> None:
    train, test = build_dataset("fashion-mnist", "train"), build_dataset("fashion-mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert len(build_dataset("fashion-mnist", "test", max_samples=100)) == 100


# ---------------------------------------------------------------------------------------------------- CIFAR
def write_cifar_batch(path: Path, n: int, label_key: bytes, num_classes: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    batch = {b"batch_label": b"testing batch", label_key: rng.integers(0, num_classes, n).tolist(), b"data": data,
             b"filenames": [b"img%d.png" % i for i in range(n)]}
    path.write_bytes(pickle.dumps(batch, protocol=2))  # bytes keys, as the Python 2 originals load
    return data


def test_cifar10_reader(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    first = write_cifar_batch(root / "data_batch_1", 3, b"labels", 10, 1)
    for i in range(2, 6):
        write_cifar_batch(root / f"data_batch_{i}", 3, b"labels", 10, i)
    write_cifar_batch(root / "test_batch", 4, b"labels", 10, 9)
    names = [b"plane", b"car", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=2))
    train = build_dataset("cifar10", "train", tmp_path)  # the parent directory is accepted too
    test = build_dataset("cifar10", "test", root)
    assert train.images.shape == (15, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert train.classes[1] == "car" and int(train.labels.min()) >= 0 and int(train.labels.max()) < 10
    # CIFAR rows are channel planes of 32x32 row-major pixels
    c, h, w = 2, 5, 7
    assert int(train.images[0, c, h, w]) == int(first[0, c * 1024 + h * 32 + w])


def test_cifar100_reader_uses_fine_labels(tmp_path: Path) -> None:
    write_cifar_batch(tmp_path / "train", 6, b"fine_labels", 100, 0)
    write_cifar_batch(tmp_path / "test", 2, b"fine_labels", 100, 1)
    train = build_dataset("cifar100", "train", tmp_path)
    assert train.num_classes == 100 and train.images.shape == (6, 3, 32, 32)
    with pytest.raises(DataError, match="under 'fine_labels'"):
        write_cifar_batch(tmp_path / "test", 2, b"coarse_labels", 20, 1)
        build_dataset("cifar100", "test", tmp_path)


class _Payload:
    """What an attacker would put in a batch: unpickling it calls open(marker, 'w')."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_cifar_pickle_executes_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    blob = pickle.dumps({b"data": _Payload(marker), b"labels": [0]}, protocol=2)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    (root / "test_batch").write_bytes(blob)
    with pytest.raises(DataError, match=r"test_batch: not a CIFAR python batch .*refusing global (io|builtins)\.open"):
        build_dataset("cifar10", "test", tmp_path)
    assert not marker.exists()
    # the payload is live: an unrestricted unpickler does run it (this is what the reader must never do)
    pickle.loads(blob)[b"data"].close()
    assert marker.exists()


def test_cifar_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "test_batch"
    write_cifar_batch(path, 4, b"labels", 10, 0)
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(DataError, match="not a CIFAR python batch"):
        read_cifar_batch(path)
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, protocol=2))
    with pytest.raises(DataError, match=r"'data' must be a uint8 array of shape \(N, 3072\), got float32"):
        build_dataset("cifar10", "test", tmp_path)
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, protocol=2))
    with pytest.raises(DataError, match="2 images but 1 entries under 'labels'"):
        build_dataset("cifar10", "test", tmp_path)
    with pytest.raises(DataError, match="lacks data_batch_1, data_batch_2"):
        build_dataset("cifar10", "train", tmp_path)
    with pytest.raises(DataError, match="needs --data-dir"):
        build_dataset("cifar10", "train")


# ---------------------------------------------------------------------------------------------- ImageFolder
def test_image_folder_source(tmp_path: Path) -> None:
    """ImageFolder trees are streamed: files listed by class, decoded on demand (grey -> RGB in an RGB tree),
    non-images ignored; build_dataset refuses to load them into memory."""
    rng = np.random.default_rng(0)
    for split, counts in (("train", {"cat": 3, "dog": 2}), ("val", {"dog": 1})):
        for cls, n in counts.items():
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    Image.fromarray(np.full((40, 48), 200, np.uint8), mode="L").save(tmp_path / "train" / "dog" / "grey.jpg")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    train = ImageFolderSource(tmp_path, "train")
    assert len(train) == 6 and train.classes == ("cat", "dog") and train.channels == 3
    assert [train.label(i) for i in range(6)] == [0, 0, 0, 1, 1, 1]
    grey = next(i for i in range(6) if train.path(i).name == "grey.jpg")
    assert train.load(grey).shape == (3, 40, 48) and torch.all(train.load(grey) == 200)
    first = np.array(Image.open(tmp_path / "train" / "cat" / "0.png"))
    assert torch.equal(train.load(0), torch.from_numpy(first).permute(2, 0, 1))
    test = ImageFolderSource(tmp_path, "test")  # 'val' is the held-out split; 'test' names it too
    assert len(test) == 1 and test.label(0) == 1
    (tmp_path / "train" / "cat" / "3.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(UnreadableImage, match=r"cannot decode .*cat/3\.png"):
        ImageFolderSource(tmp_path, "train").load(3)
    (tmp_path / "val" / "bird").mkdir()
    with pytest.raises(DataError, match="classes missing from .*train: bird"):
        ImageFolderSource(tmp_path, "val")
    for name in ("imagefolder", "webdataset"):
        with pytest.raises(DataError, match=f"{name} data are streamed from disk, not loaded into memory"):
            build_dataset(name, "train", tmp_path)


def png_header(path: Path, width: int, height: int) -> Path:
    """A ~1 KB PNG whose header claims ``width`` x ``height`` grey pixels (a decompression bomb, data truncated)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(1000)))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side, reason", [
    (50_000, "cannot decode"), (12_000, "is 12000x12000 pixels, more than the 64,000,000 decoded for a 32x32 input")])
def test_decompression_bombs_are_one_line_errors_naming_the_file(tmp_path: Path, side: int, reason: str) -> None:
    bomb = png_header(tmp_path / "bomb.png", side, side)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no DecompressionBombWarning either
        with pytest.raises(UnreadableImage, match=reason) as info:
            decode_image(bomb, "RGB", (32, 32))
    assert str(bomb) in str(info.value) and "\n" not in str(info.value)


def test_an_image_size_the_memory_cannot_hold_is_refused_with_what_it_needs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"digits: 1,797 images of 1x100000x100000 need 18.0 TB in memory"):
        build_dataset("digits", "train", image_size=100_000)
    write_fmnist(tmp_path)
    with pytest.raises(DataError, match=r"fashion-mnist train: 12 images of 1x100000x100000 need 120.0 GB in memory, "
                                        r".* is available; choose a smaller --image-size"):
        build_dataset("fashion-mnist", "train", tmp_path, image_size=100_000)


def test_an_image_folder_with_one_class_is_refused(tmp_path: Path) -> None:
    (tmp_path / "train" / "only").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(tmp_path / "train" / "only" / "0.png")
    with pytest.raises(DataError, match=r"needs a sub-folder per class, at least two; it has only one, 'only'"):
        ImageFolderSource(tmp_path, "train")


# --------------------------------------------------------------------------------------------------- digits
def test_digits_split_and_size() -> None:
    train, test = build_dataset("digits", "train"), build_dataset("digits", "test")
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert train.images.shape[1:] == (1, 28, 28) and not train.hflip
    assert set(train.labels.tolist()) == set(range(10)) and train.mean == test.mean
    small = build_dataset("digits", "test", image_size=8)
    from sklearn.datasets import load_digits

    reference = load_digits()
    pixels, targets = digits_arrays()  # read from the CSV without importing scikit-learn
    assert np.array_equal(pixels, reference.images) and np.array_equal(targets, reference.target)
    pool = {tuple(np.rint(im * 255 / 16).astype(np.uint8).ravel()) for im in reference.images}
    assert all(tuple(im.ravel().tolist()) in pool for im in small.images.numpy())  # 8 -> 8 is the raw data
    subset = build_dataset("digits", "train", max_samples=50)
    assert len(subset) == 50 and torch.equal(subset.images, build_dataset("digits", "train", max_samples=50).images)


def test_unknown_names() -> None:
    with pytest.raises(DataError, match="unknown dataset 'mnist'; choose one of fashion-mnist, cifar10"):
        build_dataset("mnist")
    with pytest.raises(DataError, match="unknown split 'val'"):
        build_dataset("digits", "val")
