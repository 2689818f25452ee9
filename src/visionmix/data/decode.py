"""Decoding image files with Pillow and resizing uint8 images: what every source and predict share.

:func:`decode_image` guards against decompression bombs (:func:`decode_pixel_limit`) and turns every decoding
failure into an :class:`~visionmix.errors.UnreadableImage`; :func:`to_tensor` makes the decoded image a uint8
(C, H, W) tensor; :func:`resize_uint8` resizes uint8 batches (how the datasets and the small recipe resize) and
:func:`resample_uint8` one image through kornia (how the deit recipe's crops and evaluation resize).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from visionmix.errors import InvalidValue, UnreadableImage

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
MIN_DECODE_PIXELS = 64_000_000  # decode_pixel_limit's floor: any ordinary photo
RESIZE_CHUNK_BYTES = 256 * 2**20
DEFAULT_DECODE_SIZE = 256  # JPEG draft size when the transform declares no size (see the sources' ``load``)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def decode_pixel_limit(image_size: int) -> int:
    """Most pixels an image may have to be decoded for ``image_size``: 64 MP, or (32 x image_size)^2 if larger.
    A header claiming more is a decompression bomb or a file that does not belong in the dataset."""
    return max(MIN_DECODE_PIXELS, (32 * image_size) ** 2)


def image_mode(path: str | Path) -> str:
    """The Pillow mode of ``path`` from its header (nothing is decoded); :class:`UnreadableImage` if it is not an
    image Pillow opens, or claims so many pixels that Pillow refuses it (a decompression bomb)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.mode
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise UnreadableImage(f"cannot read the header of {path} ({' '.join(str(exc).split())})") from exc


def decode_image(path: str | Path, mode: str, size: tuple[int, int]) -> PILImage:
    """Decode ``path`` with Pillow into ``mode``; a JPEG at the smallest scale that still covers ``size`` (width,
    height). A header claiming more pixels than :func:`decode_pixel_limit` allows for
    that size (a decompression bomb) and any decoding failure are an :class:`UnreadableImage`."""
    from PIL import Image

    max_pixels = decode_pixel_limit(max(size))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
            image = Image.open(path)
        with image:
            if image.width * image.height > max_pixels:
                raise UnreadableImage(f"{path} is {image.width}x{image.height} pixels, more than the {max_pixels:,} "
                                      f"decoded for a {size[0]}x{size[1]} input (a decompression bomb?)")
            image.draft(mode, size)
            return image.convert(mode)
    except UnreadableImage:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise UnreadableImage(f"cannot decode {path} ({' '.join(str(exc).split())})") from exc


def to_tensor(image: Any) -> torch.Tensor:
    """A PIL image (mode L or RGB) -> uint8 (C, H, W)."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def check_uint8_image(image: torch.Tensor) -> None:
    """:class:`InvalidValue` unless ``image`` is a uint8 (C, H, W) tensor (what per-sample transforms take)."""
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.ndim != 3:
        raise InvalidValue(f"expected a uint8 (C, H, W) image, got {getattr(image, 'dtype', type(image).__name__)} "
                           f"{tuple(getattr(image, 'shape', ()))}")


def resize_uint8(images: torch.Tensor, size: int | tuple[int, int], interpolation: str = "bilinear") -> torch.Tensor:
    """Resize of uint8 (N, C, H, W) images to ``size`` (an int: square; else (height, width)) by
    ``torch.nn.functional.interpolate`` (antialiased when the width shrinks), rounded; in chunks of at most ~256 MB
    of float input and output to bound memory (callers check first that the result fits:
    :func:`~visionmix.data.memory.check_fits_in_memory`)."""
    height, width = (size, size) if isinstance(size, int) else size
    n, c, h, w = images.shape
    chunk = max(1, RESIZE_CHUNK_BYTES // (4 * c * (h * w + height * width)))
    smooth = interpolation != "nearest"
    out = [F.interpolate(part.float(), size=(height, width), mode=interpolation,
                         **({"align_corners": False, "antialias": part.shape[-1] > width} if smooth else {}))
           .round_().clamp_(0, 255).to(torch.uint8)
           for part in images.split(chunk)]
    return torch.cat(out)


def resample_uint8(image: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """uint8 (C, h, w) -> uint8 (C, *size) through kornia's resize (antialiased when shrinking), rounded; a copy
    when the size is already ``size``."""
    from kornia.geometry.transform import resize

    if tuple(image.shape[-2:]) == size:
        return image.clone()
    out = resize(image[None].float(), size, interpolation=interpolation, antialias=True)[0]
    return out.round_().clamp_(0, 255).to(torch.uint8)
