"""The ASVP policy on scripted LogME-PED histories: the trend it fires on, the window, the minimums, the cap,
the method."""

from __future__ import annotations

import numpy as np
import pytest

from asvp_backend.alignment.policy import AlignmentPolicy, deliverable_rank, trend
from asvp_backend.config import ConfigError, Settings


def replay(policy: AlignmentPolicy, scores: list[tuple[int, float]]) -> list[str]:
    """Feed (labelled, LogME-PED) per round through the policy the way the round job does: the trend is fitted
    within a generation, and an update starts a new generation with a fresh history."""
    generation, updates, labels_at_update = 0, 0, 0
    history: list[tuple[int, float]] = []
    out = []
    for labelled, score in scores:
        decision = policy.decide(generation=generation, labelled=labelled, logme=score / 2, logme_ped=score,
                                 history=history, updates=updates, labels_at_last_update=labels_at_update)
        out.append(decision.decision)
        history.append((labelled, score))
        if decision.fires:
            generation, updates, labels_at_update, history = generation + 1, updates + 1, labelled, []
    return out


def test_the_trend_is_the_least_squares_slope_over_at_least_the_window():
    scores = [(100, 0.10), (110, 0.30), (120, 0.12), (130, 0.14), (140, 0.16), (150, 0.18)]
    assert trend(scores, 60) is None  # 50 labels is less than the window
    fitted = trend(scores, 50)
    assert fitted is not None and fitted.span == 50 and fitted.points == 6
    assert fitted.per_100 == pytest.approx(np.polyfit([100, 110, 120, 130, 140, 150],
                                                      [0.10, 0.30, 0.12, 0.14, 0.16, 0.18], 1)[0] * 100)
    # the fit starts at the newest score at least the window before the last: older ones do not count
    assert trend([(0, 9.0), *scores], 50) == fitted


def test_one_noisy_drop_does_not_fire_but_a_flat_trend_does():
    policy = AlignmentPolicy(threshold=0.0, window=50, min_labels=0, min_new_labels=0, max_updates=5)
    rising_with_a_dip = [(100, 0.10), (110, 0.12), (120, 0.14), (130, 0.13), (140, 0.18), (150, 0.20)]
    assert replay(policy, rising_with_a_dip) == ["wait"] * 6  # the pairwise rule fired at 130
    flat = [(100, 0.20), (110, 0.21), (120, 0.19), (130, 0.20), (140, 0.19), (150, 0.19)]
    assert replay(policy, flat)[-1] == "update"


def test_it_waits_until_the_scores_span_the_window():
    policy = AlignmentPolicy(threshold=1e9, window=100, min_labels=0, min_new_labels=0)
    decisions = replay(policy, [(n, 0.1) for n in range(100, 230, 10)])
    assert decisions.index("update") == 10  # 200 labels: the first score 100 labels back
    short = policy.decide(generation=2, labelled=150, logme=0.1, logme_ped=0.2, history=[(100, 0.2)], updates=0,
                          labels_at_last_update=0)
    assert short.decision == "wait" and "ALIGN_WINDOW=100" in short.reason and "span 50" in short.reason


def test_a_positive_threshold_fires_on_a_slow_trend():
    policy = AlignmentPolicy(threshold=0.02, window=100, min_labels=0, min_new_labels=0)
    decision = policy.decide(generation=0, labelled=200, logme=0.1, logme_ped=0.21, history=[(100, 0.20)],
                             updates=0, labels_at_last_update=0)
    assert decision.fires and decision.gain == pytest.approx(0.01)


def test_minimum_labels_and_minimum_new_labels_hold_an_update_back():
    policy = AlignmentPolicy(threshold=0.0, window=100, min_labels=300, min_new_labels=200, max_updates=5)
    falling = [(100, 0.5), (200, 0.4), (300, 0.3), (400, 0.2), (500, 0.1), (600, 0.0), (700, -0.1)]
    # 200: falling but under ALIGN_MIN_LABELS; 300: fires; 400: a new generation, nothing to fit yet;
    # 500: 200 new since 300, fires; then the cap of 5 is not the limit, the minimums are
    assert replay(policy, falling) == ["wait", "wait", "update", "wait", "update", "wait", "update"]
    blocked = policy.decide(generation=1, labelled=500, logme=None, logme_ped=0.1, history=[(400, 0.2)],
                            updates=1, labels_at_last_update=400)
    assert not blocked.fires and "ALIGN_MIN_NEW_LABELS=200" in blocked.reason and blocked.gain == pytest.approx(-0.1)


def test_the_cap_stops_further_updates():
    policy = AlignmentPolicy(threshold=1e9, window=100, min_labels=0, min_new_labels=0, max_updates=2)
    decisions = replay(policy, [(n, 0.1) for n in range(100, 1100, 100)])
    assert decisions.count("update") == 2
    last = policy.decide(generation=2, labelled=1000, logme=0.0, logme_ped=0.1, history=[(900, 0.1)], updates=2,
                         labels_at_last_update=500)
    assert not last.fires and "ALIGN_MAX_UPDATES=2" in last.reason


def test_off_never_fires_and_says_so():
    policy = AlignmentPolicy(enabled=False, threshold=1e9, min_labels=0, min_new_labels=0)
    assert set(replay(policy, [(100, 0.3), (200, 0.1), (300, 0.0)])) == {"off"}


