"""The DeiT training recipe's data side (DeiT, arXiv:2012.12877; used by SPACH and UniFormer), on kornia.

Two stages, as timm runs them:

* per sample, in DataLoader workers, on uint8 (C, H, W) images of any size: :class:`RandomResizedCropTransform`
  (train; evaluation is :class:`~visionmix.data.evaluation.EvalTransform`'s resize + centre crop); all randomness
  from an explicit ``torch.Generator``;
* per batch, on the training device, on uint8 (B, C, S, S): :class:`DeitBatchTransform` = horizontal flip ->
  RandAugment (arXiv:1909.13719) -> normalise -> Random Erasing (arXiv:1708.04896) -> mixup (arXiv:1710.09412) or
  CutMix (arXiv:1905.04899) -> label-smoothed soft targets; all randomness from an integer ``seed``, so the same
  (batch, seed) gives the same output and a resumed run is exact.

The pixel kernels are kornia's (``kornia.geometry.transform.resize`` / ``warp_affine``, ``kornia.enhance.*``,
the box sampler of ``kornia.augmentation.RandomErasing``). The sampling around them follows timm where kornia's
modules sample differently (see each class): kornia's ``RandAugment`` picks its operations once per batch with a
fixed magnitude, its mixup/CutMix draw one lambda and pair per sample, and its erasing fills a constant.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields

import kornia
import kornia.augmentation as K
import torch
import torch.nn.functional as F
from kornia.geometry.transform import get_rotation_matrix2d, warp_affine
from torch import nn

from visionmix.checks import check_choice
from visionmix.data.decode import INTERPOLATIONS, check_uint8_image, resample_uint8
from visionmix.data.seeds import stable_seed
from visionmix.errors import InvalidValue
from visionmix.transfers import device_constant, host_side, to_device

# timm's RandAugment operations (auto_augment._RAND_TRANSFORMS), in its order.
RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
            "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


@dataclass(frozen=True)
class RandomResizedCropTransform:
    """Random crop of ``scale`` x area and aspect ``ratio`` resized to ``size`` x ``size`` (Inception / DeiT).

    The box is drawn as torchvision's ``RandomResizedCrop.get_params`` (timm's ``RandomResizedCropAndInterpolation``)
    draws it: 10 attempts of area ~ U(scale) x H W and log-uniform ratio, rounded, kept if it fits; else a centre
    crop of the ratio clamped into ``ratio``. The box comes from ``generator`` (not kornia's ``RandomResizedCrop``,
    which draws from the global RNG and takes same-size float batches); kornia does the resampling.
    uint8 (C, H, W) of any size -> uint8 (C, size, size).
    """

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise InvalidValue(f"size must be positive, got {self.size}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise InvalidValue(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise InvalidValue(f"ratio must satisfy 0 < min <= max, got {self.ratio}")
        check_choice("interpolation", self.interpolation, INTERPOLATIONS)

    def sample(self, height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
        """The crop box (top, left, h, w) for an image of ``height`` x ``width``."""
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            u_area, u_ratio = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
            target_area = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u_area)
            aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
                left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        check_uint8_image(image)
        top, left, h, w = self.sample(image.shape[1], image.shape[2], generator)
        crop = image[:, top: top + h, left: left + w]
        return resample_uint8(crop, (self.size, self.size), self.interpolation)


@dataclass(frozen=True)
class DeitAugment:
    """DeiT's per-batch augmentation settings (timm flags ``--aa rand-m9-mstd0.5 --reprob 0.25 --mixup 0.8
    --cutmix 1.0 --smoothing 0.1``; DeiT's own default adds ``-inc1``, the 'increasing' op variants, not done here).
    ``randaug_n=0`` disables RandAugment; both alphas 0 disable mixing."""

    hflip: float = 0.5
    randaug_n: int = 2
    randaug_m: float = 9.0
    randaug_mstd: float = 0.5
    reprob: float = 0.25
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field out of its range."""
        ranges = {"hflip": (0, 1), "randaug_n": (0, len(RAND_OPS)), "randaug_m": (0, 10),
                  "randaug_mstd": (0, math.inf), "reprob": (0, 1), "mixup_alpha": (0, math.inf),
                  "cutmix_alpha": (0, math.inf), "mix_prob": (0, 1), "switch_prob": (0, 1),
                  "label_smoothing": (0, 1)}
        for field in fields(self):
            value, (lo, hi) = getattr(self, field.name), ranges[field.name]
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or not lo <= value <= hi:
                raise InvalidValue(f"DeitAugment.{field.name} must be a finite number in [{lo}, {hi}], got {value!r}")
        if not isinstance(self.randaug_n, int):
            raise InvalidValue(f"DeitAugment.randaug_n must be an int, got {self.randaug_n!r}")
        if self.label_smoothing >= 1:
            raise InvalidValue(f"DeitAugment.label_smoothing must be < 1, got {self.label_smoothing}")


