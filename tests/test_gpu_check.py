"""``benchmarks/gpu_check.py --cpu-smoke``: the GPU check script runs its checks on the CPU and prints its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow  # ten short trainings, an evaluation and the training benchmark in subprocesses
def test_gpu_check_runs_every_check_on_the_cpu_and_prints_one_table() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    table = done.stdout[done.stdout.index("GPU check on CPU (smoke)"):].splitlines()[2:]
    status = {line[:27].strip(): line[27:].split()[0] for line in table}
    expected = {f"train {r} {m}": "ok" for r in ("small", "deit") for m in ("bf16", "fp16", "channels_last")}
    expected |= {"train small compile": "skipped", "train deit compile": "skipped", "eval --deploy": "ok",
                 "predict": "ok", "benchmarks/gpu.py": "ok"}
    assert status == expected
    assert "per step over the whole run: reads" in done.stdout and "same predictions" in done.stdout


def test_without_a_gpu_the_script_says_how_to_smoke_test() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the script would run its real checks")
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--cpu-smoke" in done.stdout
