"""A comparison is a plan of independent runs (:class:`RunSpec`); a launcher executes them.

Every launcher ends up calling the one entry point :func:`run_spec` for each run, so a run's weights do not depend on
which launcher ran it, only on its spec (with equal ``threads``: float reductions depend on the thread count):

- :class:`InlineLauncher` calls it in this process, one run after another (``--launcher inline``);
- :class:`visionmix.bench.local.LocalLauncher` runs ``--jobs`` worker processes at once (each kept for run after
  run), each with its own threads and, with CUDA, its own GPUs (``--launcher local``);
- :mod:`visionmix.bench.slurm` submits it with submitit (``--launcher slurm``); :mod:`visionmix.bench.launchers`
  names them all.

A run of several processes (``procs`` > 1) is started by :func:`run_spec` itself with torch's elastic launcher
(``torch.distributed.run``'s API) when the environment has no process group yet; under Slurm every task calls
:func:`run_spec` with ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` already set and trains directly.

A run directory tells how its run ended, whichever launcher ran it (:func:`gather`): ``summary.json`` (the engine's,
finished) or ``error.json`` (failed: the error and the path of the log holding the traceback). Beside the engine's
files a launcher keeps ``run.json`` (the spec and, per attempt, where it ran: :func:`visionmix.bench.profile.
environment` and the time it took to start) and, for a run in a worker process, ``stdout.log``/``stderr.log``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from visionmix.bench.results import RunOutcome
from visionmix.engine.run_files import ERROR_FILE, RUN_FILE, STDERR_FILE, STDOUT_FILE, SUMMARY_FILE
from visionmix.errors import InvalidValue, TrainingInterrupted, is_user_error

LAUNCHED_AT_ENV = "VISIONMIX_LAUNCHED_AT"  # time.time() when a launcher started the process: its start-up time
SPEC_FORMAT = "visionmix-run-spec/1"


@dataclass(frozen=True)
class RunSpec:
    """One run of a comparison: ``config`` is the whole ``TrainConfig`` (``dataclasses.asdict``), trained into
    ``run_dir`` with ``threads`` intra-op threads per process and ``procs`` processes (DDP). Picklable and JSON-able
    (:meth:`to_json`)."""

    model: str
    seed: int
    config: dict[str, Any]
    run_dir: str
    threads: int
    procs: int = 1
    launcher: str = "inline"  # recorded in the run's provenance

    def to_json(self) -> str:
        return json.dumps({"format": SPEC_FORMAT, **asdict(self)})

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        values = json.loads(text)
        if values.pop("format", None) != SPEC_FORMAT:
            raise InvalidValue(f"not a visionmix run spec ({SPEC_FORMAT}): {text[:80]!r}")
        return cls(**values)

    @property
    def name(self) -> str:
        return f"{self.model} seed {self.seed}"


class Launcher(Protocol):
    """Executes run specs. ``name`` goes into every run's provenance and the comparison's ``plan.json``. A launcher
    whose runs train on other machines (Slurm) also sets ``remote = True``: ``compare`` then does not resolve the
    recipe's device on this one."""

    name: str
    procs_per_run: int

    def prepare(self, device_type: str, threads_per_run: int | None) -> int:
        """Check that the launcher's layout fits runs on ``device_type`` (``"cpu"``/``"cuda"``), raising
        :class:`~visionmix.errors.InvalidValue` naming the option if not; return the threads per run
        (``threads_per_run``, or the launcher's default for ``None``). Called once, before :meth:`launch`."""
        ...

    def launch(self, specs: Sequence[RunSpec], out_dir: Path, on_done: Callable[[RunSpec], None],
               log: Callable[[str], None]) -> dict[str, str]:
        """Execute ``specs`` (none finished yet), calling ``on_done(spec)`` as each ends (finished or failed: the
        run directory says which, :func:`gather`). Returns ``{run_dir: where}`` for runs left running on purpose
        (a Slurm submission without waiting), else ``{}``. A run the launcher saw fail without :func:`run_spec`
        saying why (a worker killed, a job cancelled) gets an ``error.json`` from it (:func:`record_error`).
        SIGINT/SIGTERM: stop the runs through their save-on-signal path, then raise ``TrainingInterrupted``."""
        ...


