"""Load foreign or own weights into a model: ``.pth``/``.pt`` (``torch.load(weights_only=True)``) or ``.safetensors``.

Wrappers written by common training scripts are unwrapped (``{"state_dict": ...}``, ``{"model": ...}``,
``{"state_dict_ema": ...}``, ``{"model_ema": ...}``) and a DataParallel/DDP ``module.`` prefix is stripped. A model
class may define ``checkpoint_filter_fn(state_dict, model) -> state_dict`` (timm's hook) to remap foreign layouts.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
# Checked in this order; "state_dict" first so a training checkpoint loads its live (non-EMA) weights.
WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")
_SHOW = 5  # keys listed per kind of mismatch


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat CPU state dict, unwrapped and without a ``module.`` prefix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file

        state: object = load_file(str(path), device="cpu")
    elif suffix in TORCH_SUFFIXES:
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"unknown checkpoint suffix {path.suffix!r} of {path}; expected one of "
                         f"{', '.join((*TORCH_SUFFIXES, SAFETENSORS_SUFFIX))}")
    return _unwrap(state, path)


def _unwrap(state: object, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(state, Mapping) and not _is_flat(state):
        inner = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            raise ValueError(f"{path} holds a dict with keys {sorted(map(str, state))[:8]} but no tensors and "
                             f"none of the wrapper keys {WRAPPER_KEYS}")
        state = inner
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _is_flat(state: Mapping) -> bool:
    return bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())


def load_checkpoint(model: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Load the weights at ``path`` into ``model`` (in place) and return it.

    Applies ``type(model).checkpoint_filter_fn`` if the class defines one. With ``strict`` any missing or
    unexpected key, and always any shape mismatch, raises ``ValueError`` listing a few of each.
    """
    state = read_state_dict(path)
    filter_fn = getattr(type(model), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    own = model.state_dict()
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in state.items() if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    problems = []
    if shapes:
        problems.append(_describe("shape mismatches", shapes))
    if strict and missing:
        problems.append(_describe("missing keys", missing))
    if strict and unexpected:
        problems.append(_describe("unexpected keys", unexpected))
    if problems:
        raise ValueError(f"checkpoint {path} does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state, strict=strict)
    return model


def _describe(kind: str, items: list[str]) -> str:
    more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return f"{len(items)} {kind}: {', '.join(items[:_SHOW])}{more}"
