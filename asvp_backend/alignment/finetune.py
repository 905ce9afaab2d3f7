"""Fine-tune a timm backbone on the labelled images: FT and LP-FT.

Invariant: every run starts from the pre-trained weights and a fresh linear head, never from an earlier round's
model, so a model depends only on the labelled set, the recipe and the seed. LP-FT first fits the head alone on
the frozen backbone, then fine-tunes everything from that head: a random head during full fine-tuning distorts
the pre-trained features, which costs most when labels are few.

The recipe is built so that tens of labels cannot end at chance (docs/decisions.md, "Start Training on tens of
labels"):
- the LP head is fitted by L-BFGS on the frozen features (an L2-penalised multinomial logistic regression on
  centred features scaled to unit mean norm, folded back into the linear head). The objective is convex and the
  line search only accepts steps that lower it, so the head cannot diverge whatever the feature norm (the pooled
  Lite0 feature's squared norm is about 4,300 at 64 px and 280 at 224 px: no fixed SGD step suits both);
- the learning rates are those of the reference batch (128) and scale linearly with the batch, so batch 8 does
  not take batch-128 steps; LP-FT's FT stage moves the backbone at a tenth of FT's rate (it starts from a
  fitted head, and at 224 px the full rate undid the probe within 16 steps);
- LP-FT's FT stage keeps BatchNorm's pre-trained statistics (its affine weights learn): its head was fitted on
  features normalised by them, and re-estimated on a few hundred augmented crops they cost it 8 to 22 points of
  test accuracy at 150 to 500 labels. FT re-estimates them from batch ``bn_min_batch`` (32) up: at its full
  rate, with the statistics kept, batch 64 ended at chance, and a batch of 8 gives noisy statistics;
- the step floor: ``recipe_for`` never gives the FT stage fewer than MIN_STEPS optimiser steps, whatever
  epochs were asked for, unless the caller insists.

The labelled images are fetched and decoded ONCE into an in-memory cache, so epochs never refetch from Label
Studio. The cache holds uint8 squares of side S = floor(input / crop_pct) (the eval transform's resize size;
256 for a 224 input): N x S x S x 3 bytes, about 197 kB per image at 224 px, 2 GB per 10,000 labels.
Training crops and flips these squares; evaluation takes their centre crop.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..features.backbones import create_backbone
from ..features.device import inference_context, resolve_device
from ..imaging import ImageFetchError

log = logging.getLogger(__name__)

METHODS = ("ft", "lpft")
TARGET_STEPS = 300  # FT optimiser steps that recipe_for aims at
MIN_STEPS = 150  # the step floor: FT optimiser steps recipe_for never goes under unless the caller insists
MIN_EPOCHS, MAX_EPOCHS = 5, 50
FT_BACKBONE_LR = 0.01  # the reference FT value at batch 128
LPFT_BACKBONE_LR = 0.001  # LP-FT's FT stage starts from a fitted head: a tenth of it (docs/decisions.md)
MIN_BATCH, MAX_BATCH = 8, 128
MIN_HOLDOUT_SET = 10  # no held-out slice below this many readable labelled images
MIN_JUDGED = 10  # held-out images wanted for a verdict, as long as they are at most a fifth of the set
MAX_SKIP_REASONS = 20
LP_MAX_ROWS = 50_000  # frozen feature rows the LP fit holds (fewer passes over a large set)
LP_MAX_ITER = 500  # L-BFGS iterations of the LP fit
_RETIRED_KEYS = {"lp_lr", "head_lr"}  # recipe keys of older checkpoints (SGD LP stage, raw head lr)
_DEFAULT_CROP_PCT = 0.875  # timm's default when a model's config has none
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

Progress = Callable[[int, int, str], None]


class FinetuneInterrupted(Exception):
    """``should_stop`` asked the run to end (a job's time limit); nothing is returned."""


@dataclass(frozen=True)
class FinetuneRecipe:
    """Hyper-parameters of one run. The FT values are the reference ImageNet ones at batch ``lr_batch``."""

    method: str  # "ft" | "lpft"
    epochs: int  # FT epochs (for lpft: the FT stage)
    batch_size: int
    backbone_lr: float | None = None  # None: 0.01 for ft, 0.001 for lpft (LPFT_BACKBONE_LR)
    head_step: float = 25.0  # the head's learning rate times the mean squared feature norm (see _train_stage)
    lr_batch: int = 128  # backbone_lr and head_step are for this batch; a run scales them by batch_size / lr_batch
    momentum: float = 0.9  # SGD nesterov
    weight_decay: float = 1e-4
    milestones: tuple[float, ...] = (0.6, 0.8)  # lr x 0.1 at these fractions of the FT steps
    lp_epochs: int = 10  # LP stage of lpft: passes over the training images whose frozen features fit the head
    lp_l2: float = 1e-3  # L2 penalty of the LP fit (mean cross-entropy + lp_l2 / 2 |W|^2, unit-norm features)
    bn_min_batch: int | None = 32  # FT re-estimates BatchNorm's statistics from this batch up (None: never);
    # LP-FT never does (docs/decisions.md, "BatchNorm's statistics in fine-tuning")
    holdout_fraction: float = 0.1
    max_holdout: int = 500
    augment: bool = True  # RandomResizedCrop(input) + horizontal flip; off: the eval centre crop
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown fine-tuning method {self.method!r}; choose one of {METHODS}")
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))
        if self.backbone_lr is None:
            object.__setattr__(self, "backbone_lr", LPFT_BACKBONE_LR if self.method == "lpft" else FT_BACKBONE_LR)
        if self.epochs < 0 or self.lp_epochs < 0 or self.batch_size < 2:  # BatchNorm cannot train on one image
            raise ValueError(f"epochs and lp_epochs must be >= 0 and batch_size >= 2: {self}")
        if self.epochs + (self.lp_epochs if self.method == "lpft" else 0) == 0:
            raise ValueError(f"recipe {self.method!r} has no epoch to train")
        if not 0.0 <= self.holdout_fraction < 1.0 or self.max_holdout < 0:
            raise ValueError("holdout_fraction must be in [0, 1) and max_holdout >= 0")
        if any(not 0.0 < m <= 1.0 for m in self.milestones):
            raise ValueError(f"milestones are fractions of the epochs in (0, 1], got {self.milestones}")
        if self.lr_batch < 1 or self.lp_l2 <= 0.0 or self.head_step <= 0.0:
            raise ValueError(f"lr_batch must be >= 1, lp_l2 and head_step > 0: {self}")
        if self.bn_min_batch is not None and self.bn_min_batch < 2:
            raise ValueError(f"bn_min_batch must be None or >= 2 (BatchNorm cannot train on one image): {self}")

    @property
    def body_lr(self) -> float:
        """The backbone's learning rate at ``batch_size`` (the linear scaling rule)."""
        return float(self.backbone_lr or 0.0) * self.lr_scale

    @property
    def trains_batchnorm(self) -> bool:
        """Whether the FT stage re-estimates BatchNorm's statistics: FT from ``bn_min_batch`` up, LP-FT never."""
        return self.method == "ft" and self.bn_min_batch is not None and self.batch_size >= self.bn_min_batch

    @property
    def lr_scale(self) -> float:
        """The linear scaling rule: learning rates grow with the batch, from the reference batch's values."""
        return self.batch_size / self.lr_batch

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneRecipe:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - _RETIRED_KEYS)
        if unknown:
            raise ValueError(f"unknown fine-tuning recipe keys {unknown}")
        kwargs: dict[str, Any] = {k: tuple(v) if k == "milestones" else v for k, v in d.items() if k in known}
        return cls(**kwargs)


