"""Curve metrics of `simulate`: labels to reach a target, sample saving ratio, overall cost, spread over seeds."""

from __future__ import annotations

import math

import pytest

from asvp_backend.evaluation.metrics import (
    labels_to_reach,
    mean_and_spread,
    mean_curve,
    overall_cost,
    sample_saving_ratio,
)

# docs/method.md, *Measuring the savings*: proxy MLP on Lite0 features, Fashion-MNIST on an H200, 100 random
# initial labels, +100/round
LABELS = [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 1100]
RANDOM = [0.7386, 0.7792, 0.7978, 0.8105, 0.8219, 0.8305, 0.8304, 0.8335, 0.8379, 0.8403, 0.8456]
MARGIN = [0.7312, 0.8077, 0.8257, 0.8361, 0.8444, 0.8508, 0.8562, 0.8618, 0.8661, 0.8683, 0.8704]


def curve(accuracies: list[float], labels: list[int] = LABELS) -> list[tuple[int, float]]:
    return list(zip(labels, accuracies, strict=True))


def test_worked_example_of_method_md():
    # random reaches 0.8456 at 1,100 labels; margin between 500 (0.8444) and 600 (0.8508): 500 + 12/64 * 100
    assert labels_to_reach(curve(RANDOM), 0.8456) == 1100
    assert labels_to_reach(curve(MARGIN), 0.8456) == pytest.approx(518.75)
    ssr = sample_saving_ratio(curve(RANDOM), curve(MARGIN), 0.8456)
    assert ssr == pytest.approx((1100 - 518.75) / 1100)
    assert round(ssr, 2) == 0.53


def test_never_reached_gives_none():
    assert labels_to_reach(curve(RANDOM), 0.90) is None
    assert sample_saving_ratio(curve(RANDOM), curve(MARGIN), 0.8600) is None  # random never gets there
    assert sample_saving_ratio(curve(MARGIN), curve(RANDOM), 0.8600) is None  # nor as the method
    assert labels_to_reach([], 0.5) is None


def test_method_worse_than_reference_is_negative():
    assert sample_saving_ratio(curve(MARGIN), curve(RANDOM), 0.8456) == pytest.approx((518.75 - 1100) / 518.75)


def test_curve_already_above_target_needs_its_first_point():
    assert labels_to_reach(curve(RANDOM), 0.5) == 100
    assert sample_saving_ratio(curve(RANDOM), curve(MARGIN), 0.70) == 0.0


def test_single_point_curves():
    assert labels_to_reach([(50, 0.8)], 0.7) == 50
    assert labels_to_reach([(50, 0.6)], 0.7) is None
    assert sample_saving_ratio([(200, 0.8)], [(50, 0.8)], 0.8) == pytest.approx(0.75)
    assert sample_saving_ratio([(200, 0.6)], [(50, 0.8)], 0.7) is None


def test_non_monotone_curve_uses_the_first_crossing():
    # rises past 0.8 between 100 and 200, dips below at 300, crosses again between 300 and 400
    bumpy = [(100, 0.70), (200, 0.90), (300, 0.60), (400, 0.85)]
    assert labels_to_reach(bumpy, 0.8) == pytest.approx(150.0)
    # the order of the points does not matter: they are sorted by labels
    assert labels_to_reach(list(reversed(bumpy)), 0.8) == pytest.approx(150.0)
    # a target only the later part reaches
    assert labels_to_reach(bumpy, 0.88) == pytest.approx(100 + 0.18 / 0.20 * 100)


def test_flat_segment_at_target():
    assert labels_to_reach([(10, 0.5), (20, 0.5), (30, 0.7)], 0.5) == 10
    assert labels_to_reach([(10, 0.4), (20, 0.6), (30, 0.6)], 0.6) == 20


def test_bad_points_are_refused():
    with pytest.raises(ValueError):
        labels_to_reach([(10, float("nan"))], 0.5)
    with pytest.raises(ValueError):
        labels_to_reach([(-1, 0.5)], 0.5)


def test_overall_cost():
    assert overall_cost(1000, 2.0, 0.1) == pytest.approx(100 + 6.0)  # $3 per GPU-hour by default
    assert overall_cost(1000, 2.0, 0.1, gpu_price=1.5) == pytest.approx(103.0)
    assert overall_cost(0, 0.0, 0.1) == 0.0
    # the authors' teaser: standard AL $8,591 of labels + $161 of training
    assert overall_cost(85_910, 161 / 3, 0.1) == pytest.approx(8752.0)
    with pytest.raises(ValueError):
        overall_cost(-1, 0.0, 0.1)


def test_mean_and_spread_ignores_none():
    s = mean_and_spread([0.5, None, 0.7])
    assert s.mean == pytest.approx(0.6)
    assert s.std == pytest.approx(math.sqrt(0.02))  # sample std (ddof=1)
    assert (s.n, s.total) == (2, 3)
    assert mean_and_spread([0.4]) == (0.4, 0.0, 1, 1)
    assert mean_and_spread([None, None]) == (None, None, 0, 2)
    assert mean_and_spread([]).to_dict() == {"mean": None, "std": None, "n": 0, "total": 0}


def test_mean_curve_over_seeds():
    a = [(10, 0.5), (20, 0.7)]
    b = [(10, 0.7), (20, 0.9), (30, 0.95)]
    assert mean_curve([a, b]) == [(10, pytest.approx(0.6)), (20, pytest.approx(0.8)), (30, 0.95)]
