"""The ``visionmix`` command: ``train``, ``eval``, ``models`` (and the commands other modules add).

Each command is a pair ``_add_<name>_parser(subparsers)`` / ``_run_<name>(args) -> int``, listed in
:data:`COMMANDS`. Errors a user can cause (missing data, a bad file, an unknown model, a bad option) print one
line ``visionmix: error: ...`` and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from visionmix.files import check_new

PROG = "visionmix"


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows ``(default: X)`` after every option whose default is meaningful (not None/False/suppressed)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if unset or "default" in text or not action.option_strings:
            return text
        return super()._get_help_string(action) or text


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{PROG}: error: {self.prog}: {message} (see '{self.prog} --help')\n")


def add_command(subparsers: Any, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    """A sub-command parser with the house formatter; ``description`` defaults to ``help``."""
    return subparsers.add_parser(name, help=help, description=description or help, formatter_class=_Formatter)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _say(message: str) -> None:
    if _is_main_process():
        print(message, flush=True)


# ------------------------------------------------------------------------------------------------------ train
def _add_train_parser(subparsers: Any) -> None:
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
    p.add_argument("--out", metavar="RUN_DIR", help="new run directory (must not exist or be empty, unless --force)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR with its saved settings (only "
                                                       "--device and --no-progress may be given beside it)")
    p.add_argument("--from-previous", action="store_true",
                   help="with --resume: continue from the run's previous checkpoint (kept for when the latest one "
                        "is damaged)")
    p.add_argument("--force", action="store_true",
                   help="replace the visionmix run already in --out (only its own files are removed), or write into "
                        "a non-empty directory that holds no run (nothing there is deleted or overwritten)")
    add_config_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar or per-epoch lines")
    p.set_defaults(run=_run_train)


# what may be given beside --resume: everything else is the saved run's and would be ignored
_RESUME_OPTIONS = ("device",)


def _run_train(args: argparse.Namespace) -> int:
    from visionmix.engine import TrainConfig, resume_run, train
    from visionmix.engine.config import config_values, option_flag

    progress = not args.no_progress
    values = config_values(args)
    if args.from_previous and not args.resume:
        raise ValueError("--from-previous needs --resume RUN_DIR")
    if args.resume:
        if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
            raise ValueError(f"--resume {args.resume} and --out {args.out} name different directories")
        flags = {f.name: option_flag(f) for f in fields(TrainConfig)}
        ignored = [flags[name] for name in values if name not in _RESUME_OPTIONS] + (["--force"] if args.force else [])
        if ignored:
            raise ValueError(f"--resume continues {args.resume} with its saved settings, so {', '.join(ignored)} "
                             f"would be ignored; drop {'it' if len(ignored) == 1 else 'them'} (or train a new run "
                             f"with --out)")
        summary = resume_run(args.resume, device=values.get("device"), progress=progress,
                             from_previous=args.from_previous)
        run_dir = args.resume
    else:
        if "model" not in values or not args.out:
            raise ValueError("train needs --model and --out (or --resume RUN_DIR)")
        cfg = TrainConfig.for_recipe(values.pop("recipe", "small"), **values)
        summary = train(cfg, args.out, progress=progress, force=args.force)
        run_dir = args.out
    _say(f"{summary['model']} on {summary['data']}: top-1 {summary['top1']:.2f}% top-5 {summary['top5']:.2f}% "
         f"(best {summary['best_top1']:.2f}%) after {summary.get('epochs_trained', summary['epochs']):.3g} epochs, "
         f"{summary['train_images_per_s']:.0f} img/s; run directory {run_dir}")
    return 0


# ------------------------------------------------------------------------------------------------------- eval
def _add_eval_parser(subparsers: Any) -> None:
    from visionmix.deployment import QUANTIZE
    from visionmix.engine.config import count_arg, count_or_zero_arg
    from visionmix.engine.evaluate import EVAL_WEIGHTS

    p = add_command(subparsers, "eval", "evaluate a trained run", """\
