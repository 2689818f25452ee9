"""Run directories: atomic checkpoints (safetensors weights + JSON sidecar + training state) and loading them.

Layout of a run directory::

    checkpoint.json              what the run is (model, kwargs, data, config), where it stands (epoch, step),
                                 its history, and the names of the three files below
    checkpoint-previous.json     the checkpoint before it, whose files are kept until the next one is complete
    weights-<step>.safetensors   model weights at global step <step>
    ema-<step>.safetensors       EMA weights (only with EMA)
    state-<step>.pt              optimizer, scheduler, per-rank RNG states (``torch.load(weights_only=True)``)
    metrics.jsonl                one JSON line per finished epoch
    summary.json                 the final result, once training has finished
    train.log                    what the run said (epoch lines, notices, warnings) and a crash's traceback
    eval*.json, confusion*.png   written by ``visionmix eval``
    run.json, error.json,        a launcher's (``visionmix compare``): the run's spec and provenance, its failure,
    stdout.log, stderr.log,      and the output of its worker process; slurm/: the jobs of ``train --launcher
    slurm/                       slurm``; not the run's own, never deleted

Every file is written to a temporary name in the same directory, flushed to disk and renamed over its target.
The step-tagged files are complete before ``checkpoint.json`` switches to them, and files that neither it nor
``checkpoint-previous.json`` names are removed only afterwards, so a kill at any instant leaves a consistent
checkpoint behind, and a damaged latest checkpoint leaves the previous one to fall back on.

A directory is a run directory only if its ``checkpoint.json`` is one (:func:`read_meta`); only there, and only
files named exactly as above (:func:`is_run_file`), count as the run's own: nothing else is ever deleted.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from visionmix.engine.config import INIT_PRETRAINED
from visionmix.errors import CheckpointError, InvalidValue
from visionmix.files import atomic_write, atomic_write_json, temporary_target

CHECKPOINT_FILE = "checkpoint.json"
PREVIOUS_FILE = "checkpoint-previous.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
LOG_FILE = "train.log"  # what the run said, its warnings and the traceback of what stopped it (visionmix.runlog)
# what a launcher (visionmix.bench.launch) keeps beside a run: its spec and provenance, its error, its output
RUN_FILE, ERROR_FILE, STDOUT_FILE, STDERR_FILE = "run.json", "error.json", "stdout.log", "stderr.log"
SLURM_DIR = "slurm"  # the Slurm launcher's: submitit's files and jobs.json (of train --launcher slurm: in a run)
LAUNCH_FILES = (RUN_FILE, ERROR_FILE, STDOUT_FILE, STDERR_FILE, SLURM_DIR)
FORMAT = "visionmix-run/1"
EVAL_FORM_SUFFIX = {"trained": "", "deployed": "-deploy", "int8": "-int8"}  # eval{suffix}.json, confusion{suffix}.png
RUN_FILES = (CHECKPOINT_FILE, PREVIOUS_FILE, METRICS_FILE, SUMMARY_FILE, LOG_FILE,
             *(f"{stem}{suffix}.{ext}" for suffix in EVAL_FORM_SUFFIX.values()
               for stem, ext in (("eval", "json"), ("confusion", "png"))))
_TAGGED = r"(?:weights|ema)-\d{8}\.safetensors|state-\d{8}\.pt"
_TAGGED_RE = re.compile(_TAGGED)
_OWN_NAME_RE = re.compile("|".join([*map(re.escape, RUN_FILES), _TAGGED]))


def is_run_file(name: str) -> bool:
    """Whether ``name`` is exactly what a run writes into its directory (including a temporary file of it)."""
    return bool(_OWN_NAME_RE.fullmatch(temporary_target(name) or name))


def state_dict_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as independent contiguous CPU tensors (what safetensors accepts)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(run_dir: str | Path, meta: dict[str, Any], model: nn.Module, train_state: dict[str, Any],
                    ema: nn.Module | None = None) -> dict[str, Any]:
    """Write weights, EMA weights and training state tagged with ``meta["global_step"]``, then switch
    ``checkpoint.json`` (``meta`` plus the file names) to them, keeping the checkpoint it replaces as
    ``checkpoint-previous.json``, then delete the files that neither names."""
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
    replaced = _read_checkpoint(run_dir / CHECKPOINT_FILE, missing_ok=True)
    if replaced is not None and replaced["files"] != files:
        atomic_write_json(run_dir / PREVIOUS_FILE, replaced)
    atomic_write_json(run_dir / CHECKPOINT_FILE, meta)
    remove_unnamed_files(run_dir)
    return meta


def remove_unnamed_files(run_dir: str | Path, *, temporary: bool = False) -> None:
    """Delete the step-tagged files that neither checkpoint names (and, with ``temporary``, the temporary files a
    killed write left behind). Only names a run writes are touched (:func:`is_run_file`)."""
    run_dir = Path(run_dir)
    keep = {name for meta_file in (CHECKPOINT_FILE, PREVIOUS_FILE)
            if (meta := _read_checkpoint(run_dir / meta_file, missing_ok=True, damaged_ok=True)) is not None
            for name in meta["files"].values()}
    for path in run_dir.iterdir():
        stale = _TAGGED_RE.fullmatch(path.name) and path.name not in keep
        if stale or (temporary and temporary_target(path.name) is not None and is_run_file(path.name)):
            path.unlink(missing_ok=True)


def _read_checkpoint(path: Path, *, missing_ok: bool = False, damaged_ok: bool = False) -> dict[str, Any] | None:
    """A checkpoint JSON file; ``None`` if absent (``missing_ok``) or not a readable one of ours (``damaged_ok``)."""
    if not path.is_file():
        if missing_ok:
            return None
        raise FileNotFoundError(f"{path.parent} holds no {path.name}: not a visionmix run directory "
                                f"(create one with 'visionmix train --out {path.parent} ...')")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        if damaged_ok:
            return None
        raise CheckpointError(f"{path} is damaged: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("files"), dict):
        if damaged_ok:
            return None
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint")
    return meta


def read_meta(run_dir: str | Path) -> dict[str, Any]:
    """The ``checkpoint.json`` of a run directory (``FileNotFoundError`` if absent, :class:`CheckpointError` if
    damaged or foreign)."""
    return _read_checkpoint(Path(run_dir) / CHECKPOINT_FILE)  # type: ignore[return-value]


def run_meta(directory: str | Path) -> dict[str, Any] | None:
    """The meta of the run in ``directory``, or ``None`` if it is not a run directory (no ``checkpoint.json``, or
    one that visionmix did not write)."""
    return _read_checkpoint(Path(directory) / CHECKPOINT_FILE, missing_ok=True, damaged_ok=True)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; :class:`CheckpointError` naming it if it is missing or damaged."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the run directory is incomplete")
    try:
        return load_safetensors(path.read_bytes())
    except SafetensorError as exc:
        raise CheckpointError(f"{path} is damaged: not a readable safetensors file ({exc})") from exc


def load_weights(module: nn.Module, path: str | Path) -> None:
    """Load a safetensors state dict into ``module``: every key, with its shape (:class:`CheckpointError` if not)."""
    from visionmix.models.loading import state_dict_problems

    state = read_weights(path)
    problems = state_dict_problems(module.state_dict(), state, strict=True)
    if problems:
        raise CheckpointError(f"{path} does not fit {type(module).__name__}: {'; '.join(problems)}")
    module.load_state_dict(state, strict=True)


def load_train_state(run_dir: str | Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The optimizer, scheduler and RNG states of a checkpoint (``torch.load(weights_only=True)``)."""
    path = Path(run_dir) / meta["files"]["state"]
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the run directory is incomplete")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, KeyError, IndexError) as exc:
        raise CheckpointError(f"{path} is damaged: not a readable training state "
                              f"({' '.join(str(exc).split())[:200]})") from exc
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "rng"} <= set(state):
        raise CheckpointError(f"{path} is damaged: it lacks the optimizer/scheduler/RNG states of a training state")
    return state


