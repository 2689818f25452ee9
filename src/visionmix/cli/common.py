"""What every command of the ``visionmix`` command line shares: its name, help formatter, one-line usage errors,
and printing from the main process only."""

from __future__ import annotations

import argparse
import os
from typing import Any

PROG = "visionmix"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows ``(default: X)`` after every option whose default is meaningful (not None/False/suppressed)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if unset or "default" in text or not action.option_strings:
            return text
        return super()._get_help_string(action) or text


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{PROG}: error: {self.prog}: {message} (see '{self.prog} --help')\n")


def add_command(subparsers: Any, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    """A sub-command parser with the house formatter; ``description`` defaults to ``help``."""
    return subparsers.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)


def add_slurm_options(group: argparse._ArgumentGroup) -> None:
    """The ``sbatch`` options of ``--launcher slurm`` (``visionmix.bench.slurm``), shared by compare and train."""
    from visionmix.engine.config import count_arg

    group.add_argument("--slurm-partition", metavar="NAME", help="slurm: the partition (default: the cluster's)")
    group.add_argument("--slurm-time", type=count_arg, metavar="MIN",
                       help="slurm: time limit per job in minutes; a run that needs longer saves a checkpoint before "
                            "the limit, requeues itself and resumes (default: the partition's)")
    group.add_argument("--slurm-account", metavar="NAME", help="slurm: the account to charge")
    group.add_argument("--slurm-qos", metavar="NAME", help="slurm: the quality of service")
    group.add_argument("--slurm-constraint", metavar="FEATURES", help="slurm: node features, e.g. volta32gb")
    group.add_argument("--slurm-opt", action="append", metavar="KEY=VALUE",
                       help="slurm: any other sbatch option without its dashes, e.g. mem=16G (repeatable)")
    group.add_argument("--no-wait", action="store_true",
                       help="slurm: submit and return; run the same command again later to gather the results "
                            "(and resubmit runs that failed or were cancelled)")


def is_main_process() -> bool:
    """Whether this is rank 0 of a torchrun job (or not under torchrun): the process that prints."""
    return os.environ.get("RANK", "0") == "0"


def say(message: str) -> None:
    """Print ``message`` from the main process only (torchrun starts one process per device)."""
    if is_main_process():
        print(message, flush=True)
