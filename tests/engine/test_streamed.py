"""Streamed training end to end: an ImageFolder run resumed after SIGTERM mid-epoch ends bit for bit where an
uninterrupted run ends (small and deit recipes, decoding in worker processes), and a WebDataset run trains from the
shards ``visionmix data pack`` writes."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from processes import start, wait_for_checkpoint
from visionmix.data import load_digits
from visionmix.data.pack import pack_shards
from visionmix.engine.evaluate import evaluate_run

# slow: real processes; tiny_test_net / tiny_test_dbb registered for this module
pytestmark = [pytest.mark.usefixtures("tiny_models"), pytest.mark.slow]


@pytest.fixture(scope="module")
def digit_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """320 training and 100 validation digits as PNG files in DIR/{train,val}/<digit>/."""
    root = tmp_path_factory.mktemp("digits")
    for split, ds, n in (("train", load_digits("train"), 320), ("val", load_digits("test"), 100)):
        for i in range(n):
            folder = root / split / f"d{int(ds.labels[i])}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(ds.images[i, 0].numpy(), mode="L").save(folder / f"{i}.png")
    return root


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    meta = json.loads((run / "checkpoint.json").read_text())
    assert meta["finished"]
    return load_file(run / meta["files"]["weights"])


@pytest.mark.parametrize("recipe", ["small", "deit"])
def test_a_streamed_run_resumed_mid_epoch_is_exact(digit_tree: Path, tmp_path: Path, recipe: str) -> None:
    args = ["train", "--model", "tiny_test_net", "--data", "imagefolder", "--data-dir", str(digit_tree),
            "--image-size", "16", "--batch-size", "16", "--epochs", "2", "--lr", "0.01", "--warmup-epochs", "0.5",
            "--workers", "2", "--recipe", recipe, "--device", "cpu", "--no-progress", "--model-arg", "step_delay=0.03"]
    straight = start(*args, "--out", str(tmp_path / "a"))
    assert straight.wait(timeout=300) == 0, straight.communicate()[1][-2000:]
    interrupted = start(*args, "--out", str(tmp_path / "b"), "--save-every", "3")
    wait_for_checkpoint(interrupted, tmp_path / "b", epoch=0, min_step=6)
    interrupted.send_signal(signal.SIGTERM)
    assert interrupted.wait(timeout=120) == 128 + signal.SIGTERM
    meta = json.loads((tmp_path / "b" / "checkpoint.json").read_text())
    assert meta["epoch"] == 0 and 0 < meta["step_in_epoch"] < 20  # stopped mid-epoch 1 (20 steps per epoch)
    resumed = start("train", "--resume", str(tmp_path / "b"), "--no-progress")
    assert resumed.wait(timeout=300) == 0, resumed.communicate()[1][-2000:]
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_a_webdataset_run_trains_from_packed_shards(digit_tree: Path, tmp_path: Path) -> None:
    for split in ("train", "val"):
        pack_shards(digit_tree, tmp_path / "shards", shard_size=40, split=split)
    run = start("train", "--model", "tiny_test_net", "--data", "webdataset", "--data-dir",
                str(tmp_path / "shards" / "train-{000000..000007}.tar"), "--image-size", "16", "--batch-size", "16",
                "--epochs", "2", "--lr", "0.01", "--workers", "2", "--device", "cpu", "--no-progress",
                "--out", str(tmp_path / "run"))
    assert run.wait(timeout=300) == 0, run.communicate()[1][-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data_info"]["train_samples"] == 320 and summary["data_info"]["eval_samples"] == 100
    assert summary["history"][-1]["global_step"] == 2 * 20  # 8 shards of 40 over 2 readers: every sample seen
    assert summary["top1"] > 10  # above chance on 10 digits after 2 epochs
    report = evaluate_run(tmp_path / "run")  # `visionmix eval` streams the val shards the same way
    assert report["forms"]["trained"]["top1"] == summary["top1"]
