"""``create_strategy``: build a registered strategy by name, optionally wrapped in an epsilon mix."""

from __future__ import annotations

from typing import Any

from .base import Strategy, get_strategy_class
from .mix import EpsilonMix


def create_strategy(
    name: str, seed: int = 0, epsilon: float = 0.0, device: str = "cpu", **params: Any
) -> Strategy:
    """E.g. ``create_strategy("badge", seed=round_no, epsilon=0.1, device="cuda")``.

    ``device`` is accepted by every strategy (``auto`` = CUDA when present). Unknown names raise ValueError
    listing the known ones; unknown ``params`` raise TypeError from the strategy's constructor, so a bad
    configuration fails at start-up rather than mid-round.
    """
    strategy = get_strategy_class(name)(seed=seed, device=device, **params)
    return EpsilonMix(strategy, epsilon, seed=seed) if epsilon > 0.0 else strategy
