"""One trainer for every registered model (SPACH's point: one recipe for all architectures, 2108.13002 sec. 3).

AdamW (1711.05101) without weight decay on 1-d parameters (norms, biases) and on ``model.no_weight_decay()``;
per-step linear warmup then cosine decay (1608.03983) to ``min_lr_ratio * lr``; label smoothing (1512.00567);
gradient-norm clipping; the model's drop-path (1603.09382); optional EMA of the weights. fp32 on CPU (bf16
autocast on CUDA when ``amp``).

Exact resume: the batch order of epoch ``e`` and the augmentation of step ``k`` are fixed functions of
``(seed, e, k)`` (see :mod:`visionmix.data.loader`), and a checkpoint holds weights, optimizer, scheduler, EMA,
every rank's RNG state and the epoch's running sums, so a run resumed from a checkpoint taken at any step,
including mid-epoch, continues bit for bit as if it had never stopped (same seed, deterministic CPU kernels).
Checkpoints are written before the first step (step 0: the directory is the run's from the start), at epoch ends,
every ``save_every`` steps and on SIGINT/SIGTERM; the previous one is kept beside the latest. A run of under
``RECOMPUTE_BN_BELOW_STEPS`` steps ends by recomputing its BatchNorm statistics from the final weights.

Time budget (``time_budget_min``): the warmup does not depend on the run's length, so the trainer times it and then
fixes the step count that fills ``BUDGET_FILL`` of the budget at that speed (at most ``epochs``); the cosine decay
spans exactly those steps. The count is saved with the checkpoint, so a resumed run keeps it. If the machine slows
down and the budget runs out first, the run ends there. Training time excludes evaluation and checkpoint writes.
"""

from __future__ import annotations

import copy
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from visionmix.checks import check_choice, check_positive
from visionmix.data import AUGMENTATIONS, DATASETS, BatchLoader, ImageDataset, build_dataset, stable_seed
from visionmix.engine import checkpoint as ckpt
from visionmix.engine.distributed import (
    DistContext,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    gather_objects,
    init_distributed,
    shutdown,
    wrap_model,
)
from visionmix.engine.evaluate import evaluate, recompute_bn_statistics
from visionmix.files import atomic_write, atomic_write_json

DEVICES = ("auto", "cpu", "cuda")
DATA_SET_BY_ENGINE = ("num_classes", "in_chans", "img_size")
BUDGET_FILL = 0.97  # a time-budgeted run is sized to this share of its budget: headroom for speed drift
MAX_LR = 1.0  # AdamW moves every weight by about lr per step: above 1 no run learns anything
RECOMPUTE_BN = ("auto", "on", "off")
RECOMPUTE_BN_BELOW_STEPS = 1000  # "auto": shorter runs end with BN statistics recomputed from the final weights
RECOMPUTE_BN_IMAGES = 10_000  # training images (un-augmented, fixed order) the recomputation passes through


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or gradient); the last good checkpoint is kept."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; a checkpoint of the step reached was saved. ``signum`` says which signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


