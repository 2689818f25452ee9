"""The evaluation transform: one resolver and one implementation (timm's ``resolve_data_config`` and
``transforms_imagenet_eval``), used by a run's evaluation (:mod:`visionmix.engine.pipeline`, ``visionmix eval``)
and by :mod:`visionmix.predict`, so an image file is classified from the tensor the run evaluated.

:func:`resolve_eval_transform` decides size, crop, interpolation and mean/std from a model's ``pretrained_cfg``, the
recipe a run trained with and what the caller knows better (the run's channels, image size and statistics, its
``--crop-pct``):

- no recipe (a foreign checkpoint): timm's evaluation transform of ``pretrained_cfg``: the shorter side to
  ``floor(size / crop_pct)``, the centre ``input_size``, its interpolation, mean and std;
- ``small``: the whole image resized straight to the size, bilinear, as the small recipe trains and evaluates;
- ``deit``: resize + centre crop at ``crop_pct`` (the run's, else ``pretrained_cfg``'s) with the model's
  interpolation, as the DeiT recipe evaluates.

:class:`EvalTransform` works on uint8 (C, H, W) tensors: it is a per-sample transform of the streaming loader
(``transform(image, generator) -> uint8 (C, H, W)``), and :meth:`EvalTransform.input` / :meth:`EvalTransform.read`
turn a decoded image or an image file into the normalised float (C, H, W) model input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from visionmix.checks import check_choice
from visionmix.data.decode import (
    INTERPOLATIONS,
    check_uint8_image,
    decode_image,
    resample_uint8,
    resize_uint8,
    to_tensor,
)
from visionmix.data.transforms import normalize
from visionmix.errors import InvalidValue

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

MODES = {1: "L", 3: "RGB"}  # the images Pillow decodes, by the model's input channels
RECIPES = ("small", "deit")


@dataclass(frozen=True)
class EvalTransform:
    """A model's evaluation transform, from an image to its ``in_chans`` x ``size`` (H, W) input.

    ``crop_pct=None`` resizes straight to ``size`` (``torch.nn.functional.interpolate``, how visionmix's datasets
    and the small recipe resize); a number is timm's evaluation resize through kornia (as the deit recipe's crops):
    the shorter side to ``floor(size / crop_pct)`` (for a non-square ``size`` each side to its own), then the centre
    crop starting at ``round((side - size) / 2)``, as torchvision's ``Resize`` + ``CenterCrop``. ``mean``/``std``
    normalise the uint8 result exactly as training normalised its batches.
    """

    in_chans: int
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float | None = None
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.in_chans not in MODES:
            raise InvalidValue(f"images are decoded grey (1 channel) or RGB (3 channels); this model takes "
                               f"{self.in_chans} channels")
        if len(self.size) != 2 or not all(isinstance(s, int) and s > 0 for s in self.size):
            raise InvalidValue(f"size must be (height, width), two positive whole numbers, got {self.size}")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise InvalidValue(f"mean/std need {self.in_chans} entries each, got {self.mean} / {self.std}")
        check_choice("interpolation", self.interpolation, INTERPOLATIONS)
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise InvalidValue(f"crop_pct must be in (0, 1], got {self.crop_pct}")

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) an image of ``height`` x ``width`` pixels is resized to before the centre crop."""
        h, w = self.size
        if self.crop_pct is None:
            return h, w
        if h != w:
            return math.floor(h / self.crop_pct), math.floor(w / self.crop_pct)
        short = math.floor(h / self.crop_pct)
        if height <= width:
            return short, int(short * width / height)
        return int(short * height / width), short

    @property
    def decode_size(self) -> tuple[int, int]:
        """(width, height) a JPEG is drafted to at least (:func:`~visionmix.data.decode.decode_image`): the output
        size, as the streaming loader drafts for its transform."""
        return self.size[1], self.size[0]

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 (C, H, W) of any size -> uint8 (C, *size); ``generator`` unused (the streaming contract)."""
        check_uint8_image(image)
        if self.crop_pct is None:
            if tuple(image.shape[-2:]) == self.size:
                return image
            return resize_uint8(image[None], self.size, self.interpolation)[0]
        h, w = self.resized_shape(image.shape[1], image.shape[2])
        image = resample_uint8(image, (h, w), self.interpolation)
        top, left = round((h - self.size[0]) / 2), round((w - self.size[1]) / 2)
        return image[:, top: top + self.size[0], left: left + self.size[1]].contiguous()

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> float32 ``(x / 255 - mean) / std`` (:func:`~visionmix.data.transforms.normalize`)."""
        return normalize(images, self.mean, self.std)

    def input(self, image: PILImage | torch.Tensor) -> torch.Tensor:
        """The model input, float32 (C, H, W), for a decoded image (a Pillow image, converted to grey or RGB as the
        model takes, or a uint8 (C, H, W) tensor)."""
        if not isinstance(image, torch.Tensor):
            mode = MODES[self.in_chans]
            image = to_tensor(image if image.mode == mode else image.convert(mode))
        return self.normalize(self(image)[None])[0]

    def read(self, path: str | Path) -> torch.Tensor:
        """The model input for the image file ``path``; :class:`UnreadableImage` if it cannot be decoded."""
        return self.input(decode_image(path, MODES[self.in_chans], self.decode_size))


def resolve_eval_transform(pretrained_cfg: Mapping[str, Any], recipe: str | None = None, *,
                           in_chans: int | None = None, image_size: int | Sequence[int] | None = None,
                           mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                           crop_pct: float | None = None, interpolation: str | None = None) -> EvalTransform:
    """The evaluation transform of a model with ``pretrained_cfg`` (``input_size``, ``crop_pct``,
    ``interpolation``, ``mean``, ``std``) trained with ``recipe`` (None: a foreign checkpoint, timm's transform;
    ``small``; ``deit``; see the module docstring). The keyword arguments override ``pretrained_cfg`` where given:
    a run's channels, image size (an int for a square) and training statistics, its ``--crop-pct``. The small
    recipe resizes straight to the size whatever ``crop_pct`` says."""
    if recipe is not None:
        check_choice("recipe", recipe, RECIPES)
    cfg_chans, height, width = pretrained_cfg["input_size"]
    if image_size is not None:
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    if recipe == "small":
        crop, interpolation = None, interpolation or "bilinear"
    else:
        crop = crop_pct if crop_pct is not None else float(pretrained_cfg["crop_pct"])
        interpolation = interpolation or pretrained_cfg["interpolation"]
    return EvalTransform(in_chans or cfg_chans, (int(height), int(width)),
                         tuple(mean if mean is not None else pretrained_cfg["mean"]),
                         tuple(std if std is not None else pretrained_cfg["std"]), crop, interpolation)
