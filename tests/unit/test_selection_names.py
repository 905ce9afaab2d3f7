"""The names config validates against: static (torch-free) lists that must equal the registries."""

from __future__ import annotations

import subprocess
import sys

from asvp_backend.selection import (
    COLD_START_STRATEGY,
    DEFAULT_PROXY,
    DEFAULT_STRATEGY,
    PROXIES,
    STRATEGIES,
    cold_start_strategy_names,
    proxy_names,
    strategy_names,
)


def test_static_names_equal_the_registries() -> None:
    assert strategy_names() == sorted(STRATEGIES)
    assert cold_start_strategy_names() == sorted(n for n, cls in STRATEGIES.items() if not cls.requires_probs)
    assert proxy_names() == sorted(PROXIES)
    assert DEFAULT_STRATEGY in strategy_names() and COLD_START_STRATEGY in cold_start_strategy_names()
    assert DEFAULT_PROXY in proxy_names()


def test_names_are_importable_without_torch() -> None:
    code = (
        "import sys\n"
        "from asvp_backend.selection import cold_start_strategy_names, proxy_names, strategy_names\n"
        "assert strategy_names() and cold_start_strategy_names() and proxy_names()\n"
        "heavy = sorted(m for m in ('torch', 'sklearn', 'numpy') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