@dataclass
class TrainConfig:
    """The recipe. ``batch_size`` is the global batch: under torchrun each of N processes takes 1/N of it, so the
    same command follows the same optimisation with or without torchrun."""

    model: str
    data: str = "fashion-mnist"
    data_dir: str | None = None
    epochs: int | float = 3  # a fraction ends the run part-way into the last epoch (a step budget)
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.1
    clip_grad: float | None = 5.0
    drop_path_rate: float | None = None  # None = the model's default
    ema_decay: float | None = None
    seed: int = 0
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    device: str = "auto"
    augment: str = "crop-flip"  # or "flip", "none" (visionmix.data.AUGMENTATIONS)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    min_lr_ratio: float = 0.01
    save_every: int = 0  # also checkpoint every N optimizer steps (0: epoch ends and signals only)
    image_size: int | None = None  # None = the dataset's own size
    amp: bool = True  # bf16 autocast on CUDA; CPU always runs fp32
    eval_batch_size: int = 500
    time_budget_min: float | None = None  # train at most this long; ``epochs`` is then an upper bound
    recompute_bn: str = "auto"  # BN statistics from the final weights at the end: on, off, auto (runs < 1k steps)

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the first bad field."""
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a registered model name, got {self.model!r}")
        check_choice("data", self.data, DATASETS)
        check_choice("augment", self.augment, AUGMENTATIONS)
        check_choice("recompute_bn", self.recompute_bn, RECOMPUTE_BN)
        check_choice("device", self.device.split(":")[0], DEVICES)
        for name in ("batch_size", "eval_batch_size"):
            check_positive(name, getattr(self, name))
        _check_range("epochs", self.epochs, 0.0, math.inf, low_open=True, high_open=True)
        for name in ("max_train_samples", "max_eval_samples", "image_size"):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.save_every < 0:
            raise ValueError(f"seed must be an int and save_every >= 0, got {self.seed!r}, {self.save_every!r}")
        _check_range("lr", self.lr, 0.0, MAX_LR, low_open=True)
        _check_range("weight_decay", self.weight_decay, 0.0, math.inf)
        _check_range("warmup_epochs", self.warmup_epochs, 0.0, math.inf)
        _check_range("label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        _check_range("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        if self.clip_grad is not None:
            _check_range("clip_grad", self.clip_grad, 0.0, math.inf, low_open=True)
        if self.drop_path_rate is not None:
            _check_range("drop_path_rate", self.drop_path_rate, 0.0, 1.0, high_open=True)
        if self.ema_decay is not None:
            _check_range("ema_decay", self.ema_decay, 0.0, 1.0, low_open=True, high_open=True)
        if self.time_budget_min is not None:
            _check_range("time_budget_min", self.time_budget_min, 0.0, math.inf, low_open=True, high_open=True)
            if self.warmup_epochs == 0:
                raise ValueError("time_budget_min needs warmup_epochs > 0: the run's speed is measured during warmup "
                                 "to fix its length")
        clash = sorted(set(self.model_kwargs) & {*DATA_SET_BY_ENGINE, "drop_path_rate"})
        if clash:
            raise ValueError(f"model_kwargs may not set {', '.join(clash)}: classes, channels and size follow the "
                             f"data (use image_size), drop-path has its own option")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        if isinstance(values.get("augment"), bool):  # runs saved before the flip-only mode: True/False
            values["augment"] = "crop-flip" if values["augment"] else "none"
        return cls(**values)


def _check_range(name: str, value: float, low: float, high: float, *, low_open: bool = False,
                 high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high or math.isnan(value):
        bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {bounds}, got {value}")


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR factor of optimizer step ``step``: ``(step + 1) / warmup_steps`` during warmup, then a half cosine from
    1 to ``min_ratio`` over the remaining steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weights of rank >= 2; none on 1-d tensors (biases, norm affine, layer scales) and on
    the names ``model.no_weight_decay()`` returns (a name or a module prefix)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim <= 1 or name in skip or any(name.startswith(f"{s}.") for s in skip)
        (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class ModelEma:
    """Exponential moving average of a model's state (params and float buffers): ``ema += (1 - d) (model - ema)``
    with ``d = min(decay, (1 + t) / (10 + t))`` at update ``t``, so early averages are not dominated by the
    random initialisation."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for ema_v, v in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            if ema_v.is_floating_point():
                ema_v.lerp_(v, 1.0 - d)
            else:
                ema_v.copy_(v)


@contextmanager
def _signal_flag() -> Iterator[dict[str, int]]:
    """Turn the first SIGINT/SIGTERM into a flag checked after each step; a second SIGINT interrupts at once."""
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
    from visionmix.models import model_entry

    cfg.validate()
    model_entry(cfg.model)  # an unknown name fails here, before any data is read
    out_dir = Path(out_dir)
    if from_previous:
        if not resume:
            raise ValueError("from_previous only applies when resuming a run")
        ckpt.restore_previous(out_dir)
    meta = _prepare_out_dir(cfg, out_dir, resume=resume, force=force)
    if meta is not None:
        ckpt.remove_unnamed_files(out_dir, temporary=True)  # what a kill mid-write left behind
    if meta is not None and meta.get("finished"):
        _verify(out_dir, meta)
        return _finished_summary(out_dir, meta)
    ctx = init_distributed(cfg.device)
    try:
        with _signal_flag() as flag:
            summary = _Trainer(cfg, out_dir, ctx, meta, progress, flag).run()
        barrier(ctx)  # no rank leaves the group while another still writes (gloo can abort a rank left behind)
        return summary
    finally:
        shutdown(ctx)


