"""``--launcher NAME``: the registry of launchers (:data:`LAUNCHERS`) and the default one for this machine.

The launchers themselves live in :mod:`visionmix.bench.launch` (inline), :mod:`visionmix.bench.local` (local
worker processes) and :mod:`visionmix.bench.slurm` (Slurm jobs through submitit); this module sits above them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from visionmix.bench import slurm
from visionmix.bench.launch import InlineLauncher, Launcher, visible_gpus
from visionmix.bench.local import LocalLauncher
from visionmix.checks import check_choice
from visionmix.errors import InvalidValue

SLURM_OPTIONS = ("slurm_partition", "slurm_time", "slurm_account", "slurm_qos", "slurm_constraint", "slurm_opt",
                 "nodes_per_run", "no_wait")


def _inline(options: Mapping[str, Any]) -> Launcher:
    _only_for("local", options, "jobs", "jobs_per_gpu")
    _only_for("slurm", options, *SLURM_OPTIONS)
    return InlineLauncher(options.get("procs_per_run") or 1, progress=options.get("progress", True))


def _local(options: Mapping[str, Any]) -> Launcher:
    _only_for("slurm", options, *SLURM_OPTIONS)
    return LocalLauncher(options.get("jobs"), jobs_per_gpu=options.get("jobs_per_gpu") or 1,
                         procs_per_run=options.get("procs_per_run") or 1)


def _slurm(options: Mapping[str, Any]) -> Launcher:
    _only_for("local", options, "jobs", "jobs_per_gpu")
    return slurm.make_launcher(options)  # needs submitit (visionmix[slurm]): the error names the extra


def _only_for(launcher: str, options: Mapping[str, Any], *names: str) -> None:
    given = [name for name in names if options.get(name) is not None and options.get(name) is not False]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise InvalidValue(f"{flag} applies to --launcher {launcher} only")


# --launcher NAME -> its factory, given the comparison's launcher options as the command line parsed them (jobs,
# jobs_per_gpu, procs_per_run, progress, and a launcher's own, e.g. slurm_partition); options of another launcher
# are an error. A launcher needing an optional package imports it in its factory (one line naming the extra if not).
LAUNCHERS: dict[str, Callable[[Mapping[str, Any]], Launcher]] = {"inline": _inline, "local": _local, "slurm": _slurm}


def default_launcher(options: Mapping[str, Any]) -> str:
    """``local`` where several GPUs are visible (one run per GPU) or ``jobs``/``jobs_per_gpu`` is given, else
    ``inline``."""
    local = any(options.get(name) is not None for name in ("jobs", "jobs_per_gpu")) or len(visible_gpus()) > 1
    return "local" if local else "inline"


def make_launcher(name: str | None = None, options: Mapping[str, Any] | None = None) -> Launcher:
    """The launcher ``name`` (default :func:`default_launcher`) built from ``options`` (see :data:`LAUNCHERS`)."""
    options = dict(options or {})
    name = name or default_launcher(options)
    check_choice("launcher", name, tuple(LAUNCHERS))
    return LAUNCHERS[name](options)
