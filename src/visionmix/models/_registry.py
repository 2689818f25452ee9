"""timm-style model registry: ``register_model``, ``create_model``, ``list_models``, ``is_model``.

Each entry carries its default ``pretrained_cfg`` and the reference figures of SPEC.md section 2
(parameters, MACs, published top-1) so tests and ``visionmix models`` can show them.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from visionmix.checks import to_pair
from visionmix.errors import InvalidType, InvalidValue

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
    """A ``pretrained_cfg`` dict with timm's fields and defaults, updated by ``overrides``.

    Input-size constraints: ``fixed_input_size`` (only ``input_size``), ``min_input_size`` (the smallest input taken)
    and visionmix's ``input_size_divisor`` (each side a multiple of it; 1 = any size). ``pool_size``, the grid of
    ``forward_features`` at ``input_size``, is filled in by ``create_model``.
    """
    cfg: dict[str, Any] = {
        "url": "", "architecture": None, "input_size": (3, 224, 224), "fixed_input_size": False,
        "min_input_size": None, "input_size_divisor": 1, "pool_size": None, "interpolation": "bicubic",
        "crop_pct": 0.875, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "num_classes": 1000,
        "first_conv": None, "classifier": "head", "paper_ids": None,
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


def unregister_model(name: str) -> None:
    """Remove ``name`` from the registry (a model registered for an experiment or a test); unknown names raise."""
    model_entry(name)
    del _ENTRIES[name]


def register_variant(name: str, build: Callable[..., nn.Module], defaults: Mapping[str, Any], *, doc: str,
                     cfg: dict[str, Any] | None = None, reference: Reference | None = None) -> None:
    """Register ``name`` as ``build(**{**defaults, **kwargs})``: one configuration of a family, given as data (the
    family's module is recorded, as for a decorated builder)."""
    def builder(**kwargs: Any) -> nn.Module:
        return build(**{**defaults, **kwargs})

    builder.__name__ = builder.__qualname__ = name
    builder.__module__ = build.__module__
    builder.__doc__ = doc
    register_model(builder, cfg=cfg, reference=reference)


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


def expand_model_names(names: Iterable[str]) -> list[str]:
    """``names`` with each fnmatch pattern (``*``, ``?``, ``[``) replaced by the registered names it matches, in
    order, without repeats; an unknown name or a pattern that matches nothing raises before anything runs."""
    expanded: list[str] = []
    for name in names:
        if any(c in name for c in "*?["):
            matches = list_models(name)
            if not matches:
                raise InvalidValue(f"no registered model matches {name!r}")
            expanded += matches
        else:
            model_entry(name)  # an unknown name fails here, with the closest names
            expanded.append(name)
    return list(dict.fromkeys(expanded))


def is_model(name: str) -> bool:
    """True if ``name`` (optionally ``name.tag``) is registered."""
    return name.split(".", 1)[0] in _ENTRIES


def model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; unknown names raise ``ValueError`` listing the closest ones."""
    arch = name.split(".", 1)[0]
    if arch not in _ENTRIES:
        close = difflib.get_close_matches(arch, list(_ENTRIES), n=5, cutoff=0.5)
        hint = (f"; closest: {', '.join(close)}" if close
                else "; list them with 'visionmix models' (Python: visionmix.list_models())")
        raise InvalidValue(f"unknown model {name!r}{hint}")
    return _ENTRIES[arch]


_UNSUPPORTED = {  # timm keyword arguments with no meaning here (None / False are accepted and dropped)
    "cache_dir": "the weights cache is $VISIONMIX_HOME (default ~/.cache/visionmix)",
    "scriptable": "visionmix layers have no TorchScript-specific forms",
    "exportable": "visionmix layers have no export-specific forms (see visionmix.export)",
    "no_jit": "visionmix layers have no TorchScript-specific forms",
    "output_stride": "visionmix models have no dilated variants",
}


def create_model(model_name: str, pretrained: bool = False, pretrained_cfg: dict[str, Any] | None = None,
                 pretrained_cfg_overlay: dict[str, Any] | None = None, checkpoint_path: str | None = None, *,
                 features_only: bool = False, out_indices: int | Sequence[int] | None = None,
                 feature_cls: str | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None,
                 **kwargs: Any) -> nn.Module:
    """Build a registered model (timm's signature). Keyword arguments whose value is ``None`` are dropped (timm's
    convention), so an unset CLI option means the model's default.

    ``checkpoint_path`` loads a local .pth/.safetensors; ``pretrained_cfg`` (a dict) replaces and
    ``pretrained_cfg_overlay`` updates the registered cfg; ``features_only`` returns a
    :class:`~visionmix.models._base.FeatureListNet` of the levels ``out_indices`` (timm's ``feature_cls="getter"``
    kind, built on ``forward_intermediates``; the only one); ``device``/``dtype`` place the model.
    ``model.pretrained_cfg`` describes the model built: ``input_size`` from ``in_chans``/``img_size``, ``mean``/``std``
    with ``in_chans`` entries, ``first_conv``/``classifier`` naming its modules, ``pool_size``.
    """
    entry = model_entry(model_name)
    weights = None
    if pretrained or "." in model_name:  # a tag names weights; pretrained=True loads them (default tag if bare)
        from visionmix.models.pretrained import resolve

        weights = resolve(model_name)
        if pretrained and checkpoint_path is not None:
            raise InvalidValue("pass pretrained=True or checkpoint_path=, not both")
        if kwargs.get("num_classes") is None:  # unset or None (timm's "default"): the weights' class count
            kwargs["num_classes"] = weights.num_classes
    for key, why in _UNSUPPORTED.items():
        if kwargs.pop(key, None) not in (None, False):
            raise InvalidValue(f"create_model({key}=...) is not supported: {why}")
    for key, value in (("pretrained_cfg", pretrained_cfg), ("pretrained_cfg_overlay", pretrained_cfg_overlay)):
        if value is not None and not isinstance(value, dict):
            raise InvalidType(f"{key} must be a dict of pretrained_cfg fields, got {type(value).__name__}")
    if feature_cls is not None and feature_cls != "getter":
        raise InvalidValue(f"feature_cls={feature_cls!r} is not supported: visionmix's features_only models are timm's "
                           "'getter' kind (they call forward_intermediates); pass feature_cls='getter' or None")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if "img_size" in kwargs:
        to_pair("img_size", kwargs["img_size"])  # a clear error for 28.0 or "28", before any family sees it
    model = entry.builder(**kwargs)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    own = weights.pretrained_cfg() if weights is not None else {}
    cfg = _model_cfg(model, {**entry.cfg, **own, **(pretrained_cfg or {}), "architecture": entry.name}, kwargs)
    cfg.update(pretrained_cfg_overlay or {})
    model.pretrained_cfg = model.default_cfg = cfg
    if pretrained:
        from visionmix.models.pretrained import load_pretrained

        load_pretrained(model, weights)
    elif checkpoint_path is not None:
        from visionmix.models.loading import load_checkpoint

        load_checkpoint(model, checkpoint_path)
    if features_only:
        from visionmix.models._base import FeatureListNet

        model = FeatureListNet(model, out_indices)
        model.pretrained_cfg = model.default_cfg = cfg
    elif out_indices is not None or feature_cls is not None:
        raise InvalidValue(f"{'out_indices' if out_indices is not None else 'feature_cls'} needs features_only=True")
    return model


def _model_cfg(model: nn.Module, cfg: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The registered cfg made true of ``model``: input size, per-channel mean/std, first conv, classifier, the
    feature grid at ``input_size`` (``pool_size``; None for (B, N, C) features or a size the last level's reduction
    does not divide)."""
    in_chans = kwargs.get("in_chans", cfg["input_size"][0])
    frames = cfg["input_size"][1:-2]  # (T,) for video models, whose input_size is (C, T, H, W)
    if frames and "num_frames" in kwargs:
        frames = (kwargs["num_frames"],)
    img_size = kwargs.get("img_size", cfg["input_size"][-2:])
    img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    cfg["input_size"] = (in_chans, *frames, *img_size)
    if getattr(model, "feature_fmt", None) in ("NCHW", "NHWC"):  # a spatial map (not tokens) from a zoo model
        reduction = model.feature_info[-1]["reduction"]
        if not any(side % reduction for side in img_size):
            cfg["pool_size"] = tuple(side // reduction for side in img_size)
    if cfg["min_input_size"] is not None:
        cfg["min_input_size"] = (in_chans, *cfg["min_input_size"][1:])
    cfg["num_classes"] = getattr(model, "num_classes", kwargs.get("num_classes", cfg["num_classes"]))
    for key in ("mean", "std"):
        cfg[key] = _per_channel(cfg[key], in_chans)
    first = next((name for name, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Conv3d)), None)
    cfg["first_conv"] = first
    cfg["classifier"] = getattr(model, "head_name", cfg["classifier"])
    return cfg


def _per_channel(values: Sequence[float], channels: int) -> tuple[float, ...]:
    """Normalisation statistics for ``channels`` inputs: kept if they fit, else their average for every channel
    (a grey image's statistics are the average of the colour ones)."""
    if len(values) == channels:
        return tuple(values)
    return (sum(values) / len(values),) * channels
