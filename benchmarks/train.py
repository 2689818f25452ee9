"""Training throughput of every family's nano model on Fashion-MNIST, DDP 2-process vs 1-process, full runs.

1. images/s of one training step (the engine's loader with augmentation, forward, label-smoothed loss, backward,
   clipping, AdamW) per nano model, 2 threads; models are timed alternately, one step each per round, and we
   report the median over rounds with the inter-quartile spread.
2. DDP: the same short ``visionmix train`` run as 1 process x 2 threads and as ``torchrun --nproc_per_node=2``
   x 1 thread (gloo), images/s from each run's summary.
3. ``--full``: train each model on all 60,000 images with ``visionmix train --time-budget`` ``--budget-min``
   minutes (or for ``--epochs``), as ``--nproc`` gloo processes under torchrun (2 x 1 thread trained between 1%
   slower and 28% faster than 1 x 2 threads here), and report test accuracy (targets: >= 92% for the best nano model
   and >= 90% for every family within 15 minutes on 2 cores). The trainer times each run's own warmup and fixes its
   length to fill 97% of the budget (a separate 30-step calibration run missed the full runs' speed by up to 17%
   either way on these noisy machines), ending early if the machine slows down.
   The short-budget recipe is the default one without crop/flip augmentation (``--augment`` picks another): 3-5
   epochs are too few for it to pay off (mixer_nano, 2 epochs of 20k images: 78.1% with crop/flip, 85.3%
   without). A run directory that already holds a run is resumed (same recipe) or, if finished, just reported.

    flock /tmp/visionmix-bench.lock .venv/bin/python benchmarks/train.py                   # 1 + 2
    flock /tmp/visionmix-bench.lock .venv/bin/python benchmarks/train.py --full --out runs/bench-full
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import nn

from visionmix.data import AUGMENTATIONS, BatchLoader, build_dataset
from visionmix.engine import TrainConfig, read_meta
from visionmix.engine.optim import param_groups
from visionmix.models import create_model, list_models

TRAIN_IMAGES = 60_000
MAX_EPOCHS = 100  # the upper bound of a time-budgeted run; its budget ends it long before


def step_throughput(names: list[str], batch_size: int, rounds: int, warmup: int) -> dict[str, dict[str, float]]:
    """Median images/s of one training step per model, models interleaved round by round."""
    data = build_dataset("fashion-mnist", "train", max_samples=batch_size * (rounds + warmup))
    loader = BatchLoader(data, batch_size, train=True)
    batches = list(loader.epoch(0))
    setups = {}
    for name in names:
        torch.manual_seed(0)
        model = create_model(name, num_classes=10, in_chans=1, img_size=28).train()
        optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)
        setups[name] = (model, optimizer)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r, (images, labels) in enumerate(batches):
        for name, (model, optimizer) in setups.items():
            start = time.perf_counter()
            loss = criterion(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    out = {}
    for name, samples in times.items():
        q1, med, q3 = statistics.quantiles(samples, n=4) if len(samples) > 1 else (samples[0],) * 3
        out[name] = {"images_per_s": batch_size / med, "spread": (q3 - q1) / med,
                     "params": sum(p.numel() for p in setups[name][0].parameters())}
    return out


def visionmix_train(args: list[str], run: Path, nproc: int, threads: int) -> dict:
    """Run ``visionmix train ARGS --out RUN`` (or continue RUN) as ``nproc`` processes of ``threads`` threads each
    (torchrun when ``nproc`` > 1) and return its summary."""
    launcher = [sys.executable, "-m", "visionmix"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "-m", "visionmix"]
    where = ["--resume", str(run)] if (run / "checkpoint.json").is_file() else [*args, "--out", str(run)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([*launcher, "train", *where, "--device", "cpu", "--no-progress"], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"visionmix train {' '.join(args)} ({nproc} process(es)) failed: {proc.stderr[-2000:]}")
    return json.loads((run / "summary.json").read_text())


def short_run_speed(model: str, batch_size: int, steps: int, nproc: int, threads: int) -> float:
    """Training images/s of ``visionmix train`` once warm: a run of two ``steps``-step epochs, timing the second
    (a process's first steps are slower and vary: one-epoch calibrations missed the full runs' speed by up to 11%
    either way)."""
    args = ["--model", model, "--max-train-samples", str(batch_size * steps), "--max-eval-samples", "500",
            "--batch-size", str(batch_size), "--epochs", "2"]
    with tempfile.TemporaryDirectory() as tmp:
        first, second = visionmix_train(args, Path(tmp) / "run", nproc, threads)["history"]
    return steps * batch_size / (second["time_s"] - first["time_s"])


def ddp_throughput(model: str, batch_size: int, steps: int, threads: int) -> dict[str, float]:
    """images/s of the same short run as 1 process (``threads`` threads) and 2 gloo processes (half each)."""
    return {f"1 process x {threads} threads": short_run_speed(model, batch_size, steps, 1, threads),
            f"2 processes x {max(1, threads // 2)} thread(s)": short_run_speed(model, batch_size, steps, 2,
                                                                                max(1, threads // 2))}


def full_runs(names: list[str], args: argparse.Namespace) -> list[dict]:
    """Train each model on all of Fashion-MNIST within the time budget (resumable: finished runs are kept)."""
    rows = []
    threads = max(1, args.threads // args.nproc)
    for name in names:
        run = Path(args.out) / name
        saved = asdict(TrainConfig.from_dict(read_meta(run)["config"])) if (run / "checkpoint.json").is_file() else None
        budget = None if args.epochs else args.budget_min
        wanted = {"epochs": args.epochs or MAX_EPOCHS, "time_budget_min": budget, "batch_size": args.batch_size,
                  "lr": args.lr, "seed": args.seed, "augment": args.augment, "ema_decay": args.ema}
        if saved is not None and any(saved[k] != v for k, v in wanted.items()):
            raise SystemExit(f"{run} holds a run with another recipe ({ {k: saved[k] for k in wanted} }); "
                             f"use another --out")
        recipe = ["--model", name, "--epochs", str(wanted["epochs"]), "--batch-size", str(args.batch_size), "--lr",
                  str(args.lr), "--seed", str(args.seed), "--save-every", "200", "--augment", args.augment]
        recipe += ["--time-budget", str(budget)] if budget else []
        recipe += ["--ema", str(args.ema)] if args.ema else []
        summary = visionmix_train(recipe, run, args.nproc, threads)
        epochs = summary["epochs_trained"]
        rows.append({"model": name, "params": summary["params"], "epochs": epochs, "augment": args.augment,
                     "top1": summary["top1"], "best_top1": summary["best_top1"],
                     "train_min": summary["train_time_s"] / 60, "images_per_s": summary["train_images_per_s"]})
        print(f"  {name:24s} {epochs:5.2f} ep  top-1 {summary['top1']:.2f}%  best {summary['best_top1']:.2f}%  "
              f"{summary['train_time_s'] / 60:.1f} min  {summary['train_images_per_s']:.0f} img/s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="*nano*", help="fnmatch pattern or comma-separated names")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10, help="timed steps per model (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ddp-model", default="resnet_nano")
    parser.add_argument("--ddp-steps", type=int, default=30, help="0 skips the DDP comparison")
    parser.add_argument("--full", action="store_true", help="also run the full trainings (long)")
    parser.add_argument("--budget-min", type=float, default=15.0, help="training minutes per model in --full")
    parser.add_argument("--epochs", type=float, help="fixed epochs for --full instead of the budget")
    parser.add_argument("--nproc", type=int, default=2, help="torchrun processes of the --full runs")
    parser.add_argument("--augment", default="none", choices=AUGMENTATIONS, help="augmentation of the --full runs")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ema", type=float, help="EMA decay for --full runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench-full", help="run directories of --full")
    parser.add_argument("--json", help="write all results here")
    parser.add_argument("--quick", action="store_true", help="3 rounds, 1 warm-up step, 5 DDP steps (smoke runs)")
    args = parser.parse_args()
    if args.nproc < 1 or args.threads < 1:
        parser.error(f"--nproc and --threads must be >= 1, got {args.nproc} and {args.threads}")
    if args.quick:
        args.rounds, args.warmup, args.ddp_steps = 3, 1, min(args.ddp_steps, 5)
    torch.set_num_threads(args.threads)
    names = args.models.split(",") if "," in args.models else list_models(args.models)

    print(f"training step, Fashion-MNIST 28x28, batch {args.batch_size}, {args.threads} threads, "
          f"median of {args.rounds} interleaved rounds (spread = IQR / median):")
    speeds = step_throughput(names, args.batch_size, args.rounds, args.warmup)
    for name, s in sorted(speeds.items(), key=lambda kv: -kv[1]["images_per_s"]):
        minutes = TRAIN_IMAGES / s["images_per_s"] / 60
        print(f"  {name:24s} {s['params'] / 1e6:5.2f}M  {s['images_per_s']:7.1f} img/s  +-{100 * s['spread']:4.1f}%  "
              f"{minutes:5.1f} min/epoch")
    results: dict = {"step": speeds, "threads": args.threads, "batch_size": args.batch_size}
    if args.ddp_steps:
        ddp = ddp_throughput(args.ddp_model, args.batch_size, args.ddp_steps, args.threads)
        one, two = ddp.values()
        print(f"DDP, {args.ddp_model}, {args.ddp_steps} steps of global batch {args.batch_size}: "
              + ", ".join(f"{k}: {v:.1f} img/s" for k, v in ddp.items()) + f" (ratio {two / one:.2f})")
        results["ddp"] = ddp
    if args.full:
        print(f"full runs ({args.budget_min:g} min training budget each, {args.nproc} process(es), "
              f"augmentation {args.augment}):")
        results["full"] = full_runs(names, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
