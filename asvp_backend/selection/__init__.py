"""Selection: proxy models on cached features and acquisition strategies (numpy + torch + scikit-learn only).

Typical round::

    proxy = create_proxy("mlp", device="cuda").fit(X_labelled, y_labelled)
    probs = proxy.predict_proba(X_pool)
    inp = SelectionInput(X_pool, probs, X_labelled, proxy)
    ranking = create_strategy("margin", seed=round_no, device="cuda").rank(inp, budget=batch_size)
    # ranking.scores -> Label Studio prediction scores (lower = label first), see ``scoring``

Importing this package loads nothing heavy: ``strategy_names``, ``cold_start_strategy_names`` and
``proxy_names`` (from ``names``) are plain lists, and every other name is imported on first use, so config
validation in the API process never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .names import (
    COLD_START_STRATEGY,
    DEFAULT_PROXY,
    DEFAULT_STRATEGY,
    cold_start_strategy_names,
    proxy_names,
    strategy_names,
)

if TYPE_CHECKING:
    from .proxy import PROXIES, LogisticProxy, MLPProxy, Proxy, create_proxy, cross_val_accuracy, load_proxy
    from .scoring import (
        check_scores,
        entropy_score,
        least_confidence_score,
        margin_score,
        order_from_scores,
        random_scores,
        rank_scores,
    )
    from .strategies import (
        STRATEGIES,
        BadgeStrategy,
        CoresetStrategy,
        EntropyStrategy,
        EpsilonMix,
        LeastConfidenceStrategy,
        MarginStrategy,
        MissingProbabilitiesError,
        RandomStrategy,
        Ranking,
        SelectionError,
        SelectionInput,
        Strategy,
        TypiClustStrategy,
        create_strategy,
        get_strategy_class,
        register_strategy,
        strategy_params,
    )

_PROXY_NAMES = ("PROXIES", "LogisticProxy", "MLPProxy", "Proxy", "create_proxy", "cross_val_accuracy", "load_proxy")
_SCORING_NAMES = (
    "check_scores",
    "entropy_score",
    "least_confidence_score",
    "margin_score",
    "order_from_scores",
    "random_scores",
    "rank_scores",
)
_STRATEGY_NAMES = (
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
    "create_strategy",
    "get_strategy_class",
    "register_strategy",
    "strategy_params",
)
_LAZY = {
    **dict.fromkeys(_PROXY_NAMES, ".proxy"),
    **dict.fromkeys(_SCORING_NAMES, ".scoring"),
    **dict.fromkeys(_STRATEGY_NAMES, ".strategies"),
}


def __getattr__(name: str) -> Any:
    """Import torch-using parts on first access (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "COLD_START_STRATEGY",
    "DEFAULT_PROXY",
    "DEFAULT_STRATEGY",
    "PROXIES",
    "STRATEGIES",
    "BadgeStrategy",
    "CoresetStrategy",
    "EntropyStrategy",
    "EpsilonMix",
    "LeastConfidenceStrategy",
    "LogisticProxy",
    "MLPProxy",
    "MarginStrategy",
    "MissingProbabilitiesError",
    "Proxy",
    "RandomStrategy",
    "Ranking",
    "SelectionError",
    "SelectionInput",
    "Strategy",
    "TypiClustStrategy",
    "check_scores",
    "cold_start_strategy_names",
    "create_proxy",
    "create_strategy",
    "cross_val_accuracy",
    "entropy_score",
    "get_strategy_class",
    "least_confidence_score",
    "load_proxy",
    "margin_score",
    "order_from_scores",
    "proxy_names",
    "random_scores",
    "rank_scores",
    "register_strategy",
    "strategy_names",
    "strategy_params",
]
