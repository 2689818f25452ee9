"""A comparison is a plan of independent runs (:class:`RunSpec`); a launcher executes them.

Every launcher ends up calling the one entry point :func:`run_spec` for each run, so a run's weights do not depend on
which launcher ran it, only on its spec (with equal ``threads``: float reductions depend on the thread count):

- :class:`InlineLauncher` calls it in this process, one run after another (``--launcher inline``);
- :class:`LocalLauncher` runs ``--jobs`` worker processes at once (:func:`main` with ``--serve``, each kept for
  run after run), each with its own threads and, with CUDA, its own GPUs (``CUDA_VISIBLE_DEVICES``;
  ``--jobs-per-gpu`` runs share one);
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
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
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


class LocalLauncher:
    """``jobs`` runs at once, each slot with a worker process of its own (:class:`_Worker`).

    On CPU the default is one thread per run and as many jobs as cores (``threads_per_run`` given: cores / threads);
    with CUDA, every run gets ``procs_per_run`` GPUs of its own, or shares them with ``jobs_per_gpu - 1`` others,
    and ``jobs`` defaults to what the visible GPUs hold.
    """

    name = "local"

    def __init__(self, jobs: int | None = None, *, jobs_per_gpu: int = 1, procs_per_run: int = 1) -> None:
        from visionmix.checks import check_positive

        self.jobs = None if jobs is None else check_positive("jobs", jobs)
        self.jobs_per_gpu = check_positive("jobs_per_gpu", jobs_per_gpu)
        self.procs_per_run = check_positive("procs_per_run", procs_per_run)
        self.slots: list[dict[str, str]] = []  # the environment of each worker slot, set by prepare()

    def prepare(self, device_type: str, threads_per_run: int | None) -> int:
        check_procs(self.procs_per_run, device_type)
        cores = available_cores()
        if device_type == "cuda":
            gpus = visible_gpus()
            groups = [gpus[i:i + self.procs_per_run] for i in range(0, len(gpus) - self.procs_per_run + 1,
                                                                      self.procs_per_run)]
            capacity = len(groups) * self.jobs_per_gpu
            jobs = capacity if self.jobs is None else self.jobs
            if jobs > capacity:
                raise InvalidValue(f"--jobs {jobs} needs {jobs} GPU slots but {len(gpus)} visible GPU(s) with "
                                   f"--procs-per-run {self.procs_per_run} and --jobs-per-gpu {self.jobs_per_gpu} "
                                   f"give {capacity}; lower --jobs or raise --jobs-per-gpu")
            self.slots = [{"CUDA_VISIBLE_DEVICES": ",".join(groups[i // self.jobs_per_gpu])} for i in range(jobs)]
            threads = threads_per_run or max(1, cores // (jobs * self.procs_per_run))
        else:
            threads = threads_per_run or (max(1, cores // (self.jobs * self.procs_per_run)) if self.jobs else 1)
            jobs = self.jobs or max(1, cores // (threads * self.procs_per_run))
            self.slots = [{} for _ in range(jobs)]
        return threads

    def launch(self, specs: Sequence[RunSpec], out_dir: Path, on_done: Callable[[RunSpec], None],
               log: Callable[[str], None]) -> dict[str, str]:
        if not self.slots:
            raise RuntimeError("LocalLauncher.prepare() must be called before launch()")
        pending = list(specs)
        workers: dict[int, _Worker] = {}  # slot -> its worker process, kept for the slot's next run
        stop: dict[str, int] = {}

        def handler(signum: int, frame: object) -> None:
            if stop and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop waiting (each worker still saves on its own signal)
            busy = [w for w in workers.values() if w.spec is not None]
            if not stop:
                log(f"{signal.Signals(signum).name}: stopping {len(busy)} running run(s) at their next step "
                    f"(each saves a checkpoint)")
            stop.setdefault("signum", signum)
            for worker in busy:
                worker.signal(signal.SIGTERM)

        try:
            with handling_signals(handler):
                while (pending and not stop) or any(w.spec is not None for w in workers.values()):
                    for slot, env in enumerate(self.slots):
                        worker = workers.get(slot)
                        if pending and not stop and (worker is None or worker.spec is None):
                            spec = pending.pop(0)
                            if worker is None:
                                workers[slot] = worker = _Worker(spec, env)
                            worker.run(spec)
                    for slot, worker in list(workers.items()):
                        spec, status = worker.spec, worker.status()
                        if spec is None or status is None:
                            continue
                        if not stop or status not in _INTERRUPTED_CODES:
                            _check_worker(spec, status)
                            on_done(spec)
                        if status not in (0, 1):  # the worker died or stopped: the slot's next run gets a new one
                            worker.close()
                            del workers[slot]
                    time.sleep(0.05)
        finally:
            for worker in workers.values():
                worker.close()
        if stop:
            raise TrainingInterrupted(f"{signal.Signals(stop['signum']).name}: stopped the running runs (each saved "
                                      f"a checkpoint)", stop["signum"])
        return {}


_INTERRUPTED_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM)


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


# a worker's command (python -c): not ``-m visionmix.bench.launch``, which visionmix.bench's imports would load twice
_WORKER = "import sys; from visionmix.bench.launch import main; sys.exit(main())"


class _Worker:
    """A worker process of one slot (:func:`main` with ``--serve FD``), kept for run after run so
    each run does not pay Python's, torch's and the optimizer's start-up again: it reads one spec per line on its
    stdin, runs it with its output in that run's ``stdout.log``/``stderr.log``, and answers its exit status
    (:func:`main`'s) on the pipe ``FD``."""

    def __init__(self, first: RunSpec, env: Mapping[str, str]) -> None:
        threads = str(first.threads)
        environ = {**os.environ, **env, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                   LAUNCHED_AT_ENV: repr(time.time())}
        environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the command line sets it for itself
        self.answers, answer_fd = os.pipe()
        os.set_blocking(self.answers, False)
        run_dir = Path(first.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / STDOUT_FILE, "ab") as out, open(run_dir / STDERR_FILE, "ab") as err:  # until it serves
            self.process = subprocess.Popen([sys.executable, "-c", _WORKER, "--serve", str(answer_fd)],
                                            stdin=subprocess.PIPE, stdout=out, stderr=err, env=environ,
                                            pass_fds=(answer_fd,))
        os.close(answer_fd)
        self.spec: RunSpec | None = None  # the run it is on
        self.received = b""

    def run(self, spec: RunSpec) -> None:
        self.spec = spec
        self.process.stdin.write((spec.to_json() + "\n").encode())
        self.process.stdin.flush()

    def status(self) -> int | None:
        """The current run's exit status once it has ended (its answer, or how the process died), else ``None``;
        the worker is then free for the next run."""
        with suppress(BlockingIOError):  # nothing said yet
            self.received += os.read(self.answers, 64)
        if b"\n" in self.received:
            line, self.received = self.received.split(b"\n", 1)
            self.spec = None
            return int(line)
        code = self.process.poll()
        if code is None:
            return None
        self.spec = None
        return code or 1  # died without answering

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def close(self) -> None:
        """End the process (at once when it is idle: its stdin closes) and wait for it."""
        with suppress(OSError):  # it died: nothing to tell it
            self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.answers)


