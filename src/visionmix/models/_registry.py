"""timm-style model registry: ``register_model``, ``create_model``, ``list_models``, ``is_model``.

Each entry carries its default ``pretrained_cfg`` and the reference figures of SPEC.md section 2
(parameters, MACs, published top-1) so tests and ``visionmix models`` can show them.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Reference:
    """Published / official figures for a model at 1x3x224x224 with a 1000-class head (SPEC.md section 2)."""

    params: int | None = None  # with head
    params_no_head: int | None = None  # the paper's convention for Mixer
    gmacs: float | None = None  # FlopCounterMode flops / 2 / 1e9
    top1: float | None = None  # published ImageNet top-1, %
    deploy_params: int | None = None  # after reparameterize(), for re-param models


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    module: str
    cfg: dict[str, Any] = field(default_factory=dict)
    reference: Reference = field(default_factory=Reference)


_ENTRIES: dict[str, ModelEntry] = {}


def default_cfg(**overrides: Any) -> dict[str, Any]:
    """A ``pretrained_cfg`` dict with timm's fields and defaults, updated by ``overrides``."""
    cfg: dict[str, Any] = {
        "url": "", "architecture": None, "input_size": (3, 224, 224), "fixed_input_size": False,
        "interpolation": "bicubic", "crop_pct": 0.875, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
        "num_classes": 1000, "first_conv": None, "classifier": "head", "paper_ids": None,
    }
    cfg.update(overrides)
    return cfg


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None,
                   cfg: dict[str, Any] | None = None, reference: Reference | None = None):
    """Register a builder (taking keyword arguments only) under ``name`` or its ``__name__``.

    Usable bare (``@register_model``), with options (``@register_model(reference=...)``) or as a call in a loop.
    """

    def add(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or builder.__name__
        module = getattr(builder, "__module__", None) or "unknown"
        _ENTRIES[key] = ModelEntry(key, builder, module.rsplit(".", 1)[-1], default_cfg(**(cfg or {})),
                                   reference or Reference())
        return builder

    return add(fn) if fn is not None else add


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def list_models(filter: str | Iterable[str] = "", exclude_filters: str | Iterable[str] = "",
                module: str = "") -> list[str]:
    """Registered names matching any fnmatch ``filter`` (a pattern or list), minus ``exclude_filters``."""
    includes = [filter] if isinstance(filter, str) else list(filter)
    excludes = [exclude_filters] if isinstance(exclude_filters, str) else list(exclude_filters)
    names = [n for n, e in _ENTRIES.items() if not module or e.module == module]
    if any(includes):
        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in includes if p)]
    names = [n for n in names if not any(fnmatch.fnmatch(n, p) for p in excludes if p)]
    return sorted(names, key=_natural_key)


def is_model(name: str) -> bool:
    """True if ``name`` (optionally ``name.tag``) is registered."""
    return name.split(".", 1)[0] in _ENTRIES


def model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; unknown names raise ``ValueError`` listing the closest ones."""
    arch = name.split(".", 1)[0]
    if arch not in _ENTRIES:
        close = difflib.get_close_matches(arch, list(_ENTRIES), n=5, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else "; see visionmix.list_models()"
        raise ValueError(f"unknown model {name!r}{hint}")
    return _ENTRIES[arch]


def create_model(model_name: str, pretrained: bool = False, checkpoint_path: str | None = None,
                 **kwargs: Any) -> nn.Module:
    """Build a registered model. Keyword arguments whose value is ``None`` are dropped (timm's convention),
    so an unset CLI option means the model's default. ``checkpoint_path`` loads a local .pth/.safetensors."""
    entry = model_entry(model_name)
    if pretrained:
        raise ValueError("pretrained=True: visionmix downloads nothing; pass checkpoint_path= to a local file")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    model = entry.builder(**kwargs)
    cfg = dict(entry.cfg, architecture=entry.name)
    in_chans = kwargs.get("in_chans", cfg["input_size"][0])
    img_size = kwargs.get("img_size", cfg["input_size"][1:])
    img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    cfg["input_size"] = (in_chans, *img_size)
    cfg["num_classes"] = kwargs.get("num_classes", cfg["num_classes"])
    model.pretrained_cfg = cfg
    model.default_cfg = cfg
    if checkpoint_path is not None:
        from visionmix.models.checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint_path)
    return model
