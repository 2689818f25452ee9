"""What a comparison directory holds, read back for the launcher tests (tests/bench/test_launch.py, test_slurm.py)."""

from __future__ import annotations

import json
from pathlib import Path


def results(out: Path) -> dict:
    """``out``'s results.json."""
    return json.loads((out / "results.json").read_text())


def weights(run: Path) -> bytes:
    """The bytes of the weights file a run directory's checkpoint.json names."""
    meta = json.loads((run / "checkpoint.json").read_text())
    return (run / meta["files"]["weights"]).read_bytes()


def assert_same_comparison(a: Path, b: Path, models: list[str], seeds: int = 2) -> None:
    """Comparisons ``a`` and ``b`` (2 models x ``seeds`` runs, launched differently) report identical accuracies
    per run and per model, and every run ends with bit-identical weights."""
    first, second = results(a), results(b)
    finished = [(r["model"], r["seed"], r["summary"]["top1"]) for r in first["runs"] if r["summary"]]
    assert len(finished) == len(models) * seeds
    assert finished == [(r["model"], r["seed"], r["summary"]["top1"]) for r in second["runs"] if r["summary"]]
    assert [m["top1"] for m in first["models"]] == [m["top1"] for m in second["models"]]
    for model in models:
        for seed in range(seeds):
            run = Path("runs") / model / f"seed{seed}"
            assert weights(a / run) == weights(b / run), run
