"""Helpers shared by the set-based strategies: candidate subsampling, partitions, distances on a device."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..scoring import margin_score, random_scores, rank_scores
from .base import Ranking, SelectionInput

#: rows per block when computing distances, so a (100k x 100k) matrix is never materialised
DIST_BLOCK = 8192


def candidate_indices(n: int, max_candidates: int | None, k: int, rng: np.random.Generator) -> np.ndarray:
    """Pool indices the strategy may pick from: all of them, or a uniform subsample of ``max_candidates``
    (never fewer than the batch ``k``), sorted. Keeps set-based selection O(max_candidates) on huge pools."""
    cap = n if max_candidates is None else max(int(max_candidates), k)
    if cap >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(rng.choice(n, size=cap, replace=False)).astype(np.int64)


def partitions(n: int, partition_size: int | None, rng: np.random.Generator) -> list[np.ndarray]:
    """Split ``range(n)`` at random into parts of at most ``partition_size`` (one part when None)."""
    if partition_size is None or n <= partition_size:
        return [np.arange(n, dtype=np.int64)]
    n_parts = -(-n // partition_size)
    return [np.sort(p) for p in np.array_split(rng.permutation(n).astype(np.int64), n_parts)]


def split_budget(sizes: list[int], k: int) -> list[int]:
    """Share a batch of ``k`` across parts in proportion to their sizes, never more than a part holds."""
    total = sum(sizes)
    if k > total:
        raise ValueError(f"budget {k} exceeds the {total} candidates")
    shares = [s * k // total for s in sizes] if total else [0] * len(sizes)
    i = 0
    while sum(shares) < k:  # hand out the remainder one by one, round-robin over parts with room
        if shares[i % len(sizes)] < sizes[i % len(sizes)]:
            shares[i % len(sizes)] += 1
        i += 1
    return shares


def interleaved_schedule(shares: list[int]) -> list[int]:
    """Which part each pick comes from: round-robin over the parts until each has its share.

    Pick ``i`` comes from part ``i mod P`` while every part still has room, so the first picks of a batch span
    the whole pool instead of exhausting one random part first.
    """
    return [p for turn in range(max(shares, default=0)) for p, share in enumerate(shares) if share > turn]


def resolve_device(device: str) -> torch.device:
    """The torch device for a DEVICE setting: ``auto`` = CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def to_tensor(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """float32 tensor on ``device`` (float16 caches are widened here, on the candidates only)."""
    return torch.from_numpy(np.ascontiguousarray(x)).to(device).float()


def min_sq_dist(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """For every row of ``x``, the squared Euclidean distance to its nearest row of ``centres``
    (+inf when there are no centres); blocked so memory stays O(block * m)."""
    out = torch.full((x.shape[0],), float("inf"), device=x.device)
    if centres.shape[0] == 0:
        return out
    c_sq = (centres * centres).sum(1)
    for cs in range(0, centres.shape[0], DIST_BLOCK):
        c = centres[cs : cs + DIST_BLOCK]
        cn = c_sq[cs : cs + DIST_BLOCK]
        for xs in range(0, x.shape[0], DIST_BLOCK):
            xb = x[xs : xs + DIST_BLOCK]
            d = (xb * xb).sum(1, keepdim=True) - 2.0 * xb @ c.T + cn
            out[xs : xs + DIST_BLOCK] = torch.minimum(out[xs : xs + DIST_BLOCK], d.min(1).values)
    return out.clamp_min_(0.0)


#: chooses a row of one part from (squared distance to the nearest centre, already-picked mask, squared norms)
ChooseRow = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], int]


def greedy_over_partitions(
    points: list[torch.Tensor], start_dist: list[torch.Tensor], k: int, choose: ChooseRow
) -> list[tuple[int, int]]:
    """A greedy batch of ``k`` picks (BADGE's k-means++, core-set's k-center) over partitioned candidates.

    The parts take turns (``interleaved_schedule`` over ``split_budget``) and each part first accounts for
    every earlier pick of the batch, whichever part made it, so the batch's prefix is itself a diverse batch
    and an annotator who labels only its start still sees the whole pool. ``start_dist`` holds each part's
    squared distance to the fixed centres (+inf: none). Returns ``(part, row)`` pairs in selection order.
    """
    dist = list(start_dist)
    x_sq = [(x * x).sum(1) for x in points]
    picked = [torch.zeros(x.shape[0], dtype=torch.bool, device=x.device) for x in points]
    seen = [0] * len(points)  # how many of the batch's picks dist[p] already accounts for
    centres: list[torch.Tensor] = []
    chosen: list[tuple[int, int]] = []
    for p in interleaved_schedule(split_budget([x.shape[0] for x in points], k)):
        if seen[p] < len(centres):  # at most one pick per part since this part's last turn: a thin matmul
            new = torch.stack(centres[seen[p] :])
            d = (x_sq[p][:, None] - 2.0 * points[p] @ new.T + (new * new).sum(1)).min(1).values
            dist[p] = torch.minimum(dist[p], d.clamp_min_(0.0))
            seen[p] = len(centres)
        j = choose(dist[p], picked[p], x_sq[p])
        picked[p][j] = True
        centres.append(points[p][j])
        chosen.append((p, j))
    return chosen


def rest_scores(inp: SelectionInput, rng: np.random.Generator) -> np.ndarray:
    """How set-based strategies order the items they did not choose: by margin when probabilities exist,
    at random otherwise."""
    return margin_score(inp.probs) if inp.probs is not None else random_scores(inp.n, rng)


def set_ranking(chosen: np.ndarray, inp: SelectionInput, rng: np.random.Generator) -> Ranking:
    """Ranking for a chosen batch: the batch first in selection order, the rest after it."""
    chosen = np.asarray(chosen, dtype=np.int64)
    return Ranking(order=chosen, scores=rank_scores(chosen, inp.n, rest_scores(inp, rng)))
