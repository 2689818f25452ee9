"""``visionmix data pack``: pack an ImageFolder tree into tar shards, or a built-in dataset into files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from visionmix.cli.common import add_command, say
from visionmix.errors import InvalidValue


def add_parser(subparsers: Any) -> None:
    from visionmix.data.pack import DEFAULT_SHARD_SIZE, FORMATS, IMAGE_FORMATS
    from visionmix.engine.config import count_arg

    p = add_command(subparsers, "data", "prepare datasets for streaming (pack)")
    p.set_defaults(run=run, data_action=None)
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


def run(args: argparse.Namespace) -> int:
    from visionmix.data.pack import pack_fashion_mnist, pack_imagefolder

    if args.data_action != "pack":
        raise InvalidValue("data needs an action: visionmix data pack ... (see 'visionmix data --help')")
    if args.source is not None:
        if len(args.paths) != 1:
            raise InvalidValue(f"--from {args.source} takes one path, OUT_DIR; got {' '.join(args.paths)}")
        out = Path(args.paths[0])
        info = pack_fashion_mnist(out, image_size=args.image_size, image_format=args.image_format,
                                  layout=args.format or "imagefolder", shard_size=args.shard_size,
                                  data_dir=args.data_dir, max_samples=args.max_samples, force=args.force)
    else:
        if len(args.paths) != 2:
            raise InvalidValue(f"data pack takes SRC OUT_DIR (or --from DATASET OUT_DIR); got {' '.join(args.paths)}")
        if (args.format or "shards") != "shards":
            raise InvalidValue("--format imagefolder needs --from DATASET (SRC is already an ImageFolder tree)")
        given = [f"--{a.replace('_', '-')}" for a in ("max_samples", "data_dir") if getattr(args, a) is not None]
        if given:
            raise InvalidValue(f"{', '.join(given)} only apply with --from DATASET")
        info = pack_imagefolder(*args.paths, shard_size=args.shard_size, force=args.force)
    written = json.loads(Path(info).read_text())
    counts = {k: v["count"] for k, v in written["splits"].items()}
    summary = ", ".join(f"{split} {count:,}" for split, count in counts.items())
    say(f"packed {summary} images into {Path(info).parent} (see {info})")
    return 0
