"""Versioned, crash-safe feature store: one generation of float16 vectors per backbone state.

Layout under ``root`` (``MODEL_DIR/projects/<id>/features``)::

    CURRENT                  {"generation": g}; written tmp + fsync + os.replace
    g<N>/manifest.json       the only truth: info, shard list, tombstones, skip reasons
    g<N>/shards/<name>.ids.npy, <name>.vec.npy   immutable once named in the manifest
    g<N>/.lock               fcntl.flock for writers of that generation

Why this shape: a reader only ever follows the manifest, and the manifest is replaced atomically after
every shard it names is fully on disk, so a writer killed at any point leaves the previous manifest and
its (immutable) shards intact. Unnamed files are crash leftovers and are removed by the next writer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from asvp_backend.fsutil import atomic_write_bytes, flocked, fsync_dir

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CURRENT = "CURRENT"
FORMAT_VERSION = 1
_GEN_RE = re.compile(r"^g(\d+)$")
_SHARD_RETRIES = 5


class FeatureStoreError(RuntimeError):
    """Raised for an unusable store state (missing generation, mismatched vectors, ...)."""


@dataclass(frozen=True)
class GenerationInfo:
    """What produced a generation's vectors; two generations are comparable only if all fields match."""

    generation: int
    backbone: str
    weights_hash: str
    preprocessing: dict = field(default_factory=dict)
    dim: int = 0

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationInfo:
        return cls(
            generation=int(d["generation"]),
            backbone=str(d["backbone"]),
            weights_hash=str(d["weights_hash"]),
            preprocessing=dict(d.get("preprocessing") or {}),
            dim=int(d["dim"]),
        )


