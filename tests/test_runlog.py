"""visionmix.runlog: what a run says reaches the console (one line each, progress bars or not) and the run's own log
file (with its warnings and the traceback of what stopped it); an application's own logging set-up is kept."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from visionmix.runlog import FILE_ONLY, console_logging, logger, run_log


@contextmanager
def bare_process() -> Iterator[None]:
    """No handler on the root logger, as in a fresh process (pytest puts its capture handler there for each test)."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()
    try:
        yield
    finally:
        root.handlers[:] = saved


def test_console_prints_info_lines_on_stderr_and_nothing_file_only(capsys):
    with bare_process(), console_logging():
        logger("train").info("epoch 1/2: loss 0.5")
        logger("train").debug("not shown")
        logger("train").error("traceback here", extra=FILE_ONLY)
    assert capsys.readouterr().err == "epoch 1/2: loss 0.5\n"
    assert not logger().handlers  # removed after the block


def test_an_application_that_configured_logging_keeps_it(capsys):
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger().addHandler(handler)
    try:
        with bare_process(), console_logging():
            logger("train").warning("one")
    finally:
        logger().removeHandler(handler)
    assert records == ["one"] and capsys.readouterr().err == ""


def test_run_log_keeps_lines_warnings_and_the_traceback_of_a_crash(tmp_path: Path):
    path = tmp_path / "train.log"
    with pytest.raises(ZeroDivisionError), run_log(path):
        logger("train").info("epoch 1/2: loss 0.5")
        warnings.warn("skipping an unreadable image: x.png", UserWarning, stacklevel=1)
        1 / 0  # noqa: B018
    text = path.read_text()
    assert " INFO epoch 1/2: loss 0.5\n" in text
    assert "WARNING UserWarning: skipping an unreadable image: x.png" in text
    assert "ERROR stopped: ZeroDivisionError\nTraceback (most recent call last):" in text and "1 / 0" in text
    with run_log(path):  # appended to, as by a resumed run
        logger("train").info("epoch 2/2")
    assert path.read_text().startswith(text) and path.read_text().endswith(" INFO epoch 2/2\n")
    assert not logger().handlers


def test_run_log_holds_its_lines_until_the_directory_is_the_runs(tmp_path: Path):
    """A run that fails before its first checkpoint leaves no file in a directory it never owned."""
    claimed = tmp_path / "checkpoint.json"
    with pytest.raises(RuntimeError), run_log(tmp_path / "train.log", claimed=claimed.is_file):
        logger("train").info("building the model")
        raise RuntimeError("no such model")
    assert list(tmp_path.iterdir()) == []
    with run_log(tmp_path / "train.log", claimed=claimed.is_file):
        logger("train").info("building the model")
        claimed.write_text("{}")
        logger("train").info("epoch 1/1")
    assert [line.split(" INFO ")[1] for line in (tmp_path / "train.log").read_text().splitlines()] == [
        "building the model", "epoch 1/1"]


@pytest.mark.slow  # a real training process
def test_no_progress_removes_the_bar_and_nothing_else(tmp_path: Path):
    """A real ``train --no-progress`` process (as a cluster or CI starts it) still says what it did."""
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "visionmix", "train", "--model", "resnet_nano", "--data", "digits", "--epochs", "2",
         "--max-train-samples", "64", "--max-eval-samples", "32", "--batch-size", "32", "--no-progress",
         "--device", "cpu", "--out", str(run)],
        env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    epochs = [line for line in result.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == ["1/2", "2/2"], result.stderr
    assert "\r" not in result.stderr  # no progress bar
    log = (run / "train.log").read_text()
    assert all(line in log for line in epochs)
