"""``visionmix train``: train a registered model into a run directory, or resume one."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

from visionmix.cli.common import add_command, add_slurm_options, say
from visionmix.errors import InvalidValue


def add_parser(subparsers: Any) -> None:
    from visionmix.engine.config import add_config_options, count_arg

    p = add_command(subparsers, "train", "train a registered model on a dataset", """\
Train any registered model with one recipe (AdamW, warmup + cosine LR, label smoothing, gradient clipping,
drop-path, optional EMA) and write a run directory: checkpoint.json + weights (safetensors) + training state,
metrics.jsonl (one line per epoch), summary.json. --recipe deit is DeiT's ImageNet recipe (random-resized crop,
RandAugment, random erasing, mixup/cutmix, lr 5e-4 x batch/512); imagefolder and webdataset data are streamed
from disk by --workers processes. --init fine-tunes from a checkpoint (--freeze backbone: a linear probe,
--layer-decay: layer-wise LR decay). A run stopped by Ctrl-C/SIGTERM (it saves first) or killed continues with
--resume RUN_DIR. Multi-process: torchrun --nproc_per_node=N -m visionmix train ...; multi-node: torchrun
--nnodes=M --node_rank=I --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT --nproc_per_node=N -m visionmix train ...;
on a Slurm cluster: --launcher slurm --nodes M --gpus-per-node N (one job; before its time limit it saves,
requeues itself and resumes; the same command run again gathers or resumes the run in RUN_DIR).

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
    where = p.add_argument_group("where the run executes")
    where.add_argument("--launcher", choices=("inline", "slurm"), default="inline",
                       help="inline: in this process (torchrun for several); slurm: one Slurm job of --nodes x "
                            "--gpus-per-node processes, submitted with submitit (needs visionmix[slurm])")
    where.add_argument("--nodes", type=count_arg, metavar="M", help="slurm: nodes of the job (default: 1)")
    where.add_argument("--gpus-per-node", type=count_arg, metavar="N",
                       help="slurm: GPUs per node, one process each (default: none, one CPU process per node)")
    where.add_argument("--threads-per-run", type=count_arg, metavar="T",
                       help="slurm: CPU threads (and CPUs) of each process (default: 1)")
    add_slurm_options(where)
    p.set_defaults(run=run)


# what may be given beside --resume: everything else is the saved run's and would be ignored
_RESUME_OPTIONS = ("device",)


def run(args: argparse.Namespace) -> int:
    from visionmix.engine import TrainConfig, resume_run, train
    from visionmix.engine.config import config_values, option_flag

    progress = not args.no_progress
    values = config_values(args)
    slurm_given = [flag for flag, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node),
                                            ("--threads-per-run", args.threads_per_run),
                                            ("--slurm-partition", args.slurm_partition),
                                            ("--slurm-time", args.slurm_time), ("--slurm-account", args.slurm_account),
                                            ("--slurm-qos", args.slurm_qos),
                                            ("--slurm-constraint", args.slurm_constraint),
                                            ("--slurm-opt", args.slurm_opt), ("--no-wait", args.no_wait)) if value]
    if args.launcher == "slurm":
        return _run_on_slurm(args, values)
    if slurm_given:
        raise InvalidValue(f"{slurm_given[0]} applies to --launcher slurm only")
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
    _say_result(summary, run_dir)
    return 0


def _say_result(summary: dict[str, Any], run_dir: str | Path) -> None:
    say(f"{summary['model']} on {summary['data']}: top-1 {summary['top1']:.2f}% top-5 {summary['top5']:.2f}% "
        f"(best {summary['best_top1']:.2f}%) after {summary.get('epochs_trained', summary['epochs']):.3g} epochs, "
        f"{summary['train_images_per_s']:.0f} img/s; run directory {run_dir}")


def _run_on_slurm(args: argparse.Namespace, values: dict[str, Any]) -> int:
    """One run as one Slurm job (``visionmix.bench.slurm``); the same command again gathers or resumes it."""
    import json
    from dataclasses import asdict

    from visionmix.bench.launch import RunSpec, gather
    from visionmix.bench.slurm import make_launcher
    from visionmix.engine import TrainConfig
    from visionmix.engine.run_files import SLURM_DIR
    from visionmix.engine.run_setup import prepare_out_dir
    from visionmix.files import hold_directory

    if args.resume or args.force or args.from_previous:
        raise InvalidValue("--launcher slurm continues the run in --out by itself: run the same command again "
                           "(no --resume, --from-previous or --force)")
    if "model" not in values or not args.out:
        raise InvalidValue("train --launcher slurm needs --model and --out")
    gpus = args.gpus_per_node or 0
    if gpus and values.get("device", "auto") == "cpu":
        raise InvalidValue(f"--gpus-per-node {gpus} with --device cpu: drop one of them")
    cfg = TrainConfig.for_recipe(values.pop("recipe", "small"), **values)
    cfg.validate()
    out = Path(args.out)
    prepare_out_dir(cfg, out, resume=True, force=False)  # new, or the same run: it continues
    nodes = args.nodes or 1
    launcher = make_launcher({**vars(args), "procs_per_run": nodes * max(gpus, 1), "nodes_per_run": nodes})
    threads = launcher.prepare("cuda" if gpus else "cpu", args.threads_per_run)
    spec = RunSpec(cfg.model, cfg.seed, json.loads(json.dumps(asdict(cfg))), str(out), threads,
                   launcher.procs_per_run, launcher.name)
    with hold_directory(out / SLURM_DIR, "visionmix train --launcher slurm"):  # one submitter per run directory
        outcome = gather(spec)
        if outcome.summary is None:  # not finished: submitted (again), or followed where it is queued
            left = launcher.launch([spec], out, lambda s: None, lambda line: print(line, flush=True))
            outcome = gather(spec, left.get(spec.run_dir))
    if outcome.summary is None:
        print(f"{spec.name}: {outcome.error}" + (f" (log: {outcome.log})" if outcome.log else ""), flush=True)
        return 0 if args.no_wait else 1
    _say_result(outcome.summary, out)
    return 0
