"""Score convention: lower = label first, finite floats in [0, 1]."""

from __future__ import annotations

import numpy as np
import pytest

from asvp_backend.selection.scoring import (
    CHOSEN_SPAN,
    check_scores,
    entropy_score,
    least_confidence_score,
    margin_score,
    order_from_scores,
    random_scores,
    rank_scores,
)

PROBS = np.array(
    [
        [0.50, 0.45, 0.05],  # margin 0.05
        [0.90, 0.05, 0.05],  # margin 0.85
        [1 / 3, 1 / 3, 1 / 3],  # uniform: margin 0, entropy max
        [0.40, 0.10, 0.50],  # margin 0.10, top-1 in the last column
    ],
    dtype=np.float32,
)


def test_margin_is_top1_minus_top2() -> None:
    np.testing.assert_allclose(margin_score(PROBS), [0.05, 0.85, 0.0, 0.10], atol=1e-6)


def test_least_confidence_is_max_prob() -> None:
    np.testing.assert_allclose(least_confidence_score(PROBS), [0.5, 0.9, 1 / 3, 0.5], atol=1e-6)


def test_entropy_score_is_one_minus_normalised_entropy() -> None:
    p = PROBS.astype(np.float64)
    h = -(p * np.log(p)).sum(1) / np.log(3)
    np.testing.assert_allclose(entropy_score(PROBS), 1 - h, atol=1e-6)
    assert entropy_score(PROBS)[2] == pytest.approx(0.0, abs=1e-6)
    assert entropy_score(np.array([[1.0, 0.0]]))[0] == pytest.approx(1.0)  # 0 log 0 = 0, no NaN


@pytest.mark.parametrize("fn", [margin_score, least_confidence_score, entropy_score])
def test_scores_finite_in_unit_interval(fn) -> None:
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(7), size=1000).astype(np.float32)
    s = fn(p)
    assert s.dtype == np.float64 and s.shape == (1000,)
    check_scores(s)


@pytest.mark.parametrize("fn", [margin_score, least_confidence_score, entropy_score])
def test_single_class_and_empty(fn) -> None:
    np.testing.assert_array_equal(fn(np.ones((3, 1), np.float32)), np.ones(3))
    assert fn(np.empty((0, 4), np.float32)).shape == (0,)


def test_margin_chunked_matches_direct() -> None:
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(4), size=70_000).astype(np.float32)  # more than one chunk
    s = np.sort(p, axis=1)
    np.testing.assert_allclose(margin_score(p), s[:, -1] - s[:, -2], atol=1e-6)


def test_rank_scores_puts_order_first_then_rest() -> None:
    rest = np.array([0.9, 0.1, 0.5, 0.3, 0.0])
    scores = rank_scores(np.array([2, 0]), 5, rest)
    check_scores(scores)
    assert list(order_from_scores(scores)) == [2, 0, 4, 1, 3]
    assert scores[[2, 0]].max() < CHOSEN_SPAN <= scores[[1, 3, 4]].min()


def test_rank_scores_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        rank_scores(np.array([1, 1]), 3)
    with pytest.raises(ValueError, match="only"):
        rank_scores(np.arange(4), 3)
    with pytest.raises(ValueError, match="shape"):
        rank_scores(np.array([0]), 3, np.zeros(2))


def test_order_from_scores_stable_and_limited() -> None:
    scores = np.array([0.5, 0.1, 0.5, 0.1, 0.9] * 20)
    full = order_from_scores(scores)
    assert list(full[:4]) == [1, 3, 6, 8]  # ties by index
    for limit in (0, 1, 3, 7, 50, 100):
        np.testing.assert_array_equal(order_from_scores(scores, limit), full[:limit])


def test_random_scores_and_check() -> None:
    s = random_scores(10, np.random.default_rng(0))
    check_scores(s)
    with pytest.raises(ValueError):
        check_scores(np.array([0.5, np.nan]))
    with pytest.raises(ValueError):
        check_scores(np.array([1.5]))
