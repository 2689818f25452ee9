"""``--launcher local``: ``jobs`` runs at once on this machine, each in a worker process of its own slot.

:class:`LocalLauncher` gives each slot its threads and, with CUDA, its GPUs (``CUDA_VISIBLE_DEVICES``;
``--jobs-per-gpu`` runs share one); a slot's worker process (:class:`_Worker`, :func:`main` with ``--serve``) is kept
for run after run and calls :func:`visionmix.bench.launch.run_spec` for each, so its weights are those of any other
launcher with the same threads. Ctrl-C/SIGTERM stops the running runs through their save-on-signal path.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from pathlib import Path

from visionmix.bench import launch
from visionmix.engine.run_files import ERROR_FILE, STDERR_FILE, STDOUT_FILE, SUMMARY_FILE
from visionmix.errors import InvalidValue, TrainingInterrupted


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
        launch.check_procs(self.procs_per_run, device_type)
        cores = launch.available_cores()
        if device_type == "cuda":
            gpus = launch.visible_gpus()
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

    def launch(self, specs: Sequence[launch.RunSpec], out_dir: Path, on_done: Callable[[launch.RunSpec], None],
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
            with launch.handling_signals(handler):
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


# a worker's command (python -c): not ``-m visionmix.bench.local``, which visionmix.bench's imports would load twice
_WORKER = "import sys; from visionmix.bench.local import main; sys.exit(main())"


class _Worker:
    """A worker process of one slot (:func:`main` with ``--serve FD``), kept for run after run so
    each run does not pay Python's, torch's and the optimizer's start-up again: it reads one spec per line on its
    stdin, runs it with its output in that run's ``stdout.log``/``stderr.log``, and answers its exit status
    (:func:`main`'s) on the pipe ``FD``."""

    def __init__(self, first: launch.RunSpec, env: Mapping[str, str]) -> None:
        threads = str(first.threads)
        environ = {**os.environ, **env, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                   launch.LAUNCHED_AT_ENV: repr(time.time())}
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
        self.spec: launch.RunSpec | None = None  # the run it is on
        self.received = b""

    def run(self, spec: launch.RunSpec) -> None:
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


def _check_worker(spec: launch.RunSpec, returncode: int) -> None:
    """A worker that ended a run without a summary or an error of its own (killed, out of memory) gets an error."""
    run_dir = Path(spec.run_dir)
    if returncode == 0 or (run_dir / ERROR_FILE).is_file() or (run_dir / SUMMARY_FILE).is_file():
        return
    how = f"killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exited with status {returncode}"
    launch.record_error(spec, f"the worker process {how}", run_dir / STDERR_FILE)


def _serve(answer_fd: int) -> int:
    """A :class:`_Worker`'s loop: a spec per line on stdin, each run's output into its run directory, its status
    (0 finished, 1 failed, 128 + signal when SIGINT/SIGTERM stopped it after saving) on ``answer_fd``; stops after
    an interrupted run or at the end of stdin. A Ctrl-C reaches the trainer of a running run (it saves) and is
    ignored otherwise: the compare process stops the workers (SIGTERM, or the end of stdin when idle)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for line in sys.stdin:
        spec = launch.RunSpec.from_json(line)
        launch.redirect_output(Path(spec.run_dir))
        try:
            status = 0 if launch.run_spec(spec, capture=True).error is None else 1
        except TrainingInterrupted as err:
            print(f"visionmix: {err}", file=sys.stderr, flush=True)
            status = 128 + err.signum
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(answer_fd, f"{status}\n".encode())
        if status > 1:
            return status
        os.environ[launch.LAUNCHED_AT_ENV] = repr(time.time())  # the next run's start-up: the wait for it
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """A worker process of the local launcher: ``main(["--serve", FD])`` (:func:`_serve`)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 2 or args[0] != "--serve":
        print("usage: --serve FD (a worker process of visionmix compare --launcher local)", file=sys.stderr)
        return 2
    return _serve(int(args[1]))
