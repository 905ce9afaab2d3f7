"""Slow images cost about one image deadline per extraction run, not one per batch (issue 17, finding 6).

The probe's case: a server that drips one byte every few seconds serves 12 of 40 tasks. When each batch was
fetched as a unit, every batch held a dripping image and waited the full IMAGE_TIMEOUT for it: 5 batches x
30 s for 28 good images. Here a real HTTP server drips (every byte well inside the per-read timeout, so only
the per-image deadline ends the fetch) and the run must end about one deadline after it started, with the
good images embedded and every drip skipped with its reason.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from asvp_backend.features import backbones as bb
from asvp_backend.features.extract import extract_items, generation_info
from asvp_backend.features.store import FeatureStore
from asvp_backend.labelstudio.images import ImageFetcher
from tests.helpers import png_bytes

DEADLINE = 2.5  # IMAGE_TIMEOUT of the test: wall-clock seconds per image
DRIP_INTERVAL = 0.3  # seconds between bytes of a dripping body
TASKS, BATCH, CONCURRENCY = 40, 8, 8


def is_drip(i: int) -> bool:
    return i % 10 >= 7  # 12 of 40, some in every batch of 8, and the last task (the wait at the end)


class _DripServer:
    """/good/<i> answers png_bytes(i) at once; /drip/<i> promises 1,000 bytes and sends one every 0.3 s."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (stdlib name)
                kind, _, index = self.path.strip("/").partition("/")
                if kind == "drip":
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    try:
                        while not outer.stop.wait(DRIP_INTERVAL):
                            self.wfile.write(b"x")
                            self.wfile.flush()
                    except OSError:
                        pass  # the client hung up at its deadline
                    return
                body = png_bytes(int(index))
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.port}/{'drip' if is_drip(i) else 'good'}/{i}"

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    s = _DripServer()
    yield s
    s.close()


@pytest.fixture(scope="module")
def tiny():
    return bb.create_backbone("test_efficientnet", weights="random", device="cpu", image_size=32)


@pytest.fixture
def generation(tiny, tmp_path):
    return FeatureStore(tmp_path / "features").create_generation(generation_info(tiny, 0))


def _fetcher() -> ImageFetcher:
    return ImageFetcher(allow_private_hosts=True, timeout=DEADLINE, total_timeout=DEADLINE)


def test_twelve_dripping_images_in_forty_cost_one_deadline_not_one_per_batch(server, tiny, generation):
    items = [(1000 + i, server.url(i)) for i in range(TASKS)]
    start = time.monotonic()
    report = extract_items(tiny, items, _fetcher(), generation, batch_size=BATCH, num_workers=0,
                           fetch_concurrency=CONCURRENCY)  # fmt: skip
    elapsed = time.monotonic() - start
    drips = {1000 + i for i in range(TASKS) if is_drip(i)}
    assert report.extracted == TASKS - len(drips) and report.remaining == 0
    assert report.skipped == {tid: f"timed out after {DEADLINE:g}s" for tid in drips}
    assert set(generation.task_ids().tolist()) == {tid for tid, _ in items} - drips
    # Batch by batch this took TASKS / BATCH = 5 deadlines (12.5 s). Now: the drips of the first slots turn
    # slow after a quarter of the deadline, the rest start beside them, all end one deadline after starting.
    assert elapsed < 2 * DEADLINE + 1.0, elapsed  # about 1.3 deadlines; a loaded 2-core host needs room


def test_a_stop_waits_at_most_one_deadline_for_the_fetches_in_flight(server, tiny, generation):
    items = [(1000 + i, server.url(i)) for i in range(TASKS)]
    start = time.monotonic()
    report = extract_items(tiny, items, _fetcher(), generation, batch_size=BATCH, num_workers=0,
                           fetch_concurrency=CONCURRENCY, should_stop=lambda: True)  # fmt: skip
    elapsed = time.monotonic() - start
    assert elapsed < 2 * DEADLINE + 1.0, elapsed  # about 1.3 deadlines; a loaded 2-core host needs room
    # What was in flight at the stop is kept: dripping images skipped with their reason, the others embedded;
    # what never started is left for the next run.
    assert report.remaining > 0 and report.skipped
    assert set(report.skipped.values()) == {f"timed out after {DEADLINE:g}s"}
    assert report.extracted + len(report.skipped) + report.remaining == TASKS


class _StuckLoader:
    """A loader whose deadline is not kept (an image still decoding): the run must not wait for it."""

    deadline_seconds = 0.5

    def load(self, url: str, task_id: int | None = None):
        from PIL import Image

        if url == "stuck":
            time.sleep(6.0)
        return Image.new("RGB", (8, 8))


def test_a_fetch_that_outlives_its_deadline_is_left_for_the_next_run(tiny, generation):
    items = [(1, "ok"), (2, "stuck"), (3, "ok")]
    start = time.monotonic()
    report = extract_items(tiny, items, _StuckLoader(), generation, batch_size=2, num_workers=0)
    assert time.monotonic() - start < 0.5 + 2.0 + 1.5  # the deadline, the slack for reporting it, the embedding
    assert (report.extracted, report.remaining, report.skipped) == (2, 1, {})
    assert generation.missing([1, 2, 3]) == [2]
