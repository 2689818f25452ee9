"""``visionmix export``: write a run's model as ONNX / a torch.export program, checked against PyTorch."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from visionmix.cli.common import add_command
from visionmix.errors import InvalidValue
from visionmix.files import check_new


def add_parser(subparsers: Any) -> None:
    from visionmix.engine.config import positive_number
    p = add_command(subparsers, "export", "export a trained run to ONNX / a torch.export program, checked against "
                    "PyTorch", """\
Export the model of a run directory (or, with --random-init, a registered model with random weights) to ONNX
(dynamo exporter, dynamic batch, weights in the one file) and/or a torch.export program (.pt2, which
torch.export.load(FILE).module() runs without visionmix). Each file is reloaded in its runtime (onnxruntime /
torch.export.load), run on random batches of two sizes and compared with PyTorch; it is kept only
if the max absolute difference is below --atol. --deploy exports visionmix.reparameterize(model) and first checks
that it computes what the trained model computes.

example: visionmix export runs/dbb --deploy --onnx dbb.onnx --pt2 dbb.pt2""")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="run directory written by 'visionmix train' (or a model name with --random-init)")
    p.add_argument("--onnx", metavar="FILE", help="write the ONNX model here")
    p.add_argument("--pt2", metavar="FILE", help="write the torch.export program (.pt2) here")
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
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from visionmix.export import deployed_for_export, export_onnx, export_program, randomize_weights

    if not (args.onnx or args.pt2):
        raise InvalidValue("export needs --onnx FILE and/or --pt2 FILE")
    if args.onnx and args.pt2 and Path(args.onnx).resolve() == Path(args.pt2).resolve():
        raise InvalidValue(f"--onnx and --pt2 name the same file {args.onnx}; give each its own")
    if not args.random_init and (args.img_size or args.in_chans or args.num_classes):
        raise InvalidValue("--img-size/--in-chans/--num-classes only apply with --random-init (a run's model keeps "
                           "the shape it was trained with)")
    for path in (args.onnx, args.pt2):
        check_new(path, args.force)
    if args.random_init:
        from visionmix.models import create_model

        model = create_model(args.checkpoint, img_size=args.img_size, in_chans=args.in_chans,
                             num_classes=args.num_classes)
        randomize_weights(model, torch.randn(8, *model.pretrained_cfg["input_size"]))
        source = f"{args.checkpoint} (random weights)"
    else:
        from visionmix.engine.run_files import load_run

        model, meta = load_run(args.checkpoint)
        source = f"{meta['model']} from {args.checkpoint}"
    example = torch.randn(args.batch_size, *model.pretrained_cfg["input_size"])
    checked = f"{args.batch_size}" if args.static_batch else f"{args.batch_size} and {args.batch_size + 1}"
    if args.deploy:
        model, equivalence = deployed_for_export(model, example)
        print(f"deployed vs trained: {equivalence}")
        source = f"{source}, deployed"
    for path, export, kind in ((args.onnx, export_onnx, "ONNX"), (args.pt2, export_program,
                                                                  "torch.export program")):
        if path:
            options = {"opset": args.opset} if export is export_onnx else {}
            diff = export(model, path, example, atol=args.atol, dynamic_batch=not args.static_batch,
                          force=args.force, **options)
            print(f"wrote {path}: {kind} of {source}; max |exported - PyTorch| = {diff:.2e} on batches of "
                  f"{checked} (atol {args.atol:g})")
    return 0
