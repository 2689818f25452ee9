"""Writing files safely: atomically (a reader sees the old file or the whole new one, never a part), never over a
file that exists unless the caller says ``force``, and one writer per directory (:func:`hold_directory`). Every
file visionmix writes goes through here."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import socket
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from visionmix.errors import DirectoryBusy, VisionmixWarning

LOCK_FILE = ".visionmix.lock"  # in a directory a visionmix process writes, while it writes there
_TEMPORARY_RE = re.compile(r"\.(?P<target>.+)\.[0-9a-f]{16}\.tmp")


def temporary_path(path: Path) -> Path:
    """A fresh hidden name beside ``path``: ``.<name>.<16 hex>.tmp``."""
    return path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"


def temporary_target(name: str) -> str | None:
    """The file a temporary name of :func:`temporary_path` was for, or ``None`` if ``name`` is not one."""
    match = _TEMPORARY_RE.fullmatch(name)
    return match["target"] if match else None


def check_new(path: str | Path | None, force: bool) -> None:
    """``FileExistsError`` if ``path`` exists and ``force`` is not set (``None``: nothing to check)."""
    if path is not None and Path(path).exists() and not force:
        raise FileExistsError(f"{path} already exists; pass --force to overwrite it")


@contextmanager
def staged(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that needs a file name; it replaces ``path`` if the block
    succeeds and is deleted otherwise. ``path`` may exist only with ``force``; its directory is created."""
    path = Path(path)
    check_new(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` atomically and durably (flushed, fsynced, renamed over ``path``). The temporary
    file gets ``open()``'s permissions (0666 less the umask)."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    tmp = temporary_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj: Any, indent: int = 1) -> None:
    """:func:`atomic_write` of ``obj`` as strict JSON (a NaN or infinity is a ``ValueError``, never written)."""
    atomic_write(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")


def write_new(path: str | Path, content: str | bytes, *, force: bool = False) -> Path:
    """:func:`atomic_write` ``content`` to ``path``, creating its directory; an existing file is an error unless
    ``force``."""
    path = Path(path)
    check_new(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, content)
    return path


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def hold_directory(directory: str | Path, command: str) -> Iterator[Path]:
    """Hold ``directory`` for this process for the block: the one writer of a run directory, a comparison or a pack
    output. Yields the directory (created if absent; removed again afterwards if it is still empty).

    An advisory ``flock`` on ``directory/.visionmix.lock``, which names the holder (PID, host, ``command``, start
    time). The operating system releases it when the process dies, so a killed holder never leaves a stale lock; the
    file is deleted on release, and a process that locked a file deleted meanwhile tries again. A second process
    gets :class:`~visionmix.errors.DirectoryBusy` naming the holder. Where the file system cannot lock (some network
    file systems) a :class:`~visionmix.errors.VisionmixWarning` says so and the block runs unguarded.
    """
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    fd = _lock(path, command)
    try:
        yield directory
    finally:
        if fd is not None:
            path.unlink(missing_ok=True)  # before closing: whoever waits then finds the file gone and retries
            os.close(fd)
        if created:
            with suppress(OSError):  # only if nothing was written there
                directory.rmdir()


def entries(directory: str | Path) -> list[str]:
    """The sorted names in ``directory`` but the lock file of :func:`hold_directory` (what a user put there, or an
    earlier run left)."""
    return sorted(name for name in os.listdir(directory) if name != LOCK_FILE)


def _lock(path: Path, command: str) -> int | None:
    """The descriptor of ``path``, locked and naming this process; ``None`` where the file system cannot lock."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise DirectoryBusy(f"{path.parent} is in use by {holder}; wait for it to finish or choose another "
                                f"directory") from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            warnings.warn(f"{path.parent} is on a file system that cannot lock files ({os.strerror(exc.errno)}): "
                          f"nothing stops two visionmix processes from writing there at once", VisionmixWarning,
                          stacklevel=4)
            path.unlink(missing_ok=True)
            return None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:  # still the file at ``path``: not one a releasing holder deleted
            break
        os.close(fd)
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
              "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    return fd


def _holder(fd: int) -> str:
    """Who holds a lock file, in words, from what it says."""
    try:
        info = json.loads(os.pread(fd, 4096, 0))
        return f"{info['command']} (PID {info['pid']} on {info['host']}, since {info['since']})"
    except (OSError, ValueError, TypeError, KeyError):
        return "another visionmix process (it has not said which yet)"