Evaluate a run directory's model: top-1/top-5, loss, per-class accuracy and the confusion matrix, written to
RUN_DIR/eval.json and RUN_DIR/confusion.png (PNG when matplotlib is installed). --deploy also evaluates the
re-parameterised model (visionmix.reparameterize) to show that it scores identically; --quantize int8 its int8
form on onnxruntime (eval-int8.json) with its top-1 change: quantisation is lossy, this measures how much.""")
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="run directory written by 'visionmix train'")
    p.add_argument("--deploy", action="store_true", help="also evaluate the re-parameterised (deployed) model")
    p.add_argument("--quantize", choices=QUANTIZE, help="also evaluate the deployed model with int8 Linear weights "
                                                        "on onnxruntime (visionmix.deploy(..., quantize='int8'))")
    p.add_argument("--data-dir", help="dataset directory (default: the one the run was trained with)")
    p.add_argument("--split", default="test", choices=("test", "train"), help="which split to evaluate")
    p.add_argument("--max-eval-samples", type=count_or_zero_arg,
                   help="evaluate on a fixed subset of this many images, 0 = all (default: the run's own setting)")
    p.add_argument("--weights", default="auto", choices=EVAL_WEIGHTS,
                   help="auto = the EMA weights if the run kept them")
    p.add_argument("--batch-size", type=count_arg, default=500, help="evaluation batch size")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = cuda when available")
    p.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from visionmix.engine.distributed import resolve_device
    from visionmix.engine.evaluate import evaluate_run

    report = evaluate_run(args.checkpoint, split=args.split, deploy=args.deploy, quantize=args.quantize,
                          data_dir=args.data_dir, max_samples=args.max_eval_samples, weights=args.weights,
                          batch_size=args.batch_size, device=resolve_device(args.device))
    for form, record in report["forms"].items():
        _say(f"{form:>8}: top-1 {record['top1']:.2f}%  top-5 {record['top5']:.2f}%  loss {record['loss']:.4f}  "
             f"({record['num_samples']} images, {record['params']:,} params)")
    per_class = zip(report["classes"], report["forms"]["trained"]["per_class"], strict=True)
    _say("per class: " + ", ".join(f"{c} {a:.1f}%" for c, a in per_class if a is not None))
    for form, check in report["checks"].items():
        _say(f"{form} vs trained: {'identical' if check['same_predictions'] else 'different'} predictions, top-1 "
             f"{check['top1_change']:+.2f} points, max |logit difference| {check['max_abs_logit_diff']:.2e} on the "
             f"first batch")
    _say("wrote " + " and ".join(map(str, report["written"])))
    return 0


# ----------------------------------------------------------------------------------------------------- models
def _add_models_parser(subparsers: Any) -> None:
    p = add_command(subparsers, "models", "list registered models with parameters and MACs", """\
List registered models matching PATTERN (fnmatch, e.g. '*_nano' or 'spach*'), with parameters at a 1000-class
head (10 classes and 1 channel for *_nano models), MACs (multiply-adds of one image: computed for small-input
models at their default input, the reference figure otherwise) and the published ImageNet top-1.""")
    p.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern of model names")
    p.set_defaults(run=_run_models)


def _model_row(name: str) -> tuple[str, str, str, str, str]:
    import torch

    from visionmix.bench.profile import count_macs, count_params, si_format
    from visionmix.models import create_model, model_entry

    entry = model_entry(name)
    h, w = entry.cfg["input_size"][-2:]  # (C, H, W), or (C, T, H, W) for video models
    small = h * w <= 64 * 64
    kwargs = {"num_classes": entry.cfg["num_classes"]}
    params = macs = "?"
    try:
        with torch.device("meta"):
            model = create_model(name, **kwargs)
            params = si_format(count_params(model))
            if small:
                macs = si_format(count_macs(model, torch.empty(1, *entry.cfg["input_size"])))
    except Exception:  # a model that cannot be built on the meta device still gets its row
        pass
    if not small:
        macs = si_format(entry.reference.gmacs * 1e9 if entry.reference.gmacs is not None else None)
    top1 = f"{entry.reference.top1:.1f}" if entry.reference.top1 is not None else "-"
    return name, params, macs, "x".join(map(str, entry.cfg["input_size"])), top1


def _run_models(args: argparse.Namespace) -> int:
    from visionmix.models import list_models

    names = list_models(args.pattern)
    if not names:
        raise ValueError(f"no registered model matches {args.pattern!r}")
    rows = [("model", "params", "MACs", "input", "top-1 (paper)"), *map(_model_row, names)]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        print("  ".join(cell.ljust(wd) if i == 0 else cell.rjust(wd)
                        for i, (cell, wd) in enumerate(zip(row, widths, strict=True))))
    return 0


# ------------------------------------------------------------------------------------------------------ bench
def _add_bench_parser(subparsers: Any) -> None:
    from visionmix.deployment import BACKENDS, QUANTIZE

    p = add_command(subparsers, "bench", "measure models: params, MACs, latency, throughput, peak memory", """\
