"""visionmix.files.hold_directory: one writer per directory, released by the OS when the holder dies."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from visionmix.errors import DirectoryBusy, UserError, VisionmixWarning
from visionmix.files import LOCK_FILE, entries, hold_directory

HOLD = textwrap.dedent("""
    import sys, time
    from visionmix.files import hold_directory
    with hold_directory(sys.argv[1], "visionmix test"):
        print("held", flush=True)
        time.sleep(60)
""")


def test_a_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    with hold_directory(tmp_path / "run", "visionmix train") as held:
        assert held == tmp_path / "run" and entries(held) == []  # the lock file is not the user's
        busy = rf"run is in use by visionmix train \(PID {os.getpid()} on "
        with pytest.raises(DirectoryBusy, match=busy), hold_directory(tmp_path / "run", "visionmix compare"):
            pass
        assert json.loads((held / LOCK_FILE).read_text())["command"] == "visionmix train"
    assert not (tmp_path / "run").exists()  # created for the block and still empty: removed again
    assert issubclass(DirectoryBusy, UserError) and issubclass(DirectoryBusy, OSError)


def test_release_deletes_the_lock_file_and_keeps_what_was_written(tmp_path: Path) -> None:
    with hold_directory(tmp_path, "visionmix train"):
        (tmp_path / "weights.safetensors").write_bytes(b"w")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.safetensors"]
    with hold_directory(tmp_path, "visionmix train"):  # free again
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(DirectoryBusy, match=f"PID {proc.pid}"), hold_directory(tmp_path, "visionmix train"):
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (tmp_path / LOCK_FILE).exists()  # the file stays, the lock does not
    with hold_directory(tmp_path, "visionmix train"):
        pass


def test_a_file_system_that_cannot_lock_is_said_once_and_not_fatal(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(VisionmixWarning, match="cannot lock files"), hold_directory(tmp_path, "visionmix train"):
        (tmp_path / "a").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