def resume_run(run_dir: str | Path, *, device: str | None = None, progress: bool = True,
               from_previous: bool = False) -> dict[str, Any]:
    """Continue the run in ``run_dir`` with its saved configuration (optionally on another ``device``), or from its
    previous checkpoint with ``from_previous``."""
    if from_previous:
        ckpt.restore_previous(run_dir)
    saved = TrainConfig.from_dict(ckpt.read_meta(run_dir)["config"])
    if device is not None:
        saved.device = device
    return train(saved, run_dir, resume=True, progress=progress)


def _verify(run_dir: Path, meta: dict[str, Any]) -> None:
    """:func:`ckpt.verify_checkpoint`, its error saying whether the previous checkpoint can take over."""
    try:
        ckpt.verify_checkpoint(run_dir, meta)
    except ckpt.CheckpointError as exc:
        raise ckpt.CheckpointError(f"{exc}; {ckpt.previous_hint(run_dir)}") from exc


def _finished_summary(run_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """A finished run's ``summary.json``, rewritten from its checkpoint if it is missing or damaged."""
    path = run_dir / ckpt.SUMMARY_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        summary = _summary(meta)
        atomic_write_json(path, summary)
        return summary


def _prepare_out_dir(cfg: TrainConfig, out_dir: Path, *, resume: bool, force: bool) -> dict[str, Any] | None:
    """Check ``out_dir`` (every rank, before anyone writes); the meta of the run to resume, or ``None``.

    A directory holds a run only if its ``checkpoint.json`` is a visionmix checkpoint; only then are files there
    the run's own (and ``force`` replaces exactly those). Anything else in ``out_dir`` is the user's.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a directory")
    meta = ckpt.run_meta(out_dir) if out_dir.is_dir() else None
    if resume and meta is not None:
        saved, now = asdict(TrainConfig.from_dict(meta["config"])), asdict(cfg)
        diff = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in now if k != "device" and saved[k] != now[k]]
        if diff:
            raise ValueError(f"{out_dir} was trained with another configuration ({'; '.join(diff)}); resume it "
                             f"with its own settings or train into a new --out")
        return meta
    if meta is not None:
        if not force:
            raise ValueError(f"{out_dir} already holds a training run; pass --resume {out_dir} to continue it or "
                             f"--force to replace it")
        return None
    entries = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if entries and not force:
        listing = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ValueError(f"--out {out_dir} is not empty ({listing}); choose a new directory or pass --force to "
                         f"write into it")
    clash = [name for name in entries if ckpt.is_run_file(name)]
    if clash:
        raise ValueError(f"--out {out_dir} holds no visionmix run but has files named like a run's own "
                         f"({', '.join(clash[:3])}{', ...' if len(clash) > 3 else ''}), which --force would "
                         f"overwrite; move them or choose a new directory")
    return None


def _clear_run(out_dir: Path) -> None:
    """Make ``out_dir`` ready for a fresh run: created, and the files of a run replaced with ``--force`` removed
    (only when its ``checkpoint.json`` says it is a run directory; other files stay)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if ckpt.run_meta(out_dir) is None:
        return
    for path in out_dir.iterdir():
        if path.is_file() and ckpt.is_run_file(path.name) and path.name != ckpt.CHECKPOINT_FILE:
            path.unlink()
    (out_dir / ckpt.CHECKPOINT_FILE).unlink()  # last: until then the directory still says whose files these are


class _Trainer:
    """State of one training run; :meth:`run` is the loop."""

    def __init__(self, cfg: TrainConfig, out_dir: Path, ctx: DistContext, meta: dict[str, Any] | None,
                 progress: bool, stop_flag: dict[str, int]) -> None:
        self.cfg, self.out_dir, self.ctx, self.stop_flag = cfg, out_dir, ctx, stop_flag
        self.show = progress and ctx.is_main
        self.train_ds = build_dataset(cfg.data, "train", cfg.data_dir, cfg.max_train_samples, image_size=cfg.image_size)
        test_ds = build_dataset(cfg.data, "test", cfg.data_dir, cfg.max_eval_samples, image_size=cfg.image_size)
        self.test_ds = test_ds.with_stats(self.train_ds.mean, self.train_ds.std)
        device = ctx.device
        self.loader = BatchLoader(self.train_ds, cfg.batch_size, train=True, augment=cfg.augment, seed=cfg.seed,
                                  rank=ctx.rank, world_size=ctx.world_size, device=device)
        self.test_loader = BatchLoader(self.test_ds, cfg.eval_batch_size, train=False, rank=ctx.rank,
                                       world_size=ctx.world_size, device=device)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model_kwargs = _model_kwargs(cfg, self.train_ds)
        self.raw_model = _create_model(cfg.model, self.model_kwargs).to(device)
        self.params = sum(p.numel() for p in self.raw_model.parameters())
        self.ema = ModelEma(self.raw_model, cfg.ema_decay) if cfg.ema_decay else None
        self.optimizer = torch.optim.AdamW(param_groups(self.raw_model, cfg.weight_decay), lr=cfg.lr)
        self.steps_per_epoch = len(self.loader)
        self.total_steps = max(1, round(cfg.epochs * self.steps_per_epoch))  # a time budget lowers it after warmup
        self.warmup_steps = round(cfg.warmup_epochs * self.steps_per_epoch)
        self.budget_s = None if cfg.time_budget_min is None else 60.0 * cfg.time_budget_min
        if self.budget_s is not None and self.warmup_steps == 0:
            raise ValueError(f"a time budget needs a warmup of at least one step (warmup_epochs="
                             f"{cfg.warmup_epochs} x {self.steps_per_epoch} steps per epoch rounds to 0)")
        self.length_fixed = self.budget_s is None  # a budgeted run fixes its length after warmup
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: warmup_cosine(
            step, warmup_steps=self.warmup_steps, total_steps=self.total_steps, min_ratio=cfg.min_lr_ratio))
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.epoch, self.step, self.global_step = 0, 0, 0
        self.running = {"loss_sum": 0.0, "correct": 0.0, "seen": 0.0}
        self.history: list[dict[str, Any]] = []
        self.train_time = 0.0
        if meta is None:
            torch.manual_seed(stable_seed(cfg.seed, "train", ctx.rank))  # drop-path differs across ranks
            if ctx.is_main:
                _clear_run(out_dir)
            barrier(ctx)
            self._save()  # step 0: the directory is a run's from the start, and a write that fails, fails now
        else:
            self._restore(meta)
        self.model = wrap_model(self.raw_model, ctx)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.amp and device.type == "cuda"
                         else nullcontext())

    # ------------------------------------------------------------------------------------------ checkpoints
    def _meta(self, finished: bool = False) -> dict[str, Any]:
        ds = self.train_ds
        return {
            "model": self.cfg.model, "model_kwargs": self.model_kwargs, "params": self.params,
            "config": asdict(self.cfg),
            "data": {"name": ds.name, "num_classes": ds.num_classes, "classes": list(ds.classes),
                     "in_chans": ds.channels, "image_size": list(ds.image_size), "mean": list(ds.mean),
                     "std": list(ds.std), "train_samples": len(ds), "eval_samples": len(self.test_ds)},
            "epoch": self.epoch, "step_in_epoch": self.step, "global_step": self.global_step,
            "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
            "length_fixed": self.length_fixed, "running": dict(self.running), "history": self.history,
            "train_time_s": self.train_time, "world_size": self.ctx.world_size, "finished": finished,
            "versions": {"torch": torch.__version__},
        }

    def _save(self, finished: bool = False) -> None:
        cuda = self.ctx.device.type == "cuda"
        state = {
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": gather_objects(torch.get_rng_state(), self.ctx),
            "cuda_rng": gather_objects(torch.cuda.get_rng_state(self.ctx.device), self.ctx) if cuda else None,
        }
        if self.ctx.is_main:
            ckpt.save_checkpoint(self.out_dir, self._meta(finished), self.raw_model, state,
                                 self.ema.module if self.ema else None)

    def _restore(self, meta: dict[str, Any]) -> None:
        try:
            ckpt.load_weights(self.raw_model, self.out_dir / meta["files"]["weights"])
            if self.ema is not None:
                ckpt.load_weights(self.ema.module, self.out_dir / meta["files"]["ema"])
            state = ckpt.load_train_state(self.out_dir, meta)
        except ckpt.CheckpointError as exc:
            raise ckpt.CheckpointError(f"{exc}; {ckpt.previous_hint(self.out_dir)}") from exc
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step, self.global_step = meta["epoch"], meta["step_in_epoch"], meta["global_step"]
        self.running, self.history, self.train_time = dict(meta["running"]), meta["history"], meta["train_time_s"]
        if meta.get("length_fixed"):  # a time-budgeted run keeps the length it fixed (older runs: from the config)
            self.total_steps, self.length_fixed = meta["total_steps"], True
        if meta["steps_per_epoch"] != self.steps_per_epoch:
            raise ValueError(f"{self.out_dir}: the data give {self.steps_per_epoch} steps per epoch, the checkpoint "
                             f"was taken with {meta['steps_per_epoch']}; did the dataset change?")
        if meta["world_size"] == self.ctx.world_size:
            torch.set_rng_state(state["rng"][self.ctx.rank])
            if state["cuda_rng"] is not None and self.ctx.device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda_rng"][self.ctx.rank], self.ctx.device)
        else:
            torch.manual_seed(stable_seed(self.cfg.seed, "resume", self.global_step, self.ctx.rank))
            self._log(f"note: checkpoint from {meta['world_size']} process(es) resumed on {self.ctx.world_size}: "
                      f"drop-path randomness differs from an uninterrupted run")
        if self.ctx.is_main:
            self._reconcile_metrics()

    def _reconcile_metrics(self) -> None:
        """metrics.jsonl := its lines up to the checkpoint's epoch + any epoch the checkpoint has and it lacks."""
        path = self.out_dir / ckpt.METRICS_FILE
        lines = []
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # not ours: metrics.jsonl is only ever replaced whole
                if entry.get("epoch", 0) <= self.epoch:
                    lines.append(entry)
        logged = {e["epoch"] for e in lines if "event" not in e}
        lines += [h for h in self.history if h["epoch"] not in logged]
        atomic_write(path, "".join(json.dumps(e) + "\n" for e in lines))

    def _append_metrics(self, entry: dict[str, Any]) -> None:
        """Add a line to metrics.jsonl, rewriting the (small) file atomically like every other write."""
        if self.ctx.is_main:
            path = self.out_dir / ckpt.METRICS_FILE
            atomic_write(path, (path.read_text() if path.is_file() else "") + json.dumps(entry) + "\n")

    def _log(self, message: str) -> None:
        if self.show:
            tqdm.write(message, file=sys.stderr)

    # --------------------------------------------------------------------------------------------- the loop
    def run(self) -> dict[str, Any]:
        while self.global_step < self.total_steps:
            self._train_epoch()
            self._end_epoch()
        summary = _summary(self._meta(finished=True))
        if self.ctx.is_main:
            atomic_write_json(self.out_dir / ckpt.SUMMARY_FILE, summary)
        return summary

    def _train_epoch(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        self.model.train()
        epoch_steps = self._epoch_steps()
        bar = tqdm(total=epoch_steps, initial=self.step, desc=f"epoch {self.epoch + 1}/{self.num_epochs}",
                   unit="step", disable=not (self.show and sys.stderr.isatty()), dynamic_ncols=True, leave=True)
        params = [p for p in self.raw_model.parameters() if p.requires_grad]
        with bar:
            tick = time.perf_counter()  # training time counts batch preparation too, not checkpoint writes
            # the last epoch of a fractional ``epochs`` (or of a time budget) stops part-way
            for images, labels in islice(self.loader.epoch(self.epoch, self.step), epoch_steps - self.step):
                with self.autocast:
                    logits = self.model(images)
                loss = self.criterion(logits.float(), labels)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = (nn.utils.clip_grad_norm_(params, cfg.clip_grad) if cfg.clip_grad is not None
                             else nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
                spent = self.budget_s is not None and self.train_time + time.perf_counter() - tick >= self.budget_s
                counts = [float(len(labels)), float(bool(self.stop_flag)), float(spent)]  # flags summed over ranks
                stats = torch.cat([torch.stack([loss.detach().float() * len(labels),
                                                (logits.argmax(1) == labels).sum().float()]),
                                   torch.tensor(counts, device=labels.device)])
                loss_sum, correct, seen, stop, spent = all_reduce_sum(stats, ctx).tolist()
                if not (math.isfinite(loss_sum) and math.isfinite(float(grad_norm))):
                    loss_value, norm = loss_sum / seen, float(grad_norm)
                    self._fail(f"non-finite training loss ({loss_value}) / gradient norm ({norm}) at epoch "
                               f"{self.epoch + 1} step {self.step + 1}",
                               {"step": self.step + 1, "loss": repr(loss_value), "grad_norm": repr(norm)})
                self.optimizer.step()
                self.global_step += 1
                self.step += 1
                if self.ema is not None:
                    self.ema.update(self.raw_model, self.global_step)
                now = time.perf_counter()
                self.train_time, tick = self.train_time + now - tick, now
                if not self.length_fixed and self.global_step >= self.warmup_steps:
                    self._fix_length()  # before the first step whose learning rate depends on the length
                if spent:
                    self._end_at_budget()  # this was the last step: the learning rate stays where it was
                else:
                    self.scheduler.step()
                bar.total = self._epoch_steps()
                run = self.running
                run["loss_sum"] += loss_sum
                run["correct"] += correct
                run["seen"] += seen
                bar.set_postfix(loss=f"{run['loss_sum'] / run['seen']:.3f}",
                                acc=f"{100 * run['correct'] / run['seen']:.1f}",
                                img_s=f"{self.global_step * cfg.batch_size / self.train_time:.0f}", refresh=False)
                bar.update(1)
                if stop:
                    self._interrupt()
                if self.step >= self._epoch_steps():
                    break  # the epoch's end, possibly moved earlier by a time budget
                if cfg.save_every and self.global_step % cfg.save_every == 0:
                    self._save()
                    tick = time.perf_counter()

    @property
    def num_epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)  # the last one may be partial

    def _epoch_steps(self) -> int:
        """Optimizer steps of the current epoch: a full epoch, or what is left of the run's length."""
        return min(self.steps_per_epoch, self.total_steps - self.epoch * self.steps_per_epoch)

    def _fix_length(self) -> None:
        """End of warmup under a time budget: fix the run at the steps that fill BUDGET_FILL of it at the speed of
        the warmup (mean over ranks), never more than ``epochs``."""
        elapsed = float(all_reduce_sum(torch.tensor([self.train_time], device=self.ctx.device), self.ctx))
        elapsed /= self.ctx.world_size
        left = max(0.0, BUDGET_FILL * self.budget_s - elapsed)
        self.total_steps = min(self.total_steps, self.global_step + math.floor(left * self.global_step / elapsed))
        self.length_fixed = True
        self._log(f"time budget {self.cfg.time_budget_min:g} min: {self.global_step} warmup steps took "
                  f"{elapsed:.1f} s, so the run is fixed at {self.total_steps} steps "
                  f"({self.total_steps / self.steps_per_epoch:.2f} epochs)")

    def _end_at_budget(self) -> None:
        """The budget ran out before the fixed length (the machine slowed down): the run ends at this step."""
        self._log(f"time budget {self.cfg.time_budget_min:g} min spent at step {self.global_step} of "
                  f"{self.total_steps}: the run ends here")
        self.total_steps, self.length_fixed = self.global_step, True

    def _end_epoch(self) -> None:
        cfg, run = self.cfg, self.running
        if self.global_step >= self.total_steps and self._recomputes_bn():
            self._recompute_bn()
        broadcast_buffers(self.raw_model, self.ctx)
        metrics = evaluate(self.ema.module if self.ema else self.raw_model, self.test_loader, ctx=self.ctx)
        if not math.isfinite(metrics["loss"]):  # the last step's update made the weights diverge
            self._fail(f"non-finite test loss ({metrics['loss']}) after epoch {self.epoch + 1}",
                       {"eval_loss": repr(metrics["loss"])})
        epoch_steps = self.step
        entry = {
            "epoch": self.epoch + 1, "train_loss": run["loss_sum"] / run["seen"],
            "train_acc": 100.0 * run["correct"] / run["seen"], "eval_loss": metrics["loss"],
            "eval_top1": metrics["top1"], "eval_top5": metrics["top5"], "lr": self.optimizer.param_groups[0]["lr"],
            "time_s": self.train_time, "global_step": self.global_step,
            "images_per_s": self.global_step * cfg.batch_size / max(self.train_time, 1e-9),
        }
        self.history.append(entry)
        self.epoch += 1
        self.step = 0
        self.running = {"loss_sum": 0.0, "correct": 0.0, "seen": 0.0}
        finished = self.global_step >= self.total_steps
        self._save(finished=finished)
        self._append_metrics(entry)
        self._log(f"epoch {entry['epoch']}/{self.num_epochs} ({epoch_steps} steps): train loss "
                  f"{entry['train_loss']:.4f} acc {entry['train_acc']:.2f}% | test loss {entry['eval_loss']:.4f} "
                  f"top-1 {entry['eval_top1']:.2f}% top-5 {entry['eval_top5']:.2f}% | "
                  f"{entry['images_per_s']:.0f} img/s")
        stop = all_reduce_sum(torch.tensor([float(bool(self.stop_flag))], device=self.ctx.device), self.ctx)
        if not finished and float(stop) > 0:
            self._interrupt(saved=True)

    def _recomputes_bn(self) -> bool:
        mode = self.cfg.recompute_bn
        return mode == "on" or (mode == "auto" and self.total_steps < RECOMPUTE_BN_BELOW_STEPS)

    def _recompute_bn(self) -> None:
        """The run's last step is done: BN statistics of the model (and of its EMA) from the final weights, computed
        on rank 0 over RECOMPUTE_BN_IMAGES un-augmented training images (then broadcast with the other buffers)."""
        if self.ctx.is_main:
            loader = BatchLoader(self.train_ds, self.cfg.eval_batch_size, train=False, device=self.ctx.device)
            batches = math.ceil(min(len(self.train_ds), RECOMPUTE_BN_IMAGES) / self.cfg.eval_batch_size)
            models = [self.raw_model, *([self.ema.module] if self.ema else [])]
            counts = [recompute_bn_statistics(m, (x for x, _ in islice(loader, batches))) for m in models]
            if counts[0]:
                self._log(f"recomputed the statistics of {counts[0]} BatchNorm layers from the final weights on "
                          f"{min(len(self.train_ds), batches * self.cfg.eval_batch_size)} training images")
        if self.ema is not None:
            broadcast_buffers(self.ema.module, self.ctx)

    def _interrupt(self, saved: bool = False) -> None:
        if not saved:
            self._save()
        signum = self.stop_flag.get("signum", signal.SIGTERM)
        name = signal.Signals(signum).name
        raise TrainingInterrupted(
            f"{name}: stopped at epoch {self.epoch + 1} step {self.step}/{self.steps_per_epoch} (global step "
            f"{self.global_step}), checkpoint saved; continue with: visionmix train --resume {self.out_dir}", signum)

    def _fail(self, problem: str, event: dict[str, Any]) -> None:
        """Stop on a non-finite number: log ``event`` and keep the last good checkpoint (a run has one from step 0)."""
        self._append_metrics({"event": "non-finite", "epoch": self.epoch + 1, **event})
        saved = ckpt.read_meta(self.out_dir)
        raise TrainingError(f"{problem}; the last good checkpoint (epoch {saved['epoch']}, global step "
                            f"{saved['global_step']}) is kept in {self.out_dir}; try a lower --lr, --clip-grad or "
                            f"--warmup-epochs")


def _model_kwargs(cfg: TrainConfig, ds: ImageDataset) -> dict[str, Any]:
    h, w = ds.image_size
    kwargs: dict[str, Any] = {"num_classes": ds.num_classes, "in_chans": ds.channels,
                              "img_size": h if h == w else [h, w]}
    if cfg.drop_path_rate is not None:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    return {**kwargs, **cfg.model_kwargs}


def _create_model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    from visionmix.models import create_model

    try:
        return create_model(name, **kwargs)
    except TypeError as exc:
        raise ValueError(f"model {name!r} rejected its arguments {kwargs}: {exc}") from exc


def _summary(meta: dict[str, Any]) -> dict[str, Any]:
    history = meta["history"]
    last = history[-1]
    cfg = meta["config"]
    return {
        "model": meta["model"], "data": cfg["data"], "epochs": cfg["epochs"], "params": meta["params"],
        "epochs_trained": meta["global_step"] / meta["steps_per_epoch"],
        "top1": last["eval_top1"], "top5": last["eval_top5"], "eval_loss": last["eval_loss"],
        "best_top1": max(h["eval_top1"] for h in history), "train_time_s": meta["train_time_s"],
        "train_images_per_s": meta["global_step"] * cfg["batch_size"] / max(meta["train_time_s"], 1e-9),
        "world_size": meta["world_size"], "history": history, "config": cfg,
        "ema": cfg["ema_decay"] is not None, "data_info": meta["data"],
    }