Profile registered models with random weights at their default input size (or --img-size/--in-chans): parameters,
MACs (FlopCounterMode multiply-adds of one image), latency at batch 1 and images/s at --batch-size (median and
inter-quartile spread over repeated runs after warm-up, eval mode, torch.inference_mode), and the peak memory of the
tensors one forward pass at --batch-size creates. --deploy adds the re-parameterised form of each model that
re-parameterisation changes.
MODEL may be an fnmatch pattern ('*_nano').

example: visionmix bench resnet_nano dbb_resnet_nano --deploy --json bench.json""")
    p.add_argument("models", nargs="+", metavar="MODEL", help="registered model names or patterns")
    p.add_argument("--batch-size", type=int, default=8, help="batch size of the throughput measurement")
    p.add_argument("--img-size", type=int, help="input height = width (default: the model's own)")
    p.add_argument("--in-chans", type=int, help="input channels (default: the model's own)")
    p.add_argument("--num-classes", type=int, help="classifier size (default: the model's own)")
    p.add_argument("--deploy", action="store_true", help="also profile visionmix.reparameterize(model)")
    p.add_argument("--backend", type=_backends, metavar="LIST",
                   help="instead: images/s of the deployed model on each inference backend of visionmix.deploy "
                        f"(comma-separated of {', '.join(BACKENDS)}, or all) next to eager, timed alternately in one "
                        "process, each checked against eager (default: off)")
    p.add_argument("--quantize", choices=QUANTIZE, help="with --backend: also time the int8 onnxruntime form "
                                                        "(dynamic int8 Linear weights; its difference is reported)")
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="time torch.compile(model, backend=BACKEND) (inductor if no value; a cold compile takes "
                        "about a minute per model and input shape)")
    p.add_argument("--vs-matmul", action="store_true",
                   help="also time a 2048^3 fp32 matmul and show each model's GFLOP/s as a fraction of it")
    p.add_argument("--repeats", type=int, default=10, help="timed samples per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before the samples")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"), help="auto = cuda when available")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--csv", metavar="FILE", help="also write the results as CSV")
    p.add_argument("--force", action="store_true", help="overwrite existing --json/--csv files")
    p.set_defaults(run=_run_bench)


def _expand_models(names: Sequence[str]) -> list[str]:
    from visionmix.models import list_models, model_entry

    expanded: list[str] = []
    for name in names:
        if any(c in name for c in "*?["):
            matches = list_models(name)
            if not matches:
                raise ValueError(f"no registered model matches {name!r}")
            expanded += matches
        else:
            model_entry(name)  # an unknown name fails here, with the closest names, before anything is measured
            expanded.append(name)
    return list(dict.fromkeys(expanded))


def _backends(text: str) -> tuple[str, ...]:
    """``--backend``: a comma-separated list of visionmix.deploy's backends, or ``all``."""
    from visionmix.deployment import BACKENDS

    names = BACKENDS if text == "all" else tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected backends among {', '.join(BACKENDS)} (or all), got {text!r}")
    return names


def _run_bench(args: argparse.Namespace) -> int:
    from visionmix.bench.profile import (
        bench_backends,
        bench_models,
        format_backend_table,
        format_table,
        matmul_gflops,
        save_results,
    )
    from visionmix.engine.distributed import resolve_device

    names = _expand_models(args.models)
    for path in (args.json, args.csv):
        check_new(path, args.force)
    common = dict(batch_size=args.batch_size, img_size=args.img_size, in_chans=args.in_chans, warmup=args.warmup,
                  repeats=args.repeats, model_kwargs={"num_classes": args.num_classes})
    reference = None
    if args.quantize and not args.backend:
        raise ValueError("--quantize times the int8 form beside --backend's; pass --backend too (e.g. --backend "
                         "onnxruntime)")
    if args.backend:
        if args.deploy or args.compile or args.vs_matmul or args.device != "cpu":
            raise ValueError("--backend times visionmix.deploy's CPU backends of the deployed model; it does not "
                             "combine with --deploy, --compile, --vs-matmul or --device")
        results: list[Any] = bench_backends(names, args.backend, quantize=args.quantize, **common)
        print(format_backend_table(results))
    else:
        device = resolve_device(args.device)
        reference = matmul_gflops(device=device) if args.vs_matmul else None
        results = bench_models(names, deploy=args.deploy, device=device, compile_backend=args.compile,
                               reference_gflops=reference, **common)
        print(format_table(results))
        if reference is not None:
            print(f"2048^3 fp32 matmul: {reference:.1f} GFLOP/s")
    meta = {"matmul_gflops": reference, "command": args.command_line}
    for path in (args.json, args.csv):
        if path:
            print(f"wrote {save_results(results, path, force=args.force, meta=meta)}")
    return 0


