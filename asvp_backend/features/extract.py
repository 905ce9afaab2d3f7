"""Streaming feature extraction: fetch + decode + transform in DataLoader workers, embed in batches,
append to the store every ``shard_size`` vectors.

Why streaming and shards: a project can hold a million images, so nothing is ever held in RAM beyond a few
batches, and an interrupted run has already persisted all full shards, so re-running with only the
still-missing ids resumes. One bad image becomes a recorded skip reason, never a failed batch.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..labelstudio.images import ImageFetcher, ImageFetchError, LocalImageLoader
from .backbones import Backbone
from .store import FeatureGeneration, GenerationInfo

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
Progress = Callable[[int, int], None]


class ImageLoader(Protocol):
    def load(self, url: str, task_id: int | None = None) -> Image.Image: ...


@dataclass
class ExtractReport:
    extracted: int
    skipped: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0

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


def extract_items(
    backbone: Backbone,
    items: Sequence[tuple[int, str]],
    loader: ImageLoader,
    generation: FeatureGeneration,
    batch_size: int = 64,
    num_workers: int = 2,
    shard_size: int = 4096,
    progress: Progress | None = None,
) -> ExtractReport:
    """Core loop shared by the Label Studio and directory entry points."""
    if not matches(generation.info, backbone):
        raise ValueError(
            f"backbone {backbone.name} (weights {backbone.weights_hash[:12]}, dim {backbone.dim}, input "
            f"{backbone.input_size}) does not match generation {generation.info.generation}: "
            f"{generation.info}"
        )
    start = time.perf_counter()
    total = len(items)
    report = ExtractReport(extracted=0)
    if not total:
        return report
    dataset = _ImageDataset(items, loader, backbone.transform, backbone.input_size)
    buf_ids: list[np.ndarray] = []
    buf_vec: list[np.ndarray] = []
    pending_skips: dict[int, str] = {}
    buffered = done = 0

    def flush() -> None:
        nonlocal buffered
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

    for ids, x, ok, reasons in _make_loader(dataset, batch_size, num_workers):
        ok_mask = ok.numpy().astype(bool)
        ids_np = ids.numpy().astype(np.int64)
        for tid, good, why in zip(ids_np.tolist(), ok_mask.tolist(), reasons, strict=True):
            if not good:
                pending_skips[tid] = why
        if ok_mask.any():
            vec = backbone.embed(x[torch.from_numpy(ok_mask)])
            buf_ids.append(ids_np[ok_mask])
            buf_vec.append(vec.astype(np.float16))
            buffered += int(ok_mask.sum())
        done += len(ids_np)
        if buffered >= shard_size:
            flush()
        if progress is not None:
            progress(done, total)
    flush()
    report.seconds = time.perf_counter() - start
    log.info(
        "extracted %d vectors (%d skipped) in %.1fs (%.1f img/s)",
        report.extracted,
        len(report.skipped),
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
) -> ExtractReport:
    """Embed Label Studio tasks ``(task_id, image_url)``; the caller passes only ids still missing."""
    return extract_items(backbone, items, fetcher, generation, batch_size, num_workers, shard_size, progress)


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
