"""The one place for the score convention.

Label Studio's uncertainty sampling serves the task with the **lowest** prediction ``score`` first, so every
strategy turns its acquisition value into a score where *lower = label first*. All scores produced here are
finite float64 values in ``[0, 1]``:

- per-item uncertainty scores are a certainty measure (``margin_score``, ``least_confidence_score``,
  ``entropy_score``): 0 = maximally uncertain, 1 = certain;
- set-based strategies (BADGE, core-set, TypiClust, epsilon mix) rank their chosen items first with
  ``rank_scores``: the i-th chosen of k items gets ``0.5 * i / k`` (in ``[0, 0.5)``) and every other item
  gets ``0.5 + 0.5 * rest`` (in ``[0.5, 1]``), where ``rest`` is a per-item score (margin, or random).

Ties are broken by pool index (stable sort), so ``order_from_scores`` is deterministic.
"""

from __future__ import annotations

import numpy as np

#: rows processed at a time so a (1M, C) probability matrix is never copied whole
_CHUNK = 65_536

#: chosen items take [0, CHOSEN_SPAN); the rest take [CHOSEN_SPAN, 1]
CHOSEN_SPAN = 0.5


def _check_probs(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs)
    if probs.ndim != 2:
        raise ValueError(f"probs must be a 2-d (n, C) array, got shape {probs.shape}")
    if probs.shape[1] < 1:
        raise ValueError("probs must have at least one class column")
    return probs


def margin_score(probs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability, in [0, 1]; 1.0 for a single-class model (nothing to separate)."""
    probs = _check_probs(probs)
    n, c = probs.shape
    out = np.ones(n, dtype=np.float64)
    if c == 1 or n == 0:
        return out
    for start in range(0, n, _CHUNK):
        part = np.partition(probs[start : start + _CHUNK], c - 2, axis=1)
        out[start : start + _CHUNK] = part[:, -1].astype(np.float64) - part[:, -2]
    return np.clip(np.nan_to_num(out, nan=1.0), 0.0, 1.0)


def least_confidence_score(probs: np.ndarray) -> np.ndarray:
    """Highest class probability, in [1/C, 1]: low = the proxy is unsure of its best guess."""
    probs = _check_probs(probs)
    out = np.empty(probs.shape[0], dtype=np.float64)
    for start in range(0, probs.shape[0], _CHUNK):
        out[start : start + _CHUNK] = probs[start : start + _CHUNK].max(axis=1)
    return np.clip(np.nan_to_num(out, nan=1.0), 0.0, 1.0)


def entropy_score(probs: np.ndarray) -> np.ndarray:
    """``1 - H(p) / log C`` in [0, 1]: 0 = uniform prediction (maximal entropy), 1 = one-hot."""
    probs = _check_probs(probs)
    n, c = probs.shape
    out = np.ones(n, dtype=np.float64)
    if c == 1 or n == 0:
        return out
    for start in range(0, n, _CHUNK):
        p = np.clip(probs[start : start + _CHUNK].astype(np.float64), 0.0, 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            plogp = np.where(p > 0.0, p * np.log(p), 0.0)
        out[start : start + _CHUNK] = 1.0 + plogp.sum(axis=1) / np.log(c)
    return np.clip(np.nan_to_num(out, nan=1.0), 0.0, 1.0)


def random_scores(n: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform scores in [0, 1): a random order that still fits the convention."""
    return rng.random(n)


def rank_scores(order: np.ndarray, n: int, rest_scores: np.ndarray | None = None) -> np.ndarray:
    """Scores that put ``order`` first (in that order) and every other item after it.

    ``rest_scores`` (per-item, in [0, 1]) orders the remaining items; without it they all get 1.0 and
    fall back to pool-index order.
    """
    order = np.asarray(order, dtype=np.int64)
    k = order.size
    if k > n:
        raise ValueError(f"order has {k} items but the pool has only {n}")
    if k and np.unique(order).size != k:
        raise ValueError("order contains duplicate indices")
    scores: np.ndarray
    if rest_scores is None:
        scores = np.ones(n, dtype=np.float64)
    else:
        rest = np.clip(np.nan_to_num(np.asarray(rest_scores, dtype=np.float64), nan=1.0), 0.0, 1.0)
        if rest.shape != (n,):
            raise ValueError(f"rest_scores must have shape ({n},), got {rest.shape}")
        scores = CHOSEN_SPAN + (1.0 - CHOSEN_SPAN) * rest
    if k:
        scores[order] = CHOSEN_SPAN * np.arange(k, dtype=np.float64) / k
    return scores


def order_from_scores(scores: np.ndarray, limit: int | None = None) -> np.ndarray:
    """Pool indices by ascending score (label first), ties by index; the first ``limit`` if given."""
    scores = np.asarray(scores)
    if limit is not None and limit < scores.size // 8:
        # top-k without sorting the whole pool: partition, then a stable sort of the (padded) head
        head = np.argpartition(scores, limit)[: limit + 1] if limit < scores.size else np.arange(scores.size)
        kth = scores[head].max()
        head = np.flatnonzero(scores <= kth)  # every tie of the boundary value, in index order
        return head[np.argsort(scores[head], kind="stable")][:limit].astype(np.int64)
    order = np.argsort(scores, kind="stable").astype(np.int64)
    return order if limit is None else order[:limit]


def check_scores(scores: np.ndarray) -> None:
    """Raise ValueError unless every score is a finite float in [0, 1] (what Label Studio receives)."""
    scores = np.asarray(scores)
    if scores.size and (not np.all(np.isfinite(scores)) or scores.min() < 0.0 or scores.max() > 1.0):
        raise ValueError("scores must be finite and in [0, 1]")