# ---------------------------------------------------------------------------------------------------- compare
def _add_compare_parser(subparsers: Any) -> None:
    from visionmix.bench.compare import PRESETS
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
point). Running the same command again skips finished runs and resumes interrupted ones; a model that fails gets a
row with its error and the others go on. Options given explicitly override the preset's.

presets:
{presets}

example: visionmix compare --models resnet_nano,mixer_nano --data fashion-mnist --epochs 3 --seeds 3 --out runs/cmp""")
    p.add_argument("--preset", choices=tuple(PRESETS), help="a predefined comparison")
    p.add_argument("--models", help="comma-separated registered model names (required without --preset)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory: new, empty, or a comparison visionmix wrote (re-use it to resume)")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty DIR that is not a visionmix comparison, replacing files there named "
                        "like its report (results.*, claims.csv, the plots); nothing else is touched")
    p.add_argument("--baseline", metavar="MODEL",
                   help="model the others are compared with seed by seed (default: the preset's baseline if it is "
                        "compared, else the first of --models)")
    p.add_argument("--seeds", type=count_arg, help="train each model with seeds 0..N-1 (default: 1, or the preset's)")
    add_config_options(p, skip=("model", "seed"))
    p.add_argument("--bench-batch-size", type=count_arg, default=64, help="batch size of the throughput measurement")
    p.add_argument("--bench-repeats", type=count_arg, default=10, help="timed samples per speed measurement (>= 2)")
    p.add_argument("--no-progress", action="store_true", help="no per-epoch lines from the trainer")
    p.set_defaults(run=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    from visionmix.bench.compare import PLOTS, PRESETS, Preset, compare, resolve_preset
    from visionmix.engine.config import config_values

    note = ""
    given = config_values(args)
    if args.preset and "data" in given:  # the data were chosen explicitly: no fallback to digits
        preset = PRESETS[args.preset]
    elif args.preset:
        preset, note = resolve_preset(args.preset, given.get("data_dir"))
    else:
        if not args.models:
            raise ValueError("compare needs --models a,b,c or --preset NAME")
        preset = Preset(models=(), data="fashion-mnist", seeds=1)
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else list(preset.models)
    data = given.get("data", preset.data)
    overrides = dict(given)
    overrides.pop("data", None)
    if data == "digits":
        overrides.pop("data_dir", None)
    recipe = {**preset.recipe, **overrides}
    if note:
        print(f"note: {note}", flush=True)
    seeds = preset.seeds if args.seeds is None else args.seeds
    baseline = args.baseline or (preset.baseline if preset.baseline in models else None)
    rows = compare(models, args.out, data=data, seeds=seeds, recipe=recipe,
                   bench_batch_size=args.bench_batch_size, bench_repeats=args.bench_repeats,
                   progress=not args.no_progress, note=note, command=args.command_line, force=args.force,
                   baseline=baseline,
                   log=lambda line: print(line, flush=True))
    out = Path(args.out)
    print()
    print((out / "results.md").read_text())
    print(f"table: {out / 'results.md'} (also results.csv, results.json)")
    print("plots: " + ", ".join(str(out / name) for name in PLOTS))
    if (out / "claims.csv").is_file():
        print(f"claims: {out / 'claims.csv'} (and the claims section of results.md)")
    failed = [r["model"] for r in rows if r["status"] != "ok"]
    if failed:
        print(f"{PROG}: {len(failed)} of {len(rows)} models did not finish cleanly: {', '.join(failed)}",
              file=sys.stderr)
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------------- export
def _add_export_parser(subparsers: Any) -> None:
    from visionmix.engine.config import positive_number
    p = add_command(subparsers, "export", "export a trained run to ONNX / TorchScript, checked against PyTorch", """\
