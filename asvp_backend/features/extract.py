"""Streaming feature extraction: fetch + decode + transform (in DataLoader worker processes, or in a bounded
thread pool without them), embed in batches, append to the store in small steps.

Why streaming and small steps: a project can hold a million images, so nothing is ever held in RAM beyond a
few batches. Invariant: what is not yet in the store is at most one flush step, ``min(flush_every,
shard_size)`` vectors (plus the batch in hand) or ``flush_seconds`` of work, so a killed run loses little
and re-running with only the still-missing ids resumes. One bad image becomes a recorded skip reason, never
a failed batch. One slow image delays only itself: without worker processes, batches are built from fetches
as they complete, and a fetch slower than a quarter of the fetcher's deadline stops holding a fetch slot
(``_FetchStream``), so slow servers cost about one image deadline per run, not one per batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from ..imaging import ImageFetchError, LocalImageLoader
from .backbones import Backbone
from .store import FeatureGeneration, GenerationInfo

if TYPE_CHECKING:
    from ..labelstudio.images import ImageFetcher

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
Progress = Callable[[int, int], None]
SLOW_FETCH_SHARE = 0.25  # a fetch running longer than this share of the image deadline is slow


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]  # task ids, images, ok mask, skip reasons


class ImageLoader(Protocol):
    """Loads one image. Called from several threads at once (``fetch_concurrency``): must be thread-safe.

    A loader may also offer ``load_prepared(url, task_id, then)``, returning ``then(image)`` computed while
    the full-size image is still under its decode budget (ImageFetcher and LocalImageLoader do); it is used
    when present. A loader with a ``deadline_seconds`` bounds each image in time, which lets extraction
    tell a slow fetch from a normal one."""

    def load(self, url: str, task_id: int | None = None) -> Image.Image: ...


@dataclass
class ExtractReport:
    extracted: int
    skipped: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0
    remaining: int = 0  # items not attempted because ``should_stop`` ended the run early

    @property
    def images_per_second(self) -> float:
        return self.extracted / self.seconds if self.seconds > 0 else 0.0


def generation_info(backbone: Backbone, generation: int) -> GenerationInfo:
    """The GenerationInfo that describes vectors produced by ``backbone``."""
    return GenerationInfo(
        generation=generation,
        backbone=backbone.name,
        weights_hash=backbone.weights_hash,
        preprocessing=dict(backbone.preprocessing),
        dim=backbone.dim,
    )


def matches(info: GenerationInfo, backbone: Backbone) -> bool:
    """True when ``backbone`` produces vectors comparable with the generation's (all but the number)."""
    mine = generation_info(backbone, info.generation).to_dict()
    return mine == info.to_dict()


class _ImageDataset(Dataset):
    """One item = (task_id, tensor, ok, reason); failures return a zero tensor and the reason."""

    def __init__(self, items: Sequence[tuple[int, str]], loader: ImageLoader, transform: Any, shape: tuple) -> None:
        self.items = list(items)
        self.loader = loader
        self.transform = transform
        self.shape = tuple(shape)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, bool, str]:
        task_id, url = self.items[i]
        try:
            prepared = getattr(self.loader, "load_prepared", None)
            if prepared is not None:  # the transform runs while the decode budget is held
                x = prepared(url, task_id, self.transform)
            else:
                x = self.transform(self.loader.load(url, task_id))
            return int(task_id), x, True, ""
        except ImageFetchError as e:
            reason = e.reason
        except Exception as e:  # a transform or codec bug must not kill the whole run
            reason = f"{type(e).__name__} while preparing image"
        return int(task_id), torch.zeros(self.shape), False, reason


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not each grab every core


def _make_loader(dataset: _ImageDataset, batch_size: int, num_workers: int) -> DataLoader:
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs = {"worker_init_fn": _worker_init, "prefetch_factor": 2, "persistent_workers": False}
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=False,
        **kwargs,
    )


def _loader_batches(dataset: _ImageDataset, batch_size: int, num_workers: int) -> Generator[Batch, None, None]:
    """A generator, so that ``close()`` ends the worker processes at once."""
    yield from _make_loader(dataset, batch_size, num_workers)


