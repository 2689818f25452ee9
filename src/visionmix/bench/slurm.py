"""Runs as Slurm jobs, submitted with submitit (as DeiT's ``run_with_submitit.py`` and the UniFormer video code do):
``visionmix compare --launcher slurm`` (one job array per comparison) and ``visionmix train --launcher slurm``.

Every task of a run's job calls :class:`SlurmRun`, which calls the one per-run entry point
:func:`visionmix.bench.launch.run_spec`; a run of several processes joins its process group over ``env://`` from
the job's own environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` from
``submitit.JobEnvironment``). Slurm sends ``SIGUSR2`` ahead of the time limit (``--signal``) and on preemption:
the trainer then saves a checkpoint at the step it reached (its SIGTERM path) and the job requeues itself through
submitit's ``checkpoint()`` protocol; the requeued job resumes from that checkpoint, bit for bit.

The submitting side keeps ``<dir>/slurm/``: submitit's files (the pickled runs, Slurm's logs per job and task) and
``jobs.json``, which run directory went to which job. It follows the jobs with ``squeue`` (no accounting database
needed); a job that left the queue without a result in its run directory (cancelled, killed, out of time, node
failure) gets an ``error.json`` naming its Slurm state, and the next invocation submits it again, resuming.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from visionmix.bench.launch import RunSpec, gather, handling_signals, record_error, redirect_output, run_spec
from visionmix.checks import check_positive
from visionmix.engine.run_files import ERROR_FILE, SLURM_DIR, STDERR_FILE
from visionmix.errors import InvalidValue, TrainingInterrupted
from visionmix.files import atomic_write_json

JOBS_FILE = "jobs.json"  # <dir>/slurm/jobs.json: {"format", "jobs": {run_dir: job id}}
JOBS_FORMAT = "visionmix-slurm-jobs/1"
# squeue's states of a job that has not ended (a requeued job is PENDING again, under the same id)
ACTIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED",
                           "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "SUSPENDED", "RESV_DEL_HOLD"})
SIGNAL_DELAY_S = 90  # submitit's default: SIGUSR2 this long before the time limit (at most half of the limit)
POLL_S = 2.0


def submitit_module() -> Any:
    """``submitit``, or the one-line error naming the extra that installs it."""
    try:
        import submitit
    except ImportError:
        raise InvalidValue("--launcher slurm needs submitit: pip install 'visionmix[slurm]'") from None
    return submitit


class SlurmRun:
    """What every task of a run's Slurm job executes (pickled by submitit): :func:`run_spec` of its spec, in the
    process group of the job's tasks. Checkpointable in submitit's sense: on ``SIGUSR2`` (time limit near,
    preemption) the trainer saves at its next step, and :meth:`checkpoint` requeues the same run, which resumes."""

    def __call__(self, spec: RunSpec) -> str:
        import submitit

        env = submitit.JobEnvironment()
        if spec.procs > 1:
            os.environ.update({"RANK": str(env.global_rank), "WORLD_SIZE": str(env.num_tasks),
                               "LOCAL_RANK": str(env.local_rank), "MASTER_ADDR": env.hostnames[0],
                               "MASTER_PORT": str(_master_port(env.job_id))})
        if env.global_rank == 0:
            redirect_output(Path(spec.run_dir))
        outside = signal.getsignal(signal.SIGTERM)  # submitit's, which logs and ignores SIGTERM
        asked: list[int] = []

        def save_first(signum: int, frame: Any) -> None:
            asked.append(signum)
            if signal.getsignal(signal.SIGTERM) is outside:  # not training (yet, or any more): nothing to save
                _requeue(env)
            signal.raise_signal(signal.SIGTERM)  # the trainer saves at its next step and stops

        signal.signal(signal.SIGUSR2, save_first)
        try:
            outcome = run_spec(spec, capture=True)
        except TrainingInterrupted as err:
            print(f"visionmix: {err}", flush=True)
            if asked:
                _requeue(env)
            raise
        return "finished" if outcome.error is None else f"failed: {outcome.error}"

    def checkpoint(self, spec: RunSpec) -> Any:
        """The run again, as submitit requeues it when ``SIGUSR2`` comes before :meth:`__call__` took over (it
        resumes from the checkpoint in its run directory)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, spec)


def _requeue(env: Any) -> None:
    """Put this job back in the queue (rank 0; the others end with it) and leave: it starts again under its id."""
    if env.global_rank == 0:
        subprocess.run(["scontrol", "requeue", env.job_id], check=True, timeout=60)
        print(f"visionmix: requeued Slurm job {env.job_id}", flush=True)
        raise SystemExit(-1)