Export the model of a run directory (or, with --random-init, a registered model with random weights) to ONNX
(dynamo exporter, dynamic batch, weights in the one file) and/or TorchScript (trace). Each file is reloaded in its
runtime (onnxruntime / torch.jit.load), run on random batches of two sizes and compared with PyTorch; it is kept only
if the max absolute difference is below --atol. --deploy exports visionmix.reparameterize(model) and first checks
that it computes what the trained model computes.

example: visionmix export runs/dbb --deploy --onnx dbb.onnx --torchscript dbb.pt""")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="run directory written by 'visionmix train' (or a model name with --random-init)")
    p.add_argument("--onnx", metavar="FILE", help="write the ONNX model here")
    p.add_argument("--torchscript", metavar="FILE", help="write the TorchScript model here")
    p.add_argument("--deploy", action="store_true", help="export the re-parameterised (deployed) form")
    p.add_argument("--random-init", action="store_true",
                   help="CHECKPOINT is a registered model name; export it with random weights")
    p.add_argument("--img-size", type=int, help="with --random-init: input height = width")
    p.add_argument("--in-chans", type=int, help="with --random-init: input channels")
    p.add_argument("--num-classes", type=int, help="with --random-init: classifier size")
    p.add_argument("--batch-size", type=int, default=2, help="batch of the example input (the check also runs one "
                                                             "image more)")
    p.add_argument("--static-batch", action="store_true",
                   help="fix the batch size at --batch-size (needed by CondConv/WeightNet: one grouped conv with "
                        "groups = batch)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17)")
    p.add_argument("--atol", type=lambda t: positive_number(t, "absolute difference"), default=1e-4,
                   help="largest allowed |exported - PyTorch| (a positive number)")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    import torch

    from visionmix.export import deployed_for_export, export_onnx, export_torchscript, randomize_weights

    if not (args.onnx or args.torchscript):
        raise ValueError("export needs --onnx FILE and/or --torchscript FILE")
    if args.onnx and args.torchscript and Path(args.onnx).resolve() == Path(args.torchscript).resolve():
        raise ValueError(f"--onnx and --torchscript name the same file {args.onnx}; give each its own")
    if not args.random_init and (args.img_size or args.in_chans or args.num_classes):
        raise ValueError("--img-size/--in-chans/--num-classes only apply with --random-init (a run's model keeps "
                         "the shape it was trained with)")
    for path in (args.onnx, args.torchscript):
        check_new(path, args.force)
    if args.random_init:
        from visionmix.models import create_model

        model = create_model(args.checkpoint, img_size=args.img_size, in_chans=args.in_chans,
                             num_classes=args.num_classes)
        randomize_weights(model, torch.randn(8, *model.pretrained_cfg["input_size"]))
        source = f"{args.checkpoint} (random weights)"
    else:
        from visionmix.engine.checkpoint import load_run

        model, meta = load_run(args.checkpoint)
        source = f"{meta['model']} from {args.checkpoint}"
    example = torch.randn(args.batch_size, *model.pretrained_cfg["input_size"])
    checked = f"{args.batch_size}" if args.static_batch else f"{args.batch_size} and {args.batch_size + 1}"
    if args.deploy:
        model, equivalence = deployed_for_export(model, example)
        print(f"deployed vs trained: {equivalence}")
        source = f"{source}, deployed"
    for path, export, kind in ((args.onnx, export_onnx, "ONNX"), (args.torchscript, export_torchscript,
                                                                  "TorchScript")):
        if path:
            options = {"opset": args.opset} if export is export_onnx else {}
            diff = export(model, path, example, atol=args.atol, dynamic_batch=not args.static_batch,
                          force=args.force, **options)
            print(f"wrote {path}: {kind} of {source}; max |exported - PyTorch| = {diff:.2e} on batches of "
                  f"{checked} (atol {args.atol:g})")
    return 0


# ---------------------------------------------------------------------------------------------------- predict
def _add_predict_parser(subparsers: Any) -> None:
    from visionmix.deployment import BACKENDS, QUANTIZE
    from visionmix.engine.config import count_arg

    p = add_command(subparsers, "predict", "classify image files with a trained run or a checkpoint", """\
Print the top-k classes, with probabilities, of each image file (a directory is searched recursively, in sorted
order, and streamed: at most one batch of images is held). Images are decoded with Pillow (grey or RGB, as the
model takes) and given the model's evaluation transform: a run directory's image size and mean/std, or with
--model the pretrained_cfg of the registered model (resize to input_size / crop_pct, centre crop, mean/std).
A file that cannot be decoded is reported on stderr and skipped.

