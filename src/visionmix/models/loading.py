"""Load foreign or own weights into a model: ``.pth``/``.pt`` (``torch.load(weights_only=True)``) or ``.safetensors``.

Wrappers written by common training scripts are unwrapped (``{"state_dict": ...}``, ``{"model": ...}``,
``{"model_state": ...}``, ``{"state_dict_ema": ...}``, ``{"model_ema": ...}``) and a DataParallel/DDP ``module.``
prefix is stripped. A model class may define ``checkpoint_filter_fn(state_dict, model) -> state_dict`` (timm's
hook) to remap foreign layouts.
Weights of another input channel count (RGB weights for a grey model, say) are adapted in the model's first conv
(``pretrained_cfg["first_conv"]``) by :func:`adapt_input_conv`, with a notice.
"""

from __future__ import annotations

import argparse
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from visionmix.checks import check_choice, check_positive
from visionmix.errors import InvalidValue
from visionmix.layers.overparam import GROUPINGS, DOConv2d
from visionmix.runlog import logger

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
# Checked in this order; "state_dict" first so a training checkpoint loads its live (non-EMA) weights.
WRAPPER_KEYS = ("state_dict", "model", "model_state", "state_dict_ema", "model_ema")
# Classes a published checkpoint may pickle besides tensors and containers: DeiT-style training scripts (SPACH's and
# UniFormer's main.py) save their command line, an argparse.Namespace of plain values rebuilt without running code,
# under "args" beside the weights. Anything else that is not tensors and containers is refused.
SAFE_CLASSES = (argparse.Namespace,)
_SHOW = 5  # keys listed per kind of mismatch
_LOG = logger("models")


