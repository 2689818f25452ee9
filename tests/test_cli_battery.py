"""A hostile-input battery through the real command line, each case in its own ``python -m visionmix`` process.

Every case asserts: the documented exit code (2 for a user's mistake), no ``Traceback`` in the output, a one-line
message naming the argument or file at fault, and every file that existed before byte-identical afterwards (none
deleted, none overwritten, none added where a command was refused). Tiny data (digits, 64 images, fractions of an
epoch) keep the whole battery cheap enough for ``make test``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionmix.engine import TrainConfig, train
from visionmix.files import LOCK_FILE

pytestmark = pytest.mark.slow  # real processes: the test tier of make test, not of make test-fast

TINY = ["--data", "digits", "--max-train-samples", "64", "--max-eval-samples", "32", "--batch-size", "32",
        "--no-progress", "--device", "cpu"]
USER_FILES = {"summary.json": b"{}", "metrics.jsonl": b"mine\n", "eval.json": b"[]",
              "weights-best-model.safetensors": b"w", "state-of-the-art.pdf": b"%PDF", ".notes.tmp": b"n"}


def visionmix(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "visionmix", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def png_header(path: Path, side: int) -> None:
    """A 1 KB PNG whose header claims side x side grey pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(bytes(1000))) + chunk(b"IEND", b""))


def image_tree(root: Path, classes: tuple[str, ...]) -> Path:
    for split in ("train", "val"):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((8, 8), 40 * i, np.uint8), mode="L").save(root / split / cls / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-epoch run of resnet_nano on 64 digits (so a previous checkpoint exists)."""
    run = tmp_path_factory.mktemp("battery") / "run"
    train(TrainConfig(model="resnet_nano", data="digits", epochs=2, batch_size=32, max_train_samples=64,
                      max_eval_samples=32, device="cpu"), run, progress=False)
    return run


@pytest.fixture
def workspace(tmp_path: Path, finished_run: Path) -> Path:
    """A fresh copy of the finished run under ``tmp_path/run``, plus a user's directory ``tmp_path/mine``."""
    shutil.copytree(finished_run, tmp_path / "run")
    (tmp_path / "mine").mkdir()
    for name, data in USER_FILES.items():
        (tmp_path / "mine" / name).write_bytes(data)
    return tmp_path


def _weights(ws: Path) -> Path:
    return ws / "run" / json.loads((ws / "run" / "checkpoint.json").read_text())["files"]["weights"]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:64])


def _damage_weights(ws: Path) -> None:
    _truncate(_weights(ws))


def _damage_state(ws: Path) -> None:
    meta = json.loads((ws / "run" / "checkpoint.json").read_text())
    (ws / "run" / meta["files"]["state"]).write_bytes(b"PK\x03\x04 not a zip archive")