exit status: 0 every image was classified, 1 some were skipped, 2 none could be read or an argument is wrong.

example: visionmix predict runs/mixer photos/ --topk 3 --json""")
    p.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="run directory written by 'visionmix train', or with --model a checkpoint file "
                        "(.pth/.safetensors)")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files and directories of them")
    p.add_argument("--model", metavar="NAME", help="the registered model whose weights the checkpoint file holds")
    p.add_argument("--classes", metavar="FILE", help="with --model: the class names, one per line (required: a "
                                                     "checkpoint file holds none)")
    p.add_argument("--topk", type=count_arg, default=5, help="classes printed per image, at most the model's")
    p.add_argument("--batch-size", type=count_arg, default=32, help="images per forward pass")
    p.add_argument("--backend", choices=("auto", *BACKENDS),
                   help="inference backend of the re-parameterised model (visionmix.deploy; auto times them on one "
                        "batch first and keeps the fastest that computes what eager does, inductor compiling for "
                        "tens of seconds; default eager, onnxruntime with --quantize)")
    p.add_argument("--quantize", choices=QUANTIZE, help="int8 Linear weights on onnxruntime (lossy: measure its top-1 "
                                                        "with 'visionmix eval --quantize int8' first)")
    p.add_argument("--json", action="store_true", help='one JSON object per line: {"path": ..., "top": '
                                                       '[{"class": ..., "index": ..., "prob": ...}, ...]}')
    p.set_defaults(run=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    import torch

    from visionmix.data.datasets import IMAGE_EXTENSIONS
    from visionmix.deployment import deploy
    from visionmix.predict import find_images, load_predictor, predict

    paths = find_images(args.images)
    model, transform, classes = load_predictor(args.checkpoint, model_name=args.model, classes_file=args.classes)
    backend = args.backend or ("onnxruntime" if args.quantize else "eager")
    deployed = deploy(model, torch.zeros(args.batch_size, transform.in_chans, *transform.size), backend,
                      quantize=args.quantize)
    if backend == "auto" and not args.quantize:
        print(f"{PROG}: backend {deployed.backend}: {deployed.reason}", file=sys.stderr, flush=True)
    model = deployed
    done = skipped = 0
    for result in predict(model, paths, transform=transform, classes=classes, topk=args.topk,
                          batch_size=args.batch_size):
        if result.error is not None:
            skipped += 1
            print(f"{PROG}: skipped: {result.error}", file=sys.stderr, flush=True)
        else:
            done += 1
            print(json.dumps(result.as_json()) if args.json else
                  f"{result.path}: " + ", ".join(f"{s.name} {100 * s.prob:.1f}%" for s in result.top), flush=True)
    if not done:
        found = (f"none of {skipped} image files could be read" if skipped
                 else f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
        raise ValueError(f"{found} in {' '.join(args.images)}")
    if skipped:
        print(f"{PROG}: classified {done} images, skipped {skipped}", file=sys.stderr)
    return 1 if skipped else 0


# ------------------------------------------------------------------------------------------------------- data
def _add_data_parser(subparsers: Any) -> None:
    from visionmix.data.pack import DEFAULT_SHARD_SIZE, FORMATS, IMAGE_FORMATS
    from visionmix.engine.config import count_arg

    p = add_command(subparsers, "data", "prepare datasets for streaming (pack)")
    p.set_defaults(run=_run_data, data_action=None)
    actions = p.add_subparsers(title="actions", metavar="ACTION")
    pack = add_command(actions, "pack", "pack an ImageFolder tree into tar shards, or Fashion-MNIST into files", """\
