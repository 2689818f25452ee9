"""Exact resume, proven with real signals on real processes.

Run A trains 2 epochs straight. Run B gets SIGTERM mid-epoch 1 (it saves the step it reached and exits 143), is
resumed, gets SIGKILL mid-epoch 2 (after a --save-every checkpoint; steps after it are lost and redone), and is
resumed to the end. Final weights, optimizer-visible history and metrics must equal run A's bit for bit.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from processes import start, wait_for_checkpoint

pytestmark = pytest.mark.slow  # real processes killed and resumed

TRAIN_ARGS = ["--model", "tiny_test_net", "--data", "digits", "--max-train-samples", "480", "--batch-size", "16",
              "--epochs", "2", "--lr", "0.01", "--save-every", "4", "--device", "cpu", "--no-progress",
              "--model-arg", "step_delay=0.04"]  # 30 steps per epoch, >= 40 ms each
STRAIGHT_FIELDS = ("epoch", "train_loss", "train_acc", "eval_loss", "eval_top1", "eval_top5", "lr", "global_step")


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def final_state(run: Path) -> tuple[dict[str, torch.Tensor], dict]:
    meta = json.loads((run / "checkpoint.json").read_text())
    return load_file(run / meta["files"]["weights"]), meta


@pytest.mark.slow
def test_resume_after_sigterm_and_sigkill_is_exact(tmp_path: Path) -> None:
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    proc_a = start("train", *TRAIN_ARGS, "--out", str(straight))

    proc_b = start("train", *TRAIN_ARGS, "--out", str(broken))
    wait_for_checkpoint(proc_b, broken, epoch=0, min_step=8)
    proc_b.send_signal(signal.SIGTERM)
    rc, _, err = finish(proc_b)
    assert rc == 128 + signal.SIGTERM, err
    assert "SIGTERM: stopped at epoch 1 step" in err and "visionmix train --resume" in err and "Traceback" not in err
    saved = json.loads((broken / "checkpoint.json").read_text())
    assert saved["epoch"] == 0 and 8 <= saved["step_in_epoch"] < 30  # the signal handler saved mid-epoch 1

    proc_b = start("train", "--resume", str(broken), "--no-progress")
    killed_at = wait_for_checkpoint(proc_b, broken, epoch=1, min_step=4)
    proc_b.send_signal(signal.SIGKILL)
    rc, _, _ = finish(proc_b)
    assert rc == -signal.SIGKILL
    assert 0 < killed_at["step_in_epoch"] < 30  # a genuine mid-epoch-2 state is what the next run starts from
    after_kill = json.loads((broken / "checkpoint.json").read_text())
    assert after_kill["epoch"] == 1 and after_kill["step_in_epoch"] >= killed_at["step_in_epoch"]
    metrics = [json.loads(line) for line in (broken / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1]  # what was written before the kill is still there

    rc, out, err = finish(start("train", "--resume", str(broken), "--no-progress"))
    assert rc == 0, err
    rc_a, _, err_a = finish(proc_a)
    assert rc_a == 0, err_a

    weights_a, meta_a = final_state(straight)
    weights_b, meta_b = final_state(broken)
    assert meta_a["global_step"] == meta_b["global_step"] == 60 and meta_b["finished"]
    assert weights_a.keys() == weights_b.keys()
    for name, tensor in weights_a.items():
        assert torch.equal(tensor, weights_b[name]), name
    for h_a, h_b in zip(meta_a["history"], meta_b["history"], strict=True):
        assert {k: h_a[k] for k in STRAIGHT_FIELDS} == {k: h_b[k] for k in STRAIGHT_FIELDS}
    lines = [json.loads(line) for line in (broken / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert "top-1" in out
