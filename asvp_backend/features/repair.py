"""Verify and repair a feature store: name every damaged file and fix what can be fixed without guessing.

Invariant: repair moves damaged data aside, never deletes it, and never guesses what a file held. A bad
shard leaves the manifest but its files are kept under ``g<N>/corrupt/``; a generation that cannot be rebuilt
is moved aside to ``.corrupt-g<N>-<time>/``; nothing is recomputed here. Why: the lost tasks then count as
missing, so the next extraction recomputes exactly them, and whoever investigates still has the files.
Every step is logged as a warning and recorded in a ``RepairReport`` for the job's summary.

* ``verify_generation()``/``verify_store()`` list the problems (``Problem``) that reads would raise as
  ``FeatureStoreCorrupt`` (``store.py`` says which), plus a lost manifest, by reading headers and sizes only.
* ``repair_generation()``/``repair_store()``: bad shards leave the manifest (their tasks count as missing);
  a lost manifest is rebuilt from ``info.json`` and the shard files (tombstones and skip reasons are lost:
  the extract job drops deleted tasks again and retries skipped images); a generation without ``info.json``
  is moved aside; a bad ``CURRENT`` points at the newest generation that verifies clean (or is removed when
  none is left).

This module builds on the file format in ``store_format.py`` (layout names, manifest and shard checks) and
works on paths; the public methods (``FeatureStore.verify()/repair()``, ``FeatureGeneration.verify()/repair()``)
are in ``store.py``, which imports this module.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from asvp_backend.features.store_format import (
    CORRUPT_DIR,
    CURRENT,
    GEN_RE,
    INFO,
    MANIFEST,
    SHARD_FILE_RE,
    SHARD_RETRIES,
    FeatureStoreCorrupt,
    GenerationInfo,
    Problem,
    file_key,
    holds_shard_files,
    inspect_shard,
    load_manifest,
    new_manifest,
    read_pointer,
    shard_paths,
)
from asvp_backend.fsutil import atomic_write_bytes, flocked, fsync_dir

log = logging.getLogger(__name__)


@dataclass
class RepairReport:
    """What ``repair()`` found and did, for the job's log and summary."""

    problems: list[Problem] = field(default_factory=list)
    dropped_shards: list[Path] = field(default_factory=list)  # g<N>/shards/<name>, now out of the manifest
    lost_vectors: int = 0  # vectors the dropped shards held according to the manifest; now missing
    rebuilt: list[Path] = field(default_factory=list)  # manifests rebuilt from info.json and the shards
    quarantined: list[Path] = field(default_factory=list)  # where unrebuildable generations were moved
    actions: list[str] = field(default_factory=list)  # one line per change, as logged

    @property
    def clean(self) -> bool:
        """Nothing was wrong (so nothing was changed)."""
        return not self.problems

    def merge(self, other: RepairReport) -> None:
        self.problems += other.problems
        self.dropped_shards += other.dropped_shards
        self.lost_vectors += other.lost_vectors
        self.rebuilt += other.rebuilt
        self.quarantined += other.quarantined
        self.actions += other.actions

    def act(self, line: str) -> None:
        """Record and log one repair step: repairs change data, so each one is a warning."""
        log.warning("feature store repair: %s", line)
        self.actions.append(line)

    def to_dict(self) -> dict[str, Any]:
        return {
            "problems": [p.to_dict() for p in self.problems],
            "dropped_shards": [str(p) for p in self.dropped_shards],
            "lost_vectors": self.lost_vectors,
            "rebuilt": [str(p) for p in self.rebuilt],
            "quarantined": [str(p) for p in self.quarantined],
            "actions": list(self.actions),
        }


# ---------------------------------------------------------------------------------------------- generation


def _shard_problems(path: Path, manifest: dict[str, Any]) -> dict[str, FeatureStoreCorrupt]:
    """Shard name -> what is wrong with it, for every bad shard the manifest names."""
    dim = int(manifest["info"]["dim"])
    bad = {}
    for entry in manifest["shards"]:
        try:
            inspect_shard(path / "shards", entry["name"], dim, entry["count"])
        except FeatureStoreCorrupt as e:
            bad[entry["name"]] = e
    return bad


