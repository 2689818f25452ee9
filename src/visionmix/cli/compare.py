"""``visionmix compare``: the main job, many models x seeds under one recipe with paired verdicts."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from visionmix.cli.common import PROG, add_command, add_slurm_options
from visionmix.errors import InvalidValue


def add_parser(subparsers: Any) -> None:
    from visionmix.bench.presets import PRESETS
    from visionmix.engine.config import add_config_options, count_arg

    presets = "\n".join(f"  {name}: {p.description} ({', '.join(p.models)}; {p.seeds} seed(s), "
                        f"{', '.join(f'{k}={v}' for k, v in p.recipe.items())})" for name, p in PRESETS.items())
    p = add_command(subparsers, "compare", "train, evaluate and benchmark several models under one recipe", f"""\
SPACH-style fair comparison (arXiv 2108.13002): every model is trained with the same recipe and seeds, evaluated,
and its deployed form benchmarked; OUT gets results.csv/.json/.md, accuracy-vs-MACs, accuracy-vs-throughput,
training-curve and paired-difference plots (PNG) and one run directory per model and seed under OUT/runs.
Each model gets its top-1 minus --baseline's, seed by seed (runs of one seed share data order and augmentation),
with a 95% paired t interval over the seeds and a verdict: better / worse / no difference shown (one seed cannot
decide). When two models of one of the papers' claims are compared (--preset claims has them all), a claims table
(results.md, claims.csv) rates each claim holds / does not hold / not shown at this scale ("on par" = within +-1
point). The runs (OUT/plan.json) execute one after another in this process (--launcher inline) or --jobs at a time
in worker processes (--launcher local), each with --threads-per-run threads (equal T: bit-identical weights on any
launcher) and, with CUDA, its own GPUs. Running the same command again skips finished runs and resumes interrupted
ones; a run that fails gets a row with its error and log, and the others go on. Options given explicitly override
the preset's.

presets:
{presets}

example: visionmix compare --models resnet_nano,mixer_nano --data fashion-mnist --epochs 3 --seeds 3 --out runs/cmp""")
    sections = add_config_options(p, skip=("model", "seed"))
    chosen, output = sections["model and data"], sections["output"]
    chosen.add_argument("--preset", choices=tuple(PRESETS), help="a predefined comparison")
    chosen.add_argument("--models", help="comma-separated registered model names (required without --preset)")
    chosen.add_argument("--baseline", metavar="MODEL",
                        help="model the others are compared with seed by seed (default: the preset's baseline if it "
                             "is compared, else the first of --models)")
    chosen.add_argument("--seeds", type=count_arg,
                        help="train each model with seeds 0..N-1 (default: 1, or the preset's)")
    output.add_argument("--out", required=True, metavar="DIR",
                        help="output directory: new, empty, or a comparison visionmix wrote (re-use it to resume)")
    output.add_argument("--force", action="store_true",
                        help="write into a non-empty DIR that is not a visionmix comparison, replacing files there "
                             "named like its report (results.*, claims.csv, the plots); nothing else is touched")
    output.add_argument("--bench-batch-size", type=count_arg, default=64,
                        help="batch size of the throughput measurement")
    output.add_argument("--bench-repeats", type=count_arg, default=10,
                        help="timed samples per speed measurement (>= 2)")
    output.add_argument("--no-progress", action="store_true",
                        help="no progress bars (epoch lines and notices still print, and go to each run's train.log)")
    add_launcher_options(p)
    p.set_defaults(run=run)


def add_launcher_options(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The options of where and how the runs execute (``visionmix.bench.launch``); a launcher's own options go into
    the returned group."""
    from visionmix.bench.launchers import LAUNCHERS
    from visionmix.engine.config import count_arg

    runs = p.add_argument_group("where the runs execute")
    runs.add_argument("--launcher", choices=tuple(LAUNCHERS),
                      help="inline: one run after another in this process; local: --jobs worker processes at once; "
                           "slurm: each run a Slurm job, all in one job array (needs visionmix[slurm]) (default: "
                           "local where several GPUs are visible or --jobs/--jobs-per-gpu is given, else inline)")
    runs.add_argument("--threads-per-run", type=count_arg, metavar="T",
                      help="CPU threads of each run's process, for every launcher (default: inline: this process's; "
                           "local: cores / --jobs, or 1 without --jobs; slurm: 1, the CPUs of each task). Weights are "
                           "bit-identical across launchers at equal T")
    runs.add_argument("--jobs", type=count_arg, metavar="N",
                      help="local: runs at once (default: on CPU cores / T, one thread each without T; with CUDA "
                           "what the visible GPUs hold)")
    runs.add_argument("--jobs-per-gpu", type=count_arg, metavar="K",
                      help="local, with CUDA: K runs share one GPU (CUDA_VISIBLE_DEVICES per worker) (default: 1)")
    runs.add_argument("--procs-per-run", type=count_arg, metavar="P",
                      help="processes per run (DDP, started with torch.distributed.run's elastic launcher, or as the "
                           "tasks of a Slurm job): one per GPU with CUDA, gloo processes on CPU (default: 1)")
    runs.add_argument("--nodes-per-run", type=count_arg, metavar="K",
                      help="slurm: nodes per run, --procs-per-run / K processes on each (default: 1)")
    add_slurm_options(runs)
    runs.add_argument("--cancel", action="store_true",
                      help="slurm: cancel the jobs of the comparison in --out (each saves a checkpoint; the compare "
                           "command run again resubmits and resumes them)")
    return runs


