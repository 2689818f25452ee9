"""Run directories: atomic checkpoints (safetensors weights + JSON sidecar + training state) and loading them.

Layout of a run directory::

    checkpoint.json              what the run is (model, kwargs, data, config), where it stands (epoch, step),
                                 its history, and the names of the three files below
    weights-<step>.safetensors   model weights at global step <step>
    ema-<step>.safetensors       EMA weights (only with EMA)
    state-<step>.pt              optimizer, scheduler, per-rank RNG states (``torch.load(weights_only=True)``)
    metrics.jsonl                one JSON line per finished epoch
    summary.json                 the final result, once training has finished

Every file is written to a temporary name in the same directory, flushed to disk and renamed over its target.
The step-tagged files are complete before ``checkpoint.json`` switches to them, and files it no longer names are
removed only afterwards, so a kill at any instant leaves a consistent checkpoint behind.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

CHECKPOINT_FILE = "checkpoint.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
FORMAT = "visionmix-run/1"
TAGGED_PREFIXES = ("weights-", "ema-", "state-")
_UMASK = os.umask(0o022)
os.umask(_UMASK)
RUN_FILES = (CHECKPOINT_FILE, METRICS_FILE, SUMMARY_FILE, "eval.json", "eval-deploy.json", "confusion.png",
             "confusion-deploy.png")


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one, never a part."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the permissions open() would
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1) + "\n")


def state_dict_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as independent contiguous CPU tensors (what safetensors accepts)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(run_dir: str | Path, meta: dict[str, Any], model: nn.Module, train_state: dict[str, Any],
                    ema: nn.Module | None = None) -> dict[str, Any]:
    """Write weights, EMA weights and training state tagged with ``meta["global_step"]``, then switch
    ``checkpoint.json`` (``meta`` plus the file names) to them, then delete the files of older checkpoints."""
    run_dir = Path(run_dir)
    tag = f"{int(meta['global_step']):08d}"
    files = {"weights": f"weights-{tag}.safetensors", "state": f"state-{tag}.pt"}
    atomic_write(run_dir / files["weights"], save_safetensors(state_dict_tensors(model), {"format": FORMAT}))
    if ema is not None:
        files["ema"] = f"ema-{tag}.safetensors"
        atomic_write(run_dir / files["ema"], save_safetensors(state_dict_tensors(ema), {"format": FORMAT}))
    buffer = io.BytesIO()
    torch.save(train_state, buffer)
    atomic_write(run_dir / files["state"], buffer.getvalue())
    meta = dict(meta, format=FORMAT, files=files)
    atomic_write_json(run_dir / CHECKPOINT_FILE, meta)
    for path in run_dir.iterdir():
        if path.name.startswith(TAGGED_PREFIXES) and path.name not in files.values():
            path.unlink(missing_ok=True)
    return meta


def read_meta(run_dir: str | Path) -> dict[str, Any]:
    """The ``checkpoint.json`` of a run directory (``FileNotFoundError`` if absent, ``ValueError`` if foreign)."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} holds no {CHECKPOINT_FILE}: not a visionmix run directory "
                                f"(create one with 'visionmix train --out {run_dir} ...')")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} checkpoint")
    return meta


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the run directory is incomplete")
    return load_safetensors(path.read_bytes())


def load_weights(module: nn.Module, path: str | Path) -> None:
    """Load a safetensors state dict into ``module`` with ``strict=True``."""
    module.load_state_dict(_load_tensors(Path(path)), strict=True)


def load_train_state(run_dir: str | Path, meta: dict[str, Any]) -> dict[str, Any]:
    path = Path(run_dir) / meta["files"]["state"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the run directory is incomplete")
    return torch.load(path, map_location="cpu", weights_only=True)


def build_model(meta: dict[str, Any]) -> nn.Module:
    """The run's model, freshly initialised: ``create_model(meta["model"], **meta["model_kwargs"])``."""
    from visionmix.models import create_model

    return create_model(meta["model"], **meta["model_kwargs"])


def load_run(run_dir: str | Path, *, ema: bool | None = None,
             model_factory: Callable[[dict[str, Any]], nn.Module] = build_model) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a run's model from its JSON sidecar and load its latest weights; returns ``(model, meta)``.

    ``ema=None`` picks the weights the run evaluated (its EMA when it kept one); ``meta["data"]`` holds the
    normalisation (mean/std), input size and class names the model was trained with. The model is in eval mode.
    """
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    use_ema = "ema" in meta["files"] if ema is None else ema
    if use_ema and "ema" not in meta["files"]:
        raise ValueError(f"{run_dir} was trained without EMA; there are no EMA weights to load")
    model = model_factory(meta)
    load_weights(model, run_dir / meta["files"]["ema" if use_ema else "weights"])
    return model.eval(), meta
