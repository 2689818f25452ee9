"""``visionmix eval``: evaluate a run directory (top-1/5, per class, confusion matrix, deployed and int8 forms)."""

from __future__ import annotations

import argparse
from typing import Any

from visionmix.cli.common import add_command, say


def add_parser(subparsers: Any) -> None:
    from visionmix.deployment import QUANTIZE
    from visionmix.engine.config import EVAL_BATCH_SIZE, count_arg, count_or_zero_arg
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
    p.add_argument("--batch-size", type=count_arg, default=EVAL_BATCH_SIZE, help="evaluation batch size")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = cuda when available")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from visionmix.engine.distributed import resolve_device
    from visionmix.engine.evaluate import evaluate_run

    report = evaluate_run(args.checkpoint, split=args.split, deploy=args.deploy, quantize=args.quantize,
                          data_dir=args.data_dir, max_samples=args.max_eval_samples, weights=args.weights,
                          batch_size=args.batch_size, device=resolve_device(args.device))
    for form, record in report["forms"].items():
        say(f"{form:>8}: top-1 {record['top1']:.2f}%  top-5 {record['top5']:.2f}%  loss {record['loss']:.4f}  "
             f"({record['num_samples']} images, {record['params']:,} params)")
    per_class = zip(report["classes"], report["forms"]["trained"]["per_class"], strict=True)
    say("per class: " + ", ".join(f"{c} {a:.1f}%" for c, a in per_class if a is not None))
    for form, check in report["checks"].items():
        say(f"{form} vs trained: {'identical' if check['same_predictions'] else 'different'} predictions, top-1 "
             f"{check['top1_change']:+.2f} points, max |logit difference| {check['max_abs_logit_diff']:.2e} on the "
             f"first batch")
    say("wrote " + " and ".join(map(str, report["written"])))
    return 0
