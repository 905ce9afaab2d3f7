"""The feature store's file format: names, the manifest's and shards' checks, and the errors that name a
damaged file.

Both the reader/writer (``store.py``) and verify/repair (``repair.py``) build on these definitions, and
neither imports the other's internals: the format is decided here once, so a check that reads accept is
the check verify reports.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
INFO = "info.json"
CURRENT = "CURRENT"
CORRUPT_DIR = "corrupt"
FORMAT_VERSION = 1
VECTOR_DTYPE = np.dtype(np.float16)
ID_DTYPE = np.dtype(np.int64)
GEN_RE = re.compile(r"^g(\d+)$")
SHARD_LIST_RE = re.compile(r"s[0-9]+(?: s[0-9]+)*")  # shard names joined by spaces
SHARD_FILE_RE = re.compile(r"^(s[0-9]+)\.(ids|vec)\.npy$")
SHARD_RETRIES = 5

class FeatureStoreError(RuntimeError):
    """Raised for an unusable store state (missing generation, mismatched vectors, ...)."""


class FeatureStoreCorrupt(FeatureStoreError):
    """A file of the store is damaged; ``path`` names it and ``problem`` says what is wrong with it."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem

    def __reduce__(self) -> tuple[type[FeatureStoreCorrupt], tuple[Path, str]]:
        # The default would call cls(message) and fail: keep it picklable for worker processes.
        return type(self), (self.path, self.problem)

    def as_problem(self) -> Problem:
        return Problem(self.path, self.problem)


@dataclass(frozen=True)
class Problem:
    """One damaged file, as ``verify()`` reports it."""

    path: Path
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"

    def to_dict(self) -> dict[str, str]:
        return {"path": str(self.path), "problem": self.problem}


@dataclass(frozen=True)
class GenerationInfo:
    """What produced a generation's vectors; two generations are comparable only if all fields match."""

    generation: int
    backbone: str
    weights_hash: str
    preprocessing: dict = field(default_factory=dict)
    dim: int = 0

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationInfo:
        return cls(
            generation=int(d["generation"]),
            backbone=str(d["backbone"]),
            weights_hash=str(d["weights_hash"]),
            preprocessing=dict(d.get("preprocessing") or {}),
            dim=int(d["dim"]),
        )


def jsonable(obj: Any) -> Any:
    """Tuples -> lists recursively so that a round trip through JSON compares equal."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------- file helpers


def save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def file_key(path: Path) -> tuple[int, int, int]:
    """Identity of one version of an atomically replaced file (each replace makes a new inode)."""
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_offset: int


def read_npy_header(path: Path) -> NpyHeader:
    """The header of a .npy file whose size matches it; FeatureStoreCorrupt names the file otherwise."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            offset = f.tell()
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise FeatureStoreCorrupt(path, "is missing") from None
    except ValueError as e:  # bad magic, a torn or garbled header
        raise FeatureStoreCorrupt(path, f"is not a valid .npy file ({e})") from e
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size < expected:
        raise FeatureStoreCorrupt(path, f"is truncated: {size} bytes, its header {shape} {dtype} needs {expected}")
    if size > expected:
        raise FeatureStoreCorrupt(path, f"is {size} bytes, its header {shape} {dtype} describes {expected}")
    return NpyHeader(tuple(int(n) for n in shape), np.dtype(dtype), bool(fortran_order), offset)


def shard_paths(shard_dir: Path, name: str) -> tuple[Path, Path]:
    return shard_dir / f"{name}.ids.npy", shard_dir / f"{name}.vec.npy"


def inspect_shard(shard_dir: Path, name: str, dim: int, count: int | None) -> tuple[NpyHeader, NpyHeader]:
    """Headers of a shard's ids and vectors after checking them against each other, the generation's
    dimension and (when known) the manifest's count. Cheap: reads headers and sizes, not the data."""
    ids_path, vec_path = shard_paths(shard_dir, name)
    ids = read_npy_header(ids_path)
    if ids.dtype != ID_DTYPE or len(ids.shape) != 1:
        raise FeatureStoreCorrupt(ids_path, f"holds {ids.dtype} of shape {ids.shape}, expected int64 task ids")
    vec = read_npy_header(vec_path)
    if vec.dtype != VECTOR_DTYPE:
        raise FeatureStoreCorrupt(vec_path, f"holds {vec.dtype} vectors, the store keeps {VECTOR_DTYPE}")
    if len(vec.shape) != 2 or vec.shape[1] != dim or vec.fortran_order:
        raise FeatureStoreCorrupt(vec_path, f"holds an array of shape {vec.shape}, the generation's dimension is {dim}")
    if count is not None and vec.shape[0] != count:
        raise FeatureStoreCorrupt(vec_path, f"holds {vec.shape[0]} vectors, the manifest says {count}")
    if ids.shape[0] != vec.shape[0]:
        raise FeatureStoreCorrupt(ids_path, f"holds {ids.shape[0]} ids for the {vec.shape[0]} vectors of {name}")
    return ids, vec


