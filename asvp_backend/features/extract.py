"""Streaming feature extraction: fetch + decode + transform (in DataLoader worker processes, or in a bounded
thread pool without them), embed in batches, append to the store in small steps.

Why streaming and small steps: a project can hold a million images, so nothing is ever held in RAM beyond a
few batches. Invariant: what is not yet in the store is at most one flush step, ``min(flush_every,
shard_size)`` vectors (plus the batch in hand) or ``flush_seconds`` of work, so a killed run loses little
and re-running with only the still-missing ids resumes. One bad image becomes a recorded skip reason, never
a failed batch; one slow image server delays only its own images (each bounded by the fetcher's deadline),
not the whole batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from ..labelstudio.images import ImageFetcher, ImageFetchError, LocalImageLoader
from .backbones import Backbone
from .store import FeatureGeneration, GenerationInfo

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
Progress = Callable[[int, int], None]


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]  # task ids, images, ok mask, skip reasons


class ImageLoader(Protocol):
    """Loads one image. Called from several threads at once (``fetch_concurrency``): must be thread-safe."""

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
            img = self.loader.load(url, task_id)
            x = self.transform(img)
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


def _threaded_batches(dataset: _ImageDataset, batch_size: int, fetch_concurrency: int) -> Iterator[Batch]:
    """Batches like a worker-less DataLoader's, but each batch's images are loaded by up to
    ``fetch_concurrency`` threads (fetching is mostly waiting on servers), results in input order."""
    with ThreadPoolExecutor(max_workers=fetch_concurrency, thread_name_prefix="image-fetch") as pool:
        for start in range(0, len(dataset), batch_size):
            indices = range(start, min(start + batch_size, len(dataset)))
            yield default_collate(list(pool.map(dataset.__getitem__, indices)))


def _batches(
    dataset: _ImageDataset, batch_size: int, num_workers: int, fetch_concurrency: int
) -> Generator[Batch, None, None]:
    """A generator either way, so that ``close()`` ends worker processes or fetch threads at once."""
    if num_workers > 0:
        yield from _make_loader(dataset, batch_size, num_workers)
    else:
        yield from _threaded_batches(dataset, batch_size, fetch_concurrency)


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
) -> ExtractReport:
    """Core loop shared by the Label Studio and directory entry points.

    ``fetch_concurrency``: images loaded at once when ``num_workers`` is 0 (ignored with worker processes).
    Vectors and skip reasons are appended to the store every ``min(flush_every, shard_size)`` vectors or
    ``flush_seconds``, whichever comes first, and on an exception. ``should_stop`` is asked after each
    batch; when it says True the run ends early and ``ExtractReport.remaining`` counts the items left.
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

    try:
        with contextlib.closing(_batches(dataset, batch_size, num_workers, fetch_concurrency)) as batches:
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
                if done < total and should_stop is not None and should_stop():
                    break
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