def _master_port(job_id: str) -> int:
    """A port every task of a job agrees on and jobs sharing a node rarely do: from the job's own id."""
    digits = "".join(c for c in job_id if c.isdigit()) or "0"
    return 20000 + int(digits) % 20000


def job_states(job_ids: Sequence[str]) -> dict[str, str]:
    """``{job id: Slurm state}`` from ``squeue`` (array tasks one by one, ended jobs while Slurm still lists them:
    ``MinJobAge``); a job Slurm no longer knows is absent."""
    if not job_ids:
        return {}
    arrays = sorted({job.split("_")[0] for job in job_ids})
    result = subprocess.run(["squeue", "--noheader", "--array", "--states=all", "--format=%i %T", "--jobs",
                             ",".join(arrays)], capture_output=True, text=True, timeout=60)
    if result.returncode != 0 and "Invalid job id" not in result.stderr:
        raise RuntimeError(f"squeue failed: {_slurm_message(result.stderr)}")
    states = dict(line.split()[:2] for line in result.stdout.splitlines() if len(line.split()) >= 2)
    return {job: states[job] for job in job_ids if job in states}


def _slurm_message(text: str) -> str:
    """The line of Slurm's output that says what went wrong (its last ``error:`` line), on one line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    return " ".join((errors or lines or ["(no message)"])[-1].split())


class SlurmLauncher:
    """Each run a Slurm job of ``procs_per_run`` tasks over ``nodes_per_run`` nodes (one GPU per task when the
    runs train on CUDA), all runs of one :meth:`launch` one job array; ``threads`` CPUs per task.

    ``partition``, ``time_min``, ``account``, ``qos``, ``constraint`` and ``options`` (any further ``sbatch``
    option, ``{"mem": "8G"}``) go to ``sbatch``; :meth:`prepare` has ``sbatch --test-only`` check them. With
    ``wait`` :meth:`launch` follows the jobs to their end, else it returns after submitting. ``command`` (the
    command line that submitted) is what it tells a user to run again to gather the results.
    """

    name = "slurm"
    remote = True  # the runs execute on the cluster's nodes: this machine's devices do not matter

    def __init__(self, procs_per_run: int = 1, *, nodes_per_run: int = 1, partition: str | None = None,
                 time_min: int | None = None, account: str | None = None, qos: str | None = None,
                 constraint: str | None = None, options: Mapping[str, str] | None = None, wait: bool = True,
                 command: str = "", poll_s: float = POLL_S) -> None:
        submitit_module()
        self.procs_per_run = check_positive("procs_per_run", procs_per_run)
        self.nodes_per_run = check_positive("nodes_per_run", nodes_per_run)
        if procs_per_run % nodes_per_run:
            raise InvalidValue(f"--procs-per-run {procs_per_run} must be a multiple of --nodes-per-run "
                               f"{nodes_per_run} (the same number of processes on every node)")
        self.time_min = None if time_min is None else check_positive("slurm_time", time_min)
        self.sbatch = {"partition": partition, "account": account, "qos": qos, "constraint": constraint,
                       **dict(options or {})}
        self.wait, self.command, self.poll_s = wait, command, poll_s
        self.parameters: dict[str, Any] = {}  # submitit's executor parameters, set by prepare()

    def prepare(self, device_type: str, threads_per_run: int | None) -> int:
        threads = threads_per_run or 1
        tasks_per_node = self.procs_per_run // self.nodes_per_run
        parameters: dict[str, Any] = {"nodes": self.nodes_per_run, "ntasks_per_node": tasks_per_node,
                                      "cpus_per_task": threads, "time": self.time_min}
        if device_type == "cuda":
            parameters["gpus_per_node"] = tasks_per_node
        extra = {key: value for key, value in self.sbatch.items() if value is not None}
        _check_sbatch({k: v for k, v in parameters.items() if v is not None}, extra)
        self.parameters = {**parameters, "additional_parameters": extra}
        return threads

    def launch(self, specs: Sequence[RunSpec], out_dir: Path, on_done: Callable[[RunSpec], None],
               log: Callable[[str], None]) -> dict[str, str]:
        folder = Path(out_dir) / SLURM_DIR
        jobs = read_jobs(out_dir)
        states = job_states([jobs[s.run_dir] for s in specs if s.run_dir in jobs])
        queued = {s.run_dir for s in specs if states.get(jobs.get(s.run_dir, ""), "") in ACTIVE_STATES}
        new = [s for s in specs if s.run_dir not in queued]
        if queued:
            log(f"Slurm: {len(queued)} run(s) already in the queue: " +
                ", ".join(f"{jobs[r]} {states[jobs[r]]}" for r in sorted(queued)))
        if new:
            for spec in new:
                (Path(spec.run_dir) / ERROR_FILE).unlink(missing_ok=True)  # an earlier attempt's: it runs again
            for run_dir, job in zip((s.run_dir for s in new), self._submit(new, folder), strict=True):
                jobs[run_dir] = job
            write_jobs(out_dir, jobs)
            log(f"Slurm: submitted {len(new)} run(s) as job(s) {_ids([jobs[s.run_dir] for s in new])} "
                f"(logs in {folder})")
        if not self.wait:
            states = job_states([jobs[s.run_dir] for s in specs])
            log(f"Slurm: not waiting; gather the results later with: {self.command or 'the same command'}")
            return {s.run_dir: f"Slurm job {jobs[s.run_dir]}, {states.get(jobs[s.run_dir], 'submitted')}"
                    for s in specs}
        return self._follow(specs, jobs, out_dir, on_done, log)

    def _submit(self, specs: Sequence[RunSpec], folder: Path) -> list[str]:
        """Submit ``specs`` as one job array (one job for one run); their job ids."""
        submitit = submitit_module()
        executor = submitit.SlurmExecutor(folder=folder)
        limit = self.parameters.get("time")
        threads = self.parameters["cpus_per_task"]
        executor.update_parameters(
            job_name=f"visionmix-{specs[0].model}" if len(specs) == 1 else "visionmix-compare",
            signal_delay_s=SIGNAL_DELAY_S if limit is None else min(SIGNAL_DELAY_S, limit * 60 // 2),
            array_parallelism=len(specs),
            setup=[f"export OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads}",
                   "export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}",
                   "export VISIONMIX_LAUNCHED_AT=$(date +%s.%N)"],
            **self.parameters)
        try:
            with executor.batch():
                submitted = [executor.submit(SlurmRun(), spec) for spec in specs]
        except Exception as err:  # sbatch refused: its own message
            raise InvalidValue(f"Slurm refused the submission: {_slurm_message(str(err))}") from err
        return [job.job_id for job in submitted]

    def _follow(self, specs: Sequence[RunSpec], jobs: dict[str, str], out_dir: Path,
                on_done: Callable[[RunSpec], None], log: Callable[[str], None]) -> dict[str, str]:
        """Wait for every run's job, reporting each run as it ends and the counts as they change; on SIGINT or
        SIGTERM stop waiting, leaving the jobs running."""
        waiting = {s.run_dir: s for s in specs}
        stop: dict[str, int] = {}
        shown = ""

        def handler(signum: int, frame: object) -> None:
            stop.setdefault("signum", signum)

        with handling_signals(handler):
            while waiting and not stop:
                states = job_states([jobs[r] for r in waiting])
                for run_dir, spec in list(waiting.items()):
                    state = states.get(jobs[run_dir], "")
                    if state in ACTIVE_STATES:
                        continue
                    del waiting[run_dir]
                    _check_ended(spec, jobs[run_dir], state or "UNKNOWN (Slurm no longer lists it)", out_dir)
                    on_done(spec)
                line = _progress(specs, jobs, states)
                if line != shown:
                    log(line)
                    shown = line
                if waiting:
                    _sleep(self.poll_s, stop)
        if stop:
            left = _ids([jobs[r] for r in waiting])
            log(f"Slurm: left {len(waiting)} job(s) running: {left}")
            log(f"  gather their results later: {self.command or 'the same visionmix command'}")
            log(f"  or cancel them: {cancel_command(out_dir)}")
            raise TrainingInterrupted(f"{signal.Signals(stop['signum']).name}: stopped waiting; Slurm jobs {left} "
                                      f"go on", stop["signum"])
        return {}


def _sleep(seconds: float, stop: Mapping[str, int]) -> None:
    end = time.monotonic() + seconds
    while not stop and time.monotonic() < end:
        time.sleep(0.1)


def _progress(specs: Sequence[RunSpec], jobs: Mapping[str, str], states: Mapping[str, str]) -> str:
    """``Slurm: 1 pending (12_3), 2 running (12_1, 12_2), 1 done, 0 failed``."""
    groups: dict[str, list[str]] = {"pending": [], "running": [], "done": [], "failed": []}
    for spec in specs:
        job, state = jobs[spec.run_dir], states.get(jobs[spec.run_dir], "")
        if state in ("RUNNING", "COMPLETING"):
            groups["running"].append(job)
        elif state in ACTIVE_STATES:
            groups["pending"].append(job)
        else:
            groups["done" if gather(spec).summary is not None else "failed"].append(job)
    return "Slurm: " + ", ".join(f"{len(ids)} {name}" + (f" ({_ids(ids)})" if ids and name != "done" else "")
                                 for name, ids in groups.items())


def _ids(job_ids: Sequence[str]) -> str:
    return ", ".join(job_ids)


def _check_ended(spec: RunSpec, job: str, state: str, out_dir: Path) -> None:
    """A job that ended without its run saying how (finished or failed) gets an error naming its Slurm state."""
    outcome = gather(spec)
    if outcome.summary is not None or (Path(spec.run_dir) / ERROR_FILE).is_file():
        return
    log = Path(spec.run_dir) / STDERR_FILE
    if not log.is_file():  # it never started: Slurm's own log of the job
        log = Path(out_dir) / SLURM_DIR / f"{job}_0_log.err"
    record_error(spec, f"Slurm job {job} ended {state} before the run finished", log)


def _check_sbatch(parameters: Mapping[str, Any], extra: Mapping[str, Any]) -> None:
    """``sbatch --test-only`` of a job with these resources: Slurm's own one-line answer if it would refuse it (a
    partition, account or QOS that does not exist, more CPUs than a node has)."""
    flags = {**{k.replace("_", "-"): v for k, v in parameters.items()},
             **{k.replace("_", "-"): v for k, v in extra.items()}}
    command = ["sbatch", "--test-only", *(f"--{k}={v}" for k, v in flags.items()), "--wrap=true"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise InvalidValue("--launcher slurm needs Slurm's sbatch on the PATH (run it on the cluster's login node)"
                           ) from None
    if result.returncode != 0:
        raise InvalidValue(f"Slurm refused the job ({shlex.join(command[2:-1])}): "
                           f"{_slurm_message(result.stderr)}")


def read_jobs(out_dir: Path) -> dict[str, str]:
    """``{run_dir: job id}`` of the runs submitted from ``out_dir`` (empty when none was)."""
    try:
        record = json.loads((Path(out_dir) / SLURM_DIR / JOBS_FILE).read_text())
        return dict(record["jobs"]) if record.get("format") == JOBS_FORMAT else {}
    except (OSError, ValueError, TypeError, KeyError):
        return {}


def write_jobs(out_dir: Path, jobs: Mapping[str, str]) -> None:
    atomic_write_json(Path(out_dir) / SLURM_DIR / JOBS_FILE, {"format": JOBS_FORMAT, "jobs": dict(jobs)})


def cancel_command(out_dir: Path) -> str:
    return shlex.join(["visionmix", "compare", "--out", str(out_dir), "--cancel"])


def cancel(out_dir: Path) -> list[str]:
    """``scancel`` the jobs submitted from ``out_dir`` that have not ended (each saves a checkpoint first: the next
    invocation resumes it); the ids cancelled."""
    jobs = read_jobs(out_dir)
    if not jobs:
        raise InvalidValue(f"--out {out_dir} has no Slurm jobs ({SLURM_DIR}/{JOBS_FILE} lists none)")
    states = job_states(list(jobs.values()))
    active = [job for job in jobs.values() if states.get(job) in ACTIVE_STATES]
    if active:
        result = subprocess.run(["scancel", *active], capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"scancel failed: {_slurm_message(result.stderr)}")
    return active


def make_launcher(options: Mapping[str, Any]) -> SlurmLauncher:
    """The launcher of ``--launcher slurm`` from the command line's options (see :data:`visionmix.bench.launchers.
    LAUNCHERS`)."""
    extra = dict(_key_value(item) for item in options.get("slurm_opt") or ())
    return SlurmLauncher(options.get("procs_per_run") or 1, nodes_per_run=options.get("nodes_per_run") or 1,
                         partition=options.get("slurm_partition"), time_min=options.get("slurm_time"),
                         account=options.get("slurm_account"), qos=options.get("slurm_qos"),
                         constraint=options.get("slurm_constraint"), options=extra,
                         wait=not options.get("no_wait"), command=options.get("command_line", ""))


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise InvalidValue(f"--slurm-opt expects KEY=VALUE (an sbatch option without its dashes, e.g. mem=8G), "
                           f"got {item!r}")
    return key.strip().lstrip("-"), value
