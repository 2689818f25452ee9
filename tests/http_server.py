"""A real HTTP server on 127.0.0.1 for the download tests (the standard library's ``http.server`` in a thread):
files by path, URL-style (``/w.pth``) and Hugging Face Hub-style (``/<repo>/resolve/<revision>/<file>``) alike.
Every answer carries what ``huggingface_hub.hf_hub_download`` requires of a Hub endpoint (its HEAD request reads
``X-Repo-Commit``, ``ETag`` and ``Content-Length``)."""

from __future__ import annotations

import hashlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the commit every Hub-style file is served at


class Server:
    """Files by path; ``drop_after[path] = n`` cuts the next transfer of ``path`` after n bytes; ``ranges=False``
    ignores Range headers; ``delay`` slows each GET; every request is logged as (path, Range header)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.drop_after: dict[str, int] = {}
        self.ranges = True
        self.delay = 0.0  # seconds each GET waits before its body (so that concurrent clients overlap)
        self.requests: list[tuple[str, str | None]] = []  # GET requests only
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _hub_headers(self, body: bytes) -> None:
                self.send_header("X-Repo-Commit", HUB_COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')

            def do_HEAD(self) -> None:
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                self._hub_headers(body)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()

            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("Range")))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                if server.ranges and self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].rstrip("-"))
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self._hub_headers(body)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                time.sleep(server.delay)
                cut = server.drop_after.pop(self.path, None)
                self.wfile.write(body[start:] if cut is None else body[start:start + cut])
                if cut is not None:
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
