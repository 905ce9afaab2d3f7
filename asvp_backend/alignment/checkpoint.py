"""Fine-tuned model checkpoints: a folder with ``model.safetensors`` (the timm state dict, head included) and
``model.json`` (backbone name, class order, recipe, preprocessing, metrics).

Invariant: a checkpoint folder is complete before it is visible. It is written into a hidden sibling folder,
every file and the folder are fsynced, and one rename makes it appear, so a crash leaves either no checkpoint
or a whole one, never a folder that a refresh could half-read (docs/method.md, *The alignment policy*). The weights
are plain timm layout, so ``create_backbone(name, weights=<folder>/model.safetensors)`` loads them too and the
feature extractor can embed with the fine-tuned backbone. model.json records the weights' size and SHA-256;
loading checks them first (alignment/integrity.py), so a damaged file is a CheckpointError naming it.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import timm.data
import torch
from PIL import Image
from torch import nn

from ..features.backbones import create_backbone
from ..features.device import inference_context, prepare_input, resolve_device
from ..features.extract import list_images
from ..features.weights import WeightsMismatchError, WeightsUnavailableError
from ..fsutil import atomic_file, published_dir
from ..imaging import ImageFetchError, LocalImageLoader
from .finetune import FinetuneResult
from .integrity import CHECKPOINT_META, CHECKPOINT_WEIGHTS, checkpoint_problem, weights_record

FORMAT = "asvp-model"
FORMAT_VERSION = 1
_FORWARD_BATCH = 64


class CheckpointError(ValueError):
    """A checkpoint file is missing or unreadable; the message names the file and what is wrong."""


def save_checkpoint(result: FinetuneResult, directory: Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``result`` as a checkpoint folder at ``directory`` (replacing one left by an earlier attempt);
    ``extra`` keys are added to model.json (e.g. the labelled-set size and feature generation)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    with published_dir(directory) as tmp:  # a re-run after a crash replaces the earlier folder
        state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
        save_file(state, str(tmp / CHECKPOINT_WEIGHTS))
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "backbone": result.backbone,
            "classes": list(result.classes),
            "recipe": result.recipe.to_dict(),
            "preprocessing": _jsonable(result.preprocessing),
            "metrics": _jsonable(result.metrics),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            **(extra or {}),
            "weights": weights_record(tmp / CHECKPOINT_WEIGHTS),
        }
        (tmp / CHECKPOINT_META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return directory


def _jsonable(value: Any) -> Any:
    """Tuples become lists, numpy scalars plain numbers (timm configs and metrics hold both)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _preprocessing(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in meta["preprocessing"].items()}


@dataclass
class FineTunedModel:
    """A loaded checkpoint: the timm model (eval mode) with its class order and eval preprocessing."""

    model: nn.Module
    backbone: str
    classes: list[str]
    preprocessing: dict[str, Any]
    meta: dict[str, Any]
    device: torch.device
    _transform: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._transform = timm.data.create_transform(**self.preprocessing, is_training=False)

    def predict_proba(self, images: list[Image.Image]) -> np.ndarray:
        """float32 (n, n_classes) softmax of the model on ``images`` (timm eval transform)."""
        out = [np.empty((0, len(self.classes)), dtype=np.float32)]
        for i in range(0, len(images), _FORWARD_BATCH):
            x = torch.stack([self._transform(im.convert("RGB")) for im in images[i : i + _FORWARD_BATCH]])
            with inference_context(self.device):
                logits = self.model(prepare_input(x, self.device))
            out.append(logits.float().softmax(-1).cpu().numpy())
        return np.concatenate(out)

    def head_proba(self, features: np.ndarray) -> np.ndarray:
        """float32 softmax(W f + b) of the checkpoint's head on pre-logit features (``Backbone.embed`` of this
        model, float16 or float32): scores cached features of a generation this model extracted, no images."""
        head = self.model.get_classifier()  # type: ignore[operator]  # timm models define it
        if not isinstance(head, nn.Linear):
            raise TypeError(f"{self.backbone}: head_proba needs a linear classifier, found {type(head).__name__}")
        f = torch.from_numpy(np.asarray(features, dtype=np.float32))
        if f.ndim != 2 or f.shape[1] != head.in_features:
            raise ValueError(f"features must be (n, {head.in_features}), got {tuple(f.shape)}")
        w = head.weight.detach().float().cpu()
        b = head.bias.detach().float().cpu() if head.bias is not None else torch.zeros(w.shape[0])
        return torch.softmax(f @ w.T + b, dim=-1).numpy()