def _holdout_size(n: int, fraction: float, cap: int) -> int:
    """``fraction`` of the set, but at least MIN_JUDGED images as long as they are at most a fifth of it (a
    verdict on four images is noise); none below MIN_HOLDOUT_SET images or at fraction 0."""
    if n < MIN_HOLDOUT_SET or fraction <= 0.0:
        return 0
    return min(cap, max(round(fraction * n), min(MIN_JUDGED, n // 5)))


def recipe_for(
    method: str,
    n_labels: int,
    epochs: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    insist: bool = False,
) -> FinetuneRecipe:
    """The default recipe with epochs and batch scaled to the labelled set.

    batch = the largest power of two <= n/4, clipped to [8, 128] (128 is the reference batch; a quarter of the
    set keeps at least about four steps per epoch). epochs = ceil(300 / steps per epoch) over the training part
    (n minus the held-out slice), clipped to [5, 50]: small sets still get a few hundred optimiser steps, 50 is
    the reference ImageNet value, and 5 passes bound large sets. Explicit ``epochs`` / ``batch_size`` win, with
    one exception, the step floor: the FT stage gets at least MIN_STEPS optimiser steps (more epochs if need
    be, above the cap of 50 too), because a fresh head and a moving backbone need a few hundred steps whatever
    an epoch holds (10 epochs of 45 images at batch 8 are 40 steps, and end at chance). ``insist=True`` keeps
    the epochs as given.
    """
    if n_labels < 0:
        raise ValueError(f"n_labels must be >= 0, got {n_labels}")
    if batch_size is None:
        quarter = max(1, n_labels // 4)
        batch_size = min(MAX_BATCH, max(MIN_BATCH, 2 ** int(math.log2(quarter))))
    n_train = n_labels - _holdout_size(n_labels, FinetuneRecipe.holdout_fraction, FinetuneRecipe.max_holdout)
    steps_per_epoch = _steps_per_epoch(max(1, n_train), batch_size)
    if epochs is None:
        epochs = min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(TARGET_STEPS / steps_per_epoch)))
    if not insist:
        epochs = max(epochs, step_floor_epochs(n_train, batch_size))
    return FinetuneRecipe(method=method, epochs=epochs, batch_size=batch_size, seed=seed)


def step_floor_epochs(n_train: int, batch_size: int) -> int:
    """The fewest epochs that give MIN_STEPS optimiser steps over ``n_train`` images (the step floor)."""
    return math.ceil(MIN_STEPS / _steps_per_epoch(max(1, n_train), batch_size))


class LabelledImages(Protocol):
    """The labelled set as the fine-tuning sees it: a label and a loader per item."""

    def __len__(self) -> int: ...
    def label(self, index: int) -> str: ...
    def load(self, index: int) -> Image.Image: ...  # may raise; such items are skipped with a reason


@dataclass
class FinetuneResult:
    model: nn.Module  # timm model with the new head, eval mode, on CPU
    backbone: str  # timm model name
    classes: list[str]  # head row i = classes[i] (sorted label names)
    recipe: FinetuneRecipe
    preprocessing: dict[str, Any]  # timm data config used (input_size, mean, std, crop_pct, interpolation)
    metrics: dict[str, Any]
    holdout_indices: list[int]  # indices into the LabelledImages that were held out
    holdout_predictions: list[str] = field(default_factory=list)  # the model's class per held-out index


# ------------------------------------------------------------------------------------------------ image cache


@dataclass
class _Cache:
    """Decoded labelled images: ``pixels[rows]`` are the readable ones, ``y`` their class indices."""

    pixels: np.ndarray  # (n_items, S, S, 3) uint8; rows of skipped items stay unused
    rows: np.ndarray  # readable item indices
    y: np.ndarray  # class index per readable item
    classes: list[str]
    skipped: dict[int, str] = field(default_factory=dict)


def cache_side(preprocessing: dict[str, Any]) -> int:
    """S, the eval transform's resize size: floor(input / crop_pct) as timm computes it."""
    _, h, w = preprocessing["input_size"]
    if h != w:
        raise ValueError(f"fine-tuning needs a square input size, got {h}x{w}; pass image_size")
    return int(math.floor(int(h) / float(preprocessing.get("crop_pct") or _DEFAULT_CROP_PCT)))


def _square(img: Image.Image, side: int, resample: Image.Resampling) -> np.ndarray:
    """Resize the short side to ``side`` (as torchvision's Resize does), then take the centre square."""
    img = img.convert("RGB")
    w, h = img.size
    size = (side, int(side * h / w)) if w <= h else (int(side * w / h), side)
    img = img.resize(size, resample)
    left, top = int(round((size[0] - side) / 2.0)), int(round((size[1] - side) / 2.0))
    return np.asarray(img.crop((left, top, left + side, top + side)), dtype=np.uint8)


def _skip_reason(exc: Exception) -> str:
    return exc.reason if isinstance(exc, ImageFetchError) else f"{type(exc).__name__}: {str(exc)[:200]}"


def _load_cache(
    images: LabelledImages,
    side: int,
    resample: Image.Resampling,
    concurrency: int,
    progress: Progress | None,
    should_stop: Callable[[], bool] | None,
) -> _Cache:
    n = len(images)
    labels = [str(images.label(i)) for i in range(n)]
    pixels = np.empty((n, side, side, 3), dtype=np.uint8)

    def load(i: int) -> str | None:  # threads write distinct rows of ``pixels``
        try:
            pixels[i] = _square(images.load(i), side, resample)
        except Exception as e:  # one bad image is a recorded skip, never a failed run
            return _skip_reason(e)
        return None

    skipped: dict[int, str] = {}
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="finetune-load")
    try:
        for i, reason in enumerate(pool.map(load, range(n))):
            if reason is not None:
                skipped[i] = reason
            _tick(progress, should_stop, i + 1, n, "loading")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    rows = np.array([i for i in range(n) if i not in skipped], dtype=np.int64)
    classes = sorted({labels[i] for i in rows.tolist()})
    if len(classes) < 2:
        raise ValueError(
            f"fine-tuning needs labelled images of at least two classes; found {len(classes)} "
            f"({', '.join(repr(c) for c in classes) or 'none'}) among {len(rows)} readable images "
            f"({len(skipped)} of {n} unreadable)"
        )
    index = {c: k for k, c in enumerate(classes)}
    y = np.array([index[labels[i]] for i in rows.tolist()], dtype=np.int64)
    return _Cache(pixels, rows, y, classes, skipped)


def _tick(progress: Progress | None, should_stop: Callable[[], bool] | None, done: int, total: int, stage: str) -> None:
    if progress is not None:
        progress(done, total, stage)
    if should_stop is not None and should_stop():
        raise FinetuneInterrupted(f"fine-tuning stopped during {stage} at {done}/{total}")


# -------------------------------------------------------------------------------------------------- holdout


def stratified_holdout(y: np.ndarray, fraction: float, cap: int, seed: int) -> np.ndarray:
    """Positions in ``y`` to hold out: ``fraction`` of the set (at most ``cap``), split over the classes with
    at least two examples in proportion to their size (largest remainders), each keeping one for training."""
    n_hold = _holdout_size(len(y), fraction, cap)
    classes, counts = np.unique(y, return_counts=True)
    eligible = counts >= 2
    if n_hold == 0 or not eligible.any():
        return np.empty(0, dtype=np.int64)
    rng = np.random.default_rng([seed, 0])
    quota = np.where(eligible, counts * n_hold / counts[eligible].sum(), 0.0)
    take = np.minimum(np.floor(quota).astype(np.int64), counts - 1)
    # largest remainders first, ties broken at random, never emptying a class
    order = np.lexsort((rng.random(len(classes)), -(quota - np.floor(quota))))
    for k in order:
        if take.sum() >= n_hold:
            break
        if eligible[k] and take[k] < counts[k] - 1:
            take[k] += 1
    held = [rng.permutation(np.flatnonzero(y == c))[:t] for c, t in zip(classes, take, strict=True)]
    return np.sort(np.concatenate(held)).astype(np.int64)


# ---------------------------------------------------------------------------------------------- transforms


class _Batcher:
    """Turns cached uint8 squares into normalised input batches on the device."""

    def __init__(self, pixels: np.ndarray, preprocessing: dict[str, Any], device: torch.device) -> None:
        self.pixels = pixels
        self.side = pixels.shape[1]
        self.size = int(preprocessing["input_size"][-1])
        self.device = device
        self.mean = torch.tensor(preprocessing["mean"], device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(preprocessing["std"], device=device).view(1, 3, 1, 1) * 255.0

    def _raw(self, rows: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(self.pixels[rows]).to(self.device, non_blocking=True)
        return x.permute(0, 3, 1, 2).float()

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" else x.contiguous()

    def centre(self, rows: np.ndarray) -> torch.Tensor:
        off = int(round((self.side - self.size) / 2.0))
        return self._finish(self._raw(rows)[:, :, off : off + self.size, off : off + self.size])

    def augmented(self, rows: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """RandomResizedCrop(size, scale (0.08, 1), ratio (3/4, 4/3)) + horizontal flip per image, as one
        affine resampling of the whole batch."""
        theta = np.zeros((len(rows), 2, 3), dtype=np.float32)
        for k in range(len(rows)):
            top, left, h, w = _rrc_box(self.side, rng)
            flip = -1.0 if rng.random() < 0.5 else 1.0
            theta[k] = [[flip * w / self.side, 0.0, (2 * left + w) / self.side - 1.0],
                        [0.0, h / self.side, (2 * top + h) / self.side - 1.0]]  # fmt: skip
        t = torch.from_numpy(theta).to(self.device)
        grid = F.affine_grid(t, [len(rows), 3, self.size, self.size], align_corners=False)
        x = F.grid_sample(self._raw(rows), grid, mode="bilinear", padding_mode="border", align_corners=False)
        return self._finish(x)


def _rrc_box(side: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of torchvision's RandomResizedCrop on a square, drawn from ``rng``."""
    area = side * side
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= side and 0 < h <= side:
            return int(rng.integers(0, side - h + 1)), int(rng.integers(0, side - w + 1)), h, w
    return 0, 0, side, side


def _batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled positions in batches; a last batch under half a batch joins the previous one.

    Why: every step takes the learning rates scaled to ``batch_size``, so a remainder of two images (450 labels
    at batch 64) took a full step on the noise of two gradients every epoch, and the deliverable fell from 0.943
    to 0.814 on MNIST (docs/decisions.md). A batch of one could not train BatchNorm at all."""
    perm = rng.permutation(n)
    out = [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    if len(out) > 1 and len(out[-1]) < batch_size / 2:
        out[-2:] = [np.concatenate(out[-2:])]
    return out


# ------------------------------------------------------------------------------------------------- training


def reset_head(model: nn.Module, n_classes: int, seed: int) -> None:
    """Replace the timm model's classifier by a fresh linear head of ``n_classes`` rows, initialised from
    ``seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.reset_classifier(n_classes)  # type: ignore[operator]  # timm models define it


def _steps_per_epoch(n: int, batch_size: int) -> int:
    """len(_batches(n, batch_size, ...)) without drawing a permutation."""
    k = math.ceil(n / batch_size)
    return k - 1 if k > 1 and 0 < n % batch_size < batch_size / 2 else k


def _head(model: nn.Module) -> nn.Linear:
    head = model.get_classifier()  # type: ignore[operator]  # timm models define it
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{type(model).__name__}: the classifier is not a single linear layer")
    return head


def _autocast(device: torch.device) -> Any:
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@dataclass
class _Stage:
    """One training stage's bookkeeping."""

    name: str
    seconds: float = 0.0
    images: int = 0
    epoch_losses: list[float] = field(default_factory=list)


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    timm_model: Any = model  # forward_features / forward_head are timm's, not nn.Module's
    return timm_model.forward_head(timm_model.forward_features(x), pre_logits=True)


def _frozen_features(
    model: nn.Module,
    batcher: _Batcher,
    rows: np.ndarray,
    passes: int,
    chunk: int,
    rng: np.random.Generator,
    stage: _Stage,
    progress: Progress | None,
    should_stop: Callable[[], bool] | None,
) -> torch.Tensor:
    """float32 (passes x len(rows), dim) pre-logit features in eval mode: the first pass the eval centre crop,
    the others augmented like the FT stage."""
    model.eval()
    chunks = [np.arange(i, min(i + chunk, len(rows))) for i in range(0, len(rows), chunk)]
    feats: list[torch.Tensor] = []
    for p in range(passes):
        for k, pos in enumerate(chunks):
            x = batcher.augmented(rows[pos], rng) if p else batcher.centre(rows[pos])
            with inference_context(batcher.device):
                feats.append(_features(model, x).float().cpu())
            stage.images += len(pos)
            _tick(progress, should_stop, p * len(chunks) + k + 1, passes * len(chunks), stage.name)
    return torch.cat(feats)


def _fit_head(
    stage: _Stage,
    model: nn.Module,
    batcher: _Batcher,
    rows: np.ndarray,
    y: np.ndarray,
    recipe: FinetuneRecipe,
    rng: np.random.Generator,
    progress: Progress | None,
    should_stop: Callable[[], bool] | None,
) -> float:
    """The LP stage: the head alone, fitted by L-BFGS on frozen features (backbone in eval mode). Returns the
    features' mean squared norm.

    The features are those of ``lp_epochs`` passes over the training images (augmented like the FT stage, the
    first pass the eval centre crop; without augmentation one pass), at most LP_MAX_ROWS rows. The fit minimises
    mean cross-entropy + lp_l2 / 2 |W|^2 on features centred and scaled to unit mean squared norm, so the
    penalty means the same at every input size, then folds the centring and scale into the linear head.
    ``stage.epoch_losses`` gets the training loss of the zero head (log C) and of the fitted one.
    """
    start = time.perf_counter()
    head = _head(model)
    passes = max(1, min(recipe.lp_epochs, LP_MAX_ROWS // max(1, len(rows)))) if recipe.augment else 1
    chunk = min(512, 4 * recipe.batch_size)
    f = _frozen_features(model, batcher, rows, passes, chunk, rng, stage, progress, should_stop).double()
    target = torch.from_numpy(np.tile(y, passes))
    mean = f.mean(0)
    scale = float((f - mean).pow(2).sum(1).mean().sqrt().clamp_min(1e-12))
    z = (f - mean) / scale
    n_classes, dim = head.weight.shape
    w = torch.zeros(n_classes, dim, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=LP_MAX_ITER, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)  # fmt: skip

    def objective() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, target) + 0.5 * recipe.lp_l2 * w.pow(2).sum()
        loss.backward()
        return loss

    def data_loss() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(z @ w.T + b, target))

    stage.epoch_losses.append(data_loss())
    opt.step(objective)
    stage.epoch_losses.append(data_loss())
    with torch.no_grad():
        weight = w.detach() / scale
        head.weight.copy_(weight.to(head.weight.dtype))
        head.bias.copy_((b.detach() - weight @ mean).to(head.bias.dtype))
    stage.seconds = time.perf_counter() - start
    return float(f.pow(2).sum(1).mean())


def _feature_sq_norm(
    model: nn.Module,
    batcher: _Batcher,
    rows: np.ndarray,
    recipe: FinetuneRecipe,
    rng: np.random.Generator,
    progress: Progress | None,
    should_stop: Callable[[], bool] | None,
) -> float:
    """Mean squared norm of the pre-trained features (eval centre crop) of at most 256 training images."""
    sample = np.sort(rng.permutation(len(rows))[:256])
    stage = _Stage("features")
    f = _frozen_features(model, batcher, rows[sample], 1, min(512, 4 * recipe.batch_size), rng, stage, progress,
                         should_stop)  # fmt: skip
    return float(f.double().pow(2).sum(1).mean())


def _batchnorm_eval(model: nn.Module) -> None:
    """BatchNorm layers in eval mode: they normalise with, and keep, the pre-trained running statistics; their
    affine weights still learn."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _train_stage(
    stage: _Stage,
    model: nn.Module,
    batcher: _Batcher,
    rows: np.ndarray,
    y: torch.Tensor,
    recipe: FinetuneRecipe,
    epochs: int,
    rng: np.random.Generator,
    progress: Progress | None,
    should_stop: Callable[[], bool] | None,
    feature_sq_norm: float,
) -> None:
    """The FT stage: all parameters in train mode (BatchNorm statistics frozen unless ``trains_batchnorm``), SGD
    with the learning rates scaled to the batch, x0.1 at the milestones.

    The head's weight learns at head_step / E|f|^2 (``feature_sq_norm``, the pre-trained features' mean squared
    norm) and its bias at head_step: a step then moves the logits by the same amount at every input size
    (E|f|^2 of Lite0 is about 4,300 at 64 px and 280 at 224 px: a fixed head learning rate that suits one
    throws the head about at the other)."""
    head = _head(model)
    head_ids = {id(p) for p in head.parameters()}
    body = [p for p in model.parameters() if id(p) not in head_ids]
    step = recipe.head_step * recipe.lr_scale
    base = [recipe.body_lr, step / max(feature_sq_norm, 1e-12), step]
    groups = [{"params": body, "lr": base[0]}, {"params": [head.weight], "lr": base[1]},
              {"params": [head.bias], "lr": base[2]}]  # fmt: skip
    model.train()
    if not recipe.trains_batchnorm:
        _batchnorm_eval(model)
    opt = torch.optim.SGD(groups, momentum=recipe.momentum, nesterov=True, weight_decay=recipe.weight_decay)
    total = epochs * _steps_per_epoch(len(rows), recipe.batch_size)
    marks = [m * total for m in recipe.milestones]
    done = 0
    device = batcher.device
    start = time.perf_counter()
    for _ in range(epochs):
        losses = torch.zeros((), device=device)
        for pos in _batches(len(rows), recipe.batch_size, rng):
            factor = 0.1 ** sum(done >= m for m in marks)
            for g, lr in zip(opt.param_groups, base, strict=True):
                g["lr"] = lr * factor
            x = batcher.augmented(rows[pos], rng) if recipe.augment else batcher.centre(rows[pos])
            with _autocast(device):
                loss = F.cross_entropy(model(x).float(), y[torch.from_numpy(pos).to(device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses += loss.detach() * len(pos)
            stage.images += len(pos)
            done += 1
            _tick(progress, should_stop, done, total, stage.name)
        stage.epoch_losses.append(float(losses) / len(rows))
    stage.seconds = time.perf_counter() - start
    model.eval()


def _predict(
    model: nn.Module,
    batcher: _Batcher,
    rows: np.ndarray,
    batch_size: int,
    progress: Progress | None,
    should_stop: Callable[[], bool] | None,
) -> np.ndarray:
    """Class index per row (eval mode, centre crop)."""
    model.eval()
    out = [np.empty(0, dtype=np.int64)]
    chunks = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    for k, chunk in enumerate(chunks):
        with inference_context(batcher.device):
            out.append(model(batcher.centre(chunk)).argmax(1).cpu().numpy())
        _tick(progress, should_stop, k + 1, len(chunks), "evaluating")
    return np.concatenate(out)


def finetune(
    backbone: str,
    weights: str,
    images: LabelledImages,
    recipe: FinetuneRecipe,
    device: str = "auto",
    image_size: int | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    load_concurrency: int = 8,
) -> FinetuneResult:
    """Train ``backbone`` (timm name; ``weights`` 'auto' | 'random' | path) on ``images`` with ``recipe``.

    ``progress(done, total, stage)`` is called after every loaded image, every batch of LP features, every FT
    step and every evaluation batch (stages 'loading', 'lp', 'ft', 'evaluating'); ``should_stop()`` is asked at
    the same points and ends the run with ``FinetuneInterrupted``. Unreadable images are skipped with their
    reason; fewer than two classes among the readable ones raise ValueError. The model comes back on CPU in eval
    mode.
    """
    start = time.perf_counter()
    dev = resolve_device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        result = _finetune(backbone, weights, images, recipe, dev, image_size, progress, should_stop, load_concurrency)
    result.metrics["seconds"] = time.perf_counter() - start
    log.info(
        "fine-tuned %s (%s, %d classes, %d train / %d held out) in %.1fs: holdout accuracy %s",
        backbone,
        recipe.method,
        len(result.classes),
        result.metrics["train_size"],
        result.metrics["holdout_size"],
        result.metrics["seconds"],
        result.metrics["holdout_accuracy"],
    )
    return result


def _finetune(
    backbone: str,
    weights: str,
    images: LabelledImages,
    recipe: FinetuneRecipe,
    dev: torch.device,
    image_size: int | None,
    progress: Progress | None,
    should_stop: Callable[[], bool] | None,
    load_concurrency: int,
) -> FinetuneResult:
    # The model comes first: a wrong backbone name or missing weights fail before any image is fetched.
    bb = create_backbone(backbone, weights, device="cpu", image_size=image_size)
    pre = dict(bb.preprocessing)
    resample = _RESAMPLE.get(str(pre.get("interpolation", "bicubic")), Image.Resampling.BICUBIC)
    t0 = time.perf_counter()
    cache = _load_cache(images, cache_side(pre), resample, load_concurrency, progress, should_stop)
    cache_seconds = time.perf_counter() - t0
    reset_head(bb.model, len(cache.classes), recipe.seed)
    model = bb.model.to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)

    held = stratified_holdout(cache.y, recipe.holdout_fraction, recipe.max_holdout, recipe.seed)
    train = np.setdiff1d(np.arange(len(cache.y)), held)
    batcher = _Batcher(cache.pixels, pre, dev)
    rng = np.random.default_rng([recipe.seed, 1])
    eval_batch = min(512, 4 * recipe.batch_size)
    lp, ft = _Stage("lp"), _Stage("ft")
    lp_accuracy, sq_norm = None, None
    if recipe.method == "lpft" and recipe.lp_epochs:
        sq_norm = _fit_head(lp, model, batcher, cache.rows[train], cache.y[train], recipe, rng, progress, should_stop)
        if len(held) and recipe.epochs:  # what the probe alone scores, for the record
            lp_pred = _predict(model, batcher, cache.rows[held], eval_batch, progress, should_stop)
            lp_accuracy = float(np.mean(lp_pred == cache.y[held]))
    if recipe.epochs:
        if sq_norm is None:
            sq_norm = _feature_sq_norm(model, batcher, cache.rows[train], recipe, rng, progress, should_stop)
        y_train = torch.from_numpy(cache.y[train]).to(dev)
        _train_stage(ft, model, batcher, cache.rows[train], y_train, recipe, recipe.epochs, rng, progress,
                     should_stop, sq_norm)  # fmt: skip
    pred = _predict(model, batcher, cache.rows[held], eval_batch, progress, should_stop) if len(held) else None
    accuracy = None if pred is None else float(np.mean(pred == cache.y[held]))
    if lp_accuracy is None and recipe.method == "lpft" and not recipe.epochs:
        lp_accuracy = accuracy

    stages = [s for s in (lp, ft) if s.epoch_losses]
    train_seconds = sum(s.seconds for s in stages)
    losses = ft.epoch_losses or lp.epoch_losses
    steps = recipe.epochs * _steps_per_epoch(len(train), recipe.batch_size) if recipe.epochs else 0
    metrics: dict[str, Any] = {
        "holdout_accuracy": accuracy,
        "holdout_size": int(len(held)),
        "lp_holdout_accuracy": lp_accuracy,
        "train_size": int(len(train)),
        "skipped": len(cache.skipped),
        "skip_reasons": [{"index": i, "reason": r} for i, r in list(cache.skipped.items())[:MAX_SKIP_REASONS]],
        "final_train_loss": losses[-1],
        "train_losses": losses,
        "lp_losses": lp.epoch_losses,
        "images_per_second": sum(s.images for s in stages) / train_seconds if train_seconds else 0.0,
        "device": str(dev),
        "cache_seconds": cache_seconds,
        "cache_bytes": int(cache.pixels.nbytes),
        "lp_seconds": lp.seconds,
        "ft_seconds": ft.seconds,
        "lp_epochs": recipe.lp_epochs if lp.epoch_losses else 0,
        "epochs": recipe.epochs,
        "ft_steps": steps,
        "feature_sq_norm": sq_norm,
        "ft_lr": {
            "backbone": recipe.body_lr,
            "head_weight": recipe.head_step * recipe.lr_scale / sq_norm if sq_norm else None,
            "head_bias": recipe.head_step * recipe.lr_scale,
        }
        if recipe.epochs
        else None,
        "batchnorm": "trained" if recipe.trains_batchnorm else "pre-trained statistics",
    }
    model = model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    return FinetuneResult(
        model=model,
        backbone=backbone,
        classes=list(cache.classes),
        recipe=recipe,
        preprocessing=pre,
        metrics=metrics,
        holdout_indices=[int(i) for i in cache.rows[held]],
        holdout_predictions=[] if pred is None else [cache.classes[int(k)] for k in pred],
    )
