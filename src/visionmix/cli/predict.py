"""``visionmix predict``: the top-k classes of image files with a run directory or a checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from visionmix.cli.common import PROG, add_command
from visionmix.errors import InvalidValue


def add_parser(subparsers: Any) -> None:
    from visionmix.deployment import BACKENDS, QUANTIZE
    from visionmix.engine.config import count_arg

    p = add_command(subparsers, "predict", "classify image files with a trained run or a checkpoint", """\
Print the top-k classes, with probabilities, of each image file (a directory is searched recursively, in sorted
order, and streamed: at most one batch of images is held). Images are decoded with Pillow (grey or RGB, as the
model takes) and given the model's evaluation transform: a run directory's image size and mean/std, or with
--model the pretrained_cfg of the registered model (resize to input_size / crop_pct, centre crop, mean/std).
A file that cannot be decoded is reported on stderr and skipped.

exit status: 0 every image was classified, 1 some were skipped, 2 none could be read or an argument is wrong.

With --model NAME --pretrained the model's released weights classify the images, with their evaluation transform
and label set (ImageNet-1k's class names).

examples: visionmix predict runs/mixer photos/ --topk 3 --json
          visionmix predict --model mixer_b16_224 --pretrained photos/""")
    p.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="run directory written by 'visionmix train', or with --model a checkpoint file "
                        "(.pth/.safetensors); with --pretrained the first image")
    p.add_argument("images", nargs="*", metavar="IMAGE_OR_DIR", help="image files and directories of them")
    p.add_argument("--model", metavar="NAME", help="the registered model whose weights the checkpoint file holds "
                                                   "(with --pretrained: NAME[.TAG] of released weights)")
    p.add_argument("--pretrained", action="store_true",
                   help="with --model: its released weights (downloaded once, see 'visionmix models --pretrained') "
                        "and their label set's class names (ImageNet-1k's shipped; class indices for others)")
    p.add_argument("--classes", metavar="FILE", help="with --model: the class names, one per line (required for a "
                                                     "checkpoint file: it holds none)")
    p.add_argument("--topk", type=count_arg, default=5, help="classes printed per image, at most the model's")
    p.add_argument("--batch-size", type=count_arg, default=32, help="images per forward pass")
    p.add_argument("--backend", choices=("auto", *BACKENDS),
                   help="inference backend of the re-parameterised model (visionmix.deploy; auto times them on one "
                        "batch first and keeps the fastest that computes what eager does, inductor compiling for "
                        "tens of seconds; default eager, onnxruntime with --quantize)")
    p.add_argument("--quantize", choices=QUANTIZE, help="int8 Linear weights on onnxruntime (lossy: measure its top-1 "
                                                        "with 'visionmix eval --quantize int8' first)")
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help="auto (CUDA when available), cpu, cuda or cuda:N: where the model runs (--quantize runs on the "
                        "CPU; onnxruntime on CUDA needs its CUDA provider)")
    p.add_argument("--json", action="store_true", help='one JSON object per line: {"path": ..., "top": '
                                                       '[{"class": ..., "index": ..., "prob": ...}, ...]}')
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from visionmix.data.decode import IMAGE_EXTENSIONS
    from visionmix.deployment import deploy, inference_device
    from visionmix.predict import find_images, load_predictor, predict

    images = [args.checkpoint, *args.images] if args.pretrained else args.images
    if not images:
        raise InvalidValue("predict needs image files or directories after the run directory or checkpoint")
    paths = find_images(images)
    model, transform, classes = load_predictor(None if args.pretrained else args.checkpoint, model_name=args.model,
                                               classes_file=args.classes)
    backend = args.backend or ("onnxruntime" if args.quantize else "eager")
    device = "cpu" if args.quantize else inference_device(args.device)
    deployed = deploy(model, torch.zeros(args.batch_size, transform.in_chans, *transform.size), backend,
                      quantize=args.quantize, device=device)
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
        raise InvalidValue(f"{found} in {' '.join(images)}")
    if skipped:
        print(f"{PROG}: classified {done} images, skipped {skipped}", file=sys.stderr)
    return 1 if skipped else 0
