"""visionmix.bench.launch and .local: the same comparison inline and on local worker processes gives the same
results and bit-identical weights; a failing run is a row with its error and log; provenance, time accounting and the
plan are recorded; bad launcher options are one line and exit status 2; SIGTERM stops local workers and a re-run
resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from comparisons import assert_same_comparison, results, weights
from visionmix.bench import launch
from visionmix.bench.compare import PLAN_FILE, compare
from visionmix.bench.launch import InlineLauncher
from visionmix.bench.launchers import LAUNCHERS, make_launcher
from visionmix.bench.local import LocalLauncher
from visionmix.cli import main
from visionmix.engine.run_files import RUN_FILE, STDERR_FILE

MODELS = ["resnet_nano", "mixer_nano", "mixer_s32_224"]  # the last cannot take 28 px: its runs fail
RECIPE = {"epochs": 1, "batch_size": 32, "max_train_samples": 64, "max_eval_samples": 32}
TINY = ["--data", "digits", "--epochs", "1", "--batch-size", "32", "--max-train-samples", "64",
        "--max-eval-samples", "32", "--bench-batch-size", "4", "--bench-repeats", "2", "--no-progress"]


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """The same comparison, 3 models x 2 seeds at one thread per run, inline and with two local workers."""
    out = tmp_path_factory.mktemp("launch")
    logs: dict[str, list[str]] = {"inline": [], "local": []}
    launchers = {"inline": InlineLauncher(progress=False), "local": LocalLauncher(2)}
    for name, launcher in launchers.items():
        compare(MODELS, out / name, data="digits", seeds=2, recipe=RECIPE, bench_batch_size=4, bench_repeats=2,
                progress=False, launcher=launcher, threads_per_run=1, log=logs[name].append)
    return out, logs


@pytest.mark.slow
def test_inline_and_local_give_identical_accuracies_and_bit_identicalweights(both):
    out, _ = both
    assert_same_comparison(out / "inline", out / "local", MODELS[:2])


@pytest.mark.slow
def test_a_failing_run_is_a_row_with_its_error_and_log_and_the_others_finish(both):
    out, logs = both
    report = results(out / "local")
    rows = {row["model"]: row for row in report["models"]}
    assert rows["resnet_nano"]["status"] == rows["mixer_nano"]["status"] == "ok"
    failed = rows["mixer_s32_224"]
    assert failed["status"] == "failed" and failed["top1"] is None
    for run in (r for r in report["runs"] if r["model"] == "mixer_s32_224"):
        log = out / "local" / "runs" / "mixer_s32_224" / f"seed{run['seed']}" / STDERR_FILE
        assert run["summary"] is None and run["error"] and run["log"] == str(log)
        assert "Traceback" in log.read_text() and f"(log: {log})" in failed["error"]
    failures = [line for line in logs["local"] if "mixer_s32_224" in line]
    assert len(failures) == 2 and all("failed: " in line and STDERR_FILE in line for line in failures)
    inline_failed = {r["model"]: r for r in results(out / "inline")["models"]}["mixer_s32_224"]
    assert inline_failed["status"] == "failed" and "train.log" in inline_failed["error"]  # inline: the engine's log


@pytest.mark.slow
def test_provenance_plan_and_time_accounting_are_recorded(both):
    out, _ = both
    for name in ("inline", "local"):
        meta = results(out / name)["meta"]
        assert (meta["launcher"], meta["threads_per_run"], meta["procs_per_run"]) == (name, 1, 1)
        env = meta["environment"]
        for key in ("visionmix", "git_commit", "torch", "mkl", "onednn", "cpu_model", "cpu_flags", "cpu_capability",
                    "threads"):
            assert key in env, key
        assert env["git_commit"] is None or len(env["git_commit"]) == 40
        plan = json.loads((out / name / PLAN_FILE).read_text())
        assert plan["launcher"] == name and len(plan["runs"]) == 6
        assert {(r["model"], r["seed"], r["threads"]) for r in plan["runs"]} == {(m, s, 1) for m in MODELS
                                                                                 for s in (0, 1)}
        record = json.loads((out / name / "runs" / "resnet_nano" / "seed1" / RUN_FILE).read_text())
        attempt = record["attempts"][-1]
        assert attempt["launcher"] == name and attempt["environment"]["threads"] == 1 and attempt["wall_s"] > 0
        assert record["spec"] == next(r for r in plan["runs"] if r["model"] == "resnet_nano" and r["seed"] == 1)
        timing = meta["time"]
        assert 0 < timing["training_share"] < 1 and set(timing["bench_s"]) == set(MODELS[:2])
        run = next(r for r in results(out / name)["runs"] if r["summary"])
        parts = ("data_load_s", "setup_s", "batches_s", "steps_s", "bn_s", "eval_s", "checkpoint_s")
        assert all(run["time"][p] >= 0 for p in parts) and run["time"]["steps_s"] > 0
        assert sum(run["time"][p] for p in parts) <= run["time"]["wall_s"] + 8 * 0.0005  # each rounded to 1 ms
    assert results(out / "local")["runs"][0]["time"]["startup_s"] > 0  # a worker process had to start


@pytest.mark.slow
def test_local_workers_are_kept_for_run_after_run(both):
    out, _ = both
    attempts = [json.loads((out / "local" / "runs" / m / f"seed{s}" / RUN_FILE).read_text())["attempts"][0]
                for m in MODELS for s in (0, 1)]
    assert len({a["pid"] for a in attempts}) == 2  # two slots; a run failing in Python keeps its worker
    startups = sorted(a["startup_s"] for a in attempts)
    assert startups[-1] > 1 and startups[:4] == [pytest.approx(0, abs=0.5)] * 4  # only the first two start python


@pytest.mark.slow
def test_a_rerun_launches_nothing_finished_and_retries_the_failures(both, capsys):
    out, _ = both
    argv = ["compare", "--models", ",".join(MODELS), *TINY, "--seeds", "2", "--jobs", "2", "--threads-per-run", "1",
            "--out", str(out / "local")]
    assert main(argv) == 1  # mixer_s32_224 still fails
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert sum("already done" in line for line in lines) == 4 and sum("failed" in line for line in lines) == 2


def test_a_signal_while_an_inline_run_ends_stops_the_comparison_before_the_next_run(monkeypatch, tmp_path):
    from visionmix.engine.train import _signal_flag
    from visionmix.errors import TrainingInterrupted

    ran = []

    def run_ending_as_the_signal_comes(spec, **kwargs):  # the trainer's handler holds it; the run then ends
        with _signal_flag() as flag:
            os.kill(os.getpid(), signal.SIGTERM)
            assert flag == {"signum": signal.SIGTERM}
        ran.append(spec.seed)

    monkeypatch.setattr(launch, "run_spec", run_ending_as_the_signal_comes)
    specs = [launch.RunSpec(model="resnet_nano", seed=seed, config={}, run_dir=str(tmp_path / str(seed)), threads=1)
             for seed in range(3)]
    before, done = signal.getsignal(signal.SIGTERM), []
    with pytest.raises(TrainingInterrupted, match="SIGTERM: stopped before the next run"):
        InlineLauncher(progress=False).launch(specs, tmp_path, done.append, print)
    assert ran == [0] and [s.seed for s in done] == [0]
    assert signal.getsignal(signal.SIGTERM) is before  # every handler restored


def test_local_slots_spread_runs_over_the_visible_gpus(monkeypatch):
    monkeypatch.setattr(launch, "visible_gpus", lambda: ["0", "1", "2", "3"])
    launcher = LocalLauncher(jobs_per_gpu=2)
    launcher.prepare("cuda", 1)
    assert [slot["CUDA_VISIBLE_DEVICES"] for slot in launcher.slots] == ["0", "0", "1", "1", "2", "2", "3", "3"]
    launcher = LocalLauncher(procs_per_run=2)
    launcher.prepare("cuda", 1)
    assert [slot["CUDA_VISIBLE_DEVICES"] for slot in launcher.slots] == ["0,1", "2,3"]
    with pytest.raises(ValueError, match=r"--jobs 3 needs 3 GPU slots but 4 visible GPU\(s\)"):
        LocalLauncher(3, procs_per_run=2).prepare("cuda", None)
    monkeypatch.setattr(launch, "available_cores", lambda: 8)
    cpu = LocalLauncher()
    assert cpu.prepare("cpu", None) == 1 and len(cpu.slots) == 8  # one thread per run, one run per core
    cpu = LocalLauncher(2)
    assert cpu.prepare("cpu", None) == 4 and len(cpu.slots) == 2
    cpu = LocalLauncher(procs_per_run=2)
    assert cpu.prepare("cpu", 2) == 2 and len(cpu.slots) == 2


def test_more_processes_per_run_than_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(launch, "visible_gpus", lambda: ["0"])
    for launcher in (InlineLauncher(2), LocalLauncher(procs_per_run=2)):
        with pytest.raises(ValueError, match="--procs-per-run 2 needs 2 GPUs .* but 1 is visible"):
            launcher.prepare("cuda", None)
    assert InlineLauncher(2).prepare("cpu", 1) == 1  # on CPU: gloo processes


@pytest.mark.parametrize(("options", "message"), [
    (["--jobs", "0"], "--jobs: expected a positive whole number, got '0'"),
    (["--threads-per-run", "0"], "--threads-per-run: expected a positive whole number, got '0'"),
    (["--procs-per-run", "-1"], "--procs-per-run: expected a positive whole number, got '-1'"),
    (["--launcher", "inline", "--jobs", "2"], "--jobs applies to --launcher local only"),
    (["--launcher", "nope"], "--launcher: invalid choice: 'nope'"),
])
def test_bad_launcher_options_are_one_line_and_exit_2(tmp_path, capsys, options, message):
    argv = ["compare", "--models", "resnet_nano", *TINY, *options, "--out", str(tmp_path / "cmp")]
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "cmp").exists()


def test_make_launcher_defaults_and_registration():
    assert make_launcher(None, {}).name == "inline"  # no GPUs here: one run after another
    assert make_launcher(None, {"jobs": 2}).name == "local"  # --jobs alone means the local launcher
    assert set(LAUNCHERS) >= {"inline", "local"}


@pytest.mark.slow
def test_sigterm_stops_local_workers_after_saving_and_a_rerun_resumes(tmp_path):
    out = tmp_path / "cmp"  # 3 runs on 2 workers: the third is still pending when the signal comes
    argv = ["compare", "--models", "resnet_nano", *TINY, "--epochs", "12", "--seeds", "3", "--jobs", "2",
            "--threads-per-run", "1", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-m", "visionmix", *argv], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    runs = [out / "runs" / "resnet_nano" / f"seed{seed}" for seed in (0, 1)]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None:
        metas = [json.loads((r / "checkpoint.json").read_text()) if (r / "checkpoint.json").is_file() else None
                 for r in runs]
        if all(m is not None and m["epoch"] >= 1 for m in metas):
            break
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, err
    assert "run the same 'visionmix compare' command again" in err
    for run in runs:  # each worker saved where it stopped, mid-run
        meta = json.loads((run / "checkpoint.json").read_text())
        assert 1 <= meta["epoch"] < 12 and not (run / "summary.json").exists()
    pending = out / "runs" / "resnet_nano" / "seed2"
    assert not (pending / "checkpoint.json").exists()  # not started after the signal
    second = subprocess.run([sys.executable, "-m", "visionmix", *argv], env=env, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr
    for run in runs:
        epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert epochs == list(range(1, 13))  # resumed, each epoch once
        assert len(json.loads((run / RUN_FILE).read_text())["attempts"]) == 2
    assert len(json.loads((pending / RUN_FILE).read_text())["attempts"]) == 1


@pytest.mark.slow
def test_a_killed_worker_is_a_failed_row_the_other_run_finishes_and_a_rerun_resumes(tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "--models", "resnet_nano", *TINY, "--epochs", "12", "--seeds", "2", "--jobs", "2",
            "--threads-per-run", "1", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-m", "visionmix", *argv], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    victim = out / "runs" / "resnet_nano" / "seed0"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None:
        if (victim / "checkpoint.json").is_file() and json.loads((victim / "checkpoint.json").read_text())["epoch"]:
            break
        time.sleep(0.05)
    os.kill(json.loads((victim / RUN_FILE).read_text())["attempts"][-1]["pid"], signal.SIGKILL)
    stdout, stderr = first.communicate(timeout=180)
    assert first.returncode == 1, stderr  # a run failed; the command itself did not
    rows = {r["seed"]: r for r in results(out)["runs"]}
    assert rows[0]["error"] == "the worker process killed by SIGKILL" and rows[0]["log"] == str(victim / STDERR_FILE)
    assert rows[1]["summary"] is not None and "seed 0: the worker process killed by SIGKILL" in stdout
    second = subprocess.run([sys.executable, "-m", "visionmix", *argv], env=env, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr
    assert "[2/2] resnet_nano seed 1: already done" in second.stdout
    epochs = [json.loads(line)["epoch"] for line in (victim / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 13))  # resumed from the checkpoint the killed worker left


@pytest.mark.slow
def test_a_run_of_two_processes_equals_torchrun_of_the_same_run(tmp_path):
    """--procs-per-run 2 on CPU: two gloo processes from torch's elastic launcher, as torchrun starts them."""
    compare(["resnet_nano"], tmp_path / "cmp", data="digits", recipe=RECIPE, bench_batch_size=4, bench_repeats=2,
            progress=False, launcher=InlineLauncher(2, progress=False), threads_per_run=1, log=lambda line: None)
    run = tmp_path / "cmp" / "runs" / "resnet_nano" / "seed0"
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2
    torchrun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "visionmix", "train", "--model", "resnet_nano", *TINY[:10], "--no-progress",
                               "--out", str(tmp_path / "torchrun")], env=dict(os.environ, OMP_NUM_THREADS="1"),
                              capture_output=True, text=True, timeout=300)
    assert torchrun.returncode == 0, torchrun.stderr
    assert weights(run) == weights(tmp_path / "torchrun")
