"""The training loop of one run (:class:`Trainer`): model, optimizer, schedule, EMA and data of a run directory,
its checkpoints and resume, epochs, evaluation, the time budget and the BatchNorm recomputation at the end.
:func:`visionmix.engine.train.train` holds the directory and builds one; see its module for the recipe and the
exact-resume guarantees.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from visionmix.data import stable_seed
from visionmix.engine import run_files
from visionmix.engine.config import (
    BUDGET_FILL,
    RECOMPUTE_BN_BATCH,
    RECOMPUTE_BN_BELOW_STEPS,
    RECOMPUTE_BN_IMAGES,
    SKIPPED_STEPS_LIMIT,
    TrainConfig,
    amp_mode,
)
from visionmix.engine.distributed import (
    DistContext,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    gather_objects,
    sync_batchnorm,
    wrap_model,
)
from visionmix.engine.evaluate import evaluate, recompute_bn_statistics
from visionmix.engine.optim import ModelEma, freeze_backbone, frozen_norms_eval, param_groups, warmup_cosine
from visionmix.engine.pipeline import DataInfo, build_pipeline
from visionmix.engine.run_setup import clear_run, run_summary
from visionmix.errors import CheckpointError, InvalidValue, TrainingError, TrainingInterrupted
from visionmix.files import atomic_write, atomic_write_json
from visionmix.runlog import logger

_LOG = logger("train")
# where a run's time goes (checkpoint.json's time_s, summary.json's time): loading the data, building the model and
# optimizer, waiting for batches, the rest of the training steps, BN recomputation, evaluation, checkpoint writes
TIME_PARTS = ("data_load_s", "setup_s", "batches_s", "steps_s", "bn_s", "eval_s", "checkpoint_s")
STATS_EVERY = 50  # optimizer steps between reads of the step statistics from the device (progress bar)


class Trainer:
    """State of one training run; :meth:`run` is the loop."""

    def __init__(self, cfg: TrainConfig, out_dir: Path, ctx: DistContext, meta: dict[str, Any] | None,
                 progress: bool, stop_flag: dict[str, int]) -> None:
        self.cfg, self.out_dir, self.ctx, self.stop_flag = cfg, out_dir, ctx, stop_flag
        self.show = progress and ctx.is_main
        device = ctx.device
        started = time.perf_counter()
        self.times = dict.fromkeys(TIME_PARTS, 0.0)  # where the run's time went, over all its attempts
        self.data = build_pipeline(cfg, ctx)
        data_load = time.perf_counter() - started
        self.loader, self.criterion = self.data.train, self.data.criterion
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model_kwargs = _model_kwargs(cfg, self.data.info)
        self.raw_model = _create_model(cfg.model, self.model_kwargs)
        # a model with an auxiliary head (UniFormer-light's class-token classifier) says how its heads' losses
        # combine; it returns every head's logits for forward(x, both_heads=True)
        self.combine_losses = getattr(self.raw_model, "combine_head_losses", None)
        self.init = {"source": cfg.init, "dropped": run_files.init_from(self.raw_model, cfg.init)} if cfg.init else None
        if self.init and self.init["dropped"] and meta is None:
            self._log(f"--init {cfg.init}: loaded every key but the classifier's ({', '.join(self.init['dropped'])}: "
                      f"another class count), which starts freshly initialised")
        if cfg.freeze == "backbone":
            freeze_backbone(self.raw_model)
        if cfg.sync_bn:
            self.raw_model = sync_batchnorm(self.raw_model, ctx)
        self.raw_model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
        self.params = sum(p.numel() for p in self.raw_model.parameters())
        self.ema = ModelEma(self.raw_model, cfg.ema_decay) if cfg.ema_decay else None
        groups = param_groups(self.raw_model, cfg.weight_decay, layer_decay=cfg.layer_decay)
        for group in groups:
            group["lr"] = cfg.peak_lr * group["lr_scale"]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.peak_lr)
        amp = amp_mode(cfg.amp, device.type)
        self.scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
        self.steps_per_epoch = len(self.loader)
        self.total_steps = max(1, round(cfg.epochs * self.steps_per_epoch))  # a time budget lowers it after warmup
        self.warmup_steps = round(cfg.warmup_epochs * self.steps_per_epoch)
        self.budget_s = None if cfg.time_budget_min is None else 60.0 * cfg.time_budget_min
        if self.budget_s is not None and self.warmup_steps == 0:
            raise InvalidValue(f"a time budget needs a warmup of at least one step (warmup_epochs="
                               f"{cfg.warmup_epochs} x {self.steps_per_epoch} steps per epoch rounds to 0)")
        self.length_fixed = self.budget_s is None  # a budgeted run fixes its length after warmup
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: warmup_cosine(
            step, warmup_steps=self.warmup_steps, total_steps=self.total_steps, min_ratio=cfg.min_lr_ratio))
        self.epoch, self.step, self.global_step = 0, 0, 0
        self.running = {"loss_sum": 0.0, "correct": 0.0, "seen": 0.0}
        # device-side sums of the steps not yet read (_record): loss_sum, correct, seen, non-finite steps, and the
        # first non-finite one's step, loss and gradient norm
        self._pending = torch.zeros(7, dtype=torch.float64, device=device)
        self.skipped_steps, self.skipped_in_row = 0, 0  # fp16 steps the gradient scaler skipped
        self.bar: tqdm | None = None  # the epoch's progress bar
        self.speed_from: tuple[int, float] | None = None  # (global step, train time) after this process's 1st step
        self.history: list[dict[str, Any]] = []
        self.train_time = 0.0
        saving = time.perf_counter()
        if meta is None:
            torch.manual_seed(stable_seed(cfg.seed, "train", ctx.rank))  # drop-path differs across ranks
            if ctx.is_main:
                clear_run(out_dir)
            barrier(ctx)
            self._save()  # step 0: the directory is a run's from the start, and a write that fails, fails now
            saving = time.perf_counter() - saving
        else:
            self._restore(meta)
            saving = 0.0
        self.model = wrap_model(self.raw_model, ctx)
        if cfg.compile:
            self.model = torch.compile(self.model)
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
        self.times["data_load_s"] += data_load
        self.times["setup_s"] += time.perf_counter() - started - data_load - saving

    # ------------------------------------------------------------------------------------------ checkpoints
    def _meta(self, finished: bool = False) -> dict[str, Any]:
        return {
            "model": self.cfg.model, "model_kwargs": self.model_kwargs, "params": self.params,
            "config": asdict(self.cfg), "data": self.data.info.as_meta(), "init": self.init,
            "epoch": self.epoch, "step_in_epoch": self.step, "global_step": self.global_step,
            "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
            "length_fixed": self.length_fixed, "running": dict(self.running), "history": self.history,
            "skipped_steps": self.skipped_steps, "skipped_in_row": self.skipped_in_row,
            "train_time_s": self.train_time, "time_s": {k: round(v, 3) for k, v in self.times.items()},
            "world_size": self.ctx.world_size, "finished": finished,
            "versions": {"torch": torch.__version__},
        }

    def _save(self, finished: bool = False) -> None:
        started = time.perf_counter()
        self._read_stats()  # the running sums it saves, and no checkpoint of a diverged step
        self._write_checkpoint(finished)
        self.times["checkpoint_s"] += time.perf_counter() - started

    def _write_checkpoint(self, finished: bool) -> None:
        cuda = self.ctx.device.type == "cuda"
        state = {
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": gather_objects(torch.get_rng_state(), self.ctx),
            "cuda_rng": gather_objects(torch.cuda.get_rng_state(self.ctx.device), self.ctx) if cuda else None,
        }
        if self.ctx.is_main:
            run_files.save_checkpoint(self.out_dir, self._meta(finished), self.raw_model, state,
                                 self.ema.module if self.ema else None)

    def _restore(self, meta: dict[str, Any]) -> None:
        try:
            run_files.load_weights(self.raw_model, self.out_dir / meta["files"]["weights"])
            if self.ema is not None:
                run_files.load_weights(self.ema.module, self.out_dir / meta["files"]["ema"])
            state = run_files.load_train_state(self.out_dir, meta)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}; {run_files.previous_hint(self.out_dir)}") from exc
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.global_step = meta["epoch"], meta["step_in_epoch"], meta["global_step"]
        self.running, self.history, self.train_time = dict(meta["running"]), meta["history"], meta["train_time_s"]
        self.times.update(meta.get("time_s", {}))  # a run saved before time accounting starts its parts at 0
        self.skipped_steps, self.skipped_in_row = meta.get("skipped_steps", 0), meta.get("skipped_in_row", 0)
        if meta.get("length_fixed"):  # a time-budgeted run keeps the length it fixed (older runs: from the config)
            self.total_steps, self.length_fixed = meta["total_steps"], True
        if meta["steps_per_epoch"] != self.steps_per_epoch:
            raise InvalidValue(f"{self.out_dir}: the data give {self.steps_per_epoch} steps per epoch, the checkpoint "
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
        path = self.out_dir / run_files.METRICS_FILE
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
            path = self.out_dir / run_files.METRICS_FILE
            atomic_write(path, (path.read_text() if path.is_file() else "") + json.dumps(entry) + "\n")

    def _log(self, message: str) -> None:
        """Say ``message`` on the console and in the run's log (:mod:`visionmix.runlog`), from the main process."""
        if self.ctx.is_main:
            _LOG.info(message)

    # --------------------------------------------------------------------------------------------- the loop
    def run(self) -> dict[str, Any]:
        while self.global_step < self.total_steps:
            self._train_epoch()
            self._end_epoch()
        summary = run_summary(self._meta(finished=True))
        if self.ctx.is_main:
            atomic_write_json(self.out_dir / run_files.SUMMARY_FILE, summary)
        return summary

    def _train_epoch(self) -> None:
        cfg = self.cfg
        self.model.train()
        if cfg.freeze == "backbone":
            frozen_norms_eval(self.raw_model)
        epoch_steps = self._epoch_steps()
        self.bar = tqdm(total=epoch_steps, initial=self.step, desc=f"epoch {self.epoch + 1}/{self.num_epochs}",
                        unit="step", disable=not (self.show and sys.stderr.isatty()), dynamic_ncols=True, leave=True)
        params = [p for p in self.raw_model.parameters() if p.requires_grad]
        with self.bar:
            tick = fetch = time.perf_counter()  # training time counts batch preparation too, not checkpoint writes
            # the last epoch of a fractional ``epochs`` (or of a time budget) stops part-way
            for images, target in islice(self.loader.epoch(self.epoch, self.step), epoch_steps - self.step):
                self.times["batches_s"] += time.perf_counter() - fetch  # waiting for this batch
                loss, correct, seen = self._accumulate(images, target)
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)
                grad_norm = (nn.utils.clip_grad_norm_(params, cfg.clip_grad) if cfg.clip_grad is not None
                             else nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
                self._record(loss, correct, seen, grad_norm)
                spent = self.budget_s is not None and self.train_time + time.perf_counter() - tick >= self.budget_s
                stop, spent = self._sum_over_ranks([float(bool(self.stop_flag)), float(spent)])
                applied = self._optimizer_step(grad_norm)
                self.global_step += 1
                self.step += 1
                if applied and self.ema is not None:
                    self.ema.update(self.raw_model, self.global_step)
                warmup_end = not self.length_fixed and self.global_step >= self.warmup_steps
                if self.speed_from is None or warmup_end:
                    self._wait_for_device()  # the times the run's length is fixed from are the device's
                now = time.perf_counter()
                self.train_time, tick = self.train_time + now - tick, now
                self.times["steps_s"] = self.train_time - self.times["batches_s"]
                if self.speed_from is None:  # this process's first step: compilation, autotuning, allocations
                    self.speed_from = (self.global_step, self.train_time)
                if warmup_end:
                    self._fix_length()  # before the first step whose learning rate depends on the length
                if spent:
                    self._end_at_budget()  # this was the last step: the learning rate stays where it was
                elif applied:
                    self.scheduler.step()
                self.bar.total = self._epoch_steps()
                if self.global_step % STATS_EVERY == 0:
                    self._read_stats()
                self.bar.update(1)
                fetch = time.perf_counter()
                if stop:
                    self._interrupt()
                if self.step >= self._epoch_steps():
                    break  # the epoch's end, possibly moved earlier by a time budget
                if cfg.save_every and self.global_step % cfg.save_every == 0:
                    self._save()
                    tick = fetch = time.perf_counter()

    def _record(self, loss: torch.Tensor, correct: torch.Tensor, seen: float, grad_norm: torch.Tensor) -> None:
        """Add a step's loss, correct count and size to the device-side sums (a step with a non-finite loss or
        gradient norm is left out and counted, the first one's step, loss and norm kept), read by
        :meth:`_read_stats`: nothing here waits for the device."""
        acc = self._pending
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        first = ~finite & (acc[3] == 0)
        stats = torch.stack([loss * seen, correct, torch.full_like(loss, seen)]).double()
        acc[:3] += torch.where(finite, stats, 0.0)
        acc[3] += (~finite).double()
        info = torch.stack([torch.full_like(loss, self.step + 1), loss.float(), grad_norm.float()]).double()
        acc[4:] = torch.where(first, info, acc[4:])

    def _read_stats(self) -> None:
        """Move the device-side step sums (:meth:`_record`, summed over ranks) into the running sums: every
        STATS_EVERY steps, before a checkpoint and at the end of an epoch, one read from the device each time.
        Without the gradient scaler a non-finite step stops the run here (the checkpoint on disk predates it)."""
        acc = self._pending
        values = torch.cat([all_reduce_sum(acc[:4].clone(), self.ctx), acc[4:]]).tolist()
        acc.zero_()
        run = self.running
        for key, value in zip(("loss_sum", "correct", "seen"), values[:3], strict=True):
            run[key] += value
        bad, (step, loss_value, norm) = values[3], values[4:]
        if bad and self.scaler is None:
            self._fail(f"non-finite training loss ({loss_value}) / gradient norm ({norm}) at epoch "
                       f"{self.epoch + 1} step {int(step)}",
                       {"step": int(step), "loss": repr(loss_value), "grad_norm": repr(norm)})
        if run["seen"] and self.bar is not None:
            self.bar.set_postfix(loss=f"{run['loss_sum'] / run['seen']:.3f}",
                                 acc=f"{100 * run['correct'] / run['seen']:.1f}",
                                 img_s=f"{self.global_step * self.cfg.batch_size / self.train_time:.0f}",
                                 refresh=False)

    def _optimizer_step(self, grad_norm: torch.Tensor) -> bool:
        """Step the optimizer; under fp16 only if the gradients are finite (the gradient scaler's rule; the one
        read from the device per step), counting the skipped steps: SKIPPED_STEPS_LIMIT in a row stop the run.
        Returns whether the step was applied (the schedule and the EMA advance only then)."""
        if self.scaler is None:
            self.optimizer.step()
            return True
        applied = bool(torch.isfinite(grad_norm))  # the gradients are unscaled: the same test as the scaler's
        if applied:
            self.optimizer.step()
            self.skipped_in_row = 0
        else:
            self.skipped_steps += 1
            self.skipped_in_row += 1
        self.scaler.update()  # halves the loss scale after a skipped step, grows it after a run of good ones
        if self.skipped_in_row >= SKIPPED_STEPS_LIMIT:
            self._fail(f"fp16: the gradient scaler skipped {self.skipped_in_row} steps in a row (non-finite "
                       f"gradients down to a loss scale of {self.scaler.get_scale():g}) at epoch {self.epoch + 1} "
                       f"step {self.step + 1}; try --amp bf16",
                       {"step": self.step + 1, "skipped_in_row": self.skipped_in_row})
        return applied

    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        """``values`` summed over the ranks (a collective and a read under torchrun; as they are otherwise)."""
        if not self.ctx.enabled:
            return values
        return all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=self.ctx.device), self.ctx).tolist()

    def _accumulate(self, images: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Forward and backward of one optimizer step's batch in ``accum_steps`` micro-batches, each loss weighted
        by its share of the batch, so the summed gradient is the whole batch's mean (exactly, for a model without
        batch statistics). Returns the mean loss, the correct count and the batch size of this rank."""
        if self.cfg.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        self.optimizer.zero_grad(set_to_none=True)
        n = len(target)
        chunks = list(zip(images.tensor_split(self.cfg.accum_steps), target.tensor_split(self.cfg.accum_steps),
                          strict=True))
        loss_total = torch.zeros((), device=images.device)
        correct = torch.zeros((), device=images.device)
        for index, (x, y) in enumerate(chunks):
            if not len(y):
                continue
            if self.cfg.compile:  # uneven micro-batches, short batches: one graph for every batch size
                torch._dynamo.maybe_mark_dynamic(x, 0)
            last = index == len(chunks) - 1
            sync = nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                with self.autocast:
                    outputs = self.model(x, both_heads=True) if self.combine_losses else self.model(x)
                if self.combine_losses:
                    logits = outputs[0]
                    loss = self.combine_losses(self.criterion, *(o.float() for o in outputs), y) * (len(y) / n)
                else:
                    logits = outputs
                    loss = self.criterion(logits.float(), y) * (len(y) / n)
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            loss_total += loss.detach()
            labels = y.argmax(1) if y.dim() == 2 else y  # soft targets (mixup): their largest share
            correct += (logits.detach().argmax(1) == labels).sum()
        return loss_total, correct.float(), float(n)

    @property
    def num_epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)  # the last one may be partial

    def _epoch_steps(self) -> int:
        """Optimizer steps of the current epoch: a full epoch, or what is left of the run's length."""
        return min(self.steps_per_epoch, self.total_steps - self.epoch * self.steps_per_epoch)

    def _fix_length(self) -> None:
        """End of warmup under a time budget: fix the run at the steps that fill BUDGET_FILL of it at the speed of
        the warmup after this process's first step (which compiles, autotunes cuDNN and allocates: its time counts
        against the budget, not in the speed; mean over ranks), never more than ``epochs``."""
        first_step, first_time = self.speed_from
        steps, timed = self.global_step - first_step, self.train_time - first_time
        if steps == 0:  # resumed at the warmup's last step: the whole warmup's speed
            steps, timed = self.global_step, self.train_time
        elapsed, timed = (v / self.ctx.world_size for v in self._sum_over_ranks([self.train_time, timed]))
        left = max(0.0, BUDGET_FILL * self.budget_s - elapsed)
        self.total_steps = min(self.total_steps, self.global_step + math.floor(left * steps / max(timed, 1e-9)))
        self.length_fixed = True
        self._log(f"time budget {self.cfg.time_budget_min:g} min: {self.global_step} warmup steps took "
                  f"{elapsed:.1f} s ({timed / steps:.3g} s per step after the first), so the run is fixed at "
                  f"{self.total_steps} steps ({self.total_steps / self.steps_per_epoch:.2f} epochs)")

    def _wait_for_device(self) -> None:
        """Let the device finish its queue (CUDA runs ahead of the host): before reading the clock for timing."""
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)

    def _end_at_budget(self) -> None:
        """The budget ran out before the fixed length (the machine slowed down): the run ends at this step."""
        self._log(f"time budget {self.cfg.time_budget_min:g} min spent at step {self.global_step} of "
                  f"{self.total_steps}: the run ends here")
        self.total_steps, self.length_fixed = self.global_step, True

    def _end_epoch(self) -> None:
        self._read_stats()
        cfg, run = self.cfg, self.running
        if self.global_step >= self.total_steps and self._recomputes_bn():
            started = time.perf_counter()
            self._recompute_bn()
            self.times["bn_s"] += time.perf_counter() - started
        started = time.perf_counter()
        broadcast_buffers(self.raw_model, self.ctx)
        metrics = evaluate(self.ema.module if self.ema else self.raw_model, self.data.test, ctx=self.ctx)
        self.times["eval_s"] += time.perf_counter() - started
        if not math.isfinite(metrics["loss"]):  # the last step's update made the weights diverge
            self._fail(f"non-finite test loss ({metrics['loss']}) after epoch {self.epoch + 1}",
                       {"eval_loss": repr(metrics["loss"])})
        epoch_steps = self.step
        entry = {
            "epoch": self.epoch + 1, "train_loss": run["loss_sum"] / max(run["seen"], 1),
            "train_acc": 100.0 * run["correct"] / max(run["seen"], 1), "eval_loss": metrics["loss"],
            "skipped_steps": self.skipped_steps,
            "eval_top1": metrics["top1"], "eval_top5": metrics["top5"],
            "lr": max(g["lr"] for g in self.optimizer.param_groups),  # the classifier's under layer decay
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
        if self.skipped_steps:
            self._log(f"fp16: the gradient scaler has skipped {self.skipped_steps} steps so far (non-finite "
                      f"gradients)")
        stop = self._sum_over_ranks([float(bool(self.stop_flag))])[0]
        if not finished and stop > 0:
            self._interrupt(saved=True)

    def _recomputes_bn(self) -> bool:
        mode = self.cfg.recompute_bn
        return mode == "on" or (mode == "auto" and self.total_steps < RECOMPUTE_BN_BELOW_STEPS)

    def _recompute_bn(self) -> None:
        """The run's last step is done: BN statistics of the model (and of its EMA) from the final weights, computed
        on rank 0 over RECOMPUTE_BN_IMAGES un-augmented training images (then broadcast with the other buffers)."""
        if self.ctx.is_main:
            batches = math.ceil(min(self.data.info.train_samples, RECOMPUTE_BN_IMAGES) / RECOMPUTE_BN_BATCH)
            models = [self.raw_model, *([self.ema.module] if self.ema else [])]
            counts = [recompute_bn_statistics(m, (x for x, _ in islice(self.data.bn, batches))) for m in models]
            if counts[0]:
                images = min(self.data.info.train_samples, batches * RECOMPUTE_BN_BATCH)
                self._log(f"recomputed the statistics of {counts[0]} BatchNorm layers from the final weights on "
                          f"{images} training images")
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
        saved = run_files.read_meta(self.out_dir)
        raise TrainingError(f"{problem}; the last good checkpoint (epoch {saved['epoch']}, global step "
                            f"{saved['global_step']}) is kept in {self.out_dir}; try a lower --lr, --clip-grad or "
                            f"--warmup-epochs")


def _model_kwargs(cfg: TrainConfig, ds: DataInfo) -> dict[str, Any]:
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
        raise InvalidValue(f"model {name!r} rejected its arguments {kwargs}: {exc}") from exc