def read_state_dict(path: str | Path, wrapped_under: str | None = None) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat CPU state dict, unwrapped and without a ``module.`` prefix.
    ``wrapped_under`` names the key that holds the weights where a publisher states it (a file with both ``model``
    and ``model_ema``, say); a file without that key is unwrapped as any other."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX):
        raise InvalidValue(f"unknown checkpoint suffix {path.suffix!r} of {path}; expected one of "
                           f"{', '.join((*TORCH_SUFFIXES, SAFETENSORS_SUFFIX))}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(list(SAFE_CLASSES)):
            warnings.simplefilter("ignore")  # torch.load's notes on pickle protocols: the outcome is checked here
            state: object = (load_file(str(path), device="cpu") if suffix == SAFETENSORS_SUFFIX
                             else torch.load(path, map_location="cpu", weights_only=True))
    except pickle.UnpicklingError as exc:
        raise InvalidValue(f"{path} is not a plain state dict: it pickles objects other than tensors and containers, "
                           f"which torch.load(weights_only=True) refuses (a pickle can run code)") from exc
    except (SafetensorError, RuntimeError, EOFError, KeyError, ValueError, IndexError) as exc:
        # a text file, a truncated or foreign archive: each makes torch.load fail in its own way
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise InvalidValue(f"{path} is damaged or not a {suffix} checkpoint ({reason})") from exc
    if wrapped_under is not None and isinstance(state, Mapping) and isinstance(state.get(wrapped_under), Mapping):
        state = state[wrapped_under]
    return _unwrap(state, path)


def _unwrap(state: object, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(state, Mapping) and not _is_flat(state):
        inner = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            raise InvalidValue(f"{path} holds a dict with keys {sorted(map(str, state))[:8]} but no tensors and "
                               f"none of the wrapper keys {WRAPPER_KEYS}")
        state = inner
    if not isinstance(state, Mapping):
        raise InvalidValue(f"{path} holds a {type(state).__name__}, not a state dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _is_flat(state: Mapping) -> bool:
    return bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())


def load_checkpoint(model: nn.Module, path: str | Path, strict: bool = True, *,
                    doconv_grouping: str | None = None) -> nn.Module:
    """Load the weights at ``path`` into ``model`` (in place) and return it.

    Applies ``type(model).checkpoint_filter_fn`` if the class defines one. With ``strict`` any missing or
    unexpected key, and always any shape or dtype-kind mismatch, raises ``ValueError`` listing a few of each.

    ``doconv_grouping`` (``"official"`` for checkpoints of the official DO-Conv code, ``"visionmix"`` for
    visionmix's own) sets the composition of every :class:`~visionmix.layers.DOConv2d`: both layouts have the same
    keys and shapes, so a grouped DO-Conv would load strictly either way and compute other outputs. Left None, it
    is required (``ValueError``) only when the model has a DO-Conv whose grouping matters.
    """
    set_doconv_grouping(model, doconv_grouping, path)
    state = read_state_dict(path)
    filter_fn = getattr(type(model), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    state = adapt_first_conv(model, state, path)
    problems = state_dict_problems(model.state_dict(), state, strict=strict)
    if problems:
        raise InvalidValue(f"checkpoint {path} does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state, strict=strict)
    return model


def state_dict_problems(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], *,
                        strict: bool = True) -> list[str]:
    """What keeps ``state`` from loading into a model whose state dict is ``own``: shape mismatches and tensors of
    another kind (integer checkpoint values for float weights, say: ``load_state_dict`` would convert them without
    a word) always, missing and unexpected keys with ``strict``; one short line per kind, listing a few keys. Empty
    if it fits."""
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in state.items() if k in own and v.shape != own[k].shape]
    dtypes = [f"{k}: checkpoint {v.dtype} vs model {own[k].dtype}"
              for k, v in state.items() if k in own and _kind(v.dtype) != _kind(own[k].dtype)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    problems = [_describe("shape mismatches", shapes)] if shapes else []
    if dtypes:
        problems.append(_describe("dtypes that would convert lossily", dtypes))
    if strict and missing:
        problems.append(_describe("missing keys", missing))
    if strict and unexpected:
        problems.append(_describe("unexpected keys", unexpected))
    return problems


def _kind(dtype: torch.dtype) -> str:
    """A dtype's kind: a tensor loads into a model tensor of the same kind (float32 into float64, say) without
    losing what it means; across kinds (integers into float weights, floats into a counter) it would not."""
    if dtype == torch.bool:
        return "bool"
    return "complex" if dtype.is_complex else "float" if dtype.is_floating_point else "int"


def set_doconv_grouping(model: nn.Module, grouping: str | None, path: str | Path) -> None:
    """Set the composition (``"official"``/``"visionmix"``) of every DO-Conv of ``model`` before loading ``path``;
    ``None`` is an error naming the grouped DO-Convs whose outputs would depend on it."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, DOConv2d)}
    if grouping is None:
        ambiguous = [name or type(model).__name__ for name, m in layers.items() if m.grouping_matters]
        if ambiguous:
            raise InvalidValue(f"checkpoint {path}: {_describe('grouped DO-Convs', ambiguous)} compose their kernel "
                               "differently in the official code; pass doconv_grouping='official' for an official "
                               "checkpoint or 'visionmix' for one saved from visionmix")
        return
    check_choice("doconv_grouping", grouping, GROUPINGS)
    for layer in layers.values():
        layer.grouping = grouping


def _describe(kind: str, items: list[str]) -> str:
    more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return f"{len(items)} {kind}: {', '.join(items[:_SHOW])}{more}"


def load_for_finetuning(model: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path) -> list[str]:
    """Load ``state`` (a flat state dict read from ``source``) into ``model`` to fine-tune it: every key strictly,
    except the classifier's (``model.get_classifier()``), which keeps its fresh initialisation when its shapes differ
    (another class count) or it is absent from ``state``. Applies ``checkpoint_filter_fn``; returns the checkpoint
    keys not loaded (the dropped classifier's), for the log."""
    filter_fn = getattr(type(model), "checkpoint_filter_fn", None)
    state = adapt_first_conv(model, dict(filter_fn(dict(state), model) if filter_fn is not None else state), source)
    own = model.state_dict()
    head_name = getattr(model, "head_name", None)
    head_keys = {k for k in own if head_name and k.startswith(f"{head_name}.")}
    head_fits = bool(head_keys) and all(k in state and state[k].shape == own[k].shape for k in head_keys)
    dropped = [] if head_fits else sorted(k for k in state if k.startswith(f"{head_name}.") or k in head_keys)
    kept = {k: v for k, v in state.items() if k not in dropped}
    problems = state_dict_problems({k: v for k, v in own.items() if head_fits or k not in head_keys}, kept)
    if problems:
        raise InvalidValue(f"--init {source} does not fit {type(model).__name__} (beyond its classifier): "
                           + "; ".join(problems))
    model.load_state_dict(kept, strict=False)
    return dropped


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A first-conv weight ``(out, C, *kernel)`` trained on C input channels, made for ``in_chans`` channels as timm's
    ``adapt_input_conv`` does: for one channel the sum over C (a grey image through it gives what the image repeated
    C times gives through the original), for more the kernel repeated along the channels, cut to ``in_chans`` and
    scaled by C / ``in_chans`` (for a multiple of C, an image whose channels are all equal then gives the
    original's response)."""
    check_positive("in_chans", in_chans)
    source = weight.shape[1]
    adapted = weight.float()
    if in_chans == 1:
        adapted = adapted.sum(dim=1, keepdim=True)
    else:
        repeats = -(-in_chans // source)
        adapted = adapted.repeat(1, repeats, *[1] * (weight.dim() - 2))[:, :in_chans] * (source / in_chans)
    return adapted.to(weight.dtype)


def adapt_first_conv(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> dict[str, torch.Tensor]:
    """``state`` with the weight of ``model``'s first conv (``pretrained_cfg["first_conv"]``) adapted to the model's
    input channel count when only that differs (:func:`adapt_input_conv`), saying so once; else ``state`` itself."""
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    key = f"{first}.weight"
    own, theirs = model.state_dict().get(key), state.get(key)
    if (first is None or own is None or theirs is None or own.shape == theirs.shape
            or own.dim() != theirs.dim() or own.shape[:1] + own.shape[2:] != theirs.shape[:1] + theirs.shape[2:]):
        return state  # nothing to adapt, or a mismatch beyond the channels: reported by state_dict_problems
    _LOG.warning(f"{source}: the first conv {key} was trained on {theirs.shape[1]} input channels; adapted to the "
                 f"model's {own.shape[1]} ("
                 + ("summed over them" if own.shape[1] == 1 else "repeated and rescaled, as timm's adapt_input_conv")
                 + ")")
    return {**state, key: adapt_input_conv(theirs, own.shape[1])}