def manifest_problem(manifest: Any, dir_name: str) -> str | None:
    """What makes parsed JSON unusable as this generation's manifest (None when it is usable)."""
    if not isinstance(manifest, dict):
        return "is not a JSON object"
    try:
        info = GenerationInfo.from_dict(manifest["info"])
    except (KeyError, TypeError, ValueError) as e:
        return f"has no valid generation info ({e!r})"
    if info.dim < 0:
        return f"has a negative dimension {info.dim}"
    numbered = GEN_RE.match(dir_name)
    if numbered and int(numbered.group(1)) != info.generation:
        return f"describes generation {info.generation} but lies in {dir_name}"
    shards, next_shard = manifest.get("shards"), manifest.get("next_shard", 0)
    if not isinstance(shards, list) or not is_int(next_shard):
        return "has no valid shard list"
    try:  # in bulk, not entry by entry: every read and every append parses the manifest
        names = [entry["name"] for entry in shards]
        counts = [entry["count"] for entry in shards]
        valid_names = not names or SHARD_LIST_RE.fullmatch(" ".join(names)) is not None
    except (TypeError, KeyError):
        return "has an invalid shard entry"
    if not valid_names or len(set(names)) != len(names):
        return "has an invalid or repeated shard name"
    if not all(type(count) is int and count >= 0 for count in counts):
        return "has an invalid shard count"
    if names and max(int(name[1:]) for name in names) >= next_shard:  # the next append would overwrite one
        return f"names shards at or after next_shard {next_shard}"
    tombstones, skips = manifest.get("tombstones", []), manifest.get("skips", {})
    if not isinstance(tombstones, list) or not all(type(t) is int for t in tombstones):
        return "has invalid tombstones"
    if not isinstance(skips, dict) or not all(k.lstrip("-").isdigit() and isinstance(v, str) for k, v in skips.items()):
        return "has invalid skip reasons"
    return None


def load_manifest(path: Path) -> tuple[dict[str, Any], tuple[int, int, int]]:
    """(manifest, file key) of the generation at ``path``; FileNotFoundError when it has none,
    FeatureStoreCorrupt when it is unreadable."""
    manifest_path = path / MANIFEST
    with open(manifest_path, "rb") as f:
        st = os.fstat(f.fileno())
        raw = f.read()
    try:
        manifest = json.loads(raw)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise FeatureStoreCorrupt(manifest_path, f"is not valid JSON ({e})") from e
    problem = manifest_problem(manifest, path.name)
    if problem is not None:
        raise FeatureStoreCorrupt(manifest_path, problem)
    return manifest, (st.st_ino, st.st_mtime_ns, st.st_size)


def new_manifest(
    info: GenerationInfo, shards: list[dict[str, Any]] | None = None, next_shard: int = 0
) -> dict[str, Any]:
    """A generation's first manifest (or one rebuilt from its shards): no tombstones, no skip reasons."""
    return {
        "format": FORMAT_VERSION,
        "version": 1,
        "info": info.to_dict(),
        "shards": shards or [],
        "next_shard": next_shard,
        "tombstones": [],
        "skips": {},
    }


def holds_shard_files(path: Path) -> bool:
    """Whether ``path`` holds shard files (a generation whose manifest is lost still has vectors)."""
    shard_dir = path / "shards"
    return shard_dir.is_dir() and any(SHARD_FILE_RE.match(p.name) for p in shard_dir.iterdir())


def read_pointer(root: Path) -> int | None:
    """The generation number ``root/CURRENT`` holds (None when there is no pointer); FeatureStoreCorrupt when
    it holds anything else."""
    path = root / CURRENT
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise FeatureStoreCorrupt(path, f"is not valid JSON ({e})") from e
    g = data.get("generation") if isinstance(data, dict) else None
    if isinstance(g, bool) or not isinstance(g, int) or g < 0:
        raise FeatureStoreCorrupt(path, f'holds {raw[:60]!r}, not {{"generation": <number>}}')
    return int(g)
