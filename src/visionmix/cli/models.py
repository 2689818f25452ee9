"""``visionmix models``: list registered models with parameters, MACs, input size and published top-1."""

from __future__ import annotations

import argparse
from typing import Any

from visionmix.cli.common import add_command
from visionmix.errors import InvalidValue


def add_parser(subparsers: Any) -> None:
    p = add_command(subparsers, "models", "list registered models with parameters and MACs", """\
List registered models matching PATTERN (fnmatch, e.g. '*_nano' or 'spach*'), with parameters at a 1000-class
head (10 classes and 1 channel for *_nano models), MACs (multiply-adds of one image: computed for small-input
models at their default input, the reference figure otherwise) and the published ImageNet top-1.""")
    p.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern of model names")
    p.add_argument("--pretrained", action="store_true",
                   help="list the released weights instead (create_model(NAME.TAG, pretrained=True)): tag, classes, "
                        "label set, reported top-1, licence; * marks a model's default tag")
    p.set_defaults(run=run)


def _released(pattern: str) -> int:
    import fnmatch

    from visionmix.models.pretrained import released_weights
    from visionmix.tables import format_table

    rows = [("weights", "classes", "labels", "top-1 (reported)", "licence", "source")]
    for w in released_weights().values():
        if fnmatch.fnmatchcase(w.model, pattern) or fnmatch.fnmatchcase(w.name, pattern):
            rows.append((w.name + (" *" if w.default else ""), str(w.num_classes), w.label_set,
                         "-" if w.top1 is None else f"{w.top1:g}", w.license, w.hf_hub_id or w.url))
    if len(rows) == 1:
        raise InvalidValue(f"no released weights match {pattern!r} (list them all with 'visionmix models "
                           f"--pretrained')")
    print(format_table(rows))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.pretrained:
        return _released(args.pattern)
    from visionmix.bench.profile import describe_model
    from visionmix.models import list_models
    from visionmix.tables import format_table, si_format

    names = list_models(args.pattern)
    if not names:
        raise InvalidValue(f"no registered model matches {args.pattern!r}")
    rows = [("model", "params", "MACs", "input", "top-1 (paper)")]
    for card in map(describe_model, names):
        rows.append((card.name, si_format(card.params) if card.params is not None else "?",
                     "?" if card.macs is None and card.params is None else si_format(card.macs),
                     "x".join(map(str, card.input_size)), "-" if card.top1 is None else f"{card.top1:.1f}"))
    print(format_table(rows))
    return 0