def _jsonable(obj: Any) -> Any:
    """Tuples -> lists recursively so that a round trip through JSON compares equal."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------- file helpers


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------- generation


@dataclass
class _Index:
    """Resolved view of one manifest version: live ids (sorted) and where each vector lives."""

    version: int
    ids: np.ndarray  # int64 (n,), sorted
    shard: np.ndarray  # int32 (n,), index into shards
    row: np.ndarray  # int64 (n,)
    shards: list[tuple[np.ndarray, np.ndarray]]  # (ids, vectors) memory maps, manifest order


class FeatureGeneration:
    """One generation's vectors. Safe to read from many processes while one process appends."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._shard_dir = self.path / "shards"
        self._cache: _Index | None = None
        self._cache_key: tuple[int, int] | None = None
        manifest = self._read_manifest()
        self.info = GenerationInfo.from_dict(manifest["info"])

    def __repr__(self) -> str:
        return f"FeatureGeneration(g={self.info.generation}, backbone={self.info.backbone!r}, path={self.path})"

    # -- manifest ------------------------------------------------------------------------------------------

    def _read_manifest(self) -> dict[str, Any]:
        try:
            with open(self.path / MANIFEST, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError as e:
            raise FeatureStoreError(f"no feature generation at {self.path}") from e

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        manifest["version"] = int(manifest.get("version", 0)) + 1
        atomic_write_bytes(self.path / MANIFEST, json.dumps(manifest, separators=(",", ":")).encode())

    @contextlib.contextmanager
    def _writing(self) -> Iterator[dict[str, Any]]:
        """Exclusive write section: lock, re-read the manifest, drop crash leftovers, yield it."""
        with flocked(self.path / ".lock"):
            manifest = self._read_manifest()
            self._remove_unnamed_shards(manifest)
            yield manifest

    def _remove_unnamed_shards(self, manifest: dict[str, Any]) -> None:
        named = {s["name"] for s in manifest["shards"]}
        for p in self._shard_dir.iterdir():
            stem = p.name.split(".", 1)[0]
            if stem not in named:
                log.info("removing leftover shard file %s", p)
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    # -- index ---------------------------------------------------------------------------------------------

    def _index(self) -> _Index:
        """Load (or reuse) the index of the newest manifest; retries if a shard vanished under us."""
        for attempt in range(_SHARD_RETRIES):
            try:
                st = os.stat(self.path / MANIFEST)
            except FileNotFoundError as e:
                raise FeatureStoreError(f"no feature generation at {self.path}") from e
            key = (st.st_ino, st.st_mtime_ns)
            if self._cache is not None and self._cache_key == key:
                return self._cache
            manifest = self._read_manifest()
            try:
                index = self._build_index(manifest)
            except FileNotFoundError:
                # A compaction replaced the manifest between our read and the shard open; read again.
                time.sleep(0.01 * (attempt + 1))
                continue
            self._cache, self._cache_key = index, key
            return index
        raise FeatureStoreError(f"manifest of {self.path} keeps naming missing shards")

    def _build_index(self, manifest: dict[str, Any]) -> _Index:
        shards = []
        for s in manifest["shards"]:
            ids = np.load(self._shard_dir / f"{s['name']}.ids.npy", mmap_mode="r")
            vec = np.load(self._shard_dir / f"{s['name']}.vec.npy", mmap_mode="r")
            shards.append((ids, vec))
        if not shards:
            empty = np.zeros(0, np.int64)
            return _Index(int(manifest.get("version", 0)), empty, np.zeros(0, np.int32), empty, [])
        all_ids = np.concatenate([np.asarray(ids, dtype=np.int64) for ids, _ in shards])
        shard_of = np.concatenate([np.full(len(ids), i, np.int32) for i, (ids, _) in enumerate(shards)])
        row_of = np.concatenate([np.arange(len(ids), dtype=np.int64) for ids, _ in shards])
        # Newest wins: keep the last occurrence of every id (unique on the reversed order).
        rev = all_ids[::-1]
        uniq, first_in_rev = np.unique(rev, return_index=True)
        last = len(all_ids) - 1 - first_in_rev
        keep = np.ones(len(uniq), bool)
        tomb = np.asarray(manifest.get("tombstones", []), dtype=np.int64)
        if len(tomb):
            keep &= ~np.isin(uniq, tomb)
        last = last[keep]
        return _Index(int(manifest.get("version", 0)), uniq[keep], shard_of[last], row_of[last], shards)

    # -- reads ---------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._index().ids)

    def task_ids(self) -> np.ndarray:
        """int64 ids with a live vector, sorted ascending."""
        return self._index().ids.copy()

    def lookup(self, task_ids: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
        """(found mask (k,), float16 vectors (found_count, dim)) in input order."""
        idx = self._index()
        q = np.asarray(list(task_ids) if not isinstance(task_ids, np.ndarray) else task_ids, dtype=np.int64)
        pos = np.searchsorted(idx.ids, q)
        pos_c = np.minimum(pos, max(len(idx.ids) - 1, 0))
        found = (pos < len(idx.ids)) & (idx.ids[pos_c] == q) if len(idx.ids) else np.zeros(len(q), bool)
        return found, self._gather(idx, pos_c[found])

    def _gather(self, idx: _Index, positions: np.ndarray) -> np.ndarray:
        out = np.empty((len(positions), self.info.dim), np.float16)
        if not len(positions):
            return out
        shard, row = idx.shard[positions], idx.row[positions]
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            rows = row[sel]
            order = np.argsort(rows, kind="stable")  # sequential mmap reads
            out[sel[order]] = idx.shards[s][1][rows[order]]
        return out

    def matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids (n,), vectors (n, dim) float16) of all live vectors, ids ascending.

        Zero-copy memory map when the generation is compact (one shard, no dead rows, ids sorted), which
        ``compact()`` produces; otherwise one float16 copy (n x dim x 2 bytes, 2.5 GB for 1M x 1280).
        """
        idx = self._index()
        if len(idx.shards) == 1:
            ids, vec = idx.shards[0]
            if len(ids) == len(idx.ids) and np.array_equal(idx.row, np.arange(len(ids))):
                return idx.ids.copy(), vec
        return idx.ids.copy(), self._gather(idx, np.arange(len(idx.ids)))

    def iter_batches(self, batch_size: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream (ids, vectors) in ascending id order with memory bounded by ``batch_size`` rows."""
        idx = self._index()
        for start in range(0, len(idx.ids), batch_size):
            pos = np.arange(start, min(start + batch_size, len(idx.ids)))
            yield idx.ids[pos].copy(), self._gather(idx, pos)

    def missing(self, task_ids: Iterable[int]) -> list[int]:
        """Ids without a live vector (skipped ids count as missing; filter with ``skipped()``)."""
        q = np.asarray(list(task_ids), dtype=np.int64)
        return [int(x) for x in q[~np.isin(q, self._index().ids)]]

    def skipped(self) -> dict[int, str]:
        return {int(k): v for k, v in self._read_manifest().get("skips", {}).items()}

    def shard_count(self) -> int:
        return len(self._read_manifest()["shards"])

    # -- writes --------------------------------------------------------------------------------------------

    def append(self, task_ids: Iterable[int], vectors: np.ndarray) -> None:
        """Add vectors (stored as float16). Shard files are fully written and fsynced before the manifest
        names them; re-appending an id replaces its vector and clears its tombstone and skip reason."""
        ids = np.asarray(list(task_ids) if not isinstance(task_ids, np.ndarray) else task_ids, dtype=np.int64)
        vec = np.asarray(vectors)
        if vec.ndim != 2 or vec.shape != (len(ids), self.info.dim):
            raise FeatureStoreError(f"expected vectors of shape ({len(ids)}, {self.info.dim}), got {vec.shape}")
        if not len(ids):
            return
        if len(np.unique(ids)) != len(ids):  # keep the last of duplicates within one call
            _, first_rev = np.unique(ids[::-1], return_index=True)
            keep = np.sort(len(ids) - 1 - first_rev)
            ids, vec = ids[keep], vec[keep]
        with np.errstate(over="ignore"):
            vec16 = vec.astype(np.float16, copy=False)
        if not np.isfinite(vec16).all():
            raise FeatureStoreError("vectors contain NaN/inf (or overflow float16)")
        with self._writing() as manifest:
            seq = int(manifest.get("next_shard", 0))
            name = f"s{seq:07d}"
            _save_npy(self._shard_dir / f"{name}.vec.npy", np.ascontiguousarray(vec16))
            _save_npy(self._shard_dir / f"{name}.ids.npy", ids)
            fsync_dir(self._shard_dir)
            manifest["shards"].append({"name": name, "count": int(len(ids))})
            manifest["next_shard"] = seq + 1
            self._forget(manifest, ids)
            self._write_manifest(manifest)

    @staticmethod
    def _forget(manifest: dict[str, Any], ids: np.ndarray) -> None:
        """Clear tombstones and skip reasons of ids that now have a vector."""
        if manifest.get("tombstones"):
            tomb = np.asarray(manifest["tombstones"], dtype=np.int64)
            manifest["tombstones"] = [int(x) for x in tomb[~np.isin(tomb, ids)]]
        skips = manifest.get("skips")
        if skips:
            for i in ids.tolist():
                skips.pop(str(i), None)

    def drop(self, task_ids: Iterable[int]) -> int:
        """Remove ids from the index (tombstones); returns how many live vectors were removed."""
        ids = np.unique(np.asarray(list(task_ids), dtype=np.int64))
        with self._writing() as manifest:
            live = self._build_index(manifest).ids
            hit = ids[np.isin(ids, live)]
            if not len(hit):
                return 0
            tomb = set(manifest.get("tombstones", []))
            tomb.update(int(x) for x in hit)
            manifest["tombstones"] = sorted(tomb)
            self._write_manifest(manifest)
            return int(len(hit))

    def record_skips(self, reasons: dict[int, str]) -> None:
        """Remember why images could not be embedded, so a round can report (and not retry) them."""
        if not reasons:
            return
        with self._writing() as manifest:
            skips = manifest.setdefault("skips", {})
            for k, v in reasons.items():
                skips[str(int(k))] = str(v)[:500]
            self._write_manifest(manifest)

    def clear_skips(self, task_ids: Iterable[int] | None = None) -> None:
        """Forget skip reasons (all, or for some ids) so that they are retried."""
        with self._writing() as manifest:
            if task_ids is None:
                manifest["skips"] = {}
            else:
                for i in task_ids:
                    manifest.get("skips", {}).pop(str(int(i)), None)
            self._write_manifest(manifest)

    def compact(self, rows_per_chunk: int = 65536) -> None:
        """Rewrite live vectors into one id-sorted shard (streamed, bounded memory) so ``matrix()`` is a
        zero-copy memory map; old shards are removed after the new manifest is in place."""
        with self._writing() as manifest:
            idx = self._build_index(manifest)
            compact_already = not idx.shards or np.array_equal(idx.row, np.arange(len(idx.shards[0][0])))
            if len(idx.shards) <= 1 and not manifest.get("tombstones") and compact_already:
                return
            seq = int(manifest.get("next_shard", 0))
            name = f"s{seq:07d}"
            vec_path = self._shard_dir / f"{name}.vec.npy"
            out = np.lib.format.open_memmap(vec_path, mode="w+", dtype=np.float16, shape=(len(idx.ids), self.info.dim))
            for start in range(0, len(idx.ids), rows_per_chunk):
                pos = np.arange(start, min(start + rows_per_chunk, len(idx.ids)))
                out[pos] = self._gather(idx, pos)
            out.flush()
            del out
            with open(vec_path, "rb+") as f:
                os.fsync(f.fileno())
            _save_npy(self._shard_dir / f"{name}.ids.npy", idx.ids)
            fsync_dir(self._shard_dir)
            idx.shards.clear()
            manifest["shards"] = [{"name": name, "count": int(len(idx.ids))}]
            manifest["tombstones"] = []
            manifest["next_shard"] = seq + 1
            self._write_manifest(manifest)
            self._remove_unnamed_shards(manifest)
        self._cache = None


# ---------------------------------------------------------------------------------------------- store


class FeatureStore:
    """All generations of one project plus the pointer to the active one."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"FeatureStore({self.root})"

    def _gen_path(self, g: int) -> Path:
        return self.root / f"g{int(g)}"

    def generations(self) -> list[int]:
        """Complete generations (those with a manifest), ascending."""
        out = []
        for p in self.root.iterdir():
            m = _GEN_RE.match(p.name)
            if m and (p / MANIFEST).exists():
                out.append(int(m.group(1)))
        return sorted(out)

    def generation(self, g: int) -> FeatureGeneration:
        return FeatureGeneration(self._gen_path(g))

    def current_generation(self) -> int | None:
        try:
            data = json.loads((self.root / CURRENT).read_bytes())
        except FileNotFoundError:
            return None
        return int(data["generation"])

    def current(self) -> FeatureGeneration | None:
        g = self.current_generation()
        return None if g is None else self.generation(g)

    def create_generation(self, info: GenerationInfo) -> FeatureGeneration:
        """Create (or reopen, when ``info`` is identical: resume) a generation. It is not current until
        ``activate()``. A half-created directory from a crash is replaced."""
        path = self._gen_path(info.generation)
        with flocked(self.root / ".lock"):
            if (path / MANIFEST).exists():
                gen = FeatureGeneration(path)
                if gen.info.to_dict() != info.to_dict():
                    raise FeatureStoreError(
                        f"generation {info.generation} already exists with different info: {gen.info}"
                    )
                return gen
            if path.exists():
                shutil.rmtree(path)
            tmp = Path(tempfile.mkdtemp(prefix=f".g{info.generation}.", dir=self.root))
            (tmp / "shards").mkdir()
            manifest = {
                "format": FORMAT_VERSION,
                "version": 1,
                "info": info.to_dict(),
                "shards": [],
                "next_shard": 0,
                "tombstones": [],
                "skips": {},
            }
            atomic_write_bytes(tmp / MANIFEST, json.dumps(manifest).encode())
            os.replace(tmp, path)
            fsync_dir(self.root)
        return FeatureGeneration(path)

    def activate(self, g: int) -> None:
        """Atomically make generation ``g`` the one readers get from ``current()``."""
        if not (self._gen_path(g) / MANIFEST).exists():
            raise FeatureStoreError(f"cannot activate missing generation {g}")
        with flocked(self.root / ".lock"):
            atomic_write_bytes(self.root / CURRENT, json.dumps({"generation": int(g)}).encode())

    def next_generation(self) -> int:
        gens = self.generations()
        return gens[-1] + 1 if gens else 0

    def remove_generation(self, g: int) -> None:
        """Delete a generation that is not current (old ones, or an abandoned alignment)."""
        with flocked(self.root / ".lock"):
            if self.current_generation() == g:
                raise FeatureStoreError(f"refusing to remove the current generation {g}")
            path = self._gen_path(g)
            if path.exists():
                # Rename first so a concurrent reader never sees a half-deleted generation as complete.
                trash = Path(tempfile.mkdtemp(prefix=f".trash-g{g}.", dir=self.root))
                os.replace(path, trash / "g")
                shutil.rmtree(trash)
