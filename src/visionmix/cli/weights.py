"""``visionmix weights``: official weights into the cache or a directory (download), or from a copied file
(convert)."""

from __future__ import annotations

import argparse
from typing import Any

from visionmix.cli.common import add_command
from visionmix.errors import InvalidValue


def add_parser(subparsers: Any) -> None:
    p = add_command(subparsers, "weights", "download released weights, or convert a publisher's file")
    p.set_defaults(run=run, weights_action=None)
    actions = p.add_subparsers(title="actions", metavar="ACTION")
    download = add_command(actions, "download", "download released weights into the cache (or a directory)", """\
Download the released weights NAME (a model's default tag) or NAME.TAG (see 'visionmix models --pretrained') into
the cache (Hugging Face Hub files: huggingface_hub's, $HF_HOME; others: $VISIONMIX_HOME, default
~/.cache/visionmix), verified where the publisher states a sha256, converted to .safetensors; with --to DIR also
copy them there as DIR/NAME.TAG.safetensors, for a machine without internet (there: create_model(NAME,
checkpoint_path=FILE)). The files come from their publishers under their licences.

example: visionmix weights download mixer_b16_224 mixer_l16_224.goog_in21k --to weights/""")
    download.add_argument("names", nargs="+", metavar="NAME[.TAG]", help="released weights to download")
    download.add_argument("--to", metavar="DIR", help="also copy each file into this directory")
    download.add_argument("--force", action="store_true", help="replace an existing file in DIR")
    download.set_defaults(weights_action="download")
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
    if args.weights_action == "convert":
        from visionmix.weights import convert_weights

        print(f"wrote {convert_weights(args.file, args.model, to_dir=args.to, force=args.force)}")
        return 0
    if args.weights_action == "download":
        from visionmix.weights import download_weights

        for name in args.names:
            print(f"{name}: {download_weights(name, to_dir=args.to, force=args.force)}", flush=True)
        return 0
    raise InvalidValue("weights needs an action: visionmix weights download|convert ... (see 'visionmix weights "
                       "--help')")
