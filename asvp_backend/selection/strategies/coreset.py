"""Core-set: greedy k-center on squared Euclidean distances (Sener & Savarese 2018).

docs/method.md, *Proxy and strategies*."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from ._common import (
    candidate_indices,
    greedy_over_partitions,
    min_sq_dist,
    partitions,
    resolve_device,
    set_ranking,
    to_tensor,
)
from .base import Ranking, SelectionInput, Strategy, register_strategy


@register_strategy
class CoresetStrategy(Strategy):
    """Repeatedly pick ``argmax_u min_{c in labelled + chosen} d(u, c)``: covers the far, unexplored regions.

    Scale: each greedy step is one matrix-vector product over the candidates, so a batch costs
    ``budget x candidates x d``. Candidates are a uniform subsample of at most ``max_candidates`` pool items,
    split into random partitions of at most ``partition_size`` that each pick their share of the batch
    (the reference's BADGE partitioning); unlike the reference, partitions take turns (pick ``i`` from
    partition ``i mod P``, so the first tasks served span the pool) and every partition treats all earlier
    picks as centres, so partitions do not re-cover the same region. All partitions stay on ``device``
    (``max_candidates x d`` float32: 0.5 GB at 100k x 1,280). ``max_labelled``
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
        super().__init__(seed, device)
        self.max_candidates = max_candidates
        self.partition_size = partition_size
        self.max_labelled = max_labelled

    @torch.no_grad()
    def rank(self, inp: SelectionInput, budget: int) -> Ranking:
        self._check(inp, budget)
        rng = np.random.default_rng(self.seed)
        k = min(budget, inp.n)
        if k == 0:
            return set_ranking(np.empty(0, np.int64), inp, rng)
        dev = resolve_device(self.device)
        cand = candidate_indices(inp.n, self.max_candidates, k, rng)
        lab = inp.labelled_features if inp.n_labelled else np.empty((0, inp.features.shape[1]), np.float32)
        if self.max_labelled is not None and lab.shape[0] > self.max_labelled:
            lab = lab[np.sort(rng.choice(lab.shape[0], self.max_labelled, replace=False))]
        labelled = to_tensor(lab, dev)
        parts = partitions(cand.size, self.partition_size, rng)
        points = [to_tensor(inp.features[cand[part]], dev) for part in parts]

        def choose(dist: torch.Tensor, picked: torch.Tensor, x_sq: torch.Tensor) -> int:
            if torch.isinf(dist).all():  # no centre yet: start from a random candidate
                return int(rng.integers(dist.shape[0]))
            return int(torch.argmax(dist.masked_fill(picked, -1.0)))

        picks = greedy_over_partitions(points, [min_sq_dist(x, labelled) for x in points], k, choose)
        return set_ranking(cand[np.asarray([parts[p][j] for p, j in picks], np.int64)], inp, rng)
