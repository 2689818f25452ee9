"""Batched crop/flip against a per-sample reference; loader sharding, coverage and resumability."""

from __future__ import annotations

import pytest
import torch

from visionmix.data import BatchLoader, CropFlip, ImageDataset, normalize


def reference_crop_flip(images: torch.Tensor, padding: int, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """One sample at a time: zero-pad, slice the crop window, flip if asked."""
    out = []
    h, w = images.shape[-2:]
    for image, (dy, dx), flip in zip(images, offsets.tolist(), flips.tolist(), strict=True):
        padded = torch.zeros(image.shape[0], h + 2 * padding, w + 2 * padding, dtype=image.dtype)
        padded[:, padding: padding + h, padding: padding + w] = image
        crop = padded[:, dy: dy + h, dx: dx + w]
        out.append(crop.flip(-1) if flip else crop)
    return torch.stack(out)


@pytest.mark.parametrize(("padding", "hflip"), [(0, False), (0, True), (2, False), (4, True)])
def test_crop_flip_matches_per_sample_reference(padding: int, hflip: bool) -> None:
    images = torch.randint(0, 256, (16, 3, 9, 7), dtype=torch.uint8)
    aug = CropFlip(padding, hflip)
    offsets, flips = aug.sample(16, torch.Generator().manual_seed(1))
    assert int(offsets.min()) >= 0 and int(offsets.max()) <= 2 * padding
    assert flips.any() == hflip
    assert torch.equal(aug(images, offsets, flips), reference_crop_flip(images, padding, offsets, flips))


def test_normalize() -> None:
    images = torch.randint(0, 256, (4, 2, 5, 5), dtype=torch.uint8)
    mean, std = (0.3, 0.6), (0.2, 0.25)
    expected = (images.double() / 255 - torch.tensor(mean).view(1, 2, 1, 1)) / torch.tensor(std).view(1, 2, 1, 1)
    out = normalize(images, mean, std)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected.float(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="mean/std need 2 entries"):
        normalize(images, (0.5,), (0.5,))


def make_dataset(n: int = 50) -> ImageDataset:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 6, 6).contiguous()
    return ImageDataset("toy", "train", images, torch.arange(n) % 10, tuple("abcdefghij"), (0.0,), (1 / 255,),
                        hflip=True, crop_padding=1)


def test_train_epoch_visits_each_sample_once_and_is_reproducible() -> None:
    ds = make_dataset()
    loader = BatchLoader(ds, 8, train=True, augment="none", seed=3)
    assert len(loader) == 6  # 50 // 8, the last partial batch dropped
    seen = torch.cat([x[:, 0, 0, 0] for x, _ in loader.epoch(0)]).long()
    assert len(seen) == 48 and len(set(seen.tolist())) == 48
    assert torch.equal(seen, torch.cat([x[:, 0, 0, 0] for x, _ in loader.epoch(0)]).long())
    assert not torch.equal(seen, torch.cat([x[:, 0, 0, 0] for x, _ in loader.epoch(1)]).long())
    labels = torch.cat([y for _, y in loader.epoch(0)])
    assert torch.equal(labels, seen % 10)  # images and labels stay paired


@pytest.mark.parametrize("mode", ["flip", "crop-flip"])
def test_flip_mode_only_mirrors_and_crop_flip_also_shifts(mode: str) -> None:
    n = 64
    images = torch.randint(1, 256, (n, 1, 6, 6), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    ds = ImageDataset("toy", "train", images, torch.arange(n), tuple(map(str, range(n))), (0.0,), (1 / 255,),
                      hflip=True, crop_padding=1)
    kinds = set()
    for x, y in BatchLoader(ds, 16, train=True, augment=mode, seed=1).epoch(0):
        for out, source in zip(x.round().to(torch.uint8), images[y], strict=True):
            kinds.add("same" if torch.equal(out, source) else "mirrored" if torch.equal(out, source.flip(-1))
                      else "other")
    assert kinds == ({"same", "mirrored"} if mode == "flip" else {"same", "mirrored", "other"})


def test_unknown_augmentation_is_rejected() -> None:
    with pytest.raises(ValueError, match="augment must be one of 'crop-flip', 'flip', 'none'; got True"):
        BatchLoader(make_dataset(), 8, train=True, augment=True)

def test_resuming_mid_epoch_gives_the_remaining_batches() -> None:
    loader = BatchLoader(make_dataset(), 8, train=True, seed=5)
    full = list(loader.epoch(2))
    tail = list(loader.epoch(2, start_step=4))
    assert len(tail) == 2
    for (x, y), (x2, y2) in zip(full[4:], tail, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_shards_of_two_ranks_make_the_single_process_batch() -> None:
    ds = make_dataset()
    single = list(BatchLoader(ds, 8, train=True, seed=7).epoch(1))
    ranks = [list(BatchLoader(ds, 8, train=True, seed=7, rank=r, world_size=2).epoch(1)) for r in range(2)]
    assert len(ranks[0]) == len(single)
    for step, (x, y) in enumerate(single):
        for r in range(2):
            xr, yr = ranks[r][step]
            assert torch.equal(xr, x[r::2]) and torch.equal(yr, y[r::2])  # augmentation included


def test_eval_loader_covers_everything_once_across_ranks() -> None:
    ds = make_dataset(23)
    seen = []
    for r in range(3):
        loader = BatchLoader(ds, 4, train=False, rank=r, world_size=3)
        seen += [int(v) for x, _ in loader for v in x[:, 0, 0, 0]]
    assert sorted(seen) == list(range(23))


def test_loader_argument_errors() -> None:
    with pytest.raises(ValueError, match="batch_size=9 must be divisible by the number of processes"):
        BatchLoader(make_dataset(), 9, train=True, world_size=2)
    with pytest.raises(ValueError, match="batch_size=64 exceeds the 50 training images"):
        BatchLoader(make_dataset(), 64, train=True)