def _check_worker(spec: RunSpec, returncode: int) -> None:
    """A worker that ended a run without a summary or an error of its own (killed, out of memory) gets an error."""
    run_dir = Path(spec.run_dir)
    if returncode == 0 or (run_dir / ERROR_FILE).is_file() or (run_dir / SUMMARY_FILE).is_file():
        return
    how = f"killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exited with status {returncode}"
    record_error(spec, f"the worker process {how}", run_dir / STDERR_FILE)


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


def _serve(answer_fd: int) -> int:
    """A :class:`_Worker`'s loop: a spec per line on stdin, each run's output into its run directory, its status
    (0 finished, 1 failed, 128 + signal when SIGINT/SIGTERM stopped it after saving) on ``answer_fd``; stops after
    an interrupted run or at the end of stdin. A Ctrl-C reaches the trainer of a running run (it saves) and is
    ignored otherwise: the compare process stops the workers (SIGTERM, or the end of stdin when idle)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for line in sys.stdin:
        spec = RunSpec.from_json(line)
        redirect_output(Path(spec.run_dir))
        try:
            status = 0 if run_spec(spec, capture=True).error is None else 1
        except TrainingInterrupted as err:
            print(f"visionmix: {err}", file=sys.stderr, flush=True)
            status = 128 + err.signum
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(answer_fd, f"{status}\n".encode())
        if status > 1:
            return status
        os.environ[LAUNCHED_AT_ENV] = repr(time.time())  # the next run's start-up: the wait for it
    return 0


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


def main(argv: Sequence[str] | None = None) -> int:
    """A worker process of the local launcher: ``main(["--serve", FD])`` (:func:`_serve`)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 2 or args[0] != "--serve":
        print("usage: --serve FD (a worker process of visionmix compare --launcher local)", file=sys.stderr)
        return 2
    return _serve(int(args[1]))