def verify_generation(path: Path) -> list[Problem]:
    """Problems of one generation, without its lock: a writer that replaces the manifest meanwhile (and
    deletes shards) makes us look again rather than report a file it legitimately removed."""
    problems: list[Problem] = []
    for _attempt in range(SHARD_RETRIES):
        try:
            manifest, key = load_manifest(path)
        except FileNotFoundError:
            return [Problem(path / MANIFEST, "is missing")]
        except FeatureStoreCorrupt as e:
            return [e.as_problem()]
        problems = [e.as_problem() for e in _shard_problems(path, manifest).values()]
        with contextlib.suppress(FileNotFoundError):
            if not problems or file_key(path / MANIFEST) == key:
                return problems
    return problems


def _set_aside(path: Path, names: Iterable[str]) -> None:
    """Move the files of shards that left the manifest into ``corrupt/``: out of the writers' way (they
    delete unnamed shard files) but kept for whoever investigates."""
    aside = path / CORRUPT_DIR
    aside.mkdir(exist_ok=True)
    for name in names:
        for file in shard_paths(path / "shards", name):
            with contextlib.suppress(FileNotFoundError):
                os.replace(file, aside / file.name)
    fsync_dir(aside)
    fsync_dir(path / "shards")


def _rebuild_manifest(path: Path, problem: str, report: RepairReport) -> None:
    """Write a new manifest from ``info.json`` and every shard that checks out, in write order (so the
    newest vector of an id still wins). Raises FeatureStoreCorrupt when the generation cannot say which
    backbone made its vectors. Caller holds the generation's lock."""
    manifest_path = path / MANIFEST
    try:
        info = GenerationInfo.from_dict(json.loads((path / INFO).read_bytes()))
    except FileNotFoundError:
        raise FeatureStoreCorrupt(manifest_path, f"{problem}, and there is no {INFO} to rebuild it from") from None
    except (ValueError, KeyError, TypeError) as e:
        raise FeatureStoreCorrupt(manifest_path, f"{problem}, and {INFO} is unreadable too ({e!r})") from e
    shard_dir = path / "shards"
    shard_dir.mkdir(exist_ok=True)
    names = set()
    for p in shard_dir.iterdir():
        match = SHARD_FILE_RE.match(p.name)
        if match:
            names.add(match.group(1))
    entries, bad = [], {}
    for name in sorted(names, key=lambda n: int(n[1:])):
        try:
            _, vec = inspect_shard(shard_dir, name, info.dim, None)
        except FeatureStoreCorrupt as e:
            bad[name] = e
        else:
            entries.append({"name": name, "count": vec.shape[0]})
    manifest = new_manifest(info, entries, next_shard=max((int(n[1:]) + 1 for n in names), default=0))
    atomic_write_bytes(manifest_path, json.dumps(manifest, separators=(",", ":")).encode())
    report.rebuilt.append(manifest_path)
    report.act(f"rebuilt {manifest_path} from {len(entries)} shards ({problem}); tombstones and skips are reset")
    _drop_shards(path, bad, {}, report)


def _drop_shards(path: Path, bad: dict[str, FeatureStoreCorrupt], counts: dict[str, int], report: RepairReport) -> None:
    """Record and set aside shards that already left the manifest."""
    for name, error in bad.items():
        report.problems.append(error.as_problem())
        report.dropped_shards.append(path / "shards" / name)
        report.lost_vectors += counts.get(name, 0)
        report.act(
            f"dropped shard {name} ({counts.get(name, 'unknown number of')} vectors) of {path}: "
            f"{error.path.name} {error.problem}; its tasks will be extracted again"
        )
    if bad:
        _set_aside(path, bad)


