"""The per-image wall-clock deadline against a real server that drips one byte at a time, in the body, in the
headers and inside the TLS handshake: every byte arrives well within the 5 s read timeout, so only a true
deadline stops the fetch."""

from __future__ import annotations

import threading
import time
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from asvp_backend.labelstudio.images import ImageFetcher, ImageFetchError
from tests.helpers import png_bytes

DRIP_INTERVAL = 0.3  # seconds between bytes: well inside the per-read timeout
DRIP_BYTES = 40  # 12 s of dripping, then the server gives up: code without a deadline fails, never hangs
TOTAL = 1.5  # the fetcher's wall-clock budget per image
SLACK = 1.0
PNG = png_bytes(1)


class _DripServer:
    """HTTP on 127.0.0.1 that serves /ok normally and drips /body, /headers and TLS handshakes."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, so a dripping request can reuse a pooled socket

            def log_message(self, *args: object) -> None:
                pass

            def handle(self) -> None:
                first = self.request.recv(1, 2)  # MSG_PEEK: a TLS ClientHello starts with 0x16
                if first == b"\x16":
                    self.request.recv(4096)
                    outer.drip(self.request.sendall, b"\x16\x03\x03\x40\x00")  # a 16 KiB handshake record
                else:
                    super().handle()

            def do_GET(self) -> None:  # noqa: N802 (stdlib name)
                if self.path == "/body":
                    self.send_response(200)
                    self.send_header("Content-Length", str(DRIP_BYTES))
                    self.end_headers()
                    outer.drip(self.wfile.write)
                elif self.path == "/headers":
                    outer.drip(self.wfile.write, b"HTTP/1.1 200 OK\r\nX-Slow: ")
                else:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(PNG)))
                    self.end_headers()
                    self.wfile.write(PNG)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def drip(self, write, prefix: bytes = b"") -> None:
        try:
            write(prefix)
            for _ in range(DRIP_BYTES):
                if self.stop.wait(DRIP_INTERVAL):
                    return
                write(b"x")
        except OSError:
            pass  # the client hung up: that is the point

    def url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def drip_server():
    server = _DripServer()
    yield server
    server.close()


def _fetcher() -> ImageFetcher:
    return ImageFetcher(allow_private_hosts=True, timeout=5.0, total_timeout=TOTAL, verify_ssl=False)


@pytest.mark.parametrize(
    "path, scheme", [("/body", "http"), ("/headers", "http"), ("/", "https")], ids=["body", "headers", "tls"]
)
def test_drip_server_fails_at_the_deadline(drip_server, path, scheme):
    fetcher = _fetcher()
    fetcher.fetch_bytes(drip_server.url("/ok"))  # a kept-alive socket the next request may reuse
    start = time.monotonic()
    with pytest.raises(ImageFetchError) as e:
        fetcher.fetch_bytes(drip_server.url(path, scheme))
    elapsed = time.monotonic() - start
    assert e.value.reason == "timed out after 1.5s"
    assert TOTAL - 0.1 < elapsed < TOTAL + SLACK, elapsed


def test_load_counts_the_whole_budget_and_the_fetcher_recovers(drip_server):
    fetcher = _fetcher()
    start = time.monotonic()
    with pytest.raises(ImageFetchError, match="timed out after 1.5s"):
        fetcher.load(drip_server.url("/body"))
    assert time.monotonic() - start < TOTAL + SLACK
    assert fetcher.load(drip_server.url("/ok")).size == (32, 32)  # no socket of the dead fetch is reused


def test_default_budget_follows_the_read_timeout():
    assert ImageFetcher(timeout=10)._deadline().seconds == 30
    assert ImageFetcher(timeout=1)._deadline().seconds == 6
    assert ImageFetcher(timeout=1, total_timeout=2.5)._deadline().reason == "timed out after 2.5s"


# ------------------------------------------------------------------------- local files (issue 17, finding 8)


def _finishes(call, seconds: float = 2.0):
    """Run ``call`` on a daemon thread; its result or exception, or a failure if it is still blocked (a FIFO
    opened for reading without a writer blocks forever: the test must fail, not hang)."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = call()
        except BaseException as e:  # noqa: BLE001 (handed to the test)
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds}s"
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_local_files_read_only_regular_files(tmp_path):
    """A FIFO, a directory or a device under LOCAL_FILES_DOCUMENT_ROOT is refused at once with its reason; before,
    a FIFO blocked the read with no deadline at all."""
    import os

    from asvp_backend.imaging import LocalImageLoader

    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    (tmp_path / "ok.png").write_bytes(PNG)
    fetcher = ImageFetcher(document_root=str(tmp_path), total_timeout=TOTAL)
    cases = {"pipe.png": "not a regular file", "folder.png": "path is a directory", "zero.png": "not a regular file"}
    for name, reason in cases.items():
        url = f"/data/local-files/?d={name}"
        for call in (partial(fetcher.load, url), partial(fetcher.fetch_bytes, url),
                     partial(LocalImageLoader().load, str(tmp_path / name))):  # fmt: skip
            start = time.monotonic()
            with pytest.raises(ImageFetchError, match=reason):
                _finishes(call)
            assert time.monotonic() - start < 0.5
    assert _finishes(lambda: fetcher.load("/data/local-files/?d=ok.png")).size == (32, 32)


def test_a_local_read_is_under_the_image_deadline(tmp_path, monkeypatch):
    """A regular file that reads slowly (a network mount) is cut at the deadline between reads of 1 MiB."""
    import os

    from asvp_backend import imaging as images

    (tmp_path / "slow.png").write_bytes(PNG + b"\0" * (8 * images._FILE_CHUNK))
    real_read = os.read

    def slow_read(fd: int, n: int) -> bytes:
        if n == images._FILE_CHUNK:
            time.sleep(0.4)
        return real_read(fd, n)

    monkeypatch.setattr(images.os, "read", slow_read)
    fetcher = ImageFetcher(document_root=str(tmp_path), total_timeout=TOTAL)
    start = time.monotonic()
    with pytest.raises(ImageFetchError, match="timed out after 1.5s"):
        _finishes(lambda: fetcher.load("/data/local-files/?d=slow.png"), seconds=5)
    assert time.monotonic() - start < TOTAL + SLACK
