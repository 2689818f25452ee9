"""``visionmix train``: train a registered model into a run directory, or resume one."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

from visionmix.cli.common import add_command, say
from visionmix.errors import InvalidValue


def add_parser(subparsers: Any) -> None:
    from visionmix.engine.config import add_config_options

    p = add_command(subparsers, "train", "train a registered model on a dataset", """\
Train any registered model with one recipe (AdamW, warmup + cosine LR, label smoothing, gradient clipping,
drop-path, optional EMA) and write a run directory: checkpoint.json + weights (safetensors) + training state,
metrics.jsonl (one line per epoch), summary.json. --recipe deit is DeiT's ImageNet recipe (random-resized crop,
RandAugment, random erasing, mixup/cutmix, lr 5e-4 x batch/512); imagefolder and webdataset data are streamed
from disk by --workers processes. --init fine-tunes from a checkpoint (--freeze backbone: a linear probe,
--layer-decay: layer-wise LR decay). A run stopped by Ctrl-C/SIGTERM (it saves first) or killed continues with
--resume RUN_DIR. Multi-process: torchrun --nproc_per_node=N -m visionmix train ...; multi-node: torchrun
--nnodes=M --node_rank=I --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT --nproc_per_node=N -m visionmix train ...

example: visionmix train --model mixer_nano --data fashion-mnist --epochs 3 --out runs/mixer""")
    output = add_config_options(p)["output"]
    output.add_argument("--out", metavar="RUN_DIR",
                        help="new run directory (must not exist or be empty, unless --force)")
    output.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR with its saved settings "
                                                            "(only --device and --no-progress may be given beside it)")
    output.add_argument("--from-previous", action="store_true",
                        help="with --resume: continue from the run's previous checkpoint (kept for when the latest "
                             "one is damaged)")
    output.add_argument("--force", action="store_true",
                        help="replace the visionmix run already in --out (only its own files are removed), or write "
                             "into a non-empty directory that holds no run (nothing there is deleted or overwritten)")
    output.add_argument("--no-progress", action="store_true",
                        help="no progress bars (epoch lines and notices still print, and go to RUN_DIR/train.log)")
    p.set_defaults(run=run)


# what may be given beside --resume: everything else is the saved run's and would be ignored
_RESUME_OPTIONS = ("device",)


def run(args: argparse.Namespace) -> int:
    from visionmix.engine import TrainConfig, resume_run, train
    from visionmix.engine.config import config_values, option_flag

    progress = not args.no_progress
    values = config_values(args)
    if args.from_previous and not args.resume:
        raise InvalidValue("--from-previous needs --resume RUN_DIR")
    if args.resume:
        if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
            raise InvalidValue(f"--resume {args.resume} and --out {args.out} name different directories")
        flags = {f.name: option_flag(f) for f in fields(TrainConfig)}
        ignored = [flags[name] for name in values if name not in _RESUME_OPTIONS] + (["--force"] if args.force else [])
        if ignored:
            raise InvalidValue(f"--resume continues {args.resume} with its saved settings, so {', '.join(ignored)} "
                               f"would be ignored; drop {'it' if len(ignored) == 1 else 'them'} (or train a new run "
                               f"with --out)")
        summary = resume_run(args.resume, device=values.get("device"), progress=progress,
                             from_previous=args.from_previous)
        run_dir = args.resume
    else:
        if "model" not in values or not args.out:
            raise InvalidValue("train needs --model and --out (or --resume RUN_DIR)")
        cfg = TrainConfig.for_recipe(values.pop("recipe", "small"), **values)
        summary = train(cfg, args.out, progress=progress, force=args.force)
        run_dir = args.out
    say(f"{summary['model']} on {summary['data']}: top-1 {summary['top1']:.2f}% top-5 {summary['top5']:.2f}% "
         f"(best {summary['best_top1']:.2f}%) after {summary.get('epochs_trained', summary['epochs']):.3g} epochs, "
         f"{summary['train_images_per_s']:.0f} img/s; run directory {run_dir}")
    return 0
