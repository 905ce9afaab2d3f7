"""Versioned, crash-safe feature store: one generation of float16 vectors per backbone state.

Layout under ``root`` (``MODEL_DIR/projects/<id>/features``)::

    CURRENT                  {"generation": g}; written tmp + fsync + os.replace
    g<N>/manifest.json       the only truth: info, shard list, tombstones, skip reasons
    g<N>/info.json           copy of the generation's info, written once: lets a lost manifest be rebuilt
    g<N>/shards/<name>.ids.npy, <name>.vec.npy   immutable once named in the manifest
    g<N>/corrupt/            shard files that repair() took out of the manifest (kept for inspection)
    g<N>/.lock               fcntl.flock for writers of that generation
    .corrupt-g<N>-<time>/    a generation repair() could not rebuild, moved aside

Why this shape: a reader only ever follows the manifest, and the manifest is replaced atomically after
every shard it names is fully on disk, so a writer killed at any point leaves the previous manifest and
its (immutable) shards intact. Unnamed files are crash leftovers and are removed by the next writer.

Readers keep every shard's ids in memory but open a shard's vectors only while copying from them: one
memory map per shard would hold one file descriptor each, and a generation of a few hundred small shards
would exhaust the usual limit of 1024. A writer may delete shards a reader's index still names
(compaction, repair), so a read that finds a file missing or damaged retries with the newest manifest and
reports corruption only when that manifest still names the file.

Corruption (disk errors, partial copies, hand edits) is detected and named, never hidden:

* Reads raise ``FeatureStoreCorrupt(path, problem)`` instead of bare NumPy/JSON errors when a file is
  bad: a shard that is missing, truncated or not a .npy file, holds the wrong dtype or dimension, or
  whose ids file disagrees with it or with the manifest; a manifest that is not valid JSON or not a
  manifest; a ``CURRENT`` that is garbage or names a missing generation.
* ``FeatureStore.current()`` raises ``FeatureStoreCorrupt`` on a bad pointer or manifest: a status
  command must see the problem, not a silently repaired store. Jobs call ``current(repair=True)``, which
  verifies the current generation and repairs the store when anything is wrong.
* ``verify()`` and ``repair()`` (of a generation, or the whole store) list such problems and fix what can
  be fixed without guessing. Their machinery is in ``repair.py``; the file format both build on (names,
  manifest and shard checks, the errors) is in ``store_format.py``, so neither imports the other's internals.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from asvp_backend.features.repair import (
    RepairReport,
    quarantine,
    repair_generation,
    repair_store,
    verify_generation,
    verify_store,
)
from asvp_backend.features.store_format import (
    CURRENT,
    GEN_RE,
    ID_DTYPE,
    INFO,
    MANIFEST,
    SHARD_RETRIES,
    VECTOR_DTYPE,
    FeatureStoreCorrupt,
    FeatureStoreError,
    GenerationInfo,
    Problem,
    file_key,
    holds_shard_files,
    inspect_shard,
    load_manifest,
    new_manifest,
    read_pointer,
    save_npy,
    shard_paths,
)
from asvp_backend.fsutil import atomic_write_bytes, flocked, fsync_dir

log = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = ["FeatureGeneration", "FeatureStore", "FeatureStoreCorrupt", "FeatureStoreError", "GenerationInfo", "Problem"]


# ---------------------------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class _Shard:
    """What a reader keeps of one shard: its ids in memory, and where its vectors start on disk."""

    name: str
    ids: np.ndarray  # int64 (rows,)
    vec_path: Path
    vec_offset: int
    rows: int


@dataclass
class _Index:
    """Resolved view of one manifest version: live ids (sorted) and where each vector lives."""

    key: tuple[int, int, int] | None  # the manifest file version it was built from
    ids: np.ndarray  # int64 (n,), sorted
    shard: np.ndarray  # int32 (n,), index into shards
    row: np.ndarray  # int64 (n,)
    shards: list[_Shard]  # manifest order


class FeatureGeneration:
    """One generation's vectors. Safe to read from many processes while one process appends."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._shard_dir = self.path / "shards"
        self._cache: _Index | None = None
        self._shards: dict[str, _Shard] = {}  # by name: shards are immutable, so reusable across manifests
        self._shards_dir_ino: int | None = None
        manifest = self._read_manifest()
        self.info = GenerationInfo.from_dict(manifest["info"])

    def __repr__(self) -> str:
        return f"FeatureGeneration(g={self.info.generation}, backbone={self.info.backbone!r}, path={self.path})"

    # -- manifest ------------------------------------------------------------------------------------------

    def _read_manifest_keyed(self) -> tuple[dict[str, Any], tuple[int, int, int]]:
        try:
            return load_manifest(self.path)
        except FileNotFoundError as e:
            raise FeatureStoreError(f"no feature generation at {self.path}") from e

    def _read_manifest(self) -> dict[str, Any]:
        return self._read_manifest_keyed()[0]

    def _manifest_key(self) -> tuple[int, int, int]:
        try:
            return file_key(self.path / MANIFEST)
        except FileNotFoundError as e:
            raise FeatureStoreError(f"no feature generation at {self.path}") from e

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        manifest["version"] = int(manifest.get("version", 0)) + 1
        atomic_write_bytes(self.path / MANIFEST, json.dumps(manifest, separators=(",", ":")).encode())

    @contextlib.contextmanager
    def _writing(self) -> Iterator[dict[str, Any]]:
        """Exclusive write section: lock, re-read the manifest, drop crash leftovers, yield it."""
        with flocked(self.path / ".lock"):
            manifest = self._read_manifest()  # a corrupt manifest stops here, before anything is deleted
            if not (self.path / INFO).exists():  # generations made before info.json existed
                atomic_write_bytes(self.path / INFO, json.dumps(manifest["info"]).encode())
            self._remove_unnamed_shards(manifest)
            yield manifest

    def _remove_unnamed_shards(self, manifest: dict[str, Any]) -> None:
        named = {s["name"] for s in manifest["shards"]}
        for file_name in os.listdir(self._shard_dir):  # plain strings: this runs on every append
            if file_name.split(".", 1)[0] not in named:
                log.info("removing leftover shard file %s", self._shard_dir / file_name)
                with contextlib.suppress(FileNotFoundError):
                    (self._shard_dir / file_name).unlink()

    # -- verify and repair ---------------------------------------------------------------------------------

    def verify(self) -> list[Problem]:
        """Damaged files of this generation (manifest, shards), from headers and sizes only."""
        return verify_generation(self.path)

    def repair(self) -> RepairReport:
        """Take bad shards out of the manifest (their tasks become missing), or rebuild a lost manifest
        from ``info.json`` and the shards. Raises FeatureStoreCorrupt when the manifest is lost and cannot
        be rebuilt; ``FeatureStore.repair()`` then moves the generation aside."""
        report = repair_generation(self.path)
        self._cache = None
        return report

    # -- index ---------------------------------------------------------------------------------------------

    def _index(self) -> _Index:
        """Load (or reuse) the index of the newest manifest; retries if a writer replaced it under us."""
        for attempt in range(SHARD_RETRIES):
            if self._cache is not None and self._cache.key == self._manifest_key():
                return self._cache
            manifest, key = self._read_manifest_keyed()
            try:
                index = self._build_index(manifest, key)
            except FeatureStoreCorrupt:
                if self._manifest_key() == key:
                    raise  # the newest manifest still names the bad file
                time.sleep(0.01 * (attempt + 1))  # a compaction or repair replaced it: read again
                continue
            self._cache = index
            return index
        raise FeatureStoreError(f"the manifest of {self.path} kept changing while it was read")

    def _read(self, read: Callable[[_Index], T]) -> T:
        """Run ``read`` on the newest index. Shard files are opened during the read, so a writer may have
        deleted one since the index was built: then read again with the manifest that replaced it."""
        for attempt in range(SHARD_RETRIES):
            idx = self._index()
            try:
                return read(idx)
            except FeatureStoreCorrupt:
                if self._manifest_key() == idx.key:
                    raise
                time.sleep(0.01 * (attempt + 1))
        raise FeatureStoreError(f"the manifest of {self.path} kept changing while it was read")

    def _shard(self, name: str, count: int) -> _Shard:
        """A shard's ids and vector location, checked once and then reused (shard files never change)."""
        cached = self._shards.get(name)
        if cached is not None and cached.rows == count:
            return cached
        ids_header, vec_header = inspect_shard(self._shard_dir, name, self.info.dim, count)
        ids_path, vec_path = shard_paths(self._shard_dir, name)
        try:
            ids = np.fromfile(ids_path, dtype=ID_DTYPE, count=count, offset=ids_header.data_offset)
        except FileNotFoundError:
            raise FeatureStoreCorrupt(ids_path, "is missing") from None
        if len(ids) != count:
            raise FeatureStoreCorrupt(ids_path, f"is truncated: holds {len(ids)} of {count} ids")
        shard = _Shard(name, ids, vec_path, vec_header.data_offset, count)
        self._shards[name] = shard
        return shard

    def _build_index(self, manifest: dict[str, Any], key: tuple[int, int, int] | None = None) -> _Index:
        dir_ino = os.stat(self.path).st_ino
        if dir_ino != self._shards_dir_ino:  # a new generation in the same place: names mean other files
            self._shards, self._shards_dir_ino = {}, dir_ino
        shards = [self._shard(s["name"], int(s["count"])) for s in manifest["shards"]]
        self._shards = {s.name: s for s in shards}  # forget compacted-away shards
        if not shards:
            empty = np.zeros(0, np.int64)
            return _Index(key, empty, np.zeros(0, np.int32), empty, [])
        all_ids = np.concatenate([s.ids for s in shards])
        shard_of = np.concatenate([np.full(s.rows, i, np.int32) for i, s in enumerate(shards)])
        row_of = np.concatenate([np.arange(s.rows, dtype=np.int64) for s in shards])
        # Newest wins: keep the last occurrence of every id (unique on the reversed order).
        rev = all_ids[::-1]
        uniq, first_in_rev = np.unique(rev, return_index=True)
        last = len(all_ids) - 1 - first_in_rev
        keep = np.ones(len(uniq), bool)
        tomb = np.asarray(manifest.get("tombstones", []), dtype=np.int64)
        if len(tomb):
            keep &= ~np.isin(uniq, tomb)
        last = last[keep]
        return _Index(key, uniq[keep], shard_of[last], row_of[last], shards)

    # -- reads ---------------------------------------------------------------------------------------------

    def _vectors(self, shard: _Shard) -> np.ndarray:
        """Memory map of one shard's vectors, open only as long as the caller holds it."""
        try:
            return np.memmap(
                shard.vec_path, dtype=VECTOR_DTYPE, mode="r", offset=shard.vec_offset, shape=(shard.rows, self.info.dim)
            )
        except FileNotFoundError:
            raise FeatureStoreCorrupt(shard.vec_path, "is missing") from None
        except ValueError as e:  # the file shrank after the index checked it
            raise FeatureStoreCorrupt(shard.vec_path, f"is truncated ({e})") from e

    def __len__(self) -> int:
        return len(self._index().ids)

    def task_ids(self) -> np.ndarray:
        """int64 ids with a live vector, sorted ascending."""
        return self._index().ids.copy()

    def lookup(self, task_ids: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
        """(found mask (k,), float16 vectors (found_count, dim)) in input order."""
        q = np.asarray(list(task_ids) if not isinstance(task_ids, np.ndarray) else task_ids, dtype=np.int64)

        def read(idx: _Index) -> tuple[np.ndarray, np.ndarray]:
            pos = np.searchsorted(idx.ids, q)
            pos_c = np.minimum(pos, max(len(idx.ids) - 1, 0))
            found = (pos < len(idx.ids)) & (idx.ids[pos_c] == q) if len(idx.ids) else np.zeros(len(q), bool)
            return found, self._gather(idx, pos_c[found])

        return self._read(read)

    def _gather(self, idx: _Index, positions: np.ndarray) -> np.ndarray:
        out = np.empty((len(positions), self.info.dim), VECTOR_DTYPE)
        if not len(positions):
            return out
        shard, row = idx.shard[positions], idx.row[positions]
        order = np.lexsort((row, shard))  # by shard, then row: one open per shard, sequential reads
        starts = np.flatnonzero(np.diff(shard[order])) + 1
        for group in np.split(order, starts):
            out[group] = self._vectors(idx.shards[shard[group[0]]])[row[group]]
        return out

    def matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids (n,), vectors (n, dim) float16) of all live vectors, ids ascending.

        Zero-copy memory map when the generation is compact (one shard, no dead rows, ids sorted), which
        ``compact()`` produces; otherwise one float16 copy (n x dim x 2 bytes, 2.5 GB for 1M x 1280).
        """

        def read(idx: _Index) -> tuple[np.ndarray, np.ndarray]:
            whole = len(idx.shards) == 1 and idx.shards[0].rows == len(idx.ids)
            if whole and np.array_equal(idx.row, np.arange(len(idx.ids))):
                return idx.ids.copy(), self._vectors(idx.shards[0])
            return idx.ids.copy(), self._gather(idx, np.arange(len(idx.ids)))

        return self._read(read)

    def iter_batches(self, batch_size: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream (ids, vectors) in ascending id order with memory bounded by ``batch_size`` rows. Each
        batch follows the newest manifest, continuing after the last id yielded."""
        after: int | None = None
        while True:
            ids, vectors = self._read(functools.partial(self._batch_after, after=after, batch_size=batch_size))
            if not len(ids):
                return
            yield ids, vectors
            after = int(ids[-1])

    def _batch_after(self, idx: _Index, after: int | None, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        start = 0 if after is None else int(np.searchsorted(idx.ids, after, side="right"))
        pos = np.arange(start, min(start + batch_size, len(idx.ids)))
        return idx.ids[pos].copy(), self._gather(idx, pos)

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
            save_npy(self._shard_dir / f"{name}.vec.npy", np.ascontiguousarray(vec16))
            save_npy(self._shard_dir / f"{name}.ids.npy", ids)
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
            compact_already = not idx.shards or np.array_equal(idx.row, np.arange(idx.shards[0].rows))
            if len(idx.shards) <= 1 and not manifest.get("tombstones") and compact_already:
                return
            seq = int(manifest.get("next_shard", 0))
            name = f"s{seq:07d}"
            vec_path = self._shard_dir / f"{name}.vec.npy"
            out = np.lib.format.open_memmap(
                vec_path, mode="w+", dtype=VECTOR_DTYPE, shape=(len(idx.ids), self.info.dim)
            )
            for start in range(0, len(idx.ids), rows_per_chunk):
                stop = min(start + rows_per_chunk, len(idx.ids))
                out[start:stop] = self._gather(idx, np.arange(start, stop))
            out.flush()
            del out
            with open(vec_path, "rb+") as f:
                os.fsync(f.fileno())
            save_npy(self._shard_dir / f"{name}.ids.npy", idx.ids)
            fsync_dir(self._shard_dir)
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
            m = GEN_RE.match(p.name)
            if m and (p / MANIFEST).exists():
                out.append(int(m.group(1)))
        return sorted(out)

    def generation(self, g: int) -> FeatureGeneration:
        """Open generation ``g``: FeatureStoreError when it does not exist, FeatureStoreCorrupt when its
        manifest is unreadable."""
        return FeatureGeneration(self._gen_path(g))

    def current_generation(self) -> int | None:
        """The number ``CURRENT`` holds (None before the first ``activate()``); FeatureStoreCorrupt when
        it holds anything else."""
        return read_pointer(self.root)

    def current(self, repair: bool = False) -> FeatureGeneration | None:
        """The active generation, or None before the first ``activate()``.

        Without ``repair`` a bad ``CURRENT`` or manifest raises FeatureStoreCorrupt (and a bad shard
        raises on the read that needs it). With ``repair=True`` the generation is verified first and the
        store repaired when anything is wrong: the result then reads cleanly (or is None)."""
        if not repair:
            return self._open_current()
        try:
            generation = self._open_current()
            problems = [] if generation is None else generation.verify()
            if not problems:
                return generation
            log.warning("feature store %s: %s", self.root, "; ".join(map(str, problems)))
        except FeatureStoreCorrupt as e:
            log.warning("feature store %s: %s", self.root, e)
        self.repair()
        return self._open_current()

    def _open_current(self) -> FeatureGeneration | None:
        g = self.current_generation()
        if g is None:
            return None
        if not (self._gen_path(g) / MANIFEST).exists():
            raise FeatureStoreCorrupt(self.root / CURRENT, f"names generation {g}, which does not exist")
        return self.generation(g)

    # -- verify and repair ---------------------------------------------------------------------------------

    def verify(self) -> list[Problem]:
        """Every damaged file in the store (pointer, manifests, shards), from headers and sizes only."""
        return verify_store(self.root)

    def repair(self) -> RepairReport:
        """Repair every generation (bad shards leave the manifest, a lost manifest is rebuilt or its
        generation moved aside), then point a bad ``CURRENT`` at the newest clean generation."""
        return repair_store(self.root)

    # -- generations ---------------------------------------------------------------------------------------

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
            if holds_shard_files(path):  # vectors without a manifest: keep them for repair or inspection
                quarantine(self.root, path, f"{path / MANIFEST} is missing", RepairReport())
            elif path.exists():
                shutil.rmtree(path)
            tmp = Path(tempfile.mkdtemp(prefix=f".g{info.generation}.", dir=self.root))
            (tmp / "shards").mkdir()
            manifest = new_manifest(info)
            atomic_write_bytes(tmp / INFO, json.dumps(info.to_dict()).encode())
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
