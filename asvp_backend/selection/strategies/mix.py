"""EpsilonMix: replace a fraction of any strategy's batch by uniform random picks (exploration)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..scoring import order_from_scores, rank_scores
from .base import Ranking, SelectionError, SelectionInput, Strategy


class EpsilonMix(Strategy):
    """``round(epsilon * batch)`` of the batch are uniform picks from the items the base strategy did not
    choose; they are placed at random positions inside the batch (not at its end) so an annotator who
    labels only part of the batch still sees some. Items after the batch keep the base strategy's order.
    Not registered: build it with ``create_strategy(name, epsilon=...)``.
    """

    name: ClassVar[str] = "epsilon_mix"

    def __init__(self, base: Strategy, epsilon: float, seed: int = 0) -> None:
        super().__init__(seed, base.device)
        if not 0.0 <= epsilon <= 1.0:
            raise SelectionError(f"epsilon must be in [0, 1], got {epsilon}")
        self.base = base
        self.epsilon = epsilon

    @property
    def requires_probs(self) -> bool:  # type: ignore[override]
        return self.base.requires_probs

    @property
    def set_based(self) -> bool:  # type: ignore[override]
        return self.base.set_based

    def rank(self, inp: SelectionInput, budget: int) -> Ranking:
        self._check(inp, budget)
        base = self.base.rank(inp, budget)
        k = min(budget, inp.n)
        n_random = int(round(self.epsilon * k))
        if k == 0 or n_random == 0:
            return base
        rng = np.random.default_rng([self.seed, 0xE5])  # independent of the base strategy's stream
        keep = base.order[: k - n_random]
        others = np.setdiff1d(np.arange(inp.n), keep)
        randoms = rng.choice(others, size=n_random, replace=False)
        slots = np.zeros(k, bool)
        slots[rng.choice(k, size=n_random, replace=False)] = True
        batch = np.empty(k, np.int64)
        batch[slots] = randoms
        batch[~slots] = keep
        scores = rank_scores(batch, inp.n, rest_scores=base.scores)
        order = batch if self.base.set_based else order_from_scores(scores)
        return Ranking(order=order, scores=scores)
