"""/predict: one result per task, in order, in Label Studio's format.

The label and score come from the current round's artefacts (written by the round job on cached
features): the proxy's label as a pre-annotation and the round's score, lower = label first. The API
reads a small NumPy file and never imports torch. A task the round did not rank (no features yet, or
added since) gets an empty result with a null score, and the next sync extracts its features.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from asvp_backend.runtime import Runtime
from asvp_backend.state import ProjectState, project_dir


@dataclass(frozen=True)
class RoundArtefacts:
    score_of: dict[int, float]
    label_of: dict[int, str]  # "" = no label (cold start)


_cache: OrderedDict[tuple[str, int, str], RoundArtefacts | None] = OrderedDict()
_cache_lock = threading.Lock()
_CACHE_SIZE = 8


def load_round(model_dir: Path, project_id: int, version: str) -> RoundArtefacts | None:
    """The round's ranking, cached per (project, version): a new version is a new key, so never stale."""
    key = (str(model_dir), project_id, version)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    path = project_dir(model_dir, project_id) / "rounds" / version / "ranking.npz"
    artefacts = None
    if path.exists():
        with np.load(path) as data:
            ids = data["task_ids"].tolist()
            artefacts = RoundArtefacts(
                score_of=dict(zip(ids, data["scores"].astype(float).tolist(), strict=True)),
                label_of=dict(zip(ids, data["labels"].astype(str).tolist(), strict=True)),
            )
    with _cache_lock:
        _cache[key] = artefacts
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return artefacts


def empty_prediction(version: str) -> dict[str, Any]:
    return {"result": [], "score": None, "model_version": version}


def predict_tasks(runtime: Runtime, state: ProjectState, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    version = str(state.version)
    artefacts = load_round(runtime.settings.model_dir, state.project_id, version) if state.round else None
    results = []
    for task in tasks:
        tid = task["id"]
        if artefacts is None or tid not in artefacts.score_of:
            results.append(empty_prediction(version))
            continue
        label = artefacts.label_of[tid]
        results.append(
            {
                # a label the current config no longer has (edited since the round) is not offered
                "result": [state.spec.result(label)] if label in state.spec.labels else [],
                "score": artefacts.score_of[tid],
                "model_version": version,
            }
        )
    return results
