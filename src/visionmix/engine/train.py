"""One trainer for every registered model (SPACH's point: one recipe for all architectures, 2108.13002 sec. 3).

The run (its directory held, its log, signals) is here, the loop in :mod:`~visionmix.engine.trainer`; the recipe
is :mod:`~visionmix.engine.config`, the data and loss :mod:`~visionmix.engine.pipeline`, parameter groups,
schedule and EMA :mod:`~visionmix.engine.optim`, the run directory :mod:`~visionmix.engine.run_setup` and
:mod:`~visionmix.engine.run_files`. AdamW (1711.05101) with
per-step linear warmup then cosine decay (1608.03983), gradient-norm clipping, the model's drop-path (1603.09382),
optional EMA; ``accum_steps`` micro-batches per optimizer step; fp32, bf16 autocast or fp16 with a gradient
scaler on the training device (``amp``; auto: bf16 on CUDA, fp32 on CPU), optionally channels-last,
``torch.compile`` and SyncBatchNorm (CUDA under torchrun).
``init`` fine-tunes from a checkpoint (every key but a resized classifier), ``freeze="backbone"`` trains the
classifier alone with the backbone's BN statistics frozen, ``layer_decay`` scales each layer's LR.

Exact resume: the batch order of epoch ``e`` and the augmentation of step ``k`` are fixed functions of
``(seed, e, k)`` (in-memory: :mod:`visionmix.data.loader`; streamed: :mod:`visionmix.data.streaming`, whose
DataLoader draws nothing from the global RNG), and a checkpoint holds weights, optimizer, scheduler, gradient
scaler, EMA, every rank's RNG state and the epoch's running sums, so a run resumed from a checkpoint taken at any
step, including mid-epoch, continues bit for bit as if it had never stopped: on CPU always, on CUDA with
``deterministic`` (cuDNN's autotuning and atomics otherwise pick kernels whose sums differ run to run).
Checkpoints are written before the first step (step 0: the directory is the run's from the start), at epoch ends,
every ``save_every`` steps and on SIGINT/SIGTERM; the previous one is kept beside the latest. A run of under
``RECOMPUTE_BN_BELOW_STEPS`` steps ends by recomputing its BatchNorm statistics from the final weights.

Time budget (``time_budget_min``): the warmup does not depend on the run's length, so the trainer times it and then
fixes the step count that fills ``BUDGET_FILL`` of the budget at that speed (at most ``epochs``); the cosine decay
spans exactly those steps. The count is saved with the checkpoint, so a resumed run keeps it. If the machine slows
down and the budget runs out first, the run ends there. Training time excludes evaluation and checkpoint writes.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from visionmix.engine import run_files
from visionmix.engine.config import TrainConfig
from visionmix.engine.distributed import (
    barrier,
    init_distributed,
    launched_rank,
    shutdown,
)
from visionmix.engine.run_setup import finished_summary, prepare_out_dir, verify_run
from visionmix.engine.trainer import Trainer
from visionmix.errors import InvalidValue
from visionmix.files import hold_directory
from visionmix.runlog import console_logging, run_log


@contextmanager
def _signal_flag() -> Iterator[dict[str, int]]:
    """Turn the first SIGINT/SIGTERM into a flag checked after each step; a second SIGINT interrupts at once. A
    signal that came after the last step (the run then ends normally) is passed on to the Python handler that was
    installed before the run (e.g. a comparison's, which then starts no further run)."""
    flag: dict[str, int] = {}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: object) -> None:
        if flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["signum"] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    before = previous.get(flag.get("signum", 0))
    if callable(before) and before is not signal.default_int_handler:
        before(flag["signum"], None)


