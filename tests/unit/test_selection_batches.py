"""Set-based strategies pick the batch labelled before the next round, and its first picks span the pool."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from sklearn.datasets import make_blobs

from asvp_backend.selection import (
    STRATEGIES,
    LogisticProxy,
    SelectionInput,
    create_strategy,
    margin_score,
    order_from_scores,
    strategy_params,
)
from asvp_backend.selection.strategies import _common, badge, coreset, typiclust
from asvp_backend.selection.strategies._common import interleaved_schedule

SET_BASED = sorted(name for name, cls in STRATEGIES.items() if cls.set_based)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def labelled_pool() -> SelectionInput:
    X, y = make_blobs(n_samples=320, n_features=8, centers=4, cluster_std=2.5, random_state=1)
    X = X.astype(np.float32)
    proxy = LogisticProxy().fit(X[:20], y[:20])
    return SelectionInput(X[20:], proxy.predict_proba(X[20:]), X[:20], proxy)


def ten_clusters(seed: int) -> tuple[SelectionInput, np.ndarray]:
    X, y = make_blobs(n_samples=1000, n_features=32, centers=10, cluster_std=1.0, center_box=(-20, 20),
                      random_state=seed)
    return SelectionInput(X.astype(np.float32), None, np.zeros((0, 32), np.float32)), y


# ------------------------------------------------------------------------------------ TypiClust


def test_typiclust_batch_of_20_covers_the_ten_clusters() -> None:
    covered = []
    for seed in range(4):
        inp, y = ten_clusters(seed)
        covered.append(len(set(y[create_strategy("typiclust", seed=seed).rank(inp, 20).order])))
    assert np.mean(covered) >= 9, covered


def test_typiclust_makes_about_budget_clusters_and_picks_one_from_each(monkeypatch) -> None:
    made: list[int] = []
    real = typiclust.TypiClustStrategy._cluster

    def spy(self: typiclust.TypiClustStrategy, x: np.ndarray, n_clusters: int, rng: np.random.Generator) -> np.ndarray:
        made.append(n_clusters)
        return real(self, x, n_clusters, rng)

    monkeypatch.setattr(typiclust.TypiClustStrategy, "_cluster", spy)
    inp, y = ten_clusters(0)
    r = create_strategy("typiclust", seed=0).rank(inp, 10)
    assert made == [10] and sorted(y[r.order]) == list(range(10))  # one typical point per cluster
    create_strategy("typiclust", seed=0).rank(inp, 900)
    assert made[-1] == strategy_params("typiclust")["max_clusters"]  # capped as before


# ------------------------------------------------------------------------------------ partitions


def test_interleaved_schedule_takes_turns() -> None:
    assert interleaved_schedule([2, 2, 1]) == [0, 1, 2, 0, 1]
    assert interleaved_schedule([1, 0, 3]) == [0, 2, 2, 2]
    assert interleaved_schedule([]) == []


@pytest.mark.parametrize("module", [badge, coreset])
def test_partitioned_batches_take_turns_across_partitions(module, monkeypatch, labelled_pool) -> None:
    recorded: list[list[np.ndarray]] = []

    def spy(n: int, size: int | None, rng: np.random.Generator) -> list[np.ndarray]:
        recorded.append(_common.partitions(n, size, rng))
        return recorded[-1]

    monkeypatch.setattr(module, "partitions", spy)
    name = "badge" if module is badge else "coreset"
    r = create_strategy(name, seed=2, partition_size=25).rank(labelled_pool, 36)
    part_of = np.empty(labelled_pool.n, np.int64)
    for p, rows in enumerate(recorded[0]):
        part_of[rows] = p
    n_parts = len(recorded[0])
    assert n_parts == 12
    first = part_of[r.order[:n_parts]]
    assert len(set(first.tolist())) == n_parts  # the first P picks come from P different partitions
    assert np.bincount(part_of[r.order], minlength=n_parts).tolist() == [3] * n_parts


def test_partitioned_coreset_still_covers_clusters() -> None:
    X, y = make_blobs(n_samples=600, n_features=6, centers=6, cluster_std=0.3, center_box=(-50, 50),
                      random_state=4)
    inp = SelectionInput(X.astype(np.float32), None, np.zeros((0, 6), np.float32))
    r = create_strategy("coreset", seed=0, partition_size=50).rank(inp, 6)
    assert len(set(y[r.order])) == 6  # every partition counts the other partitions' picks as centres


# ------------------------------------------------------------------------------------ after the batch


@pytest.mark.parametrize("name", SET_BASED)
def test_tasks_after_the_batch_follow_the_margin(name: str, labelled_pool: SelectionInput) -> None:
    r = create_strategy(name, seed=1).rank(labelled_pool, 10)
    rest = order_from_scores(r.scores)[len(r.order) :]
    assert len(rest) == labelled_pool.n - 10
    assert labelled_pool.probs is not None
    margins = margin_score(labelled_pool.probs)[rest]
    assert np.all(np.diff(margins) >= 0.0)
    assert r.scores[r.order].max() < r.scores[rest].min()


# ------------------------------------------------------------------------------------ device


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_every_strategy_accepts_the_device(name: str, device: str, labelled_pool: SelectionInput) -> None:
    strategy = create_strategy(name, seed=0, epsilon=0.2, device=device)
    assert strategy.device == device and strategy_params(name)["device"] == "cpu"
    r = strategy.rank(labelled_pool, 5)
    assert r.scores.shape == (labelled_pool.n,)
