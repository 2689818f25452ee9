"""The ``visionmix`` command line: one module per command (``add_parser(subparsers)`` builds its options,
``run(args) -> int`` parses nothing more, calls one library function and prints), and :func:`main`.

Errors a user can cause (:func:`visionmix.errors.is_user_error`: a bad option, missing data, a damaged file, a
directory another process holds) print one line ``visionmix: error: ...`` and exit with status 2; anything else is
a bug in visionmix and shows its traceback.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from visionmix.cli import bench, compare, data, evaluate, export, models, predict, train, weights
from visionmix.cli.common import PROG, HelpFormatter, Parser
from visionmix.errors import TrainingError, TrainingInterrupted, VisionmixWarning, is_user_error, one_line

COMMANDS = (train, evaluate, models, bench, compare, export, predict, data, weights)  # each module: add_parser(), run()


def build_parser() -> argparse.ArgumentParser:
    from visionmix import __version__

    parser = Parser(prog=PROG, formatter_class=HelpFormatter,
                     description="Mixing layers, re-parameterisable blocks and fair comparisons of vision models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def _one_line_warnings(previous: Callable[..., None]) -> Callable[..., None]:
    """``warnings.showwarning`` for the command line: visionmix's own warnings (an unreadable image skipped) as one
    line ``visionmix: warning: ...``; others as before."""

    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, VisionmixWarning):
            print(f"{PROG}: warning: {one_line(message)}", file=sys.stderr, flush=True)
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

    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(warnings.showwarning)
            return args.run(args)
    except TrainingInterrupted as exc:
        print(f"{PROG}: {one_line(exc)}", file=sys.stderr)
        return 128 + exc.signum
    except BrokenPipeError:  # the reader went away (``visionmix models | head``): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return 141
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except TrainingError as exc:
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:
        if not is_user_error(exc):  # a bug in visionmix: its traceback, and where to report it
            traceback.print_exc()
            print(f"{PROG}: this is a bug in visionmix; please report it with the traceback above", file=sys.stderr)
            return 1
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)  # the user's input or files: one line
        return 2