def build_model(meta: dict[str, Any]) -> nn.Module:
    """The run's model, freshly initialised: ``create_model(meta["model"], **meta["model_kwargs"])``."""
    from visionmix.models import create_model

    return create_model(meta["model"], **meta["model_kwargs"])


def verify_checkpoint(run_dir: str | Path, meta: dict[str, Any],
                      model_factory: Callable[[dict[str, Any]], nn.Module] = build_model) -> None:
    """Read every file ``meta`` names and load its weights into the run's model; :class:`CheckpointError` at the
    first that is missing, damaged or does not fit."""
    run_dir = Path(run_dir)
    model = model_factory(meta)
    for kind in ("weights", "ema"):
        if kind in meta["files"]:
            load_weights(model, run_dir / meta["files"][kind])
    load_train_state(run_dir, meta)


def intact_previous(run_dir: str | Path,
                    model_factory: Callable[[dict[str, Any]], nn.Module] = build_model) -> dict[str, Any] | None:
    """The meta of ``checkpoint-previous.json`` if every file it names is intact, else ``None``."""
    meta = _read_checkpoint(Path(run_dir) / PREVIOUS_FILE, missing_ok=True, damaged_ok=True)
    if meta is None:
        return None
    try:
        verify_checkpoint(run_dir, meta, model_factory)
    except CheckpointError:
        return None
    return meta