def train(cfg: TrainConfig, out_dir: str | Path, *, resume: bool = False, progress: bool = True,
          force: bool = False, from_previous: bool = False) -> dict[str, Any]:
    """Train ``cfg`` into run directory ``out_dir``; returns the summary also written to ``summary.json``.

    ``resume=True`` continues the checkpoint in ``out_dir`` (whose configuration must equal ``cfg`` but for the
    device), returns at once if that run has finished (after checking that its files are intact), and starts
    afresh if ``out_dir`` holds no run yet; ``from_previous`` first goes back to the run's previous checkpoint
    (when the latest is damaged). Without ``resume`` an existing run directory, or a non-empty directory, is an
    error unless ``force``: then the files of the run already there are replaced, and in a directory that holds
    no run nothing is deleted (files named like a run's own are an error). Raises :class:`TrainingError` on a
    non-finite loss and :class:`TrainingInterrupted` after saving on SIGINT/SIGTERM.
    """
    cfg.validate()
    if from_previous and not resume:
        raise InvalidValue("from_previous only applies when resuming a run")
    out_dir = Path(out_dir)
    with _held(out_dir):
        if from_previous and launched_rank() == 0:
            run_files.restore_previous(out_dir)
        return _train_held(cfg, out_dir, resume=resume, progress=progress, force=force)


def resume_run(run_dir: str | Path, *, device: str | None = None, progress: bool = True,
               from_previous: bool = False) -> dict[str, Any]:
    """Continue the run in ``run_dir`` with its saved configuration (optionally on another ``device``), or from its
    previous checkpoint with ``from_previous``."""
    run_dir = Path(run_dir)
    with _held(run_dir):
        if from_previous and launched_rank() == 0:
            run_files.restore_previous(run_dir)
        saved = TrainConfig.from_dict(run_files.read_meta(run_dir)["config"])
        if device is not None:
            saved.device = device
        saved.validate()
        return _train_held(saved, run_dir, resume=True, progress=progress, force=False)


@contextmanager
def _held(out_dir: Path) -> Iterator[None]:
    """One writer per run directory (:func:`hold_directory`); under torchrun, rank 0 writes and holds it."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidValue(f"--out {out_dir} exists and is not a directory")
    with hold_directory(out_dir, "visionmix train") if launched_rank() == 0 else nullcontext():
        yield


def _train_held(cfg: TrainConfig, out_dir: Path, *, resume: bool, progress: bool, force: bool) -> dict[str, Any]:
    """:func:`train` once ``out_dir`` is held."""
    from visionmix.models import model_entry

    model_entry(cfg.model)  # an unknown name fails here, before any data is read
    meta = prepare_out_dir(cfg, out_dir, resume=resume, force=force)
    if meta is not None:
        run_files.remove_unnamed_files(out_dir, temporary=True)  # what a kill mid-write left behind
    if meta is not None and meta.get("finished"):
        verify_run(out_dir, meta)
        return finished_summary(out_dir, meta)
    log_path = out_dir / run_files.LOG_FILE if launched_rank() == 0 else None
    with console_logging(), run_log(log_path, claimed=(out_dir / run_files.CHECKPOINT_FILE).is_file):
        ctx = init_distributed(cfg.device)
        try:
            with _kernel_settings(ctx.device, cfg.deterministic), _signal_flag() as flag:
                summary = Trainer(cfg, out_dir, ctx, meta, progress, flag).run()
            barrier(ctx)  # no rank leaves the group while another still writes (gloo can abort a rank left behind)
            return summary
        finally:
            shutdown(ctx)


@contextmanager
def _kernel_settings(device: torch.device, deterministic: bool) -> Iterator[None]:
    """cuDNN autotuning on CUDA (fixed shapes: let it pick its kernels), or with ``deterministic`` cuDNN's
    deterministic kernels and ``torch.use_deterministic_algorithms`` (warning for an op without one); the process's
    settings again afterwards, for whatever runs next."""
    cudnn = torch.backends.cudnn
    saved = (cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        cudnn.benchmark = device.type == "cuda" and not deterministic
        if deterministic:
            cudnn.deterministic = True
            if device.type == "cuda":  # cuBLAS is deterministic only with a fixed workspace (read at its first use)
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        yield
    finally:
        cudnn.benchmark, cudnn.deterministic = saved[0], saved[1]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