def available_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def visible_gpus() -> list[str]:
    """The CUDA devices this process sees, as ``CUDA_VISIBLE_DEVICES`` names them (none without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    named = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    count = torch.cuda.device_count()
    return named[:count] if named else [str(i) for i in range(count)]


def check_procs(procs: int, device_type: str) -> None:
    """A run of ``procs`` processes needs that many GPUs on CUDA (on CPU, gloo processes share the cores)."""
    if device_type == "cuda" and procs > len(visible_gpus()):
        raise InvalidValue(f"--procs-per-run {procs} needs {procs} GPUs (one per process), but {len(visible_gpus())} "
                           f"is visible; lower --procs-per-run or train on --device cpu")


class InlineLauncher:
    """Every run in this process, one after another (today's behaviour): progress bars on the console."""

    name = "inline"

    def __init__(self, procs_per_run: int = 1, *, progress: bool = True) -> None:
        from visionmix.checks import check_positive

        self.procs_per_run = check_positive("procs_per_run", procs_per_run)
        self.progress = progress

    def prepare(self, device_type: str, threads_per_run: int | None) -> int:
        import torch

        check_procs(self.procs_per_run, device_type)
        return threads_per_run or max(1, torch.get_num_threads() // self.procs_per_run)

    def launch(self, specs: Sequence[RunSpec], out_dir: Path, on_done: Callable[[RunSpec], None],
               log: Callable[[str], None]) -> dict[str, str]:
        stop: dict[str, int] = {}

        def handler(signum: int, frame: object) -> None:  # between runs, or passed on by a run that was ending
            if stop and signum == signal.SIGINT:
                raise KeyboardInterrupt
            stop.setdefault("signum", signum)

        with handling_signals(handler):
            for spec in specs:
                if stop:
                    raise TrainingInterrupted(f"{signal.Signals(stop['signum']).name}: stopped before the next run",
                                              stop["signum"])
                run_spec(spec, capture=False, progress=self.progress)
                on_done(spec)
        return {}


class handling_signals:
    """``handler`` for SIGINT/SIGTERM within the block (from the main thread only; elsewhere nothing changes)."""

    def __init__(self, handler: Callable[[int, object], None]) -> None:
        self.handler, self.previous = handler, {}

    def __enter__(self) -> None:
        import threading

        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def __exit__(self, *exc: object) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


def record_error(spec: RunSpec, error: str, log: str | Path) -> None:
    """Say in ``spec``'s run directory that it failed with ``error`` (one line), its traceback or output in ``log``."""
    from visionmix.files import atomic_write_json

    atomic_write_json(Path(spec.run_dir) / ERROR_FILE, {"error": error, "log": str(log)})


def gather(spec: RunSpec, note: str | None = None) -> RunOutcome:
    """How ``spec``'s run stands, from its directory: finished (its ``summary.json``), failed (``error.json``), or
    not finished (``note`` says where it runs, if a launcher left it running)."""
    run_dir = Path(spec.run_dir)
    try:
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
        if _same_recipe(summary["config"], spec.config):  # else: trained with another recipe, not this run
            return RunOutcome(spec.model, spec.seed, summary=summary, time=run_time(spec, summary))
    except (OSError, ValueError, TypeError, KeyError):
        pass
    try:
        failed = json.loads((run_dir / ERROR_FILE).read_text())
        return RunOutcome(spec.model, spec.seed, error=failed["error"], log=failed["log"])
    except (OSError, ValueError, TypeError, KeyError):
        return RunOutcome(spec.model, spec.seed, error=f"not finished ({note or 'not run'})")


def run_time(spec: RunSpec, summary: Mapping[str, Any]) -> dict[str, float]:
    """Where a finished run's time went, summed over its attempts: ``startup_s`` (its process starting, before
    :func:`run_spec`), the trainer's parts (``summary["time"]``: data, setup, batches, steps, BN, evaluation,
    checkpoints), ``wall_s`` (of :func:`run_spec`) and ``other_s`` (what none of them covers); a run trained
    before this accounting has only ``train_time_s``."""
    try:
        attempts = json.loads((Path(spec.run_dir) / RUN_FILE).read_text())["attempts"]
    except (OSError, ValueError, TypeError, KeyError):
        attempts = []
    parts = dict(summary.get("time") or {})
    startup = sum(a.get("startup_s", 0.0) for a in attempts)
    wall = sum(a.get("wall_s", 0.0) for a in attempts)
    result = {"startup_s": startup, **parts, "train_time_s": summary["train_time_s"], "wall_s": wall}
    if parts and wall:
        result["other_s"] = max(0.0, wall - sum(parts.values()))
    return {k: round(v, 3) for k, v in result.items()}


def _same_recipe(saved: Mapping[str, Any], config: Mapping[str, Any]) -> bool:
    """Whether a run trained with ``saved`` is the run of ``config`` (the device may differ, as on resuming)."""
    return {k: v for k, v in saved.items() if k != "device"} == {k: v for k, v in config.items() if k != "device"}


def describe(err: BaseException) -> str:
    """A failure in a results row: a user error's message (as the command line prints it), else ``Type: message``
    (a bug, whose traceback is kept in a log)."""
    return (str(err) if is_user_error(err) else f"{type(err).__name__}: {err}").splitlines()[0]


def _record_attempt(spec: RunSpec, wall_s: float | None = None) -> None:
    """Append this attempt's provenance (where it ran, how long the process took to start) to ``run.json``; with
    ``wall_s``, say instead how long the attempt (the last one) took."""
    from visionmix.bench.profile import environment
    from visionmix.files import atomic_write_json

    path = Path(spec.run_dir) / RUN_FILE
    try:
        record = json.loads(path.read_text())
        attempts = record["attempts"] if record.get("spec") == asdict(spec) else []
    except (OSError, ValueError, TypeError, KeyError):
        attempts = []
    if wall_s is not None:
        if attempts:
            attempts[-1]["wall_s"] = round(wall_s, 3)
            atomic_write_json(path, {"spec": asdict(spec), "attempts": attempts})
        return
    launched = os.environ.get(LAUNCHED_AT_ENV)
    attempt = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "launcher": spec.launcher,
               "host": socket.gethostname(), "pid": os.getpid(),
               "startup_s": round(time.time() - float(launched), 3) if launched else 0.0, "environment": environment()}
    atomic_write_json(path, {"spec": asdict(spec), "attempts": [*attempts, attempt]})


def run_spec(spec: RunSpec, *, capture: bool = True, progress: bool = False) -> RunOutcome:
    """Train ``spec`` into its run directory with ``spec.threads`` threads, resuming what is there (a finished run
    returns at once). Every launcher calls this. A failure is recorded in ``error.json`` (its traceback in the log:
    ``stderr.log`` with ``capture``, which says the process's output goes there, else the engine's ``train.log``)
    and returned; ``TrainingInterrupted`` (SIGINT/SIGTERM, checkpoint saved) propagates."""
    import torch

    from visionmix.engine import run_files

    run_dir = Path(spec.run_dir)
    main = int(os.environ.get("RANK", "0")) == 0  # under Slurm every task of a run calls this; rank 0 writes
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ERROR_FILE).unlink(missing_ok=True)
    log = run_dir / (STDERR_FILE if capture else run_files.LOG_FILE)
    threads = torch.get_num_threads()
    started = time.perf_counter()
    try:
        torch.set_num_threads(spec.threads)
        if main:
            _record_attempt(spec)
        if spec.procs > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            summary = _elastic_train(spec)
        else:
            summary = _train(spec.config, spec.run_dir, spec.threads, progress)
    except TrainingInterrupted:
        raise
    except Exception as err:  # the run's row says what went wrong; the other runs go on
        if capture:
            traceback.print_exc()
        if main:
            record_error(spec, describe(err), log)
        return RunOutcome(spec.model, spec.seed, error=describe(err), log=str(log))
    finally:
        torch.set_num_threads(threads)
        if main:
            _record_attempt(spec, wall_s=time.perf_counter() - started)
    return RunOutcome(spec.model, spec.seed, summary=summary)