def read_meta(directory: Path) -> dict[str, Any]:
    """model.json of a checkpoint, checked for format, version and the keys loading needs."""
    path = Path(directory) / CHECKPOINT_META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an {FORMAT} checkpoint")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    missing = [k for k in ("backbone", "classes", "preprocessing") if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: missing keys {missing}")
    return meta


def load_checkpoint(directory: Path, device: str = "cpu") -> FineTunedModel:
    """Load a checkpoint folder written by ``save_checkpoint`` onto ``device`` ('cpu' | 'cuda' | 'auto')."""
    directory = Path(directory)
    meta = read_meta(directory)
    problem = checkpoint_problem(directory, full=True)
    if problem:
        raise CheckpointError(problem)
    weights = directory / CHECKPOINT_WEIGHTS
    pre = _preprocessing(meta)
    dev = resolve_device(device)  # outside the try: a missing GPU is not a checkpoint problem
    try:
        bb = create_backbone(meta["backbone"], weights, device=dev, image_size=int(pre["input_size"][-1]))
    except (WeightsUnavailableError, WeightsMismatchError) as e:
        raise CheckpointError(f"{weights}: {e}") from None
    except Exception as e:  # a truncated safetensors file raises the library's own errors
        raise CheckpointError(f"{weights}: unreadable ({type(e).__name__}: {str(e)[:200]})") from None
    classes = [str(c) for c in meta["classes"]]
    if bb.num_classes != len(classes):
        raise CheckpointError(f"{weights}: head has {bb.num_classes} rows, model.json names {len(classes)} classes")
    return FineTunedModel(bb.model, meta["backbone"], classes, pre, meta, bb.device)


def classify_folder(
    checkpoint: Path,
    images_dir: Path,
    out_csv: Path,
    batch_size: int = 64,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Classify every image under ``images_dir`` into ``out_csv`` (written atomically).

    Columns: path (relative to ``images_dir``), label, confidence, ``p_<class>`` per class, error. An unreadable
    file gets a row with an empty label and the reason in ``error``; it never stops the run.
    """
    start = time.perf_counter()
    model = load_checkpoint(checkpoint, device=device)
    root = Path(images_dir)
    files = list_images(root)
    loader = LocalImageLoader()
    failed = 0

    def load(path: Path) -> Image.Image | str:
        try:
            return loader.load(os.fspath(path))
        except ImageFetchError as e:
            return e.reason
        except Exception as e:  # a codec bug must not stop the folder
            return f"{type(e).__name__} while reading image"

    with atomic_file(Path(out_csv), "w", newline="", encoding="utf-8") as fh, ThreadPoolExecutor(4) as pool:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "confidence", *(f"p_{c}" for c in model.classes), "error"])
        for i in range(0, len(files), batch_size):
            chunk = files[i : i + batch_size]
            loaded = list(pool.map(load, chunk))
            good = [im for im in loaded if isinstance(im, Image.Image)]
            probs = iter(model.predict_proba(good))
            for path, im in zip(chunk, loaded, strict=True):
                rel = path.relative_to(root).as_posix()
                if isinstance(im, str):
                    failed += 1
                    writer.writerow([rel, "", "", *([""] * len(model.classes)), im])
                    continue
                p = next(probs)
                k = int(p.argmax())
                writer.writerow([rel, model.classes[k], f"{p[k]:.6f}", *(f"{v:.6f}" for v in p), ""])
            if progress is not None:
                progress(min(i + batch_size, len(files)), len(files))
    return {
        "images": len(files),
        "classified": len(files) - failed,
        "failed": failed,
        "seconds": time.perf_counter() - start,
    }
