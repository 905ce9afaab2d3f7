"""/predict: one result per task, in order, in Label Studio's format.

The label and score come from the current round's ranking (artefacts.py): the proxy's label as a
pre-annotation and the round's score, lower = label first. The API reads a small NumPy file and never
imports torch. A task the ranking does not hold gets an empty result with a null score under the version
`<current>-unranked`, never under the current version itself: Label Studio stores what /predict answers, and
its uncertainty sampling orders the current version's predictions by score with NULL first on SQLite, so an
unranked task opened once jumped ahead of the backend's top pick (and kept a second, empty prediction of the
version after the rescore added its real one). The outcome says which tasks those are, so the caller can
decide whether a sync is needed (only for tasks the last sync has not seen: known tasks are already on their
way through extraction and scoring).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asvp_backend.artefacts import RANKING_FILE, ArtefactCorrupt, read_ranking
from asvp_backend.layout import ProjectLayout
from asvp_backend.state import ProjectState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundLookup:
    score_of: dict[int, float]
    label_of: dict[int, str]  # "" = no label (cold start)


@dataclass
class PredictOutcome:
    results: list[dict[str, Any]]
    unranked: list[int] = field(default_factory=list)  # task ids the current ranking does not hold
    problem: str | None = None  # the ranking could not be read (named file and reason)

    def needs_sync(self, state: ProjectState) -> bool:
        """True when some unranked task is newer than everything the last sync saw."""
        seen = int((state.last_sync or {}).get("max_task_id", -1))
        return any(tid > seen for tid in self.unranked)


_cache: OrderedDict[tuple[str, int, str, int, int], RoundLookup | None] = OrderedDict()
_cache_lock = threading.Lock()
_CACHE_SIZE = 8


def load_round(model_dir: Path, project_id: int, version: str) -> RoundLookup | None:
    """The round's ranking, cached per (project, version, file identity): a re-scored ranking replaces the
    file (a new inode), so it is a new key and never served stale."""
    layout = ProjectLayout(model_dir, project_id)
    try:
        stat = (layout.round_dir(version) / RANKING_FILE).stat()
    except FileNotFoundError:
        return None
    key = (str(model_dir), project_id, version, stat.st_ino, stat.st_mtime_ns)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    ranking = read_ranking(layout, version)
    lookup = None if ranking is None else RoundLookup(*ranking.lookup())
    with _cache_lock:
        _cache[key] = lookup
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return lookup


UNRANKED_SUFFIX = "-unranked"


def empty_prediction(version: str) -> dict[str, Any]:
    return {"result": [], "score": None, "model_version": f"{version}{UNRANKED_SUFFIX}"}


def predict_tasks(model_dir: Path, state: ProjectState, task_ids: list[int]) -> PredictOutcome:
    version = str(state.version)
    lookup, problem = None, None
    if state.round:
        try:
            lookup = load_round(model_dir, state.project_id, version)
        except ArtefactCorrupt as exc:
            problem = str(exc)
            log.error("project %s: %s; serving empty predictions until the next round", state.project_id, exc)
    outcome = PredictOutcome(results=[], problem=problem)
    for tid in task_ids:
        if lookup is None or tid not in lookup.score_of:
            outcome.results.append(empty_prediction(version))
            outcome.unranked.append(tid)
            continue
        outcome.results.append(
            {
                "result": state.spec.prediction_result(lookup.label_of[tid]),
                "score": lookup.score_of[tid],
                "model_version": version,
            }
        )
    return outcome
