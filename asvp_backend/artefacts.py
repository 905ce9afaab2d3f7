"""A round's artefacts: the ranking /predict serves and the proxy that made it. The only module that knows
their file names and formats; the round job writes through it and the API reads through it.

Invariant: a round folder `rounds/<version>/` is complete and on disk before it exists under that name.
Files are written and fsynced in a hidden temporary folder, which is fsynced, renamed into place, and the
parent fsynced; the project's state advances to the version only after that. So a power loss can leave a
stray temporary folder, never a truncated `ranking.npz` behind a committed version. A folder that is
unreadable anyway (disk corruption, a person's edit) raises ArtefactCorrupt, which names the file; the
API then serves empty predictions and queues a new round.

This module must not import torch: the API reads rankings and never loads a model.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from asvp_backend.fsutil import atomic_file, atomic_write_bytes, published_dir
from asvp_backend.layout import ProjectLayout

RANKING_FILE = "ranking.npz"
PROXY_FILE = "proxy.pt"
META_FILE = "round.json"
STOP_FILE = "stop.npz"  # the round proxy's labels for the stop set (stopping.py)


class ArtefactCorrupt(ValueError):
    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path} is corrupt: {problem}")
        self.path, self.problem = path, problem


@dataclass(frozen=True)
class RankingArtefact:
    """Per ranked pool task: its score (lower = label first) and the proxy's label ("" at cold start)."""

    task_ids: np.ndarray  # (n,) int64
    scores: np.ndarray  # (n,) float32
    labels: np.ndarray  # (n,) str

    def __post_init__(self) -> None:
        if not (len(self.task_ids) == len(self.scores) == len(self.labels)):
            raise ValueError("task_ids, scores and labels must have the same length")

    def lookup(self) -> tuple[dict[int, float], dict[int, str]]:
        ids = self.task_ids.tolist()
        return (
            dict(zip(ids, self.scores.astype(float).tolist(), strict=True)),
            dict(zip(ids, self.labels.astype(str).tolist(), strict=True)),
        )


def _save_ranking(fh: IO[bytes], ranking: RankingArtefact) -> None:
    np.savez(fh, task_ids=ranking.task_ids.astype(np.int64), scores=ranking.scores.astype(np.float32),
             labels=ranking.labels.astype(str))


@dataclass(frozen=True)
class StopPredictions:
    """The round proxy's label for each stop-set task that still has features."""

    task_ids: np.ndarray  # (n,) int64
    labels: np.ndarray  # (n,) str

    def by_task(self) -> dict[int, str]:
        return dict(zip(self.task_ids.tolist(), self.labels.astype(str).tolist(), strict=True))


def write_round(layout: ProjectLayout, version: object, ranking: RankingArtefact, proxy: Any | None,
                stop: StopPredictions | None = None) -> Path:
    """Write the round's folder completely, then make it visible under its version (see the invariant);
    a re-run of a round that crashed after saving replaces the earlier folder."""
    target = layout.round_dir(version)
    with published_dir(target) as tmp:
        with open(tmp / RANKING_FILE, "wb") as fh:
            _save_ranking(fh, ranking)
        if stop is not None:
            with open(tmp / STOP_FILE, "wb") as fh:
                np.savez(fh, task_ids=stop.task_ids.astype(np.int64), labels=stop.labels.astype(str))
        if proxy is not None:
            proxy.save(tmp / PROXY_FILE)
        (tmp / META_FILE).write_text(json.dumps({"version": str(version), "pool": int(len(ranking.task_ids))}))
    return target


def extend_ranking(layout: ProjectLayout, version: object, extra: RankingArtefact) -> RankingArtefact:
    """Add tasks scored after the round (new tasks) to the version's ranking; replaced atomically."""
    current = read_ranking(layout, version)
    if current is None:
        raise FileNotFoundError(layout.round_dir(version) / RANKING_FILE)
    known = set(current.task_ids.tolist())
    keep = np.array([tid not in known for tid in extra.task_ids.tolist()], dtype=bool)
    merged = RankingArtefact(
        np.concatenate([current.task_ids, extra.task_ids[keep]]),
        np.concatenate([current.scores, extra.scores[keep].astype(np.float32)]),
        np.concatenate([current.labels.astype(str), extra.labels[keep].astype(str)]),
    )
    with atomic_file(layout.round_dir(version) / RANKING_FILE) as fh:
        _save_ranking(fh, merged)
    return merged


def read_ranking(layout: ProjectLayout, version: object) -> RankingArtefact | None:
    """The version's ranking; None when the round has no folder (yet); ArtefactCorrupt when unreadable."""
    path = layout.round_dir(version) / RANKING_FILE
    try:
        with np.load(path, allow_pickle=False) as data:
            return RankingArtefact(data["task_ids"].astype(np.int64), data["scores"].astype(np.float32),
                                   data["labels"].astype(str))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise ArtefactCorrupt(path, f"{type(exc).__name__}: {str(exc)[:200]}") from None


def read_stop_predictions(layout: ProjectLayout, version: object) -> StopPredictions | None:
    """The version's stop-set predictions; None when it made none (cold start, older rounds, pruned)."""
    path = layout.round_dir(version) / STOP_FILE
    try:
        with np.load(path, allow_pickle=False) as data:
            return StopPredictions(data["task_ids"].astype(np.int64), data["labels"].astype(str))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise ArtefactCorrupt(path, f"{type(exc).__name__}: {str(exc)[:200]}") from None


def read_stop_set(layout: ProjectLayout) -> np.ndarray | None:
    """The project's fixed stop set (task ids), None before it is drawn; ArtefactCorrupt when unreadable."""
    path = layout.stop_set_file
    try:
        return np.asarray(json.loads(path.read_bytes())["task_ids"], dtype=np.int64)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtefactCorrupt(path, f"{type(exc).__name__}: {str(exc)[:200]}") from None


def write_stop_set(layout: ProjectLayout, task_ids: np.ndarray, seed: int) -> None:
    payload = {"task_ids": [int(t) for t in task_ids.tolist()], "seed": int(seed)}
    atomic_write_bytes(layout.stop_set_file, json.dumps(payload).encode())


def proxy_path(layout: ProjectLayout, version: object) -> Path | None:
    path = layout.round_dir(version) / PROXY_FILE
    return path if path.exists() else None


def prune_rounds(layout: ProjectLayout, keep: set[str]) -> None:
    """Delete round folders other than `keep` (and finished temporary ones)."""
    root = layout.rounds_dir
    for path in root.iterdir() if root.exists() else []:
        if path.is_dir() and not path.name.startswith(".") and path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)


def round_versions_on_disk(layout: ProjectLayout) -> list[str]:
    """Version names of the round folders present (a lost state's version can be recovered from them)."""
    root = layout.rounds_dir
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.exists() else []
