"""Strategy base class, value objects and registry (small-text-like ABC, timm-like registry + factory)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np

from ..proxy import Proxy
from ..scoring import order_from_scores


class SelectionError(ValueError):
    """A strategy cannot run on the given input."""


class MissingProbabilitiesError(SelectionError):
    """A probability-based strategy was asked before anything is labelled; use a cold-start strategy."""


@dataclass(frozen=True)
class SelectionInput:
    """Everything a strategy may look at; strategies never mutate it."""

    features: np.ndarray  # (n, d) unlabelled pool features (float16 or float32)
    probs: np.ndarray | None  # (n, C) proxy probabilities; None when nothing is labelled
    labelled_features: np.ndarray  # (m, d), m may be 0
    proxy: Proxy | None = None  # for BADGE gradient embeddings

    def __post_init__(self) -> None:
        if self.features.ndim != 2:
            raise SelectionError(f"features must be 2-d (n, d), got shape {self.features.shape}")
        if self.probs is not None and (self.probs.ndim != 2 or self.probs.shape[0] != self.features.shape[0]):
            raise SelectionError(f"probs must be ({self.features.shape[0]}, C), got {self.probs.shape}")
        lab = self.labelled_features
        if lab.size and (lab.ndim != 2 or lab.shape[1] != self.features.shape[1]):
            raise SelectionError(f"labelled_features must be (m, {self.features.shape[1]}), got {lab.shape}")

    @property
    def n(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_labelled(self) -> int:
        return int(self.labelled_features.shape[0]) if self.labelled_features.size else 0


@dataclass(frozen=True)
class Ranking:
    """A strategy's answer: ``order`` (label-first pool indices) and a score for every pool item.

    ``order`` has length ``min(budget, n)`` for set-based strategies and ``n`` for per-item ones; it always
    equals ``order_from_scores(scores)[: len(order)]`` (lower score = label first, see ``scoring``).
    """

    order: np.ndarray
    scores: np.ndarray

    def __post_init__(self) -> None:
        if self.scores.ndim != 1 or self.order.ndim != 1 or self.order.size > self.scores.size:
            raise SelectionError("Ranking needs 1-d scores (n,) and an order of at most n indices")

    @classmethod
    def from_scores(cls, scores: np.ndarray, limit: int | None = None) -> Ranking:
        """Per-item ranking: sort the scores (ties by index)."""
        scores = np.asarray(scores, dtype=np.float64)
        return cls(order=order_from_scores(scores, limit), scores=scores)

    @classmethod
    def empty(cls) -> Ranking:
        return cls(order=np.empty(0, np.int64), scores=np.empty(0, np.float64))


class Strategy(ABC):
    """Rank the unlabelled pool. ``__init__`` stores parameters only; ``rank`` is a pure function of its
    input and ``seed`` (same seed, same input -> same ranking; vary the seed per round).

    Every strategy accepts ``device`` (the DEVICE setting: ``cpu``, ``cuda``, ``auto``) so callers pass it
    blindly; the ones that compute with torch (BADGE, core-set, TypiClust) use it, the others ignore it.
    """

    name: ClassVar[str]
    requires_probs: ClassVar[bool] = False
    set_based: ClassVar[bool] = False  # True: order holds only the chosen batch

    def __init__(self, seed: int = 0, device: str = "cpu") -> None:
        self.seed = seed
        self.device = device

    @abstractmethod
    def rank(self, inp: SelectionInput, budget: int) -> Ranking:
        """Return the ranking for a batch of ``budget`` items: the batch labelled before the next round
        (BATCH_SIZE), not how many predictions are pushed. Set-based strategies pick exactly that batch and
        order everything else by ``scoring``'s rest rule, so a large budget would only dilute the batch."""

    def _check(self, inp: SelectionInput, budget: int) -> None:
        if budget < 0:
            raise SelectionError(f"budget must be >= 0, got {budget}")
        if self.requires_probs and inp.probs is None:
            raise MissingProbabilitiesError(
                f"strategy {self.name!r} needs proxy probabilities; nothing is labelled yet, "
                "use a cold-start strategy (e.g. 'typiclust' or 'random')"
            )

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


STRATEGIES: dict[str, type[Strategy]] = {}

S = TypeVar("S", bound=type[Strategy])


def register_strategy(cls: S) -> S:
    """Class decorator: add a strategy to ``STRATEGIES`` under its ``name``."""
    name = cls.name
    if name in STRATEGIES and STRATEGIES[name] is not cls:
        raise ValueError(f"strategy name {name!r} already registered by {STRATEGIES[name].__name__}")
    STRATEGIES[name] = cls
    return cls


def get_strategy_class(name: str) -> type[Strategy]:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}") from None


def strategy_params(name: str) -> dict[str, Any]:
    """The constructor defaults of a registered strategy (for config validation at start-up)."""
    import inspect

    sig = inspect.signature(get_strategy_class(name).__init__)
    return {
        p.name: p.default
        for p in list(sig.parameters.values())[1:]
        if p.default is not inspect.Parameter.empty
    }
