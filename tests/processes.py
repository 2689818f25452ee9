"""Real ``visionmix`` processes for the tests that signal, kill and resume them: the test models registered in
the child (tinynets.py), one thread, and a poll for a mid-epoch checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import torch
torch.set_num_threads(1)
import tinynets
tinynets.register()
from visionmix.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def start(*args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    return subprocess.Popen([sys.executable, "-c", SCRIPT, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(proc: subprocess.Popen, run: Path, epoch: int, min_step: int, timeout: float = 90) -> dict:
    """Poll checkpoint.json (written atomically) until it is at ``epoch`` completed epochs + >= ``min_step``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run / "checkpoint.json"
        if path.is_file():
            meta = json.loads(path.read_text())
            if meta["epoch"] == epoch and meta["step_in_epoch"] >= min_step:
                return meta
            if meta["epoch"] > epoch:
                break
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    proc.kill()
    out, err = proc.communicate()
    pytest.fail(f"no mid-epoch checkpoint at epoch {epoch} step >= {min_step} (rc={proc.returncode}): {err[-2000:]}")
