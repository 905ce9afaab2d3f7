"""Extraction flow: bounded concurrent fetching against a real slow HTTP server, progress flushed to the
store in small steps, work kept when a run aborts, and early stops that report what is left."""

from __future__ import annotations

import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from asvp_backend.features import backbones as bb
from asvp_backend.features.extract import extract_items, extract_to_store, generation_info
from asvp_backend.features.store import FeatureGeneration, FeatureStore
from asvp_backend.imaging import LocalImageLoader
from asvp_backend.labelstudio.images import ImageFetcher
from tests.helpers import png_bytes

SLOW_SECONDS = 1.0


@pytest.fixture(scope="module")
def tiny():
    return bb.create_backbone("test_efficientnet", weights="random", device="cpu", image_size=32)


@pytest.fixture
def generation(tiny, tmp_path) -> FeatureGeneration:
    return FeatureStore(tmp_path / "features").create_generation(generation_info(tiny, 0))


def _reader(generation: FeatureGeneration) -> FeatureGeneration:
    """A second handle on the same files: what another process (or a restarted job) would see."""
    return FeatureGeneration(generation.path)


def _image_files(directory: Path, n: int) -> list[tuple[int, str]]:
    directory.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        path = directory / f"{i}.png"
        path.write_bytes(png_bytes(i))
        items.append((100 + i, str(path)))
    return items


class _SlowImageServer:
    """Serves /<i>.png (png_bytes(i)) after SLOW_SECONDS and records how many requests overlap."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (stdlib name)
                with outer.lock:
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                time.sleep(SLOW_SECONDS)
                with outer.lock:
                    outer.in_flight -= 1
                body = png_bytes(int(self.path.strip("/").removesuffix(".png")))
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def slow_server():
    server = _SlowImageServer()
    yield server
    server.close()


# ---------------------------------------------------------------------------------------------- concurrency


def test_slow_images_are_fetched_concurrently_within_the_bound_and_in_order(tiny, generation, slow_server):
    n, concurrency = 8, 4
    items = [(100 + i, f"http://127.0.0.1:{slow_server.port}/{i}.png") for i in range(n)]
    start = time.monotonic()
    report = extract_to_store(
        tiny, items, ImageFetcher(allow_private_hosts=True), generation,
        batch_size=n, num_workers=0, fetch_concurrency=concurrency,
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert report.extracted == n and not report.skipped
    assert slow_server.max_in_flight == concurrency
    # n / concurrency rounds of SLOW_SECONDS; sequential fetching would take n * SLOW_SECONDS
    assert n / concurrency * SLOW_SECONDS <= elapsed < (n / concurrency + 1.5) * SLOW_SECONDS, elapsed
    # Every id got its own image's vector: results stayed in input order.
    images = [Image.open(io.BytesIO(png_bytes(i))).convert("RGB") for i in range(n)]
    found, stored = generation.lookup([tid for tid, _ in items])
    assert found.all()
    direct = tiny.embed_images(images).astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(stored.astype(np.float32), direct, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("bad", [{"fetch_concurrency": 0}, {"flush_every": 0}])
def test_bounds_must_be_positive(tiny, generation, bad):
    with pytest.raises(ValueError, match="at least 1"):
        extract_items(tiny, [(1, "x")], LocalImageLoader(), generation, num_workers=0, **bad)


# ---------------------------------------------------------------------------------------------- flushing


def test_vectors_reach_the_store_every_flush_every_vectors(tiny, generation, tmp_path):
    items = _image_files(tmp_path / "imgs", 10)
    seen: list[int] = []
    report = extract_items(
        tiny, items, LocalImageLoader(), generation, batch_size=2, num_workers=0,
        flush_every=4, progress=lambda done, total: seen.append(len(_reader(generation))),
    )  # fmt: skip
    assert seen == [0, 4, 4, 8, 8]  # on disk while the run goes on, not only at its end
    assert report.extracted == 10 and len(_reader(generation)) == 10
    assert generation.shard_count() == 3  # 4 + 4 + 2


def test_vectors_reach_the_store_every_flush_seconds(tiny, generation, tmp_path):
    items = _image_files(tmp_path / "imgs", 6)
    seen: list[int] = []
    extract_items(
        tiny, items, LocalImageLoader(), generation, batch_size=2, num_workers=0,
        flush_every=10**6, flush_seconds=0.0, progress=lambda done, total: seen.append(len(_reader(generation))),
    )  # fmt: skip
    assert seen == [2, 4, 6]


def test_an_aborted_run_keeps_what_it_embedded(tiny, generation, tmp_path):
    items = _image_files(tmp_path / "imgs", 10)

    def abort_after_three_batches(done: int, total: int) -> None:
        if done >= 6:
            raise RuntimeError("job cancelled")

    with pytest.raises(RuntimeError, match="job cancelled"):
        extract_items(
            tiny, items, LocalImageLoader(), generation, batch_size=2, num_workers=0,
            flush_every=10**6, flush_seconds=10**6, progress=abort_after_three_batches,
            fetch_concurrency=1,  # results in input order
        )  # fmt: skip
    assert _reader(generation).task_ids().tolist() == [100, 101, 102, 103, 104, 105]


# ---------------------------------------------------------------------------------------------- should_stop


def test_should_stop_ends_the_run_between_batches_and_reports_what_is_left(tiny, generation, tmp_path):
    items = _image_files(tmp_path / "imgs", 10)
    items.insert(1, (99, str(tmp_path / "missing.png")))  # a skip is flushed too
    asked: list[int] = []

    def stop_after_two_batches() -> bool:
        asked.append(1)
        return len(asked) >= 2

    report = extract_items(
        tiny, items, LocalImageLoader(), generation, batch_size=2, num_workers=0, should_stop=stop_after_two_batches,
        fetch_concurrency=1,  # one fetch at a time: results arrive in input order
    )  # fmt: skip
    # Two batches, then what was fetched ahead while they were embedded (at most two batches and the fetch in
    # flight): kept, not wasted. No fetch starts after the stop.
    assert 3 <= report.extracted <= 3 + 5 and report.extracted + 1 + report.remaining == len(items)
    assert report.skipped == {99: "file not found"}
    reader = _reader(generation)
    assert reader.task_ids().tolist() == list(range(100, 100 + report.extracted))
    assert reader.skipped() == report.skipped
    # Resuming with the ids still missing finishes the job.
    todo = [(tid, url) for tid, url in items if tid in set(reader.missing([t for t, _ in items])) and tid != 99]
    rest = extract_items(tiny, todo, LocalImageLoader(), generation, batch_size=2, num_workers=0)
    assert (rest.extracted, rest.remaining) == (report.remaining, 0)


def test_should_stop_is_not_asked_after_the_last_batch(tiny, generation, tmp_path):
    items = _image_files(tmp_path / "imgs", 6)
    asked: list[int] = []

    def stop() -> bool:
        asked.append(1)
        return True

    report = extract_items(tiny, items[:2], LocalImageLoader(), generation, batch_size=2, num_workers=0,
                           should_stop=stop)  # fmt: skip
    assert (report.extracted, report.remaining) == (2, 0) and not asked
    report = extract_items(
        tiny, items[2:], LocalImageLoader(), generation, batch_size=2, num_workers=0, should_stop=stop,
        fetch_concurrency=1,
    )  # fmt: skip
    assert len(asked) == 1  # asked once, after the first batch; the fetches in flight then still arrive
    assert 2 <= report.extracted <= 4 and report.extracted + report.remaining == 4  # up to two batches fetched ahead
