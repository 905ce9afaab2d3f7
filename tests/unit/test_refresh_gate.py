"""The refresh gate (alignment/gate.py): cross-fitting never predicts a label with a proxy trained on it, the
paired test adopts only a difference beyond its noise, and too few audit labels make it wait."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from asvp_backend.alignment.gate import (
    ADOPT,
    REJECT,
    WAIT,
    AuditEstimate,
    Gate,
    Verdict,
    cross_fitted_right,
    judge_model,
)


class _Memoriser:
    """A 'proxy' that knows the labels it was fitted on and is wrong on every other point: a label it
    predicts right is one it trained on."""

    def fit(self, x: np.ndarray, y: np.ndarray) -> _Memoriser:
        self.seen = {tuple(row): label for row, label in zip(x.tolist(), y.tolist(), strict=True)}
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.array([self.seen.get(tuple(row), "never") for row in x.tolist()], dtype=object)


def test_cross_fitting_never_predicts_an_audit_label_with_a_proxy_that_saw_it() -> None:
    rng = np.random.default_rng(0)
    x_other, y_other = rng.normal(size=(40, 4)), np.array(["a", "b"] * 20, dtype=object)
    x_audit, y_audit = rng.normal(size=(25, 4)), np.array(["a", "b", "c", "d", "e"] * 5, dtype=object)
    right = cross_fitted_right(_Memoriser, x_other, y_other, x_audit, y_audit, folds=5)
    assert right is not None and right.shape == (25,) and not right.any()


def test_cross_fitting_estimates_a_real_proxy_near_its_accuracy_on_unseen_data() -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    centres = rng.normal(scale=1.2, size=(3, 8))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 3, n)
        return (centres[y] + rng.normal(size=(n, 8))).astype(np.float32), y.astype(str).astype(object)

    x_other, y_other = draw(200)
    x_audit, y_audit = draw(300)
    x_test, y_test = draw(5_000)
    truth = float((LogisticRegression(max_iter=500).fit(np.concatenate([x_other, x_audit]),
                                                         np.concatenate([y_other, y_audit])).predict(x_test)
                   == y_test).mean())
    right = cross_fitted_right(lambda: LogisticRegression(max_iter=500), x_other, y_other, x_audit, y_audit)
    assert right is not None
    estimate = AuditEstimate.from_right(right)
    assert estimate.low <= truth <= estimate.high
    assert estimate.n == 300 and estimate.low < estimate.accuracy < estimate.high


def test_cross_fitting_says_none_without_labels_or_without_two_classes() -> None:
    x = np.zeros((3, 2))
    assert cross_fitted_right(_Memoriser, x, np.array(["a"] * 3), x[:0], np.array([], dtype=object)) is None
    assert cross_fitted_right(_Memoriser, x[:0], np.array([], dtype=object), x, np.array(["a"] * 3)) is None


def _separable(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two well-separated classes: a linear proxy labels nearly all of them right."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return (np.where(y[:, None] == 1, 3.0, -3.0) + rng.normal(size=(n, 4))).astype(np.float32), \
        y.astype(str).astype(object)


def test_a_fine_tuned_model_is_judged_against_the_cross_fitted_proxy_on_the_same_audit_labels() -> None:
    from sklearn.linear_model import LogisticRegression

    x_other, y_other = _separable(60, 2)
    x_audit, y_audit = _separable(80, 3)
    gate = Gate(z=1.0, min_labels=60)
    proxy_right = cross_fitted_right(LogisticRegression, x_other, y_other, x_audit, y_audit, seed=4)
    assert proxy_right is not None and proxy_right.mean() > 0.95
    worse = np.arange(80) % 4 != 0  # the model misses a quarter: the proxy stays the better model
    record = judge_model(gate, LogisticRegression, worse, x_other, y_other, x_audit, y_audit, seed=4)
    assert record is not None and record["verdict"] == Verdict.PROXY and record["judged_on"] == "audit"
    assert record["n"] == 80 and record["model_accuracy"] == 0.75
    assert record["proxy_accuracy"] == pytest.approx(proxy_right.mean())
    assert record["gate"]["decision"] == REJECT
    assert record["model_only"] + record["proxy_only"] == int((worse != proxy_right).sum())
    # a proxy with nothing to learn from (the features are noise) loses to a model that is right throughout
    noise = np.random.default_rng(5).normal(size=(140, 4)).astype(np.float32)
    record = judge_model(gate, LogisticRegression, np.ones(80, bool), noise[:60], y_other, noise[60:], y_audit, seed=4)
    assert record is not None and record["verdict"] == Verdict.MODEL and record["gate"]["decision"] == ADOPT
    assert record["model_accuracy"] == 1.0 and record["proxy_accuracy"] < 0.8


def test_judging_a_model_says_none_when_the_proxy_cannot_be_cross_fitted() -> None:
    x = np.zeros((3, 2))
    assert judge_model(Gate(), _Memoriser, np.ones(3, bool), x[:0], np.array([], dtype=object), x,
                       np.array(["a"] * 3, dtype=object)) is None


def _paired(n: int, challenger_only: int, incumbent_only: int, both: int) -> tuple[np.ndarray, np.ndarray]:
    challenger, incumbent = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    challenger[:challenger_only] = True
    incumbent[challenger_only:challenger_only + incumbent_only] = True
    challenger[challenger_only + incumbent_only:challenger_only + incumbent_only + both] = True
    incumbent[challenger_only + incumbent_only:challenger_only + incumbent_only + both] = True
    return challenger, incumbent


def test_a_clear_gain_on_the_same_labels_is_adopted_with_both_accuracies() -> None:
    new, old = _paired(100, challenger_only=15, incumbent_only=3, both=70)
    decision = Gate(z=1.0, min_labels=60).judge(new, old)
    assert decision.decision == ADOPT and decision.adopts
    assert decision.challenger_accuracy == 0.85 and decision.incumbent_accuracy == 0.73
    assert decision.difference == 0.12 and decision.n == 100
    diff = new.astype(float) - old.astype(float)
    assert decision.standard_error == pytest.approx(diff.std(ddof=1) / 10, abs=1e-4)
    assert "0.850 vs 0.730" in decision.reason and "100 audit labels" in decision.reason


def test_a_worse_or_equal_refresh_is_rejected() -> None:
    gate = Gate(z=1.0, min_labels=60)
    worse = gate.judge(*_paired(100, challenger_only=2, incumbent_only=12, both=70))
    assert worse.decision == REJECT and worse.difference == -0.10 and "not better" in worse.reason
    equal = gate.judge(*_paired(100, challenger_only=6, incumbent_only=6, both=70))
    assert equal.decision == REJECT and equal.difference == 0.0


def test_a_gain_within_noise_is_rejected_and_the_same_gain_on_more_labels_is_adopted() -> None:
    gate = Gate(z=2.0, min_labels=60)
    small = gate.judge(*_paired(100, challenger_only=8, incumbent_only=5, both=70))  # +3 points, SE ~3.6
    assert small.decision == REJECT and "beyond noise" in small.reason
    large = gate.judge(*_paired(1_000, challenger_only=80, incumbent_only=50, both=700))  # +3 points, SE ~1.1
    assert large.decision == ADOPT


def test_too_few_audit_labels_make_the_refresh_wait_with_that_reason() -> None:
    gate = Gate(z=1.0, min_labels=60)
    few = gate.judge(*_paired(59, challenger_only=30, incumbent_only=0, both=20))
    assert few.decision == WAIT and not few.adopts and "59 audit labels" in few.reason and few.min_labels == 60
    none = gate.judge(None, None)
    assert none.decision == WAIT and none.n == 0


@pytest.mark.parametrize("n", [60, 200])
def test_a_refresh_with_no_effect_is_adopted_rarely(n: int) -> None:
    """The false-adopt rate of a refresh that changes nothing but noise: about the normal tail beyond z (16%
    at z = 1), whatever the number of audit labels."""
    rng = np.random.default_rng(n)
    gate = Gate(z=1.0, min_labels=60)
    adopted = 0
    for _ in range(2_000):
        both = rng.random(n) < 0.7
        flip = rng.random(n) < 0.2  # 20% discordant, each way alike
        side = rng.random(n) < 0.5
        new, old = both.copy(), both.copy()
        new[flip] = side[flip]
        old[flip] = ~side[flip]
        adopted += gate.judge(new, old).adopts
    assert 0.10 < adopted / 2_000 < 0.22


def test_estimate_dict_has_the_interval() -> None:
    estimate: dict[str, Any] = AuditEstimate.from_right(np.array([True] * 45 + [False] * 15)).to_dict()
    assert estimate["n"] == 60 and estimate["accuracy"] == 0.75 and estimate["low"] < 0.75 < estimate["high"]
