"""The audit sample: a small share of the queue drawn uniformly at random, whose labels judge models.

Invariant: which task is an audit pick depends only on the project's seed and the task's id, never on its
features, its label or the strategy. Every task has a fixed audit key (a uniform number in [0, 1) hashed
from the seed and the id); a round's audit picks are the unlabelled tasks with the smallest keys, so the
audit labels are a uniform random sample of the pool they were drawn from. Actively chosen labels flatter
every model trained or checked on them; the audit labels are the ones that do not (docs/method.md,
*The audit sample and the refresh gate*).

The picks are interleaved into the ranking at positions that follow the labels given since the audit
started (a quota: one label in 1/AUDIT_FRACTION, a higher share until the audit has AUDIT_MIN_LABELS
labels), not at fixed positions of one ranking: a queue re-ranked after every label only ever serves its
first task. Pure and deterministic, so the round job and `simulate` place the same picks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

_MIX = np.uint64(0x9E3779B97F4A7C15)


def audit_keys(task_ids: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per task id, fixed for (seed, id): splitmix64 of the two (vectorised)."""
    with np.errstate(over="ignore"):
        z = np.asarray(task_ids, dtype=np.int64).astype(np.uint64) * _MIX + np.uint64(seed & 0xFFFFFFFF) * np.uint64(
            0xBF58476D1CE4E5B9) + _MIX
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclass(frozen=True)
class AuditPolicy:
    """AUDIT_FRACTION, AUDIT_EARLY_FRACTION, AUDIT_MIN_LABELS (0 turns the audit off with AUDIT_FRACTION=0) and
    AUDIT_EXISTING (`existing_random`: the labels present at the first round start the audit)."""

    fraction: float = 0.05
    early_fraction: float = 0.2
    min_labels: int = 60
    existing_random: bool = False

    @classmethod
    def from_settings(cls, settings: Any) -> AuditPolicy:
        return cls(settings.audit_fraction, settings.audit_early_fraction, settings.audit_min_labels,
                   settings.audit_existing == "random")

    @property
    def enabled(self) -> bool:
        return self.fraction > 0

    def share(self, audit_labels: int) -> float:
        """The share of labels owed to the audit once it has `audit_labels` labels."""
        if not self.enabled:
            return 0.0
        return max(self.fraction, self.early_fraction) if audit_labels < self.min_labels else self.fraction

    def owed(self, labels: int) -> int:
        """Audit labels owed after `labels` labels since the audit started: the early share until the audit
        has AUDIT_MIN_LABELS, the share after."""
        if not self.enabled:
            return 0
        early = max(self.fraction, self.early_fraction)
        early_labels = self.min_labels / early  # labels it takes to owe AUDIT_MIN_LABELS at the early share
        if labels <= early_labels:
            return int(labels * early + 1e-9)
        return self.min_labels + int((labels - early_labels) * self.fraction + 1e-9)

    def positions(self, labels_since_start: int, audit_labels: int, horizon: int) -> list[int]:
        """Positions (0 = served next) among the next `horizon` tasks of the queue that get an audit pick.

        Position i is the (labels_since_start + i + 1)-th label since the audit started; it gets an audit
        pick when the labels owed by then exceed the audit labels given plus those placed before it. A debt
        (audit picks skipped, or labels given outside the queue) is paid back at every other position, never
        as a run of audit picks."""
        placed: list[int] = []
        for i in range(max(0, horizon) if self.enabled else 0):
            have = audit_labels + len(placed)
            due = self.owed(labels_since_start + i + 1)
            if due > have and (due - have == 1 or not placed or i - placed[-1] >= 2):
                placed.append(i)
        return placed


def audit_order(pool_ids: np.ndarray, keys: np.ndarray, count: int) -> np.ndarray:
    """Rows of the pool with the `count` smallest audit keys, smallest first (ties by task id)."""
    count = min(int(count), len(pool_ids))
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((np.asarray(pool_ids), np.asarray(keys)))
    return order[:count].astype(np.int64)


@dataclass(frozen=True)
class Interleaved:
    """A ranking with its audit picks in place: `scores` (lower = served first) over the same pool rows."""

    scores: np.ndarray
    audit_rows: np.ndarray  # pool rows placed at audit positions, in placement order
    positions: list[int]


def interleave(scores: np.ndarray, pool_ids: np.ndarray, seed: int, positions: list[int]) -> Interleaved:
    """Put the audit picks (smallest keys) at `positions` of the ranking and the strategy's order around them.

    The scores keep their values: position p gets the p-th smallest score, so the pushed scores still say
    how sure the strategy was, and Label Studio's order (lowest first) is the interleaved one."""
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    positions = [p for p in positions if p < n]
    if not positions:
        return Interleaved(scores, np.zeros(0, dtype=np.int64), [])
    picks = audit_order(pool_ids, audit_keys(pool_ids, seed), len(positions))
    is_pick = np.zeros(n, dtype=bool)
    is_pick[picks] = True
    rest = np.array([r for r in np.argsort(scores, kind="stable") if not is_pick[r]], dtype=np.int64)
    order = np.empty(n, dtype=np.int64)
    slots = np.zeros(n, dtype=bool)
    slots[positions] = True
    order[slots] = picks
    order[~slots] = rest
    ordered = np.sort(scores, kind="stable")
    top = min(n, positions[-1] + 2)
    ordered[:top] = _untied(ordered[:top])  # ties at the top would let Label Studio serve either first
    ordered[top:] = np.maximum(ordered[top:], ordered[top - 1])  # and nothing below the top moves above it
    new_scores = np.empty(n, dtype=np.float64)
    new_scores[order] = ordered
    return Interleaved(new_scores, picks, positions)


def _ulps(value: float, count: int, direction: float) -> list[float]:
    """`value` and the `count` floats after it towards `direction`, nearest first."""
    out = [float(value)]
    for _ in range(count):
        out.append(float(np.nextafter(out[-1], direction)))
    return out


def _untied(ordered: np.ndarray) -> np.ndarray:
    """Sorted scores made strictly increasing by the smallest steps (a few ulps) that keep every score in
    [0, 1], Label Studio's range (selection/scoring.py): a run of equal scores steps down from its value, or up
    where that would leave [0, 1] or meet the score before it. A run that fits neither way stays tied."""
    out = np.array(ordered, dtype=np.float64)
    i = 0
    while i < len(out):
        j = i
        while j + 1 < len(out) and out[j + 1] == out[i]:
            j += 1
        if j > i:
            down = _ulps(out[i], j - i, -np.inf)[::-1]
            up = _ulps(out[i], j - i, np.inf)
            if down[0] >= 0.0 and (i == 0 or down[0] > out[i - 1]):
                out[i : j + 1] = down
            elif up[-1] <= 1.0 and (j + 1 == len(out) or up[-1] < out[j + 1]):
                out[i : j + 1] = up
        i = j + 1
    return out
