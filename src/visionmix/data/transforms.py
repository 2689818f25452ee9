"""Batched augmentation and normalisation of uint8 image batches (N, C, H, W): no per-sample Python; and the
per-sample :data:`Transform` contract of the streaming loader with its plain :class:`Resize`.

Random crop with zero padding and horizontal flip are one gather: output pixel (b, c, i, j) reads padded pixel
(b, c, i + dy_b, j' + dx_b) with j' = W - 1 - j for flipped samples. Their random parameters are drawn by
:meth:`CropFlip.sample` from an explicit generator, so a batch's augmentation is a fixed function of its seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from visionmix.checks import check_positive
from visionmix.data.decode import resize_uint8
from visionmix.errors import InvalidValue
from visionmix.transfers import device_constant, to_device

# What BatchLoader's ``augment`` can ask for: random crop + flip, the flip alone, nothing.
AUGMENTATIONS = ("crop-flip", "flip", "none")

# A per-sample transform of the streaming loader: ``transform(image_uint8_chw, generator) -> uint8 (C, S, S)``.
Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class CropFlip:
    """Random crop of the original size from the image zero-padded by ``padding`` (2 for 28 px, 4 for 32 px is
    the usual choice) and, when ``hflip``, a horizontal flip with probability 1/2."""

    padding: int = 0
    hflip: bool = False

    def __post_init__(self) -> None:
        if self.padding < 0:
            raise InvalidValue(f"padding must be >= 0, got {self.padding}")

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop offsets (n, 2) int64 in ``[0, 2 * padding]`` (dy, dx) and flip flags (n,) bool."""
        offsets = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=generator)
        flips = torch.rand(n, generator=generator) < 0.5 if self.hflip else offsets.new_zeros(n, dtype=torch.bool)
        return offsets, flips

    def sample_to(self, n: int, generator: torch.Generator, device: torch.device,
                  rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``rows`` (default: all) of :meth:`sample`'s draw for a batch of ``n``, on ``device`` in one copy."""
        offsets, flips = self.sample(n, generator)
        packed = to_device(torch.cat([offsets, flips[:, None].long()], 1)[rows or slice(None)], device)
        return packed[:, :2], packed[:, 2].bool()

    def __call__(self, images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Apply the crops/flips given by :meth:`sample` to ``images`` (N, C, H, W), any dtype, any device."""
        n, c, h, w = images.shape
        p = self.padding
        device = images.device
        padded = F.pad(images, (p, p, p, p)) if p else images
        offsets, flips = offsets.to(device), flips.to(device)
        rows = offsets[:, :1] + torch.arange(h, device=device)  # (N, H)
        cols = torch.arange(w, device=device).expand(n, w)
        cols = torch.where(flips[:, None], cols.flip(1), cols) + offsets[:, 1:]  # (N, W)
        batch = torch.arange(n, device=device)[:, None, None, None]
        chans = torch.arange(c, device=device)[None, :, None, None]
        return padded[batch, chans, rows[:, None, :, None], cols[:, None, None, :]]


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 ``(x / 255 - mean) / std`` per channel."""
    c = images.shape[1]
    if len(mean) != c or len(std) != c:
        raise InvalidValue(f"mean/std need {c} entries for {c}-channel images, got {len(mean)}/{len(std)}")
    # computed in float64 on the host, rounded to float32 once, copied to the device once (device_constant)
    scale = device_constant(tuple(1.0 / (255.0 * s) for s in std), images.device).view(1, c, 1, 1)
    shift = device_constant(tuple(-m / s for m, s in zip(mean, std, strict=True)), images.device).view(1, c, 1, 1)
    return images.float().mul_(scale).add_(shift)


@dataclass(frozen=True)
class Resize:
    """Deterministic bilinear (antialiased when shrinking) resize of a uint8 (C, H, W) image to (size, size)."""

    size: int

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if tuple(image.shape[-2:]) == (self.size, self.size):
            return image
        return resize_uint8(image[None], self.size)[0]


def resize_to(size: int) -> Resize:
    """The plain transform of :class:`~visionmix.data.streaming.StreamingLoader`: resize the whole image to
    ``size`` x ``size``."""
    return Resize(check_positive("size", size))