def previous_hint(run_dir: str | Path) -> str:
    """What to say after a damaged checkpoint: how to continue from the previous one, if it is intact."""
    meta = intact_previous(run_dir)
    if meta is None:
        return "no earlier intact checkpoint is kept"
    return (f"the previous checkpoint (epoch {meta['epoch']}, global step {meta['global_step']}) is intact: continue "
            f"from it with 'visionmix train --resume {run_dir} --from-previous'")


def restore_previous(run_dir: str | Path) -> dict[str, Any]:
    """Make the intact previous checkpoint the current one again (``--from-previous``); returns its meta."""
    run_dir = Path(run_dir)
    meta = intact_previous(run_dir)
    if meta is None:
        raise CheckpointError(f"{run_dir} has no intact previous checkpoint ({PREVIOUS_FILE} is missing, or a file "
                              f"it names is missing or damaged)")
    atomic_write_json(run_dir / CHECKPOINT_FILE, meta)
    return meta


def load_run(run_dir: str | Path, *, ema: bool | None = None,
             model_factory: Callable[[dict[str, Any]], nn.Module] = build_model) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a run's model from its JSON sidecar and load its latest weights; returns ``(model, meta)``.

    ``ema=None`` picks the weights the run evaluated (its EMA when it kept one); ``meta["data"]`` holds the
    normalisation (mean/std), input size and class names the model was trained with. The model is in eval mode.
    A damaged weights file is a :class:`CheckpointError` that says whether the previous checkpoint is intact.
    """
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    use_ema = "ema" in meta["files"] if ema is None else ema
    if use_ema and "ema" not in meta["files"]:
        raise InvalidValue(f"{run_dir} was trained without EMA; there are no EMA weights to load")
    model = model_factory(meta)
    try:
        load_weights(model, run_dir / meta["files"]["ema" if use_ema else "weights"])
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; {previous_hint(run_dir)}") from exc
    return model.eval(), meta


def init_from(model: nn.Module, source: str | Path) -> list[str]:
    """Load the weights of ``source`` into ``model`` to fine-tune it (``--init``): ``"pretrained"`` (the model's
    released weights, fetched into the cache), a visionmix run directory (the weights it evaluated: its EMA when it
    kept one) or an official ``.pth``/``.safetensors`` file; see
    :func:`visionmix.models.loading.load_for_finetuning`. Returns the checkpoint keys not loaded."""
    from visionmix.models.loading import load_for_finetuning, read_state_dict, set_doconv_grouping

    if str(source) == INIT_PRETRAINED:
        from visionmix.models.pretrained import fetch, resolve

        path = fetch(resolve(model.pretrained_cfg["architecture"]))
        return load_for_finetuning(model, read_state_dict(path), path)
    source = Path(source)
    meta = run_meta(source) if source.is_dir() else None
    if source.is_dir() and meta is None:
        raise InvalidValue(f"--init {source} is a directory but not a visionmix run (no {CHECKPOINT_FILE})")
    if meta is not None:
        state = read_weights(source / meta["files"]["ema" if "ema" in meta["files"] else "weights"])
        set_doconv_grouping(model, "visionmix", source)
    else:
        state = read_state_dict(source)
        set_doconv_grouping(model, None, source)
    return load_for_finetuning(model, state, source)
