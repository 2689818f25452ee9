"""visionmix.bench.slurm against a real Slurm cluster (scripts/slurm-local.sh, which `make test` starts): a comparison
as one job array gives the weights of the inline launcher bit for bit; jobs are recorded, followed, left running on
Ctrl-C and cancelled with --cancel; a run cancelled mid-way is reported and resubmitted; a job past its time limit
saves, requeues and resumes exactly; two processes per run equal torchrun's; bad input is one line, exit 2."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from comparisons import assert_same_comparison, results, weights
from visionmix.bench.compare import compare
from visionmix.bench.launch import InlineLauncher
from visionmix.cli import main
from visionmix.engine.run_files import RUN_FILE, SLURM_DIR

MODELS = ["resnet_nano", "mixer_nano"]
RECIPE = {"epochs": 1, "batch_size": 32, "max_train_samples": 64, "max_eval_samples": 32}
TRAIN = ["--data", "digits", "--epochs", "1", "--batch-size", "32", "--max-train-samples", "64",
         "--max-eval-samples", "32", "--no-progress"]
TINY = [*TRAIN, "--bench-batch-size", "4", "--bench-repeats", "2"]
SLURM = ["--launcher", "slurm", "--threads-per-run", "1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _cluster_reason() -> str | None:
    """Why the Slurm tests cannot run here, or ``None``."""
    try:
        import submitit  # noqa: F401
    except ImportError:
        return "submitit is not installed (pip install 'visionmix[slurm]')"
    if shutil.which("sbatch") is None:
        return "no Slurm here: start the local cluster with 'scripts/slurm-local.sh start' (root; make test does)"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    if ping.returncode != 0 or "UP" not in ping.stdout:
        return "the Slurm controller does not answer: run 'scripts/slurm-local.sh start' (root; make test does)"
    return None


@pytest.fixture(scope="module")
def cluster() -> None:
    reason = _cluster_reason()
    if reason:
        pytest.skip(reason)


def _jobs(out: Path) -> dict[str, str]:
    return json.loads((out / SLURM_DIR / "jobs.json").read_text())["jobs"]


def _state(job: str) -> str:
    """squeue's state of ``job``, or "" once Slurm has forgotten it."""
    result = subprocess.run(["squeue", "-h", "--states=all", "-j", job, "-o", "%T"], capture_output=True, text=True)
    return result.stdout.strip()


def _wait_for(condition, timeout: float = 120, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _epoch(run: Path) -> int:
    try:
        return json.loads((run / "checkpoint.json").read_text())["epoch"]
    except (OSError, ValueError, KeyError):
        return 0


def _visionmix(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "visionmix", *argv], env=ENV, capture_output=True, text=True,
                          timeout=600, **kwargs)


@pytest.fixture(scope="module")
def both(cluster, tmp_path_factory):
    """Two models x two seeds on digits at one thread per run, inline and as one Slurm job array."""
    out = tmp_path_factory.mktemp("slurm")
    logs: dict[str, list[str]] = {"inline": [], "slurm": []}
    compare(MODELS, out / "inline", data="digits", seeds=2, recipe=RECIPE, bench_batch_size=4, bench_repeats=2,
            progress=False, launcher=InlineLauncher(progress=False), threads_per_run=1, log=logs["inline"].append)
    argv = ["compare", "--models", ",".join(MODELS), *TINY, "--seeds", "2", *SLURM, "--out", str(out / "slurm")]
    result = _visionmix(*argv)
    assert result.returncode == 0, result.stderr
    return out, result.stdout.splitlines()


@pytest.mark.slow
def test_slurm_and_inline_give_identical_accuracies_and_bit_identicalweights(both):
    out, _ = both
    assert_same_comparison(out / "inline", out / "slurm", MODELS)


@pytest.mark.slow
def test_the_runs_go_as_one_job_array_recorded_and_followed(both):
    out, lines = both
    jobs = _jobs(out / "slurm")
    assert sorted(jobs) == sorted(str(out / "slurm" / "runs" / m / f"seed{s}") for m in MODELS for s in (0, 1))
    arrays = {job.split("_")[0] for job in jobs.values()}
    assert len(arrays) == 1 and sorted(job.split("_")[1] for job in jobs.values()) == ["0", "1", "2", "3"]
    assert any(line.startswith("Slurm: submitted 4 run(s) as job(s)") for line in lines)
    assert "Slurm: 0 pending, 0 running, 4 done, 0 failed" in lines
    assert sum(line.startswith("[") and "top-1" in line for line in lines) == 4
    meta = results(out / "slurm")["meta"]
    assert (meta["launcher"], meta["threads_per_run"]) == ("slurm", 1)
    attempt = json.loads((out / "slurm" / "runs" / "mixer_nano" / "seed1" / RUN_FILE).read_text())["attempts"][-1]
    assert attempt["launcher"] == "slurm" and attempt["environment"]["threads"] == 1 and attempt["startup_s"] > 0


