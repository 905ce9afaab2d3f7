"""Per-item strategies: one score per pool item, the whole pool sorted (docs/method.md, *Proxy and strategies*)."""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import numpy as np

from ..scoring import entropy_score, least_confidence_score, margin_score, random_scores
from .base import Ranking, SelectionInput, Strategy, register_strategy


class UncertaintyStrategy(Strategy):
    """Score every item from the proxy probabilities; lowest score = most uncertain = label first."""

    requires_probs: ClassVar[bool] = True

    @staticmethod
    @abstractmethod
    def score(probs: np.ndarray) -> np.ndarray:
        """One certainty score per item from ``scoring`` (lower = label first)."""

    def rank(self, inp: SelectionInput, budget: int) -> Ranking:
        self._check(inp, budget)
        if inp.n == 0:
            return Ranking.empty()
        assert inp.probs is not None
        return Ranking.from_scores(self.score(inp.probs))


@register_strategy
class MarginStrategy(UncertaintyStrategy):
    """Default: smallest top-1 minus top-2 probability first (all released ASVP scripts)."""

    name: ClassVar[str] = "margin"
    score = staticmethod(margin_score)


@register_strategy
class LeastConfidenceStrategy(UncertaintyStrategy):
    """Smallest maximum probability first (SVP's default)."""

    name: ClassVar[str] = "least_confidence"
    score = staticmethod(least_confidence_score)


@register_strategy
class EntropyStrategy(UncertaintyStrategy):
    """Highest predictive entropy first (score = 1 - H / log C)."""

    name: ClassVar[str] = "entropy"
    score = staticmethod(entropy_score)


@register_strategy
class RandomStrategy(Strategy):
    """Uniform random order: the baseline and the reference's initial round."""

    name: ClassVar[str] = "random"

    def rank(self, inp: SelectionInput, budget: int) -> Ranking:
        self._check(inp, budget)
        return Ranking.from_scores(random_scores(inp.n, np.random.default_rng(self.seed)))
