"""Core-set: greedy k-center on squared Euclidean distances (Sener & Savarese 2018; method.md section 7)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from ._common import (
    candidate_indices,
    min_sq_dist,
    partitions,
    set_ranking,
    split_budget,
    sq_dist_to,
    to_tensor,
)
from .base import Ranking, SelectionInput, Strategy, register_strategy


@register_strategy
class CoresetStrategy(Strategy):
    """Repeatedly pick ``argmax_u min_{c in labelled + chosen} d(u, c)``: covers the far, unexplored regions.

    Scale: each greedy step is one matrix-vector product over the candidates, so a batch costs
    ``budget x candidates x d``. Candidates are a uniform subsample of at most ``max_candidates`` pool items,
    split into random partitions of at most ``partition_size`` that each pick their share of the batch
    (the reference's BADGE partitioning); unlike the reference, every partition also treats the picks of
    the earlier partitions as centres, so partitions do not re-cover the same region. ``max_labelled``
    caps (uniform subsample) the labelled points used as initial centres. Without labelled points the
    first centre is a random candidate. Items not chosen are ordered by margin (or at random).
    """

    name: ClassVar[str] = "coreset"
    set_based: ClassVar[bool] = True

    def __init__(
        self,
        seed: int = 0,
        max_candidates: int | None = 100_000,
        partition_size: int | None = 20_000,
        max_labelled: int | None = 100_000,
        device: str = "cpu",
    ) -> None:
        super().__init__(seed)
        self.max_candidates = max_candidates
        self.partition_size = partition_size
        self.max_labelled = max_labelled
        self.device = device

    @torch.no_grad()
    def rank(self, inp: SelectionInput, budget: int) -> Ranking:
        self._check(inp, budget)
        rng = np.random.default_rng(self.seed)
        k = min(budget, inp.n)
        if k == 0:
            return set_ranking(np.empty(0, np.int64), inp, rng)
        dev = torch.device(self.device)
        cand = candidate_indices(inp.n, self.max_candidates, k, rng)
        lab = inp.labelled_features if inp.n_labelled else np.empty((0, inp.features.shape[1]), np.float32)
        if self.max_labelled is not None and lab.shape[0] > self.max_labelled:
            lab = lab[np.sort(rng.choice(lab.shape[0], self.max_labelled, replace=False))]
        centres = to_tensor(lab, dev)
        parts = partitions(cand.size, self.partition_size, rng)
        chosen: list[int] = []
        for part, share in zip(parts, split_budget([p.size for p in parts], k), strict=True):
            if share == 0:
                continue
            idx = cand[part]
            x = to_tensor(inp.features[idx], dev)
            x_sq = (x * x).sum(1)
            prev = to_tensor(inp.features[np.asarray(chosen, np.int64)], dev)
            dist = torch.minimum(min_sq_dist(x, centres), min_sq_dist(x, prev))
            picked = torch.zeros(x.shape[0], dtype=torch.bool, device=dev)
            for _ in range(share):
                if torch.isinf(dist).all():  # no centre yet: start from a random candidate
                    j = int(rng.integers(x.shape[0]))
                else:
                    j = int(torch.argmax(dist.masked_fill(picked, -1.0)))
                picked[j] = True
                chosen.append(int(idx[j]))
                dist = torch.minimum(dist, sq_dist_to(x, x_sq, x[j]))
        return set_ranking(np.asarray(chosen, np.int64), inp, rng)