@pytest.mark.slow
def test_no_wait_submits_and_returns_and_the_same_command_gathers(cluster, tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "--models", "resnet_nano", *TINY, *SLURM, "--no-wait", "--out", str(out)]
    first = _visionmix(*argv)
    assert first.returncode == 0, first.stderr
    job = _jobs(out)[str(out / "runs" / "resnet_nano" / "seed0")]
    assert f"not finished (Slurm job {job}, " in (out / "results.md").read_text()
    _wait_for(lambda: _state(job) not in ("PENDING", "RUNNING", "COMPLETING"), what=f"job {job} to end")
    second = _visionmix(*argv)
    assert second.returncode == 0, second.stderr
    assert "[1/1] resnet_nano seed 0: already done" in second.stdout and "submitted" not in second.stdout
    assert results(out)["models"][0]["status"] == "ok"


@pytest.mark.slow
def test_ctrl_c_leaves_the_jobs_running_and_cancel_cancels_them(cluster, tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "--models", "resnet_nano", *TINY, "--epochs", "40", *SLURM, "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "visionmix", *argv], env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    run = out / "runs" / "resnet_nano" / "seed0"
    _wait_for(lambda: _epoch(run) >= 1, what="the run's first epoch")
    first.send_signal(signal.SIGINT)
    stdout, stderr = first.communicate(timeout=60)
    assert first.returncode == 128 + signal.SIGINT, stderr
    job = _jobs(out)[str(run)]
    assert f"Slurm: left 1 job(s) running: {job}" in stdout
    assert "gather their results later: visionmix compare --models resnet_nano" in stdout
    assert f"or cancel them: visionmix compare --out {out} --cancel" in stdout
    assert _state(job) == "RUNNING"
    cancelled = _visionmix("compare", "--out", str(out), "--cancel")
    assert cancelled.returncode == 0 and cancelled.stdout.strip() == f"cancelled Slurm job(s) {job}"
    _wait_for(lambda: _state(job) in ("CANCELLED", ""), what=f"job {job} to be cancelled")
    assert 1 <= _epoch(run) < 40 and not (run / "summary.json").exists()  # it saved where it stopped


@pytest.mark.slow
def test_a_run_cancelled_mid_way_is_reported_and_resubmitted_by_the_next_invocation(cluster, tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "--models", "resnet_nano", *TINY, "--epochs", "12", "--seeds", "2", *SLURM, "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "visionmix", *argv], env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    victim = out / "runs" / "resnet_nano" / "seed0"
    _wait_for(lambda: _epoch(victim) >= 1, what="the run's first epoch")
    job = _jobs(out)[str(victim)]
    subprocess.run(["scancel", job], check=True)
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 1, stderr  # a run failed; the command itself did not
    rows = {r["seed"]: r for r in results(out)["runs"]}
    assert rows[0]["error"] == f"Slurm job {job} ended CANCELLED before the run finished", rows[0]
    assert rows[0]["log"] == str(victim / "stderr.log") and rows[1]["summary"] is not None
    assert f"[1/2] resnet_nano seed 0: failed: Slurm job {job} ended CANCELLED" in stdout
    stopped = _epoch(victim)
    assert 1 <= stopped < 12
    second = _visionmix(*argv)
    assert second.returncode == 0, second.stderr
    assert "[2/2] resnet_nano seed 1: already done" in second.stdout
    assert "Slurm: submitted 1 run(s)" in second.stdout and _jobs(out)[str(victim)] != job
    epochs = [json.loads(line)["epoch"] for line in (victim / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 13))  # resumed from the checkpoint the cancelled job saved, each epoch once
    assert len(json.loads((victim / RUN_FILE).read_text())["attempts"]) == 2


@pytest.mark.slow
def test_a_job_past_its_time_limit_requeues_and_ends_with_the_weights_of_an_uninterrupted_run(cluster, tmp_path):
    """--slurm-time 1 (SIGUSR2 30 s before the limit): ~65 s of training needs at least two jobs' time."""
    recipe = ["--epochs", "16", "--max-train-samples", "320"]
    reference = subprocess.Popen([sys.executable, "-m", "visionmix", "train", "--model", "resnet_nano", *TRAIN,
                                  *recipe, "--out", str(tmp_path / "reference")], env=ENV, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
    out = tmp_path / "cmp"
    result = _visionmix("compare", "--models", "resnet_nano", *TINY, *recipe, *SLURM, "--slurm-time", "1",
                        "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    run = out / "runs" / "resnet_nano" / "seed0"
    attempts = json.loads((run / RUN_FILE).read_text())["attempts"]
    assert len(attempts) >= 2 and len({a["started"] for a in attempts}) == len(attempts)
    assert f"requeued Slurm job {_jobs(out)[str(run)]}" in (run / "stdout.log").read_text()
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 17))
    assert weights(run) == weights(tmp_path / "reference")


@pytest.mark.slow
def test_a_run_of_two_processes_on_slurm_equals_torchrun_of_the_same_run(cluster, tmp_path):
    """--procs-per-run 2 on CPU: two tasks of one job, a gloo group over env:// from the job's environment."""
    out = tmp_path / "cmp"
    result = _visionmix("compare", "--models", "resnet_nano", *TINY, *SLURM, "--procs-per-run", "2",
                        "--out", str(out))
    assert result.returncode == 0, result.stderr
    run = out / "runs" / "resnet_nano" / "seed0"
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2
    assert len(json.loads((run / RUN_FILE).read_text())["attempts"]) == 1  # rank 0 alone records
    torchrun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "visionmix", "train", "--model", "resnet_nano", *TRAIN,
                               "--out", str(tmp_path / "torchrun")], env=ENV, capture_output=True, text=True,
                              timeout=300)
    assert torchrun.returncode == 0, torchrun.stderr
    assert weights(run) == weights(tmp_path / "torchrun")