def _misfit_weights(ws: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(_weights(ws))
    state["linear.weight"] = state["linear.weight"][:3]
    save_file(state, _weights(ws))


def _damage_meta(ws: Path) -> None:
    (ws / "run" / "checkpoint.json").write_text('{"format": "visionmix-run/1", "files": ')


def _bomb_tree(ws: Path) -> None:
    image_tree(ws / "tree", ("a", "b"))
    png_header(ws / "tree" / "train" / "b" / "bomb.png", 50_000)


def _one_class_tree(ws: Path) -> None:
    image_tree(ws / "tree", ("only",))


def _user_report(ws: Path) -> None:
    (ws / "mine" / "results.md").write_text("# my own results\n")


def _user_shard(ws: Path) -> None:
    image_tree(ws / "tree", ("a", "b"))
    (ws / "mine" / "train-000000.tar").write_bytes(b"my own archive")


def _tree(ws: Path) -> None:
    image_tree(ws / "tree", ("a", "b"))


def _not_a_tar_shard(ws: Path) -> None:
    from visionmix.data.pack import pack_shards

    image_tree(ws / "tree", ("a", "b"))
    pack_shards(ws / "tree", ws / "shards", shard_size=2)
    (ws / "shards" / "train-000001.tar").write_bytes(b"<html>not found</html>")


def _text_pth(ws: Path) -> None:
    (ws / "mine" / "weights.pth").write_text("hello, these are not weights\n")


# (id, setup(ws) or None, argv with {ws} placeholders, exit code, fragments the one-line message must contain)
CASES = [
    ("epochs-zero", None, ["train", "--model", "resnet_nano", "--epochs", "0", "--out", "{ws}/new"], 2,
     ["--epochs", "expected a positive number of epochs, got '0'"]),
    ("time-budget-negative", None, ["train", "--model", "resnet_nano", "--time-budget", "-1", "--out", "{ws}/new"],
     2, ["--time-budget", "expected a positive number of minutes"]),
    ("lr-inf", None, ["train", "--model", "resnet_nano", *TINY, "--lr", "inf", "--out", "{ws}/new"], 2,
     ["lr must be in (0.0, 1.0], got inf"]),
    ("lr-huge", None, ["train", "--model", "resnet_nano", *TINY, "--lr", "1e30", "--out", "{ws}/new"], 2,
     ["lr must be in (0.0, 1.0], got 1e+30"]),
    ("image-size-huge", None, ["train", "--model", "resnet_nano", *TINY, "--image-size", "100000",
                               "--out", "{ws}/new"], 2, ["100000x100000 need", "in memory", "--image-size"]),
    ("unknown-model", None, ["train", "--model", "resnet_nan", *TINY, "--out", "{ws}/new"], 2,
     ["unknown model 'resnet_nan'", "resnet_nano"]),
    ("unknown-model-no-match", None, ["train", "--model", "zzzqqq", *TINY, "--out", "{ws}/new"], 2,
     ["unknown model 'zzzqqq'; list them with 'visionmix models'"]),
    ("resume-with-other-options", None, ["train", "--resume", "{ws}/run", "--lr", "5"], 2,
     ["--lr would be ignored"]),
    ("from-previous-without-resume", None, ["train", "--model", "resnet_nano", "--from-previous",
                                            "--out", "{ws}/new"], 2, ["--from-previous needs --resume"]),
    ("out-is-a-file", None, ["train", "--model", "resnet_nano", *TINY, "--out", "{ws}/mine/summary.json"], 2,
     ["exists and is not a directory"]),
    ("out-holds-user-files", None, ["train", "--model", "resnet_nano", *TINY, "--out", "{ws}/mine"], 2,
     ["is not empty", "--force"]),
    ("force-over-user-files", None, ["train", "--model", "resnet_nano", *TINY, "--force", "--out", "{ws}/mine"], 2,
     ["holds no visionmix run", "eval.json, metrics.jsonl, summary.json", "move them"]),
    ("out-holds-a-run", None, ["train", "--model", "resnet_nano", *TINY, "--out", "{ws}/run"], 2,
     ["already holds a training run", "--resume"]),
    ("one-class-folder", _one_class_tree, ["train", "--model", "resnet_nano", "--data", "imagefolder", "--data-dir",
                                           "{ws}/tree", "--no-progress", "--out", "{ws}/new"], 2,
     ["at least two; it has only one, 'only'"]),
    ("resume-damaged-weights", _damage_weights, ["train", "--resume", "{ws}/run"], 2,
     ["weights-", "is damaged: not a readable safetensors file", "the previous checkpoint (epoch 1, global step 2) "
      "is intact", "--from-previous"]),
    ("resume-damaged-state", _damage_state, ["train", "--resume", "{ws}/run"], 2,
     ["state-", "is damaged: not a readable training state"]),
    ("eval-damaged-weights", _damage_weights, ["eval", "--checkpoint", "{ws}/run"], 2,
     ["is damaged: not a readable safetensors file"]),
    ("eval-misfit-weights", _misfit_weights, ["eval", "--checkpoint", "{ws}/run"], 2,
     ["does not fit ResNet: 1 shape mismatches: linear.weight: checkpoint (3, "]),
    ("eval-damaged-meta", _damage_meta, ["eval", "--checkpoint", "{ws}/run"], 2,
     ["checkpoint.json is damaged: not valid JSON"]),
    ("eval-not-a-run", None, ["eval", "--checkpoint", "{ws}/mine"], 2, ["holds no checkpoint.json"]),
    ("export-damaged-weights", _damage_weights, ["export", "{ws}/run", "--onnx", "{ws}/m.onnx"], 2,
     ["is damaged: not a readable safetensors file"]),
    ("export-same-file-twice", None, ["export", "{ws}/run", "--onnx", "{ws}/m", "--pt2", "{ws}/m"], 2,
     ["--onnx and --pt2 name the same file"]),
    ("export-negative-atol", None, ["export", "{ws}/run", "--onnx", "{ws}/m.onnx", "--atol", "-1"], 2,
     ["--atol", "expected a positive number"]),
    ("export-over-a-user-file", None, ["export", "{ws}/run", "--onnx", "{ws}/mine/summary.json"], 2,
     ["already exists; pass --force"]),
    ("bench-unknown-backend", None, ["bench", "resnet_nano", "--backend", "jit,tensorrt"], 2,
     ["--backend", "expected backends among eager, channels_last, onnxruntime, inductor (or all)"]),
    ("bench-backend-with-deploy", None, ["bench", "resnet_nano", "--backend", "onnxruntime", "--deploy"], 2,
     ["does not combine with --deploy"]),
    ("bench-quantize-without-backend", None, ["bench", "mixer_nano", "--quantize", "int8"], 2,
     ["--quantize times the int8 form beside --backend's; pass --backend too"]),
    ("bench-quantize-int4", None, ["bench", "mixer_nano", "--backend", "onnxruntime", "--quantize", "int4"], 2,
     ["--quantize", "invalid choice: 'int4'"]),
    ("compare-seeds-zero", None, ["compare", "--models", "resnet_nano", "--seeds", "0", "--out", "{ws}/cmp"], 2,
     ["--seeds", "expected a positive whole number, got '0'"]),
    ("compare-unknown-model", None, ["compare", "--models", "resnet_nano,nope", *TINY, "--out", "{ws}/cmp"], 2,
     ["unknown model 'nope'"]),
    ("compare-bench-repeats-one", None, ["compare", "--models", "resnet_nano", *TINY, "--bench-repeats", "1",
                                         "--out", "{ws}/cmp"], 2, ["bench_repeats must be at least 2"]),
    ("compare-over-a-user-report", _user_report, ["compare", "--models", "resnet_nano", *TINY,
                                                  "--out", "{ws}/mine"], 2,
     ["is not empty", "holds no visionmix comparison", "--force"]),
    ("pack-force-over-a-user-shard", _user_shard, ["data", "pack", "{ws}/tree", "{ws}/mine", "--force"], 2,
     ["mine/train-000000.tar was not written by pack", "move it or choose another OUT_DIR"]),
    ("pack-into-its-source", _tree, ["data", "pack", "{ws}/tree", "{ws}/tree/train/shards"], 2,
     ["lies inside SRC", "choose an OUT_DIR outside it"]),
    ("pack-source-inside-out", _tree, ["data", "pack", "{ws}/tree/train", "{ws}/tree"], 2, ["lies inside OUT_DIR"]),
    ("shard-not-a-tar", _not_a_tar_shard, ["train", "--model", "resnet_nano", "--data", "webdataset", "--data-dir",
                                           "{ws}/shards", "--workers", "0", "--no-progress", "--out", "{ws}/new"], 2,
     ["shards/train-000001.tar is not a tar file", "re-run 'visionmix data pack'"]),
    ("init-a-text-file", _text_pth, ["train", "--model", "resnet_nano", *TINY, "--init", "{ws}/mine/weights.pth",
                                     "--out", "{ws}/new"], 2, ["weights.pth is damaged or not a .pth checkpoint"]),
]


@pytest.mark.parametrize("setup, argv, code, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input(workspace: Path, setup, argv: list[str], code: int, fragments: list[str]) -> None:
    if setup is not None:
        setup(workspace)
    before = snapshot(workspace)
    result = visionmix(*(a.format(ws=workspace) for a in argv), cwd=workspace)
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert "Traceback" not in output, output
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and message[0].startswith("visionmix: error: "), output
    for fragment in fragments:
        assert fragment.format(ws=workspace) in message[0], message[0]
    assert snapshot(workspace) == before  # nothing deleted, overwritten or added


def test_a_streamed_run_stops_at_its_bad_image_limit_naming_the_file(workspace: Path) -> None:
    """Streamed data are decoded while training, so the run directory exists (a step-0 checkpoint, resumable once
    the data are repaired); the one-line error names the file and the limit. One bad image within the limit is
    skipped with a one-line warning and the run finishes."""
    _bomb_tree(workspace)
    argv = ["train", "--model", "resnet_nano", "--data", "imagefolder", "--data-dir", str(workspace / "tree"),
            "--batch-size", "2", "--workers", "0", "--epochs", "1", "--no-progress"]
    result = visionmix(*argv, "--max-bad-images", "0", "--out", str(workspace / "strict"), cwd=workspace)
    message = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(message) == 1, result.stderr
    for fragment in ("1 unreadable images, more than max_bad_images=0", "bomb.png", "decompression bomb"):
        assert fragment in message[0]
    assert json.loads((workspace / "strict" / "checkpoint.json").read_text())["global_step"] == 0
    result = visionmix(*argv, "--out", str(workspace / "lenient"), cwd=workspace)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("visionmix: warning: ")]
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert len(warnings) == 1 and "bomb.png" in warnings[0]


def test_from_previous_recovers_a_damaged_run_and_force_keeps_the_users_files(workspace: Path) -> None:
    _damage_weights(workspace)
    result = visionmix("train", "--resume", str(workspace / "run"), "--from-previous", "--no-progress",
                       cwd=workspace)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert json.loads((workspace / "run" / "summary.json").read_text())["epochs_trained"] == 2
    assert visionmix("eval", "--checkpoint", str(workspace / "run"), cwd=workspace).returncode == 0
    (workspace / "run" / "notes.pdf").write_bytes(b"%PDF mine")
    result = visionmix("train", "--model", "resnet_nano", *TINY, "--epochs", "0.5", "--force",
                       "--out", str(workspace / "run"), cwd=workspace)
    assert result.returncode == 0, result.stderr
    assert (workspace / "run" / "notes.pdf").read_bytes() == b"%PDF mine"


def test_compare_force_writes_its_report_beside_the_users_files(workspace: Path) -> None:
    (workspace / "mine" / "results.md").write_text("# my own results\n")
    result = visionmix("compare", "--models", "resnet_nano", *TINY, "--epochs", "0.5", "--bench-repeats", "2",
                       "--bench-batch-size", "4", "--no-progress", "--force", "--out", str(workspace / "mine"),
                       cwd=workspace)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "| resnet_nano |" in (workspace / "mine" / "results.md").read_text()
    assert {n: (workspace / "mine" / n).read_bytes() for n in USER_FILES} == USER_FILES
    again = visionmix("compare", "--models", "resnet_nano", *TINY, "--epochs", "0.5", "--bench-repeats", "2",
                      "--bench-batch-size", "4", "--no-progress", "--out", str(workspace / "mine"), cwd=workspace)
    assert again.returncode == 0 and "already done" in again.stdout, again.stderr  # now it is a comparison of ours


def test_sigint_saves_and_exits_130_without_a_traceback(tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "visionmix", "train", "--model", "resnet_nano", "--data", "digits",
                             "--batch-size", "16", "--epochs", "3", "--no-progress", "--device", "cpu",
                             "--save-every", "5", "--out", str(run)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:  # wait for a checkpoint past step 0
        path = run / "checkpoint.json"
        if path.is_file() and json.loads(path.read_text())["global_step"] > 0:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in out + err, err
    assert "checkpoint saved; continue with: visionmix train --resume" in err
    meta = json.loads((run / "checkpoint.json").read_text())
    assert meta["global_step"] > 0 and not meta["finished"]
    assert all((run / name).is_file() for name in meta["files"].values())


def _start(*args: str, cwd: Path) -> subprocess.Popen[str]:
    """visionmix in a child process with SIGINT at its default, so that the tests' Ctrl-C reaches it (a suite
    started in the background of a shell without job control runs with SIGINT ignored, and children inherit that)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "visionmix", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)


def test_a_second_train_into_the_same_directory_is_refused_before_it_writes(tmp_path: Path) -> None:
    """A training into a run directory another training holds: one line naming the holder's PID, exit code 2,
    and the directory ends holding the first run alone (each of its epochs once)."""
    out = tmp_path / "run"
    argv = ["train", "--model", "resnet_nano", *TINY, "--out", str(out)]
    first = _start(*argv, "--epochs", "20", "--seed", "0", cwd=tmp_path)
    _wait_for(out / LOCK_FILE, first)
    second = visionmix(*argv, "--epochs", "2", "--seed", "1", cwd=tmp_path)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
    message = second.stderr.strip().splitlines()
    assert len(message) == 1 and f"is in use by visionmix train (PID {first.pid} on " in message[0], message
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["config"]["seed"] == 0 and meta["finished"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == list(range(1, 21))
    assert json.loads((out / "summary.json").read_text())["top1"] == lines[-1]["eval_top1"]


def test_two_trainings_started_together_leave_one_run(tmp_path: Path) -> None:
    """Started at the same instant (different seeds), one trains and the other is refused before it writes."""
    out = tmp_path / "run"
    procs = [_start("train", "--model", "resnet_nano", *TINY, "--epochs", "2", "--seed", str(seed), "--out",
                    str(out), cwd=tmp_path) for seed in (0, 1)]
    results = [(p.returncode, err) for p in procs for _, err in [p.communicate(timeout=300)]]
    assert sorted(code for code, _ in results) == [0, 2], results
    winner = [i for i, (code, _) in enumerate(results) if code == 0][0]
    refusal = results[1 - winner][1]
    assert "Traceback" not in refusal and ("is in use by visionmix train" in refusal
                                           or "already holds a training run" in refusal), refusal
    assert json.loads((out / "checkpoint.json").read_text())["config"]["seed"] == winner
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_second_compare_of_one_directory_is_refused(tmp_path: Path) -> None:
    argv = ["compare", "--models", "resnet_nano", *TINY, "--epochs", "10", "--bench-repeats", "2",
            "--bench-batch-size", "4", "--out", str(tmp_path / "cmp")]  # 10 epochs outlast the second's start-up
    first = _start(*argv, cwd=tmp_path)
    _wait_for(tmp_path / "cmp" / "runs" / "resnet_nano" / "seed0" / "checkpoint.json", first)
    second = visionmix(*argv, cwd=tmp_path)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
    assert f"cmp is in use by visionmix compare (PID {first.pid} on " in second.stderr
    _, err = first.communicate(timeout=180)
    assert first.returncode == 0, err
    lines = (tmp_path / "cmp" / "runs" / "resnet_nano" / "seed0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, 11))  # each epoch once: one writer


def test_a_decompression_bomb_as_the_first_image_is_skipped(tmp_path: Path) -> None:
    image_tree(tmp_path / "tree", ("a", "b"))
    png_header(tmp_path / "tree" / "train" / "a" / "0000.png", 50_000)  # sorts first: the channel probe meets it
    result = visionmix("train", "--model", "resnet_nano", "--data", "imagefolder", "--data-dir",
                       str(tmp_path / "tree"), "--batch-size", "2", "--workers", "0", "--epochs", "1",
                       "--no-progress", "--out", str(tmp_path / "run"), cwd=tmp_path)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("visionmix: warning: ")]
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert warnings and all("0000.png" in w and "decompression bomb" in w for w in warnings)  # once per loader


def test_channels_last_trains_a_model_with_dynamic_kernels(tmp_path: Path) -> None:
    result = visionmix("train", "--model", "condconv_resnet_nano", *TINY, "--epochs", "0.5", "--channels-last",
                       "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr


def test_pack_into_a_full_disk_is_one_line(tmp_path: Path) -> None:
    """ENOSPC: one line, nothing printed at shutdown, no temporary file left, the split marked incomplete."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (not root?): {mounted.stderr.strip()}")
    try:
        rng = np.random.default_rng(0)
        for cls in ("a", "b"):
            (tmp_path / "tree" / "train" / cls).mkdir(parents=True)
            for i in range(8):  # 8 x 2 x ~12 KB of noise: more than the disk holds
                Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
                    tmp_path / "tree" / "train" / cls / f"{i}.png")
        result = visionmix("data", "pack", str(tmp_path / "tree"), str(disk / "out"), cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "Traceback" not in result.stderr
        assert "No space left on device" in result.stderr and "Exception ignored" not in result.stderr
        leftovers = [p.name for p in (disk / "out").iterdir() if p.name.endswith(".tmp")]
        assert leftovers == [] and json.loads((disk / "out" / "info.json").read_text())["splits"]["train"] == \
            {"incomplete": True}
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_a_pack_stopped_midway_is_replaced_by_the_next_one(tmp_path: Path, sig: signal.Signals) -> None:
    """A pack killed while writing leaves its split marked incomplete (readers refuse it); the same command run
    again replaces everything it left, temporary files included, and no --force is needed for that."""
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "tree" / "train" / cls).mkdir(parents=True)
        for i in range(300):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                tmp_path / "tree" / "train" / cls / f"{i:03d}.png")
    argv = ["data", "pack", str(tmp_path / "tree"), str(tmp_path / "out"), "--shard-size", "10"]
    proc = _start(*argv, cwd=tmp_path)
    _wait_for(tmp_path / "out" / "train-000003.tar", proc)
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert json.loads((tmp_path / "out" / "info.json").read_text())["splits"]["train"] == {"incomplete": True}
    refused = visionmix("train", "--model", "resnet_nano", "--data", "webdataset", "--data-dir",
                        str(tmp_path / "out"), "--workers", "0", "--no-progress", "--out", str(tmp_path / "run"),
                        cwd=tmp_path)
    assert refused.returncode == 2 and "was being packed when the pack stopped" in refused.stderr, refused.stderr
    again = visionmix(*argv, cwd=tmp_path)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["info.json", *(f"train-{i:06d}.tar" for i in range(60))]


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of condconv_resnet_nano, whose grouped conv takes the batch size as its group count."""
    run = tmp_path_factory.mktemp("battery") / "cond"
    train(TrainConfig(model="condconv_resnet_nano", data="digits", epochs=0.5, batch_size=32, max_train_samples=64,
                      max_eval_samples=32, device="cpu"), run, progress=False)
    return run


@pytest.mark.parametrize("argv, fragments", [
    (["predict", "{run}", "{img}", "--backend", "onnxruntime"], ["onnxruntime: ExportError: ONNX export failed"]),
    (["predict", "{run}", "{img}", "--quantize", "int8"], ["onnxruntime: ExportError: ONNX export failed"]),
    (["eval", "--checkpoint", "{run}", "--quantize", "int8"], ["onnxruntime: ExportError: ONNX export failed"]),
    (["export", "{run}", "--onnx", "{tmp}/c.onnx"], ["ONNX export failed", "export a static batch"]),
    (["predict", "{run}", "{img}", "--model", "resnet_nano"], ["--model resnet_nano takes a checkpoint file"]),
    (["eval", "--checkpoint", "{run}", "--max-eval-samples", "-3"], ["--max-eval-samples", "expected a whole "
                                                                       "number >= 0, got '-3'"]),
], ids=["predict-onnxruntime", "predict-int8", "eval-int8", "export-dynamic-batch", "predict-run-with-model",
        "eval-negative-subset"])
def test_a_backend_that_cannot_take_the_model_is_one_line(cond_run: Path, tmp_path: Path, argv: list[str],
                                                          fragments: list[str]) -> None:
    """The inference surfaces on a model some backends cannot run (CondConv): one line naming the backend and why,
    exit code 2, nothing written."""
    Image.fromarray(np.full((28, 28), 90, np.uint8)).save(tmp_path / "img.png")
    before = snapshot(cond_run)
    result = visionmix(*(a.format(run=cond_run, img=tmp_path / "img.png", tmp=tmp_path) for a in argv), cwd=tmp_path)
    message = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(message) == 1 and all(f in message[0] for f in fragments), message
    assert snapshot(cond_run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]
