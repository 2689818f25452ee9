"""``visionmix weights``: official weights for a machine without internet (convert a copied file)."""

from __future__ import annotations

import argparse
from typing import Any

from visionmix.cli.common import add_command
from visionmix.errors import InvalidValue


def add_parser(subparsers: Any) -> None:
    p = add_command(subparsers, "weights", "official weights for a machine without internet (convert)")
    p.set_defaults(run=run, weights_action=None)
    actions = p.add_subparsers(title="actions", metavar="ACTION")
    convert = add_command(actions, "convert", "convert a publisher's checkpoint file for a registered model", """\
Read FILE as create_model(..., checkpoint_path=FILE) reads it (a .pth wrapped under 'model' or 'state_dict', a
'module.' prefix, the official key layout; a pickle that would run code is refused), build --model with the
file's class count and input channels, load it strictly, and write DIR/<name>.safetensors (default DIR: FILE's
directory) with the model name, class count and the source file's sha256 in its metadata. The result loads with
create_model(NAME, num_classes=N, checkpoint_path=...) or 'visionmix train --init'. The files come from their
publishers under their licences.

example: visionmix weights convert spach_ms_conv_s.pth --model spach_ms_s_patch4_224_conv --to weights/""")
    convert.add_argument("file", metavar="FILE", help="the checkpoint (.pth/.pt/.bin/.ckpt/.safetensors)")
    convert.add_argument("--model", required=True, metavar="NAME", help="the registered model the file holds")
    convert.add_argument("--to", metavar="DIR", help="output directory (default: FILE's directory)")
    convert.add_argument("--force", action="store_true", help="replace an existing output file")
    convert.set_defaults(weights_action="convert")


def run(args: argparse.Namespace) -> int:
    from visionmix.weights import convert_weights

    if args.weights_action != "convert":
        raise InvalidValue("weights needs an action: visionmix weights convert ... (see 'visionmix weights --help')")
    out = convert_weights(args.file, args.model, to_dir=args.to, force=args.force)
    print(f"wrote {out}")
    return 0