class _FetchStream:
    """Batches built from image fetches as they complete: a feeder thread keeps ``concurrency`` fetches
    running (plus a slow lane) while the caller embeds, and the caller takes whatever has arrived.

    Why: with a batch fetched as a unit, one image that drips a byte every few seconds held its whole batch
    for the full image deadline, batch after batch (12 such images among 40 tasks: 5 batches x 30 s). Here
    a fetch that has run for ``slow_after`` seconds stops counting toward ``concurrency``: it finishes or
    times out in the background (at most ``concurrency`` of them at once) while the next images start. A
    batch is ``batch_size`` results, or whatever has arrived once only slow fetches are left in flight. At
    most two batches of results wait for the caller; the feeder starts no fetch beyond that.

    The end: after ``stop()`` (or once every item has started) no fetch starts; those in flight are waited
    for at most ``drain_seconds`` and their results yielded (an image or a skip reason). One still running
    then is abandoned (``abandoned`` counts it) and left for the next run; with ``drain_seconds`` a little
    over the fetcher's deadline only an image still decoding can be. ``slow_after`` None: no slow lane
    (loaders without a deadline, such as local files) and no limit on the wait at the end."""

    def __init__(self, dataset: _ImageDataset, batch_size: int, concurrency: int, slow_after: float | None = None,
                 drain_seconds: float | None = None) -> None:  # fmt: skip
        self.dataset = dataset
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.slow_after = slow_after
        self.drain_seconds = drain_seconds
        self.abandoned = 0
        self._cond = threading.Condition()  # guards everything below; reentrant (a done callback may run inline)
        self._started: dict[Future, float] = {}  # fetches in flight -> when they started
        self._ready: list[tuple[int, torch.Tensor, bool, str]] = []
        self._next = 0
        self._stopping = self._finished = self._closed = False
        self._starved = False  # the feeder has no fetch counting toward concurrency, and cannot start one
        self._error: BaseException | None = None

    def stop(self) -> None:
        """Start no more fetches; what is in flight is still yielded (see the class)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def _fresh(self, now: float) -> list[float]:
        """Start times of the fetches in flight that still count toward ``concurrency``."""
        return [t for t in self._started.values() if self.slow_after is None or now - t < self.slow_after]

    def _arrived(self, future: Future) -> None:
        with self._cond:
            if self._started.pop(future, None) is None or self._closed:
                return  # abandoned, or cancelled at the end
            try:
                self._ready.append(future.result())
            except BaseException as e:  # _ImageDataset turns every Exception into a skip: this is a bug
                self._error = e
            self._cond.notify_all()

    def _feed(self, pool: ThreadPoolExecutor) -> None:
        n = len(self.dataset)
        lane = self.concurrency if self.slow_after is not None else 0
        drain_until: float | None = None
        with self._cond:
            try:
                while not self._closed and self._error is None:
                    now = time.monotonic()
                    while (not self._stopping and self._next < n and len(self._fresh(now)) < self.concurrency
                           and len(self._started) < self.concurrency + lane
                           and len(self._ready) < 2 * self.batch_size):  # fmt: skip
                        future = pool.submit(self.dataset.__getitem__, self._next)
                        self._started[future] = now
                        self._next += 1
                        future.add_done_callback(self._arrived)  # runs at once if already done
                    # from what is still in flight: a fetch done before its callback was added is not
                    fresh = self._fresh(now)
                    feeding = not self._stopping and self._next < n
                    self._starved = not fresh
                    if not feeding and not self._started:
                        break
                    timeout: float | None = None
                    if fresh and self.slow_after is not None:
                        timeout = min(fresh) + self.slow_after - now
                    if not feeding and self.drain_seconds is not None:
                        drain_until = now + self.drain_seconds if drain_until is None else drain_until
                        if now >= drain_until:
                            self.abandoned = len(self._started)
                            self._started.clear()
                            log.warning("%d image(s) still loading %.0fs after the last one started: left for "
                                        "the next run", self.abandoned, self.drain_seconds)  # fmt: skip
                            break
                        timeout = drain_until - now if timeout is None else min(timeout, drain_until - now)
                    self._cond.notify_all()  # a fetch may have turned slow: the caller may take a partial batch
                    self._cond.wait(timeout)
            except BaseException as e:
                self._error = e
            self._finished = True
            self._cond.notify_all()

    def _batch_ready(self) -> bool:
        if len(self._ready) >= self.batch_size or self._finished or self._error is not None:
            return True
        return bool(self._ready) and self._starved  # only slow fetches left in flight, or none

    def __iter__(self) -> Generator[Batch, None, None]:
        lane = self.concurrency if self.slow_after is not None else 0
        pool = ThreadPoolExecutor(max_workers=self.concurrency + lane, thread_name_prefix="image-fetch")
        feeder = threading.Thread(target=self._feed, args=(pool,), name="image-feed", daemon=True)
        feeder.start()
        try:
            while True:
                with self._cond:
                    while not self._batch_ready():
                        self._cond.wait(1.0)
                    if self._error is not None:
                        raise self._error
                    if not self._ready:
                        return
                    batch, self._ready = self._ready[: self.batch_size], self._ready[self.batch_size :]
                    self._cond.notify_all()  # room for more results: the feeder may start fetches again
                yield default_collate(batch)
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            feeder.join()
            pool.shutdown(wait=False, cancel_futures=True)  # abandoned fetches end by their own deadline


def extract_items(
    backbone: Backbone,
    items: Sequence[tuple[int, str]],
    loader: ImageLoader,
    generation: FeatureGeneration,
    batch_size: int = 64,
    num_workers: int = 2,
    shard_size: int = 4096,
    progress: Progress | None = None,
    fetch_concurrency: int = 8,
    flush_every: int = 512,
    flush_seconds: float = 30.0,
    should_stop: Callable[[], bool] | None = None,
    image_timeout: float | None = None,
) -> ExtractReport:
    """Core loop shared by the Label Studio and directory entry points.

    ``fetch_concurrency``: images loaded at once when ``num_workers`` is 0 (ignored with worker processes),
    plus as many slow ones (``_FetchStream``). ``image_timeout``: the loader's deadline per image (default:
    its ``deadline_seconds``, if any); a fetch running longer than SLOW_FETCH_SHARE of it is slow, and the
    end of the run waits about this long (plus max(2 s, 10%)) for the fetches in flight. Vectors and skip
    reasons are appended to the store every ``min(flush_every, shard_size)`` vectors or ``flush_seconds``,
    whichever comes first, and on an exception. ``should_stop`` is asked after each batch; when it says True
    no fetch starts, those in flight are embedded or skipped (worker processes: dropped), and
    ``ExtractReport.remaining`` counts the items left.
    """
    if not matches(generation.info, backbone):
        raise ValueError(
            f"backbone {backbone.name} (weights {backbone.weights_hash[:12]}, dim {backbone.dim}, input "
            f"{backbone.input_size}) does not match generation {generation.info.generation}: "
            f"{generation.info}"
        )
    if fetch_concurrency < 1 or flush_every < 1 or shard_size < 1:
        raise ValueError(
            f"fetch_concurrency, flush_every and shard_size must be at least 1, got "
            f"{fetch_concurrency}, {flush_every}, {shard_size}"
        )
    start = time.perf_counter()
    total = len(items)
    report = ExtractReport(extracted=0)
    if not total:
        return report
    dataset = _ImageDataset(items, loader, backbone.transform, backbone.input_size)
    flush_size = min(flush_every, shard_size)
    buf_ids: list[np.ndarray] = []
    buf_vec: list[np.ndarray] = []
    pending_skips: dict[int, str] = {}
    buffered = done = 0
    last_flush = time.monotonic()

    def flush() -> None:
        nonlocal buffered, last_flush
        if buffered:
            generation.append(np.concatenate(buf_ids), np.concatenate(buf_vec))
            report.extracted += buffered
            buf_ids.clear()
            buf_vec.clear()
            buffered = 0
        if pending_skips:
            generation.record_skips(pending_skips)
            report.skipped.update(pending_skips)
            pending_skips.clear()
        last_flush = time.monotonic()

    if image_timeout is None:
        image_timeout = getattr(loader, "deadline_seconds", None)
    stream: _FetchStream | None = None
    if num_workers > 0:
        source: Generator[Batch, None, None] = _loader_batches(dataset, batch_size, num_workers)
    else:
        slow_after = drain = None
        if image_timeout is not None:  # the wait at the end: the deadline, and time for the thread to report it
            slow_after, drain = image_timeout * SLOW_FETCH_SHARE, image_timeout + max(2.0, 0.1 * image_timeout)
        stream = _FetchStream(dataset, batch_size, fetch_concurrency, slow_after, drain)
        source = iter(stream)
    stopping = False

    try:
        with contextlib.closing(source) as batches:
            for ids, x, ok, reasons in batches:
                ok_mask = ok.numpy().astype(bool)
                ids_np = ids.numpy().astype(np.int64)
                for tid, good, why in zip(ids_np, ok_mask, reasons, strict=True):
                    if not good:
                        pending_skips[int(tid)] = why
                if ok_mask.any():
                    vec = backbone.embed(x[torch.from_numpy(ok_mask)])
                    buf_ids.append(ids_np[ok_mask])
                    buf_vec.append(vec.astype(np.float16))
                    buffered += int(ok_mask.sum())
                done += len(ids_np)
                overdue = time.monotonic() - last_flush >= flush_seconds
                if buffered >= flush_size or (overdue and (buffered or pending_skips)):
                    flush()
                if progress is not None:
                    progress(done, total)
                if not stopping and done < total and should_stop is not None and should_stop():
                    if stream is None:
                        break
                    stream.stop()  # the fetches in flight still arrive, and are kept
                    stopping = True
    except BaseException:
        with contextlib.suppress(Exception):  # keep what is embedded; the original error matters more
            flush()
        raise
    flush()
    report.remaining = total - done
    report.seconds = time.perf_counter() - start
    log.info(
        "extracted %d vectors (%d skipped, %d left) in %.1fs (%.1f img/s)",
        report.extracted,
        len(report.skipped),
        report.remaining,
        report.seconds,
        report.images_per_second,
    )
    return report


def extract_to_store(
    backbone: Backbone,
    items: Sequence[tuple[int, str]],
    fetcher: ImageFetcher,
    generation: FeatureGeneration,
    batch_size: int = 64,
    num_workers: int = 2,
    shard_size: int = 4096,
    progress: Progress | None = None,
    fetch_concurrency: int = 8,
    flush_every: int = 512,
    flush_seconds: float = 30.0,
    should_stop: Callable[[], bool] | None = None,
) -> ExtractReport:
    """Embed Label Studio tasks ``(task_id, image_url)``; the caller passes only ids still missing.
    Parameters as in ``extract_items``."""
    return extract_items(
        backbone,
        items,
        fetcher,
        generation,
        batch_size,
        num_workers,
        shard_size,
        progress,
        fetch_concurrency=fetch_concurrency,
        flush_every=flush_every,
        flush_seconds=flush_seconds,
        should_stop=should_stop,
    )


def list_images(directory: Path | str, recursive: bool = True) -> list[Path]:
    """Image files under ``directory`` in sorted (stable) order: their index is the task id."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"not a directory: {root}")
    pattern = "**/*" if recursive else "*"
    files = [p for p in root.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def extract_dir(
    backbone: Backbone,
    directory: Path | str,
    generation: FeatureGeneration,
    batch_size: int = 64,
    num_workers: int = 2,
    shard_size: int = 4096,
    progress: Progress | None = None,
    resume: bool = True,
    max_bytes: int = 50 * 2**20,
    max_pixels: int = 64_000_000,
) -> tuple[ExtractReport, list[Path]]:
    """Embed every image file under ``directory`` (CLI ``extract --images DIR``). Task id = index in the
    sorted file list; with ``resume`` ids already in the generation (or skipped) are not redone."""
    files = list_images(directory)
    items = [(i, os.fspath(p)) for i, p in enumerate(files)]
    if resume and items:
        todo = set(generation.missing([i for i, _ in items])) - set(generation.skipped())
        items = [it for it in items if it[0] in todo]
    loader = LocalImageLoader(max_bytes=max_bytes, max_pixels=max_pixels)
    report = extract_items(backbone, items, loader, generation, batch_size, num_workers, shard_size, progress)
    return report, files