Pack SRC (an ImageFolder tree: SRC/train/<class>/* and SRC/val/<class>/* or SRC/test/<class>/*) into WebDataset tar
shards OUT_DIR/{train,val}-NNNNNN.tar plus OUT_DIR/info.json (classes, counts, channels, image size), which
WebDatasetSource reads. With --from fashion-mnist, write the installed Fashion-MNIST as greyscale PNG/JPEG files
(OUT_DIR/{train,val}/<index>_<class>/*) or shards. OUT_DIR must be new or empty; --force replaces only pack's own
files.

examples: visionmix data pack photos/ shards/ --shard-size 1000
          visionmix data pack --from fashion-mnist fm/ --image-size 32 --image-format jpeg""")
    pack.add_argument("paths", nargs="+", metavar="SRC OUT_DIR", help="the ImageFolder tree and the output "
                                                                      "directory (only OUT_DIR with --from)")
    pack.add_argument("--from", dest="source", choices=("fashion-mnist",),
                      help="pack a built-in dataset instead of SRC")
    pack.add_argument("--format", default=None, choices=FORMATS,
                      help="output layout (default: shards from SRC, imagefolder with --from)")
    pack.add_argument("--shard-size", type=count_arg, default=DEFAULT_SHARD_SIZE, help="samples per tar shard")
    pack.add_argument("--image-size", type=count_arg, default=28, help="with --from: square image size")
    pack.add_argument("--image-format", default="png", choices=IMAGE_FORMATS, help="with --from: file format")
    pack.add_argument("--max-samples", type=count_arg,
                      help="with --from: a fixed subset of this many images per split (default: all)")
    pack.add_argument("--data-dir", help="with --from: the dataset's directory (default: its usual place)")
    pack.add_argument("--force", action="store_true", help="replace pack's own files in OUT_DIR (others are kept)")
    pack.set_defaults(data_action="pack")


def _run_data(args: argparse.Namespace) -> int:
    from visionmix.data.pack import pack_fashion_mnist, pack_imagefolder

    if args.data_action != "pack":
        raise ValueError("data needs an action: visionmix data pack ... (see 'visionmix data --help')")
    if args.source is not None:
        if len(args.paths) != 1:
            raise ValueError(f"--from {args.source} takes one path, OUT_DIR; got {' '.join(args.paths)}")
        out = Path(args.paths[0])
        info = pack_fashion_mnist(out, image_size=args.image_size, image_format=args.image_format,
                                  layout=args.format or "imagefolder", shard_size=args.shard_size,
                                  data_dir=args.data_dir, max_samples=args.max_samples, force=args.force)
    else:
        if len(args.paths) != 2:
            raise ValueError(f"data pack takes SRC OUT_DIR (or --from DATASET OUT_DIR); got {' '.join(args.paths)}")
        if (args.format or "shards") != "shards":
            raise ValueError("--format imagefolder needs --from DATASET (SRC is already an ImageFolder tree)")
        given = [f"--{a.replace('_', '-')}" for a in ("max_samples", "data_dir") if getattr(args, a) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --from DATASET")
        info = pack_imagefolder(*args.paths, shard_size=args.shard_size, force=args.force)
    written = json.loads(Path(info).read_text())
    counts = {k: v["count"] for k, v in written["splits"].items()}
    summary = ", ".join(f"{split} {count:,}" for split, count in counts.items())
    _say(f"packed {summary} images into {Path(info).parent} (see {info})")
    return 0


# ------------------------------------------------------------------------------------------------------- main
COMMANDS: tuple[Callable[[Any], None], ...] = (_add_train_parser, _add_eval_parser, _add_models_parser,
                                               _add_bench_parser, _add_compare_parser, _add_export_parser,
                                               _add_predict_parser, _add_data_parser)


def build_parser() -> argparse.ArgumentParser:
    from visionmix import __version__

    parser = _Parser(prog=PROG, formatter_class=_Formatter,
                     description="Mixing layers, re-parameterisable blocks and fair comparisons of vision models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _one_line_warnings(previous: Callable[..., None]) -> Callable[..., None]:
    """``warnings.showwarning`` for the command line: visionmix's own warnings (an unreadable image skipped) as one
    line ``visionmix: warning: ...``; others as before."""

    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        from visionmix.errors import VisionmixWarning

        if issubclass(category, VisionmixWarning):
            print(f"{PROG}: warning: {_one_line(message)}", file=sys.stderr, flush=True)
        else:
            previous(message, category, *args, **kwargs)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Unless the user chose otherwise, sets ``OMP_WAIT_POLICY=PASSIVE`` for this process before it loads torch (when
    it has not already): idle OpenMP threads that spin instead of sleeping halve throughput on shared CPUs.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = shlex.join([PROG, *(sys.argv[1:] if argv is None else argv)])  # recorded in reports
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return 2
    from visionmix.engine import TrainingError, TrainingInterrupted
    from visionmix.errors import UserError

    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(warnings.showwarning)
            return args.run(args)
    except TrainingInterrupted as exc:
        print(f"{PROG}: {_one_line(exc)}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except TrainingError as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except (UserError, ValueError, OSError) as exc:  # the user's input or files: one line, no traceback
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