@dataclass(frozen=True)
class MixParams:
    """What :meth:`DeitBatchTransform.mix` drew: the target weight ``lam`` of each row's own image, the CutMix box
    ``(top, bottom, left, right)`` (half-open; None for mixup or no mixing). The partner of row i is row B-1-i."""

    lam: float
    box: tuple[int, int, int, int] | None


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run with the CPU RNG (and ``device``'s CUDA RNG) seeded by ``seed``; restore them afterwards."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def _rand_op(name: str, x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """One RandAugment operation on float (b, 3, H, W) in [0, 1] with per-row ``level`` in [0, 10] and ``sign``
    (+-1, used by the symmetric ops): timm's level-to-argument mapping, kornia's kernels, ``fill`` outside."""
    b, _, h, w = x.shape
    f = level / 10
    if name == "AutoContrast":  # PIL leaves a constant channel alone; kornia's min-max would zero it
        flat = x.flatten(2)
        constant = (flat.amax(-1) <= flat.amin(-1))[..., None, None]
        return torch.where(constant, x, kornia.enhance.normalize_min_max(x))
    if name == "Equalize":
        return kornia.enhance.equalize(x)
    if name == "Invert":
        return 1.0 - x  # kornia.enhance.invert's default, without its copy of max_val to the device per call
    if name == "Posterize":  # keep int(4 f) high bits
        return kornia.enhance.posterize(x, (4 * f).long())
    if name == "Solarize":  # invert pixels >= int(256 f)
        return kornia.enhance.solarize(x, (256 * f).floor().clamp(max=256) / 255)
    if name == "SolarizeAdd":  # add int(110 f) to pixels < 128 (kornia's `additions` shifts every pixel)
        return torch.where(x < 128 / 255, (x + (110 * f).floor().clamp(max=128)[:, None, None, None] / 255)
                           .clamp(max=1), x)
    factor = 1.8 * f + 0.1  # PIL ImageEnhance factor for the four below
    if name == "Color":
        return kornia.enhance.adjust_saturation_with_gray_subtraction(x, factor)
    if name == "Contrast":
        return kornia.enhance.adjust_contrast_with_mean_subtraction(x, factor)
    if name == "Brightness":  # PIL's brightness is a scale; kornia calls the scale `adjust_contrast`
        return kornia.enhance.adjust_contrast(x, factor)
    if name == "Sharpness":
        return kornia.enhance.sharpness(x, factor)
    if name == "Rotate":
        center = x.new_empty(b, 2)  # filled in place: no copy from the host
        center[:, 0], center[:, 1] = (w - 1) / 2, (h - 1) / 2
        matrix = get_rotation_matrix2d(center, 30 * f * sign, torch.ones(b, 2, device=x.device))
    else:
        # PIL's affine maps output -> input; kornia's M maps input -> output, so the offsets change sign.
        matrix = torch.eye(2, 3, device=x.device).repeat(b, 1, 1)
        index = {"ShearX": (0, 1), "ShearY": (1, 0), "TranslateXRel": (0, 2), "TranslateYRel": (1, 2)}[name]
        scale = {"ShearX": 0.3, "ShearY": 0.3, "TranslateXRel": 0.45 * w, "TranslateYRel": 0.45 * h}[name]
        matrix[:, index[0], index[1]] = -scale * f * sign
    out = warp_affine(x, matrix, (h, w), mode="bicubic", padding_mode="fill", fill_value=fill)
    return out.clamp_(0, 1)


def rand_augment(x: torch.Tensor, n: int, m: float, mstd: float, fill: torch.Tensor) -> torch.Tensor:
    """timm's ``rand-m{m}-mstd{mstd}`` RandAugment (arXiv:1909.13719) on float (B, 3, H, W) in [0, 1].

    Per image, ``n`` times: an operation of :data:`RAND_OPS` chosen uniformly (with replacement, as timm), applied
    with probability 0.5 at level ~ N(m, mstd) clipped to [0, 10], a random sign for symmetric ops. Rows that drew
    the same operation run as one kornia call. Draws from the global RNG (CPU); call it under a seeded fork.
    """
    with host_side():
        plan = RandAugmentPlan.draw(x.shape[0], n, m, mstd)
    return plan.apply(x, to_device(plan.values, x.device), fill)


@dataclass(frozen=True)
class RandAugmentPlan:
    """:func:`rand_augment`'s draws for a batch, made on the host: for each round and each operation chosen in
    it, the rows (grouped by operation, as one kornia call each), their levels and signs, packed in ``values``
    (``3 * count`` floats per round: rows, levels, signs) so that they reach the device in one copy; ``layout``
    gives each round's (operation index, row count) in order."""

    values: torch.Tensor
    layout: tuple[tuple[tuple[int, int], ...], ...]

    @classmethod
    def draw(cls, b: int, n: int, m: float, mstd: float) -> RandAugmentPlan:
        """Draw ``n`` rounds for ``b`` images from the global RNG (CPU)."""
        parts, layout = [], []
        for _ in range(n):
            choice = torch.randint(len(RAND_OPS), (b,))
            applied = torch.rand(b) < 0.5
            level = (m + mstd * torch.randn(b)).clamp(0, 10)
            sign = torch.where(torch.rand(b) < 0.5, -1.0, 1.0)
            groups = [(k, ((choice == k) & applied).nonzero().squeeze(1)) for k in range(len(RAND_OPS))]
            groups = [(k, rows) for k, rows in groups if rows.numel()]
            rows = torch.cat([r for _, r in groups]) if groups else torch.zeros(0, dtype=torch.int64)
            parts += [rows.float(), level[rows], sign[rows]]
            layout.append(tuple((k, r.numel()) for k, r in groups))
        values = torch.cat(parts) if parts else torch.zeros(0)
        return cls(values, tuple(layout))

    def apply(self, x: torch.Tensor, values: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        """The drawn operations on ``x``, with ``values`` (:attr:`values` on ``x``'s device)."""
        start = 0
        for groups in self.layout:
            count = sum(c for _, c in groups)
            rows, level, sign = values[start: start + 3 * count].view(3, count)
            rows = rows.long()
            start += 3 * count
            offset = 0
            for k, c in groups:
                picked = rows[offset: offset + c]
                out = _rand_op(RAND_OPS[k], x[picked], level[offset: offset + c], sign[offset: offset + c], fill)
                x = x.index_copy(0, picked, out)
                offset += c
        return x


class DeitBatchTransform:
    """DeiT's per-batch training augmentation (arXiv:2012.12877, timm's order) on uint8 (B, C, S, S), C in {1, 3}.

    ``__call__(images, labels, seed) -> (float32 normalised (B, C, S, S), float32 soft targets (B, num_classes))``:
    [0, 1] -> flip (p ``hflip``) -> :func:`rand_augment` -> ``(x - mean) / std`` -> Random Erasing (p ``reprob``;
    the box from kornia's ``RandomErasing`` sampler, area U(0.02, 1/3), ratio (0.3, 1/0.3); filled with per-pixel
    N(0, 1) noise as timm's 'pixel' mode) -> :meth:`mix` -> label-smoothed targets. Grayscale runs RandAugment on
    three equal channels and averages back (every operation keeps equal channels equal). Geometric RandAugment ops
    fill with the mean colour, as timm. Everything random is a function of ``seed`` (and the device).
    """

    def __init__(self, num_classes: int, mean: Sequence[float], std: Sequence[float], aug: DeitAugment, *,
                 allow_hflip: bool = True) -> None:
        if num_classes < 2:
            raise InvalidValue(f"num_classes must be >= 2, got {num_classes}")
        if len(mean) != len(std) or len(mean) not in (1, 3):
            raise InvalidValue(f"mean/std need 1 or 3 entries each, got {len(mean)}/{len(std)}")
        if any(s <= 0 for s in std):
            raise InvalidValue(f"std must be positive, got {tuple(std)}")
        aug.validate()
        self.num_classes, self.aug = num_classes, aug
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.hflip = aug.hflip if allow_hflip else 0.0
        self.erasing = K.RandomErasing(scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), p=aug.reprob)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, _ = self.augment(images, labels, seed)
        return x, y

    def augment(self, images: torch.Tensor, labels: torch.Tensor,
                seed: int) -> tuple[torch.Tensor, torch.Tensor, MixParams]:
        """As ``__call__``, with the mixing parameters drawn."""
        b, c, h, w = images.shape
        if images.dtype != torch.uint8 or c != len(self.mean):
            raise InvalidValue(f"expected uint8 (B, {len(self.mean)}, H, W), got {images.dtype} {tuple(images.shape)}")
        device = images.device
        aug = self.aug
        with _seeded(stable_seed(seed, "deit-pixels"), device):
            with host_side():  # every parameter drawn on the host (the CPU RNG, in the order of use) ...
                flips = torch.rand(b) < self.hflip
                plan = RandAugmentPlan.draw(b, aug.randaug_n, aug.randaug_m, aug.randaug_mstd)
                boxes = self._erase_boxes((b, c, h, w)) if aug.reprob else torch.zeros(0)
                packed = torch.cat([flips.float(), boxes.flatten(), plan.values])
            values = to_device(packed, device)  # ... and copied to the device at once
            x = images.float() / 255
            x = torch.where(values[:b].bool()[:, None, None, None], x.flip(-1), x)
            if aug.randaug_n:
                fill = device_constant(tuple(round(255 * v) / 255 for v in self.mean), device).expand(3)
                x3 = x.expand(b, 3, h, w) if c == 1 else x
                x3 = plan.apply(x3, values[b + boxes.numel():], fill)
                x = x3.mean(1, keepdim=True) if c == 1 else x3
            mean = device_constant(self.mean, device).view(1, c, 1, 1)
            std = device_constant(self.std, device).view(1, c, 1, 1)
            x = (x - mean) / std
            if aug.reprob:
                x = self._erase(x, values[b: b + boxes.numel()].view(5, b))
        return self.mix(x, labels, seed)

    def _erase_boxes(self, shape: tuple[int, int, int, int]) -> torch.Tensor:
        """kornia's RandomErasing boxes for a batch of ``shape``, drawn on the host: (5, B) top, left, height,
        width, erased (0/1)."""
        p = self.erasing.forward_parameters(shape)
        return torch.stack([p["ys"], p["xs"], p["heights"], p["widths"], (p["batch_prob"] > 0).float()]).float()

    def _erase(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        rows = torch.arange(h, device=x.device)[None, :, None]
        cols = torch.arange(w, device=x.device)[None, None, :]
        ys, xs, hs, ws = (v.long()[:, None, None] for v in boxes[:4])
        erased = (boxes[4] > 0)[:, None, None]
        inside = (rows >= ys) & (rows < ys + hs) & (cols >= xs) & (cols < xs + ws) & erased
        noise = torch.randn(x.shape, device=x.device)
        return torch.where(inside[:, None], noise, x)

    def mix(self, x: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, MixParams]:
        """timm's batch-mode ``Mixup`` with ``correct_lam``: with prob ``mix_prob`` one lambda for the batch, CutMix
        (Beta(cutmix_alpha)) with prob ``switch_prob`` else mixup (Beta(mixup_alpha)); partner = ``x.flip(0)``.
        CutMix pastes a box of sides ``int(S sqrt(1 - lam))`` centred uniformly, clipped, and recomputes
        ``lam = 1 - box area / S^2``. Returns (mixed x, soft targets (B, num_classes), :class:`MixParams`)."""
        aug = self.aug
        with _seeded(stable_seed(seed, "deit-mix"), torch.device("cpu")), host_side():
            lam, box = 1.0, None
            mixing = (aug.mixup_alpha > 0 or aug.cutmix_alpha > 0) and float(torch.rand(())) < aug.mix_prob
            if mixing:
                cutmix = aug.cutmix_alpha > 0 and (aug.mixup_alpha == 0 or float(torch.rand(())) < aug.switch_prob)
                alpha = aug.cutmix_alpha if cutmix else aug.mixup_alpha
                lam = float(torch.distributions.Beta(alpha, alpha).sample())
                if cutmix:
                    h, w = x.shape[-2:]
                    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
                    cy, cx = int(torch.randint(0, h, ())), int(torch.randint(0, w, ()))
                    top, bottom = min(max(cy - cut_h // 2, 0), h), min(max(cy + cut_h // 2, 0), h)
                    left, right = min(max(cx - cut_w // 2, 0), w), min(max(cx + cut_w // 2, 0), w)
                    box = (top, bottom, left, right)
                    lam = 1 - (bottom - top) * (right - left) / (h * w)
        if box is not None:
            x = x.clone()
            x[:, :, box[0]: box[1], box[2]: box[3]] = x.flip(0)[:, :, box[0]: box[1], box[2]: box[3]]
        elif lam < 1:
            x = lam * x + (1 - lam) * x.flip(0)
        return x, mixup_target(labels, self.num_classes, lam, aug.label_smoothing), MixParams(lam, box)


def mixup_target(labels: torch.Tensor, num_classes: int, lam: float, smoothing: float) -> torch.Tensor:
    """timm's ``mixup_target``: ``lam * smooth(onehot(y)) + (1 - lam) * smooth(onehot(y.flip(0)))`` with
    ``smooth(t) = t (1 - smoothing) + smoothing / num_classes``. int64 (B,) -> float32 (B, num_classes)."""
    off = smoothing / num_classes
    # scattered rather than F.one_hot, which reads the labels' range back to the host
    onehot = torch.zeros(len(labels), num_classes, device=labels.device).scatter_(1, labels.long()[:, None], 1.0)
    smooth = onehot * (1 - smoothing) + off
    return lam * smooth + (1 - lam) * smooth.flip(0)


class SoftTargetCrossEntropy(nn.Module):
    """Cross-entropy with soft targets: mean over rows of ``sum(-target * log_softmax(logits))``.
    (B, K) logits and (B, K) targets -> scalar."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
