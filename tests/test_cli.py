"""The command line: help texts, one-line user errors (exit 2, no traceback), train -> eval --deploy on digits,
the model listing, the OMP_WAIT_POLICY default, ``python -m visionmix``, and a short real Fashion-MNIST run."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from visionmix.cli import build_parser, main
from visionmix.data import FASHION_MNIST_DIR, build_dataset
from visionmix.models import create_model, model_entry

pytestmark = pytest.mark.usefixtures("tiny_models")  # tiny_test_net / tiny_test_dbb, for this module


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as exc:  # argparse's own exits (--help, usage errors)
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", ["train", "eval", "models", "bench", "predict"])
def test_help_explains_every_option_with_its_default(capsys: pytest.CaptureFixture[str], command: str) -> None:
    rc, out, _ = run(capsys, command, "--help")
    assert rc == 0
    text = " ".join(out.split())
    for action in subcommands()[command]._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.option_strings[-1] in text
        assert action.help, f"{action.option_strings} has no help"
        if action.default not in (None, False, argparse.SUPPRESS) and action.default != []:
            assert f"(default: {action.default})" in text, action.option_strings
    if command == "train":
        assert "(default: 128)" in text and "(default: fashion-mnist)" in text and "(default: the model's own)" in text


def test_user_errors_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    base = ["--data", "digits", "--no-progress", "--max-train-samples", "64", "--batch-size", "32"]
    existing = tmp_path / "existing"
    assert run(capsys, "train", "--model", "tiny_test_net", *base, "--epochs", "1", "--out", str(existing))[0] == 0
    cases = {
        "unknown model 'resnet_nanoo'": ["train", "--model", "resnet_nanoo", *base, "--out", str(tmp_path / "a")],
        "Fashion-MNIST train split not found": ["train", "--model", "tiny_test_net", "--data-dir", str(tmp_path),
                                                "--out", str(tmp_path / "b")],
        "cifar10 needs --data-dir": ["train", "--model", "tiny_test_net", "--data", "cifar10", "--out",
                                     str(tmp_path / "c")],
        "already holds a training run": ["train", "--model", "tiny_test_net", *base, "--out", str(existing)],
        "rejected its arguments": ["train", "--model", "tiny_test_net", *base, "--model-arg", "bogus=1", "--out",
                                   str(tmp_path / "d")],
        "exceeds the 64 training images": ["train", "--model", "tiny_test_net", "--data", "digits",
                                           "--max-train-samples", "64", "--out", str(tmp_path / "e")],
        "not a visionmix run directory": ["eval", "--checkpoint", str(tmp_path)],
        "--epochs: expected a positive number of epochs, got 'x'": ["train", "--epochs", "x"],
        "--epochs: expected a positive number of epochs, got '0'": ["compare", "--epochs", "0", "--out", "o"],
        "--time-budget: expected a positive number of minutes, got '-1'": ["train", "--time-budget", "-1"],
        "--time-budget: expected a positive number of minutes, got 'inf'": ["train", "--time-budget", "inf"],
        "no registered model matches": ["models", "zzz*"],
        "needs --model and --out": ["train", "--model", "tiny_test_net"],
    }
    for expected, argv in cases.items():
        rc, out, err = run(capsys, *argv)
        assert rc == 2, (argv, err)
        assert err.count("\n") == 1 and err.startswith("visionmix: error: ") and expected in err, err
        assert "Traceback" not in err and out == ""


def test_train_then_eval_deploy(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    rc, out, _ = run(capsys, "train", "--model", "tiny_test_dbb", "--data", "digits", "--max-train-samples", "128",
                     "--batch-size", "32", "--epochs", "1", "--lr", "0.01", "--out", str(run_dir), "--no-progress")
    assert rc == 0 and "tiny_test_dbb on digits: top-1" in out
    rc, out, err = run(capsys, "eval", "--checkpoint", str(run_dir), "--deploy")
    assert rc == 0, err
    trained = json.loads((run_dir / "eval.json").read_text())
    deployed = json.loads((run_dir / "eval-deploy.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert trained["top1"] == summary["top1"] == deployed["top1"] and trained["num_samples"] == 359
    assert trained["confusion"] == deployed["confusion"] and trained["top5"] == deployed["top5"]
    assert deployed["params"] < trained["params"]  # the DBB really was folded
    assert "identical predictions" in out
    for png in ("confusion.png", "confusion-deploy.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_int8_is_evaluated_benchmarked_and_predicts_through_the_command_line(capsys: pytest.CaptureFixture[str],
                                                                            tmp_path: Path) -> None:
    """A mixer trained on digits (its token and channel MLPs are Linear layers): eval --quantize int8 scores within
    2 points of float32, bench times the int8 form beside onnxruntime, predict runs on it."""
    run_dir = tmp_path / "run"
    rc, _, err = run(capsys, "train", "--model", "mixer_nano", "--data", "digits", "--max-train-samples", "512",
                     "--batch-size", "32", "--epochs", "2", "--lr", "3e-3", "--warmup-epochs", "0.2", "--augment",
                     "none", "--out", str(run_dir), "--no-progress")
    assert rc == 0, err
    rc, out, err = run(capsys, "eval", "--checkpoint", str(run_dir), "--quantize", "int8")
    assert rc == 0, err
    trained = json.loads((run_dir / "eval.json").read_text())
    int8 = json.loads((run_dir / "eval-int8.json").read_text())
    assert trained["top1"] > 70 and abs(int8["top1"] - trained["top1"]) <= 2.0 and int8["form"] == "int8"
    assert int8["num_samples"] == trained["num_samples"] == 359 and int8["params"] == trained["params"]
    assert "int8 vs trained: " in out and f"top-1 {int8['top1'] - trained['top1']:+.2f} points" in out
    rc, out, err = run(capsys, "bench", "mixer_nano", "--backend", "onnxruntime", "--quantize", "int8",
                       "--repeats", "2", "--warmup", "1")
    assert rc == 0, err
    rows = {line.split()[1]: line.split() for line in out.splitlines()[1:]}
    assert set(rows) == {"eager", "onnxruntime", "onnxruntime-int8"} and rows["onnxruntime-int8"][-2].endswith("x")
    image = tmp_path / "digit.png"
    Image.fromarray(build_dataset("digits", "test").images[0, 0].numpy(), mode="L").save(image)
    top = []
    for extra in ([], ["--quantize", "int8"]):
        rc, out, err = run(capsys, "predict", str(run_dir), str(image), "--topk", "1", "--json", *extra)
        assert rc == 0 and err == "", err
        top.append(json.loads(out)["top"][0]["index"])
    assert top[0] == top[1]


def test_models_listing(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "models", "tiny_test_*")
    assert rc == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert set(rows) == {"tiny_test_dbb", "tiny_test_net"}
    expected = sum(p.numel() for p in create_model("tiny_test_net", num_classes=1000).parameters())
    assert rows["tiny_test_net"][1:4] == [f"{expected / 1e3:.2f}K", "-", "3x224x224"]  # 224 px, no reference MACs
    rc, out, _ = run(capsys, "models", "mixer_nano")
    c, h, w = model_entry("mixer_nano").cfg["input_size"]
    model = create_model("mixer_nano").eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, c, h, w))
    name, params, macs, size, _ = out.splitlines()[1].split()
    assert (name, size) == ("mixer_nano", f"{c}x{h}x{w}")
    assert params == f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M"
    assert macs == f"{counter.get_total_flops() / 2 / 1e6:.2f}M"  # computed on the meta device, same count


@pytest.mark.slow
def test_main_sets_omp_wait_policy_before_torch_and_importing_changes_nothing() -> None:
    code = ("import sys, os, visionmix.cli as cli; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules); "
            "parse = cli.build_parser; cli.build_parser = lambda: (print(os.environ['OMP_WAIT_POLICY'], "
            "'torch' in sys.modules), parse())[1]; cli.main(['models', 'mixer_nano'])")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[:4] == ["None", "False", "PASSIVE", "False"]  # import: untouched; main: set before torch
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[:4] == ["ACTIVE", "False", "ACTIVE", "False"]  # the user's choice wins
    version = subprocess.run([sys.executable, "-m", "visionmix", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("visionmix ")


@pytest.mark.slow
@pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason=f"Fashion-MNIST is not in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)")
def test_short_real_fashion_mnist_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """resnet_nano, 2,000 training images, 1 epoch (125 steps): > 70% on 2,000 test images (73-75% seen over
    seeds 0-2 and lr 2e-3/3e-3); the deployed (BN-folded) model scores the same."""
    run_dir = tmp_path / "run"
    rc, _, err = run(capsys, "train", "--model", "resnet_nano", "--max-train-samples", "2000", "--max-eval-samples",
                     "2000", "--epochs", "1", "--batch-size", "16", "--lr", "2e-3", "--warmup-epochs", "0.1",
                     "--label-smoothing", "0", "--augment", "none", "--device", "cpu", "--out", str(run_dir),
                     "--no-progress")
    assert rc == 0, err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["top1"] > 70.0, summary["top1"]
    assert run(capsys, "eval", "--checkpoint", str(run_dir), "--deploy", "--device", "cpu")[0] == 0
    deployed = json.loads((run_dir / "eval-deploy.json").read_text())
    assert deployed["top1"] == summary["top1"] and deployed["num_samples"] == 2000