@pytest.mark.slow
def test_train_on_slurm_gives_the_weights_of_an_inline_train(cluster, tmp_path):
    argv = ["train", "--model", "resnet_nano", *TRAIN]
    slurm = _visionmix(*argv, "--launcher", "slurm", "--nodes", "1", "--out", str(tmp_path / "slurm"))
    assert slurm.returncode == 0, slurm.stderr
    assert f"run directory {tmp_path / 'slurm'}" in slurm.stdout and "Slurm: submitted 1 run(s)" in slurm.stdout
    inline = _visionmix(*argv, "--out", str(tmp_path / "inline"))
    assert inline.returncode == 0, inline.stderr
    assert weights(tmp_path / "slurm") == weights(tmp_path / "inline")
    again = _visionmix(*argv, "--launcher", "slurm", "--out", str(tmp_path / "slurm"))  # the same command: gathers
    assert again.returncode == 0 and "submitted" not in again.stdout and "top-1" in again.stdout, again.stderr


def _one_line_exit_2(argv: list[str], capsys) -> str:
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    return err


def test_slurm_without_submitit_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit raises ImportError
    err = _one_line_exit_2(["compare", "--models", "resnet_nano", *TINY, *SLURM, "--out", str(tmp_path / "c")],
                           capsys)
    assert "--launcher slurm needs submitit: pip install 'visionmix[slurm]'" in err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(("options", "message"), [
    (["--launcher", "slurm", "--slurm-time", "0"], "--slurm-time: expected a positive whole number, got '0'"),
    (["--launcher", "local", "--slurm-partition", "gpu"], "--slurm-partition applies to --launcher slurm only"),
    (["--no-wait"], "--no-wait applies to --launcher slurm only"),
    (["--launcher", "slurm", "--jobs", "2"], "--jobs applies to --launcher local only"),
])
def test_bad_slurm_options_are_one_line_and_exit_2(tmp_path, capsys, options, message):
    pytest.importorskip("submitit")
    err = _one_line_exit_2(["compare", "--models", "resnet_nano", *TINY, *options, "--out", str(tmp_path / "c")],
                           capsys)
    assert message in err
    assert not (tmp_path / "c").exists()


def test_a_partition_that_does_not_exist_gets_slurms_own_message(cluster, tmp_path, capsys):
    err = _one_line_exit_2(["compare", "--models", "resnet_nano", *TINY, *SLURM, "--slurm-partition", "nope",
                            "--out", str(tmp_path / "c")], capsys)
    assert "Slurm refused the job" in err and "sbatch: error:" in err and "partition" in err.lower()
    assert not (tmp_path / "c").exists()


def test_train_refuses_slurm_options_without_the_slurm_launcher(tmp_path, capsys):
    err = _one_line_exit_2(["train", "--model", "resnet_nano", *TRAIN, "--nodes", "2", "--out", str(tmp_path / "t")],
                           capsys)
    assert "--nodes applies to --launcher slurm only" in err
