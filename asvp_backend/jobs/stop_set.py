"""The round's stop-set step (stopping.py has the rule): predict the project's fixed stop set with the
round's proxy and measure Cohen's kappa against the previous round's predictions of the same tasks.

The stop set is a seeded sample of up to STOP_SET_SIZE tasks, drawn once from the unlabelled tasks with
features (at the first round) and never re-drawn, so that kappa always compares predictions of the same
tasks. Tasks deleted later drop out (they have no features any more); tasks labelled later stay in: the
criterion measures whether the model's predictions change, not how it does on the pool.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from asvp_backend.artefacts import (
    ArtefactCorrupt,
    StopPredictions,
    read_stop_predictions,
    read_stop_set,
    write_stop_set,
)
from asvp_backend.features.store import FeatureGeneration
from asvp_backend.layout import ProjectLayout
from asvp_backend.stopping import STOP_SET_SIZE, cohen_kappa

log = logging.getLogger(__name__)


def stop_set(layout: ProjectLayout, pool_ids: np.ndarray, seed: int) -> np.ndarray:
    """The project's stop set; drawn (and persisted) now if it has none. A corrupt file is drawn again."""
    try:
        ids = read_stop_set(layout)
    except ArtefactCorrupt as exc:
        log.warning("project %s: %s; drawing the stop set again", layout.project_id, exc)
        ids = None
    if ids is not None or not len(pool_ids):
        return ids if ids is not None else np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    drawn = np.sort(rng.choice(pool_ids, size=min(STOP_SET_SIZE, len(pool_ids)), replace=False))
    write_stop_set(layout, drawn, seed)
    return drawn


def predict_stop_set(layout: ProjectLayout, seed: int, pool_ids: np.ndarray, generation: FeatureGeneration, proxy: Any,
                     previous_version: object) -> tuple[StopPredictions | None, dict[str, Any]]:
    """The round proxy's labels for the stop set, and the round record's `stop` entry: kappa against
    `previous_version`'s predictions (None when either round made none, e.g. at cold start)."""
    ids = stop_set(layout, pool_ids, seed)
    if proxy is None or not len(ids):
        return None, {"kappa": None, "stop_set": 0, "compared_with": None, "compared": 0}
    found, vectors = generation.lookup(ids)
    present = ids[found]
    labels = np.asarray(proxy.classes_).astype(str)[proxy.predict_proba(vectors).argmax(axis=1)]
    current = StopPredictions(present, labels)
    try:
        previous = read_stop_predictions(layout, previous_version)
    except ArtefactCorrupt as exc:
        log.warning("project %s: %s; no kappa this round", layout.project_id, exc)
        previous = None
    entry: dict[str, Any] = {"kappa": None, "stop_set": int(len(present)), "compared_with": None, "compared": 0}
    if previous is not None:
        before = previous.by_task()
        pairs = [(before[t], label) for t, label in current.by_task().items() if t in before]
        if pairs:
            old, new = zip(*pairs, strict=True)
            entry.update(kappa=round(cohen_kappa(old, new), 6), compared_with=str(previous_version),
                         compared=len(pairs))
    return current, entry