def _train(config: dict[str, Any], run_dir: str, threads: int, progress: bool = False) -> dict[str, Any]:
    """One process's part of a run (also the entry point of every rank under the elastic launcher)."""
    import torch

    from visionmix.engine import TrainConfig, train

    torch.set_num_threads(threads)
    return train(TrainConfig.from_dict(config), run_dir, resume=True, progress=progress)


def _elastic_train(spec: RunSpec) -> dict[str, Any]:
    """``spec.procs`` processes on this machine, started as ``torchrun --standalone --nproc_per_node=procs`` does
    (gloo on CPU, one GPU each on CUDA); rank 0's summary."""
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=spec.procs, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn")
    try:
        results = elastic_launch(config, _train)(spec.config, spec.run_dir, spec.threads)
    except ChildFailedError as err:
        failures = list(err.failures.values())
        first = failures[0] if failures else None
        message = first.message if first is not None and isinstance(first.message, str) else str(err)
        raise RuntimeError(f"a process of the run failed: {' '.join(message.split())[:300]}") from err
    return results[0]


def redirect_output(run_dir: Path) -> None:
    """This process's stdout and stderr (the file descriptors: torch's and C's output too) into ``run_dir``'s
    ``stdout.log``/``stderr.log``, appended."""
    run_dir.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    for name, target in ((STDOUT_FILE, 1), (STDERR_FILE, 2)):
        fd = os.open(run_dir / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        os.dup2(fd, target)
        os.close(fd)
