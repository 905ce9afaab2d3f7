"""Selection: proxy models on cached features and acquisition strategies (numpy + torch + scikit-learn only).

Typical round::

    proxy = create_proxy("mlp", device="cuda").fit(X_labelled, y_labelled)
    probs = proxy.predict_proba(X_pool)
    inp = SelectionInput(X_pool, probs, X_labelled, proxy)
    ranking = create_strategy("margin", seed=round_no).rank(inp, budget=100)
    # ranking.scores -> Label Studio prediction scores (lower = label first), see ``scoring``
"""

from .proxy import (
    PROXIES,
    LogisticProxy,
    MLPProxy,
    Proxy,
    create_proxy,
    cross_val_accuracy,
    load_proxy,
)
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
    COLD_START_STRATEGY,
    DEFAULT_STRATEGY,
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

__all__ = [
    "COLD_START_STRATEGY",
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
    "create_proxy",
    "create_strategy",
    "cross_val_accuracy",
    "entropy_score",
    "get_strategy_class",
    "least_confidence_score",
    "load_proxy",
    "margin_score",
    "order_from_scores",
    "random_scores",
    "rank_scores",
    "register_strategy",
    "strategy_params",
]
