"""The run directory: what may be written where (a directory holds a run only if its ``checkpoint.json`` says so),
resuming checks, and the run's ``summary.json``."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from visionmix.engine import run_files
from visionmix.engine.config import TrainConfig
from visionmix.errors import CheckpointError, InvalidValue
from visionmix.files import atomic_write_json, entries


def verify_run(run_dir: Path, meta: dict[str, Any]) -> None:
    """:func:`run_files.verify_checkpoint`, its error saying whether the previous checkpoint can take over."""
    try:
        run_files.verify_checkpoint(run_dir, meta)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; {run_files.previous_hint(run_dir)}") from exc


def finished_summary(run_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """A finished run's ``summary.json``, rewritten from its checkpoint if it is missing or damaged."""
    path = run_dir / run_files.SUMMARY_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        summary = run_summary(meta)
        atomic_write_json(path, summary)
        return summary


def prepare_out_dir(cfg: TrainConfig, out_dir: Path, *, resume: bool, force: bool) -> dict[str, Any] | None:
    """Check ``out_dir`` (every rank, before anyone writes); the meta of the run to resume, or ``None``.

    A directory holds a run only if its ``checkpoint.json`` is a visionmix checkpoint; only then are files there
    the run's own (and ``force`` replaces exactly those). A launcher's files (``run_files.LAUNCH_FILES``) may
    precede the run; anything else in ``out_dir`` is the user's.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidValue(f"--out {out_dir} exists and is not a directory")
    meta = run_files.run_meta(out_dir) if out_dir.is_dir() else None
    if resume and meta is not None:
        saved, now = asdict(TrainConfig.from_dict(meta["config"])), asdict(cfg)
        diff = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in now if k != "device" and saved[k] != now[k]]
        if diff:
            raise InvalidValue(f"{out_dir} was trained with another configuration ({'; '.join(diff)}); resume it "
                               f"with its own settings or train into a new --out")
        return meta
    if meta is not None:
        if not force:
            raise InvalidValue(f"{out_dir} already holds a training run; pass --resume {out_dir} to continue it or "
                               f"--force to replace it")
        return None
    names = [n for n in entries(out_dir) if n not in run_files.LAUNCH_FILES] if out_dir.is_dir() else []
    if names and not force:
        listing = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise InvalidValue(f"--out {out_dir} is not empty ({listing}); choose a new directory or pass --force to "
                           f"write into it")
    clash = [name for name in names if run_files.is_run_file(name)]
    if clash:
        raise InvalidValue(f"--out {out_dir} holds no visionmix run but has files named like a run's own "
                           f"({', '.join(clash[:3])}{', ...' if len(clash) > 3 else ''}), which --force would "
                           f"overwrite; move them or choose a new directory")
    return None


def clear_run(out_dir: Path) -> None:
    """Make ``out_dir`` ready for a fresh run: created, and the files of a run replaced with ``--force`` removed
    (only when its ``checkpoint.json`` says it is a run directory; other files stay)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if run_files.run_meta(out_dir) is None:
        return
    for path in out_dir.iterdir():
        if path.is_file() and run_files.is_run_file(path.name) and path.name != run_files.CHECKPOINT_FILE:
            path.unlink()
    (out_dir / run_files.CHECKPOINT_FILE).unlink()  # last: until then the directory still says whose files these are


def run_summary(meta: dict[str, Any]) -> dict[str, Any]:
    history = meta["history"]
    last = history[-1]
    cfg = meta["config"]
    return {
        "model": meta["model"], "data": cfg["data"], "epochs": cfg["epochs"], "params": meta["params"],
        "epochs_trained": meta["global_step"] / meta["steps_per_epoch"],
        "top1": last["eval_top1"], "top5": last["eval_top5"], "eval_loss": last["eval_loss"],
        "best_top1": max(h["eval_top1"] for h in history), "train_time_s": meta["train_time_s"],
        "train_images_per_s": meta["global_step"] * cfg["batch_size"] / max(meta["train_time_s"], 1e-9),
        "time": meta.get("time_s"), "world_size": meta["world_size"], "history": history, "config": cfg,
        "ema": cfg["ema_decay"] is not None, "data_info": meta["data"],
    }
