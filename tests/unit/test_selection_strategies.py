"""Acquisition strategies on hand-made probabilities and features."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import make_blobs

from asvp_backend.selection import (
    STRATEGIES,
    EpsilonMix,
    LogisticProxy,
    MissingProbabilitiesError,
    Ranking,
    SelectionError,
    SelectionInput,
    check_scores,
    create_strategy,
    margin_score,
    order_from_scores,
    strategy_params,
)
from asvp_backend.selection.strategies import pooled_grad_embedding, typicality

ALL = sorted(STRATEGIES)
SET_BASED = [name for name in ALL if STRATEGIES[name].set_based]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pool() -> SelectionInput:
    X, y = make_blobs(n_samples=320, n_features=8, centers=4, cluster_std=2.5, random_state=1)
    X = X.astype(np.float32)
    proxy = LogisticProxy().fit(X[:20], y[:20])
    return SelectionInput(X[20:], proxy.predict_proba(X[20:]), X[:20], proxy)


def assert_valid(r: Ranking, n: int, budget: int, set_based: bool) -> None:
    """The Ranking contract: scores for every item in [0, 1], distinct order consistent with the scores."""
    assert r.scores.shape == (n,)
    check_scores(r.scores)
    assert r.order.dtype.kind == "i"
    assert len(r.order) == (min(budget, n) if set_based else n)
    assert len(np.unique(r.order)) == len(r.order)
    np.testing.assert_array_equal(r.order, order_from_scores(r.scores)[: len(r.order)])


def subset(inp: SelectionInput, idx) -> SelectionInput:
    probs = None if inp.probs is None else inp.probs[idx]
    return SelectionInput(inp.features[idx], probs, inp.labelled_features, inp.proxy)


# ------------------------------------------------------------------------------------ uncertainty

PROBS = np.array(
    [
        [0.50, 0.50, 0.00],  # margin 0 (most uncertain by margin), max 0.5, entropy log 2
        [0.40, 0.30, 0.30],  # margin 0.1, max 0.4 (least confident), entropy ~1.09 (highest)
        [0.98, 0.01, 0.01],  # confident
        [0.70, 0.20, 0.10],  # entropy 0.80 > log 2
    ],
    dtype=np.float32,
)


def hand_input(probs: np.ndarray = PROBS) -> SelectionInput:
    return SelectionInput(np.zeros((len(probs), 2), np.float32), probs, np.zeros((0, 2), np.float32))


@pytest.mark.parametrize(
    ("name", "expected"),
    [("margin", [0, 1, 3, 2]), ("least_confidence", [1, 0, 3, 2]), ("entropy", [1, 3, 0, 2])],
)
def test_uncertainty_order(name: str, expected: list[int]) -> None:
    r = create_strategy(name).rank(hand_input(), budget=2)
    assert list(r.order) == expected
    assert_valid(r, 4, 2, set_based=False)


def test_margin_scores_are_the_margins() -> None:
    r = create_strategy("margin").rank(hand_input(), budget=1)
    np.testing.assert_allclose(r.scores, margin_score(PROBS))
    np.testing.assert_allclose(r.scores[[0, 1]], [0.0, 0.1], atol=1e-6)


@pytest.mark.parametrize("name", [n for n in ALL if STRATEGIES[n].requires_probs])
def test_probability_strategies_need_probs(name: str) -> None:
    inp = SelectionInput(np.zeros((5, 2), np.float32), None, np.zeros((0, 2), np.float32))
    with pytest.raises(MissingProbabilitiesError, match="cold-start"):
        create_strategy(name).rank(inp, 2)
    assert issubclass(MissingProbabilitiesError, ValueError)


def test_random_is_seeded_and_covers_pool(pool: SelectionInput) -> None:
    a = create_strategy("random", seed=1).rank(pool, 10)
    b = create_strategy("random", seed=1).rank(pool, 10)
    c = create_strategy("random", seed=2).rank(pool, 10)
    np.testing.assert_array_equal(a.order, b.order)
    assert not np.array_equal(a.order, c.order)
    assert sorted(a.order) == list(range(pool.n))


# ---------------------------------------------------------------------------- contract, all strategies


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("budget", [0, 1, 7, 1000])
def test_ranking_contract(name: str, budget: int, pool: SelectionInput) -> None:
    r = create_strategy(name, seed=3).rank(pool, budget)
    assert_valid(r, pool.n, budget, STRATEGIES[name].set_based)


@pytest.mark.parametrize("name", ALL)
def test_deterministic_with_seed(name: str, pool: SelectionInput) -> None:
    a = create_strategy(name, seed=5).rank(pool, 12)
    b = create_strategy(name, seed=5).rank(pool, 12)
    np.testing.assert_array_equal(a.order, b.order)
    np.testing.assert_array_equal(a.scores, b.scores)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("n", [0, 1, 2])
def test_tiny_pools(name: str, n: int, pool: SelectionInput) -> None:
    r = create_strategy(name).rank(subset(pool, slice(0, n)), budget=5)
    assert_valid(r, n, 5, STRATEGIES[name].set_based)
    assert sorted(r.order) == list(range(n))


@pytest.mark.parametrize("name", ALL)
def test_no_labelled_points(name: str, pool: SelectionInput) -> None:
    inp = SelectionInput(pool.features, pool.probs, np.zeros((0, 8), np.float32), pool.proxy)
    assert_valid(create_strategy(name).rank(inp, 9), pool.n, 9, STRATEGIES[name].set_based)


@pytest.mark.parametrize("name", SET_BASED)
def test_candidate_cap_and_partitions(name: str, pool: SelectionInput) -> None:
    params: dict[str, Any] = {"max_candidates": 120}
    if name in ("badge", "coreset"):
        params["partition_size"] = 25
    r = create_strategy(name, seed=1, **params).rank(pool, 30)
    assert_valid(r, pool.n, 30, set_based=True)


def test_negative_budget_and_unknown_names(pool: SelectionInput) -> None:
    with pytest.raises(SelectionError, match="budget"):
        create_strategy("margin").rank(pool, -1)
    with pytest.raises(ValueError, match="known: badge, coreset, entropy"):
        create_strategy("bald")
    with pytest.raises(TypeError):
        create_strategy("coreset", max_candidatez=3)
    assert strategy_params("coreset")["max_candidates"] == 100_000


def test_input_shape_validation() -> None:
    with pytest.raises(SelectionError, match="probs"):
        SelectionInput(np.zeros((3, 2)), np.zeros((4, 2)), np.zeros((0, 2)))
    with pytest.raises(SelectionError, match="labelled"):
        SelectionInput(np.zeros((3, 2)), None, np.zeros((2, 5)))


# ------------------------------------------------------------------------------------ core-set


def test_coreset_picks_the_outlier_cluster_first() -> None:
    rng = np.random.default_rng(0)
    main = rng.normal(0, 1, (200, 4))
    far = rng.normal(0, 0.1, (5, 4)) + 40.0
    mid = rng.normal(0, 0.1, (5, 4)) - 15.0
    feats = np.vstack([main, far, mid]).astype(np.float32)
    inp = SelectionInput(feats, None, rng.normal(0, 1, (30, 4)).astype(np.float32))
    r = create_strategy("coreset").rank(inp, 3)
    assert 200 <= r.order[0] < 205  # the farthest region from the labelled set
    assert 205 <= r.order[1] < 210  # then the next uncovered one
    assert r.order[2] < 200


def test_coreset_covers_clusters_without_labels() -> None:
    X, y = make_blobs(
        n_samples=300, n_features=6, centers=5, cluster_std=0.3, center_box=(-50, 50), random_state=2
    )
    inp = SelectionInput(X.astype(np.float32), None, np.zeros((0, 6), np.float32))
    r = create_strategy("coreset", seed=0).rank(inp, 5)
    assert len(set(y[r.order])) == 5


# ------------------------------------------------------------------------------------ BADGE


class FakeProxy:
    """A proxy whose last-layer input and logits are given directly."""

    def __init__(self, hidden: np.ndarray, logits: np.ndarray) -> None:
        self.hidden, self.logits = hidden.astype(np.float32), logits.astype(np.float32)
        self.classes_ = np.arange(logits.shape[1])

    def hidden_and_logits(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = X[:, 0].astype(int)  # feature 0 carries the row id
        return self.hidden[rows], self.logits[rows]


def fake_input(hidden: np.ndarray, logits: np.ndarray) -> SelectionInput:
    n = len(hidden)
    feats = np.arange(n, dtype=np.float32)[:, None]
    probs = torch.softmax(torch.from_numpy(logits.astype(np.float32)), 1).numpy()
    return SelectionInput(feats, probs, np.zeros((0, 1), np.float32), cast(Any, FakeProxy(hidden, logits)))


def test_pooled_embedding_equals_pooling_the_full_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    for c, h in [(10, 1280), (3, 50), (20, 700), (2, 7)]:
        hidden, logits = torch.rand(5, h, generator=gen), torch.randn(5, c, generator=gen)
        g = torch.softmax(logits, 1) - F.one_hot(logits.argmax(1), c)
        full = (g[:, :, None] * hidden[:, None, :]).unsqueeze(1)  # (n, 1, C, H)
        rows = min(16, c)
        cols = min(512 // rows, h)
        ref = F.adaptive_avg_pool2d(full, (rows, cols)).flatten(1)
        torch.testing.assert_close(pooled_grad_embedding(hidden, logits), ref, rtol=1e-5, atol=1e-6)
    assert pooled_grad_embedding(torch.rand(2, 1280), torch.randn(2, 10)).shape == (2, 510)


def test_badge_prefers_uncertain_items() -> None:
    rng = np.random.default_rng(0)
    uncertain_h = rng.normal(0, 10, (30, 16))
    confident_h = rng.normal(0, 10, (70, 16))
    logits = np.vstack([rng.normal(0, 0.1, (30, 3)), np.tile([20.0, -20.0, -20.0], (70, 1))])
    inp = fake_input(np.vstack([uncertain_h, confident_h]), logits)
    for seed in range(10):
        r = create_strategy("badge", seed=seed).rank(inp, 10)
        assert_valid(r, 100, 10, set_based=True)
        assert np.sum(r.order < 30) >= 9  # confident items collapse onto one zero-gradient point


def test_badge_is_diverse_across_duplicate_groups() -> None:
    rng = np.random.default_rng(1)
    centres = np.eye(16)[:3] * 10.0
    hidden = np.repeat(centres, 20, axis=0) + rng.normal(0, 0.01, (60, 16))
    logits = np.tile([0.1, 0.0, -0.1], (60, 1))
    for seed in range(5):
        r = create_strategy("badge", seed=seed).rank(fake_input(hidden, logits), 3)
        assert sorted(r.order // 20) == [0, 1, 2]


def test_badge_first_pick_is_the_largest_gradient(pool: SelectionInput) -> None:
    r = create_strategy("badge", seed=0).rank(pool, 5)
    assert_valid(r, pool.n, 5, set_based=True)
    assert pool.proxy is not None
    hid, logits = pool.proxy.hidden_and_logits(pool.features)
    emb = pooled_grad_embedding(torch.from_numpy(hid), torch.from_numpy(logits))
    assert r.order[0] == int(emb.norm(dim=1).argmax())


def test_badge_needs_a_proxy(pool: SelectionInput) -> None:
    inp = SelectionInput(pool.features, pool.probs, pool.labelled_features, None)
    with pytest.raises(SelectionError, match="proxy"):
        create_strategy("badge").rank(inp, 3)


# ------------------------------------------------------------------------------------ TypiClust


@pytest.fixture(scope="module")
def five_blobs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    centres = np.eye(8)[:5] * 20.0
    X, y = make_blobs(n_samples=250, centers=centres, cluster_std=1.0, random_state=3)
    return X.astype(np.float32), y, centres


def test_typiclust_one_typical_point_per_cluster(five_blobs) -> None:
    X, y, centres = five_blobs
    inp = SelectionInput(X, None, np.zeros((0, 8), np.float32))
    r = create_strategy("typiclust", seed=0, normalise=False).rank(inp, 5)
    assert_valid(r, 250, 5, set_based=True)
    assert sorted(y[r.order]) == [0, 1, 2, 3, 4]
    for i in r.order:  # typical = close to the blob's centre
        own = np.linalg.norm(X[y == y[i]] - centres[y[i]], axis=1)
        assert np.linalg.norm(X[i] - centres[y[i]]) <= np.quantile(own, 0.35)


def test_typiclust_skips_covered_clusters(five_blobs) -> None:
    X, y, _ = five_blobs
    labelled = np.vstack([X[y == 0][:1], X[y == 1][:1]])  # one labelled point in clusters 0 and 1
    inp = SelectionInput(X, None, labelled)
    r = create_strategy("typiclust", seed=0, normalise=False).rank(inp, 3)
    assert sorted(y[r.order]) == [2, 3, 4]


def test_typicality_prefers_dense_points() -> None:
    x = torch.tensor([[0.0], [0.1], [-0.1], [0.05], [5.0]])
    t = typicality(x, knn=2)
    assert int(t.argmin()) == 4 and t.shape == (5,)
    t_ref = typicality(x, knn=2, ref_rows=np.array([0, 1, 2]))
    assert int(t_ref.argmin()) == 4


# ------------------------------------------------------------------------------------ epsilon mix


def test_epsilon_mix_keeps_the_head_of_the_base_batch(pool: SelectionInput) -> None:
    base = create_strategy("margin").rank(pool, 10)
    mixed_strategy = create_strategy("margin", seed=4, epsilon=0.3)
    assert isinstance(mixed_strategy, EpsilonMix) and mixed_strategy.requires_probs
    mixed = mixed_strategy.rank(pool, 10)
    assert_valid(mixed, pool.n, 10, set_based=False)
    batch = set(mixed.order[:10].tolist())
    assert set(base.order[:7].tolist()) <= batch
    assert len(batch - set(base.order[:10].tolist())) >= 1  # with 300 items, random picks land outside


def test_epsilon_mix_on_set_based_and_extremes(pool: SelectionInput) -> None:
    r = create_strategy("coreset", epsilon=0.5).rank(pool, 8)
    assert_valid(r, pool.n, 8, set_based=True)
    all_random = create_strategy("margin", epsilon=1.0).rank(pool, 6)
    assert_valid(all_random, pool.n, 6, set_based=False)
    same = create_strategy("margin", epsilon=0.01).rank(pool, 6)  # round(0.06) = 0 random picks
    np.testing.assert_array_equal(same.order, create_strategy("margin").rank(pool, 6).order)
    with pytest.raises(SelectionError, match="epsilon"):
        create_strategy("margin", epsilon=1.5)