def test_no_score_or_first_score_waits_with_its_reason():
    policy = AlignmentPolicy(min_labels=0)
    none = policy.decide(generation=0, labelled=1, logme=None, logme_ped=None, history=[], updates=0,
                         labels_at_last_update=0)
    first = policy.decide(generation=3, labelled=50, logme=0.1, logme_ped=0.2, history=[], updates=0,
                          labels_at_last_update=0)
    assert none.decision == first.decision == "wait"
    assert "two labelled classes" in none.reason and "generation 3" in first.reason


def test_every_decision_carries_its_inputs():
    policy = AlignmentPolicy(threshold=0.0, window=20, min_labels=10, min_new_labels=5)
    d = policy.decide(generation=0, labelled=40, logme=0.11, logme_ped=0.19, history=[(20, 0.2)], updates=0,
                      labels_at_last_update=0).to_dict()
    assert d["decision"] == "update" and d["method"] == "ft"
    assert {k: d[k] for k in ("generation", "labelled", "logme", "logme_ped", "previous", "threshold", "window",
                              "points")} == {
        "generation": 0, "labelled": 40, "logme": 0.11, "logme_ped": 0.19, "previous": 0.2, "threshold": 0.0,
        "window": 20, "points": 2}
    assert d["gain"] == pytest.approx(-0.05) and "fine-tune (ft)" in d["reason"]  # -0.01 over 20 labels


@pytest.mark.parametrize(("setting", "generation", "expected"), [
    ("auto", 0, "lpft"), ("auto", 1, "ft"), ("auto", 4, "ft"), ("ft", 0, "ft"), ("lpft", 2, "lpft"),
    ("audit", 0, "lpft"), ("audit", 2, "ft"),
])
def test_training_method_follows_the_feature_state(setting, generation, expected):
    assert AlignmentPolicy(training_method=setting).method_for(generation) == expected


@pytest.mark.parametrize(("setting", "generation", "expected"), [
    ("auto", 0, ("lpft",)), ("auto", 1, ("ft",)), ("audit", 0, ("lpft",)), ("audit", 1, ("lpft", "ft")),
    ("audit", 3, ("lpft", "ft")), ("ft", 2, ("ft",)), ("lpft", 1, ("lpft",)),
])
def test_after_a_refresh_audit_trains_the_deliverable_both_ways(setting, generation, expected):
    assert AlignmentPolicy(training_method=setting).deliverable_methods(generation) == expected


def test_the_deliverable_ranks_by_labels_then_the_proxy_verdict_then_the_audit_labels():
    def model(name: str, labelled: int = 100, verdict: str = "model", audit: float | None = None,
              holdout: float = 0.5, at: float = 0.0) -> dict:
        comparison = {} if audit is None else {"judged_on": "audit", "model_accuracy": audit}
        return {"id": name, "labelled": labelled, "verdict": verdict, "comparison": comparison,
                "holdout_accuracy": holdout, "at": at}

    def best(*models: dict) -> str:
        return max(models, key=deliverable_rank)["id"]

    assert best(model("more", 120, audit=0.5), model("fewer", 100, audit=0.9)) == "more"
    assert best(model("lost", verdict="proxy", audit=0.9), model("beat", audit=0.6)) == "beat"
    assert best(model("lpft", audit=0.82, holdout=0.9, at=1), model("ft", audit=0.80, at=2)) == "lpft"
    assert best(model("audit", audit=0.5, holdout=0.1), model("held-out only", holdout=0.99)) == "audit"
    assert best(model("lpft", audit=0.8, at=1), model("ft", audit=0.8, at=2)) == "ft"  # full tie: the later
    assert best(model("old", holdout=0.7, at=1), model("new", holdout=0.6, at=2)) == "old"


def test_settings_build_the_policy_and_refuse_bad_values():
    settings = Settings.from_env({"ALIGN": "off", "ALIGN_THRESHOLD": "0.01", "ALIGN_WINDOW": "150",
                                  "ALIGN_MIN_LABELS": "50", "ALIGN_MIN_NEW_LABELS": "20", "ALIGN_MAX_UPDATES": "1",
                                  "TRAINING_METHOD": "lpft"})
    assert AlignmentPolicy.from_settings(settings) == AlignmentPolicy(False, 0.01, 150, 50, 20, 1, "lpft")
    assert AlignmentPolicy.from_settings(Settings.from_env({})) == AlignmentPolicy()
    with pytest.raises(ConfigError, match="TRAINING_METHOD"):
        Settings.from_env({"TRAINING_METHOD": "sgd"})
    with pytest.raises(ConfigError, match="ALIGN_WINDOW"):
        Settings.from_env({"ALIGN_WINDOW": "5000"})  # longer than the scores the state keeps
    with pytest.raises(ValueError, match="training method"):
        AlignmentPolicy(training_method="sgd")


def test_a_round_on_an_unchanged_labelled_set_never_fires():
    policy = AlignmentPolicy(threshold=1000, window=20, min_labels=0, min_new_labels=0)
    same = policy.decide(generation=0, labelled=40, logme=0.1, logme_ped=0.2, history=[(20, 0.2), (40, 0.2)],
                         updates=0, labels_at_last_update=0)
    grown = policy.decide(generation=0, labelled=44, logme=0.1, logme_ped=0.2, history=[(20, 0.2), (40, 0.2)],
                          updates=0, labels_at_last_update=0)
    assert not same.fires and "did not grow" in same.reason
    assert grown.fires
