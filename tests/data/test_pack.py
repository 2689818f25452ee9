"""pack_shards / pack_fashion_mnist: round trips through both layouts, info.json, and never touching user files."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionmix.data import FASHION_MNIST_DIR, build_dataset
from visionmix.data.pack import pack_fashion_mnist, pack_shards, safe_class_names
from visionmix.data.sources import ImageFolderSource, WebDatasetSource
from visionmix.data.streaming import StreamingLoader
from visionmix.data.transforms import resize_to
from visionmix.errors import BadImageWarning

needs_fmnist = pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
                                  reason=f"Fashion-MNIST is not in {FASHION_MNIST_DIR}")


def make_tree(root: Path, per_class: int, splits: tuple[str, ...] = ("train", "val"), ext: str = "png") -> None:
    rng = np.random.default_rng(0)
    for split in splits:
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                side = 10 + i % 4
                Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
                    root / split / cls / f"{i:03d}.{ext}")


def test_safe_class_names_sort_in_label_order() -> None:
    names = safe_class_names(("T-shirt/top", "Trouser", "Ankle boot"))
    assert names == ("0_T-shirt_top", "1_Trouser", "2_Ankle boot") and tuple(sorted(names)) == names


def test_pack_shards_round_trip_and_info(tmp_path: Path) -> None:
    make_tree(tmp_path / "tree", per_class=5)
    info_path = pack_shards(tmp_path / "tree", tmp_path / "out", shard_size=4, split="train")
    pack_shards(tmp_path / "tree", tmp_path / "out", shard_size=4, split="val")
    info = json.loads(info_path.read_text())
    assert info["classes"] == ["a", "b"] and info["channels"] == 3 and info["image_size"] is None
    assert info["splits"]["train"]["count"] == 10 and [s["count"] for s in info["splits"]["train"]["shards"]] == \
        [4, 4, 2] and info["splits"]["train"]["pattern"] == "train-{000000..000002}.tar"
    source, folder = WebDatasetSource(tmp_path / "out", "train"), ImageFolderSource(tmp_path / "tree", "train")
    originals = {(folder.path(i).read_bytes(), folder.label(i)) for i in range(len(folder))}
    packed = {(s[next(k for k in ("png", "jpg") if k in s)], int(s["cls"])) for s in source.raw_samples(range(3))}
    assert packed == originals and len(WebDatasetSource(tmp_path / "out", "val")) == 10
    with pytest.raises(FileExistsError, match="already holds a train split; pass --force"):
        pack_shards(tmp_path / "tree", tmp_path / "out", shard_size=4, split="train")
    pack_shards(tmp_path / "tree", tmp_path / "out", shard_size=5, split="train", force=True)
    assert [s["count"] for s in json.loads(info_path.read_text())["splits"]["train"]["shards"]] == [5, 5]


def test_pack_never_writes_into_a_directory_of_user_files(tmp_path: Path) -> None:
    make_tree(tmp_path / "tree", per_class=2, splits=("train",))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds files pack did not write \(notes.txt\)"):
        pack_shards(tmp_path / "tree", tmp_path / "out", shard_size=4)
    pack_shards(tmp_path / "tree", tmp_path / "out", shard_size=4, force=True)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_packed_unreadable_images_are_skipped_by_the_loader(tmp_path: Path) -> None:
    make_tree(tmp_path / "tree", per_class=6, splits=("train",), ext="jpg")
    truncated = tmp_path / "tree" / "train" / "b" / "002.jpg"
    truncated.write_bytes(truncated.read_bytes()[:-30])  # a header that reads, pixels that do not
    (tmp_path / "tree" / "train" / "a" / "005.jpg").write_bytes(b"garbage")
    with pytest.warns(BadImageWarning, match="leaving out .*005.jpg"):
        pack_shards(tmp_path / "tree", tmp_path / "out", shard_size=3)
    source = WebDatasetSource(tmp_path / "out", "train")
    assert len(source) == 11
    loader = StreamingLoader(source, 11, train=False, transform=resize_to(8), workers=0, max_bad_images=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        total = sum(len(y) for _, y in loader.epoch(0))
    named = [str(w.message) for w in caught if issubclass(w.category, BadImageWarning)]
    assert total == 10 and len(named) == 1 and re.search(r"train-00000\d\.tar:\d{8}\.jpg", named[0])


@needs_fmnist
@pytest.mark.parametrize("layout", ["imagefolder", "shards"])
def test_pack_fashion_mnist_round_trip(tmp_path: Path, layout: str) -> None:
    pack_fashion_mnist(tmp_path / "fm", layout=layout, max_samples=24, shard_size=8)
    train = build_dataset("fashion-mnist", "train", max_samples=24)
    info = json.loads((tmp_path / "fm" / "info.json").read_text())
    assert info["class_names"][0] == "T-shirt/top" and info["classes"][0] == "0_T-shirt_top" and info["mean"]
    if layout == "imagefolder":
        source = ImageFolderSource(tmp_path / "fm", "train")
        assert source.channels == 1 and source.class_names[0] == "T-shirt/top" and len(source) == 24
        got = sorted((source.load(i)[0].flatten().tolist(), source.label(i)) for i in range(len(source)))
    else:
        source = WebDatasetSource(tmp_path / "fm", "train")
        got = sorted((source.decode(s)[0][0].flatten().tolist(), source.decode(s)[1])
                     for s in source.raw_samples(range(len(source.shards))))
    want = sorted((x[0].flatten().tolist(), int(y)) for x, y in zip(train.images, train.labels, strict=True))
    assert got == want and len(WebDatasetSource(tmp_path / "fm", "val") if layout == "shards"
                               else ImageFolderSource(tmp_path / "fm", "val")) == 24
    assert torch.tensor(info["mean"]).shape == (1,)


def test_force_replaces_packs_own_files_only(tmp_path: Path) -> None:
    """--force keeps the user's files, refuses to write over one named like a shard that info.json does not list,
    and a re-pack into fewer shards removes pack's own surplus shards."""
    make_tree(tmp_path / "tree", per_class=5, splits=("train",))
    out = tmp_path / "out"
    pack_shards(tmp_path / "tree", out, shard_size=2)  # 5 shards
    (out / "notes.txt").write_text("mine")
    pack_shards(tmp_path / "tree", out, shard_size=4, force=True)  # 3 shards
    assert sorted(p.name for p in out.iterdir()) == ["info.json", "notes.txt", *(f"train-{i:06d}.tar"
                                                                                for i in range(3))]
    (out / "val-000000.tar").write_bytes(b"my archive")
    make_tree(tmp_path / "tree", per_class=1, splits=("val",))
    with pytest.raises(FileExistsError, match=r"val-000000\.tar was not written by pack"):
        pack_shards(tmp_path / "tree", out, shard_size=4, split="val", force=True)
    assert (out / "val-000000.tar").read_bytes() == b"my archive" and "val" not in json.loads(
        (out / "info.json").read_text())["splits"]


def test_output_and_source_may_not_nest(tmp_path: Path) -> None:
    make_tree(tmp_path / "tree", per_class=2, splits=("train",))
    with pytest.raises(ValueError, match="lies inside SRC"):
        pack_shards(tmp_path / "tree", tmp_path / "tree" / "train" / "out")
    with pytest.raises(ValueError, match="lies inside OUT_DIR"):
        pack_shards(tmp_path / "tree" / "train", tmp_path / "tree")
    assert not (tmp_path / "tree" / "train" / "out").exists()


@needs_fmnist
def test_fashion_mnist_imagefolder_repack_keeps_user_files(tmp_path: Path) -> None:
    out = tmp_path / "fm"
    pack_fashion_mnist(out, max_samples=12)
    (out / "train" / "README.md").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds files pack did not write \(train\)"):
        pack_fashion_mnist(out, max_samples=6)
    pack_fashion_mnist(out, max_samples=6, force=True)  # fewer images: pack's surplus files go
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert "train/README.md" in files and len([f for f in files if f.endswith(".png")]) == 12
    with pytest.raises(FileExistsError, match="holds a pack of another layout"):
        pack_fashion_mnist(out, layout="shards", max_samples=6, force=True)