def repair_generation(path: Path) -> RepairReport:
    """Drop bad shards from the manifest, or rebuild a lost manifest. Raises FeatureStoreCorrupt when the
    manifest is lost and cannot be rebuilt (the store then moves the generation aside)."""
    report = RepairReport()
    with flocked(path / ".lock"):
        try:
            manifest, _ = load_manifest(path)
        except FileNotFoundError:
            _rebuild_manifest(path, f"{MANIFEST} is missing", report)
            report.problems.insert(0, Problem(path / MANIFEST, "is missing"))
            return report
        except FeatureStoreCorrupt as e:
            _rebuild_manifest(path, e.problem, report)
            report.problems.insert(0, e.as_problem())
            return report
        if not (path / INFO).exists():  # make an older generation rebuildable from now on
            atomic_write_bytes(path / INFO, json.dumps(manifest["info"]).encode())
        bad = _shard_problems(path, manifest)
        if bad:
            counts = {s["name"]: int(s["count"]) for s in manifest["shards"]}
            manifest["shards"] = [s for s in manifest["shards"] if s["name"] not in bad]
            manifest["version"] = int(manifest.get("version", 0)) + 1
            atomic_write_bytes(path / MANIFEST, json.dumps(manifest, separators=(",", ":")).encode())
            _drop_shards(path, bad, counts, report)
    return report


# ---------------------------------------------------------------------------------------------- store


def _generation_dirs(root: Path) -> list[tuple[int, Path]]:
    """(number, path) of every ``g<N>`` directory, complete or not, by generation number."""
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := GEN_RE.match(p.name)) and p.is_dir())


def _pointer_problem(root: Path) -> Problem | None:
    """What is wrong with ``root/CURRENT``: not a pointer, or naming a generation without a manifest."""
    try:
        g = read_pointer(root)
    except FeatureStoreCorrupt as e:
        return e.as_problem()
    if g is not None and not (root / f"g{g}" / MANIFEST).exists():
        return Problem(root / CURRENT, f"names generation {g}, which does not exist")
    return None  # a bad manifest is the generation's problem, reported with it


def verify_store(root: Path) -> list[Problem]:
    """Every damaged file in the store (pointer, manifests, shards), from headers and sizes only."""
    problems = []
    pointer = _pointer_problem(root)
    if pointer is not None:
        problems.append(pointer)
    for _, path in _generation_dirs(root):
        if (path / MANIFEST).exists():
            problems += verify_generation(path)
        elif holds_shard_files(path):
            problems.append(Problem(path / MANIFEST, "is missing, but shards/ holds shard files"))
    return problems


def repair_store(root: Path) -> RepairReport:
    """Repair every generation (bad shards leave the manifest, a lost manifest is rebuilt or its
    generation moved aside), then point a bad ``CURRENT`` at the newest clean generation."""
    report = RepairReport()
    with flocked(root / ".lock"):
        for _, path in _generation_dirs(root):
            if not (path / MANIFEST).exists() and not holds_shard_files(path):
                continue  # an empty leftover; create_generation() replaces it
            try:
                report.merge(repair_generation(path))
            except FeatureStoreCorrupt as e:
                report.problems.append(e.as_problem())
                quarantine(root, path, str(e), report)
        pointer = _pointer_problem(root)
        if pointer is not None:
            report.problems.append(pointer)
            _repoint(root, pointer, report)
    return report


def _repoint(root: Path, pointer: Problem, report: RepairReport) -> None:
    """Point CURRENT at the newest generation that verifies clean; remove it when there is none."""
    clean = [g for g, path in _generation_dirs(root) if (path / MANIFEST).exists() and not verify_generation(path)]
    if clean:
        atomic_write_bytes(root / CURRENT, json.dumps({"generation": clean[-1]}).encode())
        report.act(f"{pointer}; pointed it at generation {clean[-1]}")
    else:
        with contextlib.suppress(FileNotFoundError):
            (root / CURRENT).unlink()
        fsync_dir(root)
        report.act(f"{pointer}; removed it, no generation is left")


def quarantine(root: Path, path: Path, reason: str, report: RepairReport) -> None:
    """Move the generation at ``path`` aside (never delete it) so extraction starts a fresh one. Caller
    holds the store's lock."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    target = root / f".corrupt-{path.name}-{stamp}"
    with flocked(path / ".lock"):  # no writer is half-way through an append
        os.replace(path, target)
    fsync_dir(root)
    report.quarantined.append(target)
    report.act(f"moved {path} to {target}: {reason}")
