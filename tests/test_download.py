"""visionmix.download against a real HTTP server on 127.0.0.1 (the standard library's): resume after a dropped
connection, a restart when the server ignores ranges, wrong sha256, 404, an HTML page, no network, two processes
downloading one file."""

from __future__ import annotations

import hashlib
import multiprocessing
from collections.abc import Iterator
from pathlib import Path

import pytest

from http_server import Server
from visionmix.download import download_url
from visionmix.errors import DownloadError

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


@pytest.fixture
def server() -> Iterator[Server]:
    with Server() as s:
        s.files["/w.pth"] = PAYLOAD
        yield s


SHA = hashlib.sha256(PAYLOAD).hexdigest()


def test_a_download_is_verified_and_then_served_from_the_cache(server: Server, tmp_path: Path) -> None:
    dest = download_url(f"{server.url}/w.pth", tmp_path / "w.pth", sha256=SHA)
    assert dest.read_bytes() == PAYLOAD and not (tmp_path / "w.pth.part").exists()
    assert download_url(f"{server.url}/w.pth", dest, sha256=SHA) == dest
    assert len(server.requests) == 1


def test_a_dropped_connection_leaves_a_part_that_the_next_call_resumes(server: Server, tmp_path: Path) -> None:
    server.drop_after["/w.pth"] = 300_000
    with pytest.raises(DownloadError, match=r"/w.pth: the transfer (broke|ended) after 300,000 .*run again to "
                                            r"resume it"):
        download_url(f"{server.url}/w.pth", tmp_path / "w.pth", sha256=SHA)
    assert not (tmp_path / "w.pth").exists() and (tmp_path / "w.pth.part").stat().st_size == 300_000
    download_url(f"{server.url}/w.pth", tmp_path / "w.pth", sha256=SHA)
    assert (tmp_path / "w.pth").read_bytes() == PAYLOAD
    assert server.requests[-1] == ("/w.pth", "bytes=300000-")


def test_a_server_that_ignores_ranges_restarts_the_file(server: Server, tmp_path: Path) -> None:
    server.ranges = False
    (tmp_path / "w.pth.part").write_bytes(b"x" * 1000)  # a stale part of something else
    download_url(f"{server.url}/w.pth", tmp_path / "w.pth", sha256=SHA)
    assert (tmp_path / "w.pth").read_bytes() == PAYLOAD


def test_a_wrong_sha256_deletes_the_download(server: Server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=rf"/w.pth: the file's sha256 is {SHA}, the publisher states 00ff"):
        download_url(f"{server.url}/w.pth", tmp_path / "w.pth", sha256="00ff")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pth.lock"]


def test_404_an_html_page_and_no_network_are_one_line_each(server: Server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"/missing.pth: HTTP 404 Not Found$"):
        download_url(f"{server.url}/missing.pth", tmp_path / "m.pth")
    server.files["/login"] = b"<!DOCTYPE html><html><body>Sign in</body></html>"
    with pytest.raises(DownloadError, match=r"/login answered with an HTML page, not the weights"):
        download_url(f"{server.url}/login", tmp_path / "l.pth")
    assert not (tmp_path / "l.pth").exists() and not (tmp_path / "l.pth.part").exists()
    port = server.httpd.server_address[1]
    server.httpd.server_close()  # nothing listens there any more
    with pytest.raises(DownloadError, match=rf"cannot reach http://127.0.0.1:{port}/w.pth .*offline: download it "
                                            r"on a machine with internet .* checkpoint_path=FILE") as info:
        download_url(f"http://127.0.0.1:{port}/w.pth", tmp_path / "w.pth", timeout=5)
    assert "\n" not in str(info.value) and isinstance(info.value, OSError)


def _fetch(url: str, dest: str, sha: str) -> None:
    download_url(url, dest, sha256=sha)


def test_two_processes_downloading_one_file_end_with_one_good_file(server: Server, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_fetch, args=(f"{server.url}/w.pth", str(tmp_path / "w.pth"), SHA))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert (tmp_path / "w.pth").read_bytes() == PAYLOAD
    assert len(server.requests) == 1  # the second found the first's file under the lock
