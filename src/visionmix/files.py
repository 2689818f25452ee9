"""Writing files safely: atomically (a reader sees the old file or the whole new one, never a part), and never over a
file that exists unless the caller says ``force``. Every file visionmix writes goes through here."""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
