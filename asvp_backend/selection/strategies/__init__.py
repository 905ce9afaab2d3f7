"""Acquisition strategies: each a small class registered by name (see ``STRATEGIES``)."""

from ..names import COLD_START_STRATEGY, DEFAULT_STRATEGY
from .badge import BadgeStrategy, pooled_grad_embedding
from .base import (
    STRATEGIES,
    MissingProbabilitiesError,
    Ranking,
    SelectionError,
    SelectionInput,
    Strategy,
    get_strategy_class,
    register_strategy,
    strategy_params,
)
from .coreset import CoresetStrategy
from .factory import create_strategy
from .mix import EpsilonMix
from .typiclust import TypiClustStrategy, typicality
from .uncertainty import (
    EntropyStrategy,
    LeastConfidenceStrategy,
    MarginStrategy,
    RandomStrategy,
    UncertaintyStrategy,
)

__all__ = [
    "COLD_START_STRATEGY",
    "DEFAULT_STRATEGY",
    "STRATEGIES",
    "BadgeStrategy",
    "CoresetStrategy",
    "EntropyStrategy",
    "EpsilonMix",
    "LeastConfidenceStrategy",
    "MarginStrategy",
    "MissingProbabilitiesError",
    "RandomStrategy",
    "Ranking",
    "SelectionError",
    "SelectionInput",
    "Strategy",
    "TypiClustStrategy",
    "UncertaintyStrategy",
    "create_strategy",
    "get_strategy_class",
    "pooled_grad_embedding",
    "register_strategy",
    "strategy_params",
    "typicality",
]