def _cancel(args: argparse.Namespace) -> int:
    from visionmix.bench.slurm import cancel

    given = [flag for flag, value in (("--models", args.models), ("--preset", args.preset)) if value]
    if given:
        raise InvalidValue(f"--cancel takes only --out (the comparison's jobs are in OUT/slurm), not {given[0]}")
    cancelled = cancel(Path(args.out))
    print(f"cancelled Slurm job(s) {', '.join(cancelled)}" if cancelled else "no Slurm job of this comparison is "
          "pending or running")
    return 0


def run(args: argparse.Namespace) -> int:
    from visionmix.bench.compare import compare
    from visionmix.bench.launchers import make_launcher
    from visionmix.bench.plots import PLOTS
    from visionmix.bench.presets import resolve_comparison
    from visionmix.engine.config import config_values

    if args.cancel:
        return _cancel(args)
    plan = resolve_comparison(args.preset, args.models, config_values(args), seeds=args.seeds,
                              baseline=args.baseline)
    launcher = make_launcher(args.launcher, {**vars(args), "progress": not args.no_progress})
    if plan.note:
        print(f"note: {plan.note}", flush=True)
    rows = compare(plan.models, args.out, data=plan.data, seeds=plan.seeds, recipe=plan.recipe,
                   bench_batch_size=args.bench_batch_size, bench_repeats=args.bench_repeats,
                   progress=not args.no_progress, note=plan.note, command=args.command_line, force=args.force,
                   baseline=plan.baseline, launcher=launcher, threads_per_run=args.threads_per_run,
                   log=lambda line: print(line, flush=True))
    out = Path(args.out)
    print()
    print((out / "results.md").read_text())
    print(f"table: {out / 'results.md'} (also results.csv, results.json)")
    print("plots: " + ", ".join(str(out / name) for name in PLOTS))
    if (out / "claims.csv").is_file():
        print(f"claims: {out / 'claims.csv'} (and the claims section of results.md)")
    failed = [r["model"] for r in rows if r["status"] != "ok"]
    if args.no_wait:  # submitted: the same command gathers them later
        return 0
    if failed:
        print(f"{PROG}: {len(failed)} of {len(rows)} models did not finish cleanly: {', '.join(failed)}",
              file=sys.stderr)
    return 1 if failed else 0
