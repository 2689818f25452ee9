"""Downloads into a cache that never holds a file that looks complete and is not (issue 28, items 2 and 4).

:func:`download_url` writes ``DEST.part`` while it receives, resumes it with an HTTP ``Range`` request when a
transfer was cut (restarting when the server ignores the range), checks the length the server announced, refuses
an HTML page saved in place of the file, verifies the sha256 where it is known and only then renames the file to
``DEST``: a ``DEST`` that exists is complete. Two processes downloading one file take turns on ``DEST.lock``
(``fcntl.flock``): the second finds the first's file and returns it. Every failure is one
:class:`~visionmix.errors.DownloadError` line naming the URL or the file.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from visionmix.errors import DownloadError

CHUNK = 1 << 20
OFFLINE_ROUTE = ("download it on a machine with internet ('visionmix weights download NAME --to DIR', or the URL "
                 "itself and 'visionmix weights convert'), copy it here and pass checkpoint_path=FILE")


def download_url(url: str, dest: str | Path, *, sha256: str | None = None, timeout: float = 30.0) -> Path:
    """The file at ``url`` as ``dest`` (downloaded unless ``dest`` exists), verified against ``sha256`` (hex) when
    given. See the module docstring for partial transfers, locking and errors."""
    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest.with_name(dest.name + ".lock")):
        if dest.is_file():  # another process finished it while this one waited
            return dest
        part = dest.with_name(dest.name + ".part")
        _receive(url, part, timeout)
        try:
            check_not_html(url, part)
            if sha256 is not None:
                check_sha256(url, part, sha256)
        except DownloadError:
            part.unlink()
            raise
        os.replace(part, dest)
    return dest


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of the file at ``path``."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _receive(url: str, part: Path, timeout: float) -> None:
    """Fetch ``url`` into ``part``, continuing what ``part`` already holds when the server takes a range."""
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # the range starts at the end: the part is the whole file
            return
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"cannot reach {url} ({reason}); offline: {OFFLINE_ROUTE}") from err
    with response:
        resumed = response.status == 206
        length = response.headers.get("Content-Length")
        expected = (int(length) + (have if resumed else 0)) if length is not None else None
        received = have if resumed else 0
        try:
            with part.open("ab" if resumed else "wb") as out:
                for block in iter(lambda: response.read(CHUNK), b""):
                    out.write(block)
                    received += len(block)
        except (OSError, http.client.HTTPException) as err:  # the connection dropped: the part stays, to resume
            raise DownloadError(f"{url}: the transfer broke after {received:,} bytes ({err}); run again to "
                                f"resume it") from err
    if expected is not None and received != expected:
        raise DownloadError(f"{url}: the transfer ended after {received:,} of {expected:,} bytes; run again to "
                            f"resume it")


def check_not_html(url: str, path: Path) -> None:
    """Refuse ``path`` (the download of ``url``) when it is an HTML page (the caller deletes it)."""
    with path.open("rb") as f:
        head = f.read(512).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        raise DownloadError(f"{url} answered with an HTML page, not the weights (a login, quota or error page); "
                            f"the download was deleted")


def check_sha256(url: str, path: Path, sha256: str) -> None:
    """Refuse ``path`` (the download of ``url``) unless its sha256 is ``sha256`` (the caller deletes it)."""
    got = file_sha256(path)
    if got != sha256.lower():
        raise DownloadError(f"{url}: the file's sha256 is {got}, the publisher states {sha256}; the download was "
                            f"deleted (a changed or corrupted file)")
