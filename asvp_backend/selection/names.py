"""The selection names configuration may use, importable without torch (the API process never loads it).

The registries (``STRATEGIES``, ``PROXIES``) are filled when the torch-using modules are imported, so these
static lists mirror them; ``tests/unit/test_selection_names.py`` checks that they stay equal.
"""

from __future__ import annotations

DEFAULT_STRATEGY = "margin"
COLD_START_STRATEGY = "typiclust"
DEFAULT_PROXY = "mlp"

#: every registered strategy
_STRATEGIES = ("badge", "coreset", "entropy", "least_confidence", "margin", "random", "typiclust")
#: the ones that rank without proxy probabilities (fewer than two labelled classes)
_COLD_START_STRATEGIES = ("coreset", "random", "typiclust")
_PROXIES = ("logistic", "mlp")


def strategy_names() -> list[str]:
    """Valid values of STRATEGY."""
    return list(_STRATEGIES)


def cold_start_strategy_names() -> list[str]:
    """Valid values of COLD_START_STRATEGY: strategies that need no proxy probabilities."""
    return list(_COLD_START_STRATEGIES)


def proxy_names() -> list[str]:
    """Valid values of PROXY."""
    return list(_PROXIES)
