"""The DeiT recipe's data side: per-sample crops against references, batch transform determinism, mixing formulas."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from kornia.geometry.transform import resize

from visionmix.data.recipe import (
    RAND_OPS,
    DeitAugment,
    DeitBatchTransform,
    RandomResizedCropTransform,
    SoftTargetCrossEntropy,
    _rand_op,
    mixup_target,
    rand_augment,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PLAIN = {"hflip": 0.0, "randaug_n": 0, "reprob": 0.0}  # switch off everything before mixing


def image(c: int = 3, h: int = 24, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def batch(b: int = 6, c: int = 3, s: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (b, c, s, s), dtype=torch.uint8, generator=g), torch.randint(0, 10, (b,), generator=g)


def reference_resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    out = resize(img[None].float(), size, interpolation="bicubic", antialias=True)[0]
    return out.round().clamp(0, 255).to(torch.uint8)


def test_rrc_shape_determinism_and_reference() -> None:
    rrc = RandomResizedCropTransform(16)
    img = image()
    out = rrc(img, torch.Generator().manual_seed(5))
    assert out.shape == (3, 16, 16) and out.dtype == torch.uint8
    assert torch.equal(out, rrc(img, torch.Generator().manual_seed(5)))
    assert not torch.equal(out, rrc(img, torch.Generator().manual_seed(6)))
    top, left, h, w = rrc.sample(24, 32, torch.Generator().manual_seed(5))
    assert torch.equal(out, reference_resize(img[:, top: top + h, left: left + w], (16, 16)))
    assert pickle.loads(pickle.dumps(rrc)) == rrc
    assert rrc(image(1, 28, 28), torch.Generator()).shape == (1, 16, 16)


def test_rrc_boxes_inside_and_scale_ratio_ranges() -> None:
    rrc = RandomResizedCropTransform(16)
    g = torch.Generator().manual_seed(0)
    fractions = []
    for _ in range(2000):
        top, left, h, w = rrc.sample(40, 60, g)
        assert top >= 0 and top + h <= 40 and left >= 0 and left + w <= 60 and h > 0 and w > 0
        fractions.append(h * w / 2400)
        assert 3 / 4 * 0.8 < w / h < 4 / 3 * 1.25  # rounding of small boxes moves the ratio a little
    fractions_t = torch.tensor(fractions)
    # rounding the sides lets the area stray slightly outside [0.08, 1]
    assert fractions_t.min() >= 0.07 and fractions_t.max() <= 1.0
    # every box of area <= 0.5 fits a 40 x 60 image, so accepted areas are uniform there
    low = int(((fractions_t >= 0.08) & (fractions_t < 0.29)).sum())
    high = int(((fractions_t >= 0.29) & (fractions_t < 0.5)).sum())
    assert abs(low - high) < 0.15 * (low + high)
    assert float(fractions_t.min()) < 0.12 and float(fractions_t.max()) > 0.85  # at most 40 x 54


def test_rrc_fallback_is_centre_crop_of_clamped_ratio() -> None:
    rrc = RandomResizedCropTransform(8, scale=(0.5, 1.0))
    assert rrc.sample(4, 64, torch.Generator().manual_seed(0)) == (0, 29, 4, 5)  # w = round(4 * 4/3)
    assert rrc.sample(64, 4, torch.Generator().manual_seed(0)) == (29, 0, 5, 4)  # h = round(4 / (3/4))


def test_rrc_validation() -> None:
    with pytest.raises(ValueError, match="scale"):
        RandomResizedCropTransform(16, scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="interpolation"):
        RandomResizedCropTransform(16, interpolation="lanczos")
    with pytest.raises(ValueError, match="uint8"):
        RandomResizedCropTransform(16)(torch.zeros(3, 8, 8), torch.Generator())


def test_batch_transform_determinism_and_rng_isolation() -> None:
    images, labels = batch()
    t = DeitBatchTransform(10, MEAN, STD, DeitAugment())
    state = torch.random.get_rng_state()
    x1, y1 = t(images, labels, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is untouched
    x2, y2 = t(images, labels, seed=3)
    x3, _ = t(images, labels, seed=4)
    assert x1.shape == (6, 3, 16, 16) and x1.dtype == torch.float32 and y1.shape == (6, 10)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    torch.testing.assert_close(y1.sum(1), torch.ones(6))


def test_no_augmentation_is_normalise_and_smoothed_onehot() -> None:
    images, labels = batch()
    aug = DeitAugment(**PLAIN, mix_prob=0.0, label_smoothing=0.1)
    x, y, info = DeitBatchTransform(10, MEAN, STD, aug).augment(images, labels, 0)
    expected = (images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x, expected)
    assert info.lam == 1.0 and info.box is None
    assert torch.allclose(y[torch.arange(6), labels], torch.full((6,), 0.9 + 0.01))
    assert torch.allclose(y.sum(1), torch.ones(6)) and torch.allclose(y.min(1).values, torch.full((6,), 0.01))


def test_hflip_all_or_nothing() -> None:
    images, labels = batch()
    aug = DeitAugment(**{**PLAIN, "hflip": 1.0}, mix_prob=0.0)
    x_flip, _ = DeitBatchTransform(10, MEAN, STD, aug)(images, labels, 0)
    x_none, _ = DeitBatchTransform(10, MEAN, STD, aug, allow_hflip=False)(images, labels, 0)
    assert torch.equal(x_flip, x_none.flip(-1))


@pytest.mark.parametrize("seed", range(4))
def test_mixup_formula(seed: int) -> None:
    images, labels = batch()
    t = DeitBatchTransform(10, MEAN, STD, DeitAugment(**PLAIN, cutmix_alpha=0.0, label_smoothing=0.1))
    x0, _, _ = DeitBatchTransform(10, MEAN, STD, DeitAugment(**PLAIN, mix_prob=0.0)).augment(images, labels, seed)
    x, y, info = t.augment(images, labels, seed)
    assert info.box is None and 0 < info.lam < 1
    torch.testing.assert_close(x, info.lam * x0 + (1 - info.lam) * x0.flip(0))
    torch.testing.assert_close(y.sum(1), torch.ones(6))
    smooth = F.one_hot(labels, 10).float() * 0.9 + 0.01
    torch.testing.assert_close(y, info.lam * smooth + (1 - info.lam) * smooth.flip(0))


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_formula_and_correct_lam(seed: int) -> None:
    images, labels = batch(s=20)
    x0 = torch.randn(6, 3, 20, 20)
    t = DeitBatchTransform(10, MEAN, STD, DeitAugment(**PLAIN, mixup_alpha=0.0))
    x, y, info = t.mix(x0, labels, seed)
    assert info.box is not None
    top, bottom, left, right = info.box
    assert 0 <= top <= bottom <= 20 and 0 <= left <= right <= 20
    inside = torch.zeros(20, 20, dtype=torch.bool)
    inside[top:bottom, left:right] = True
    assert torch.equal(x, torch.where(inside, x0.flip(0), x0))
    assert info.lam == pytest.approx(1 - (bottom - top) * (right - left) / 400)
    smooth = F.one_hot(labels, 10).float() * 0.9 + 0.01
    torch.testing.assert_close(y, info.lam * smooth + (1 - info.lam) * smooth.flip(0))
    assert torch.equal(x, t.mix(x0, labels, seed)[0])


def test_switch_between_mixup_and_cutmix() -> None:
    _, labels = batch()
    t = DeitBatchTransform(10, MEAN, STD, DeitAugment())
    kinds = [t.mix(torch.zeros(6, 3, 8, 8), labels, seed)[2].box is None for seed in range(200)]
    assert 70 < sum(kinds) < 130  # switch_prob = 0.5


def test_mixup_target_values() -> None:
    labels = torch.tensor([0, 2, 1])
    y = mixup_target(labels, 4, 0.7, 0.2)
    smooth = torch.tensor([[0.85, 0.05, 0.05, 0.05], [0.05, 0.05, 0.85, 0.05], [0.05, 0.85, 0.05, 0.05]])
    torch.testing.assert_close(y, 0.7 * smooth + 0.3 * smooth.flip(0))


def test_random_erasing_fills_one_box_with_noise() -> None:
    images, labels = batch(b=8, s=24)
    plain = DeitBatchTransform(10, MEAN, STD, DeitAugment(**PLAIN, mix_prob=0.0))
    erased = DeitBatchTransform(10, MEAN, STD, DeitAugment(**{**PLAIN, "reprob": 1.0}, mix_prob=0.0))
    x0, _ = plain(images, labels, 0)
    x1, _ = erased(images, labels, 0)
    for a, b in zip(x0, x1, strict=True):
        changed = (a != b).any(0)
        assert changed.any()
        rows, cols = changed.any(1).nonzero().squeeze(1), changed.any(0).nonzero().squeeze(1)
        box = b[:, int(rows.min()): int(rows.max()) + 1, int(cols.min()): int(cols.max()) + 1]
        area = box[0].numel() / 24**2
        assert 0.01 < area < 0.5  # scale (0.02, 1/3), up to rounding and clamping of the sides
        assert box.numel() < 30 or abs(float(box.std()) - 1) < 0.5  # N(0, 1) per pixel and channel


@pytest.mark.parametrize("name", RAND_OPS)
def test_rand_ops_keep_gray_channels_equal(name: str) -> None:
    gray = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)).expand(4, 3, 16, 16)
    out = _rand_op(name, gray, torch.tensor([0.0, 5.0, 9.0, 10.0]), torch.tensor([1.0, -1.0, 1.0, -1.0]),
                   torch.full((3,), 0.5))
    assert out.shape == gray.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-5) and torch.allclose(out[:, 0], out[:, 2], atol=1e-5)


def test_rand_ops_follow_timm_arguments() -> None:
    u8 = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    x, level, sign, fill = u8.float() / 255, torch.tensor([9.0]), torch.ones(1), torch.zeros(3)
    as_u8 = lambda t: (t * 255).round().to(torch.uint8)  # noqa: E731
    assert torch.equal(as_u8(_rand_op("Posterize", x, level, sign, fill)), u8 & 0b11100000)  # int(0.9 * 4) bits
    assert torch.equal(as_u8(_rand_op("Solarize", x, level, sign, fill)), torch.where(u8 < 230, u8, 255 - u8))
    add = torch.where(u8 < 128, (u8.int() + 99).clamp(max=255), u8.int()).to(torch.uint8)
    assert torch.equal(as_u8(_rand_op("SolarizeAdd", x, level, sign, fill)), add)
    torch.testing.assert_close(_rand_op("Brightness", x, level, sign, fill), (x * 1.72).clamp(0, 1))
    torch.testing.assert_close(_rand_op("Invert", x, level, sign, fill), 1 - x)
    shifted = _rand_op("TranslateXRel", x, level, sign, fill)  # 0.405 * 16 = 6.48 px, fill 0 beyond the edge
    assert float(shifted[..., -6:].abs().max()) == 0 and float(shifted[..., :8].min()) > 0


def test_grayscale_batch() -> None:
    images, labels = batch(c=1)
    t = DeitBatchTransform(10, (0.286,), (0.353,), DeitAugment())
    x, y = t(images, labels, 7)
    assert x.shape == (6, 1, 16, 16) and y.shape == (6, 10) and torch.isfinite(x).all()
    gray = images.float().expand(6, 3, 16, 16) / 255
    with torch.random.fork_rng():
        torch.manual_seed(0)
        out = rand_augment(gray, 2, 9.0, 0.5, torch.full((3,), 0.29))
    torch.testing.assert_close(out.mean(1), out[:, 0], atol=1e-5, rtol=0)


def test_batch_transform_validation() -> None:
    with pytest.raises(ValueError, match="reprob"):
        DeitAugment(reprob=1.5)
    with pytest.raises(ValueError, match="randaug_m"):
        DeitAugment(randaug_m=11)
    with pytest.raises(ValueError, match="mean/std"):
        DeitBatchTransform(10, (0.5, 0.5), (0.2, 0.2), DeitAugment())
    images, labels = batch()
    with pytest.raises(ValueError, match="uint8"):
        DeitBatchTransform(10, MEAN, STD, DeitAugment())(images.float(), labels, 0)


def test_soft_target_cross_entropy() -> None:
    logits, labels = torch.randn(5, 7), torch.randint(0, 7, (5,))
    loss = SoftTargetCrossEntropy()
    torch.testing.assert_close(loss(logits, F.one_hot(labels, 7).float()), F.cross_entropy(logits, labels))
    smoothed = mixup_target(labels, 7, 1.0, 0.1)
    torch.testing.assert_close(loss(logits, smoothed), F.cross_entropy(logits, labels, label_smoothing=0.1))
