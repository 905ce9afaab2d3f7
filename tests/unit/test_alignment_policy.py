"""The ASVP policy on scripted LogME-PED histories: where it fires, the minimums, the cap, the method."""

from __future__ import annotations

import pytest

from asvp_backend.alignment.policy import AlignmentPolicy
from asvp_backend.config import ConfigError, Settings


def replay(policy: AlignmentPolicy, history: list[tuple[int, float]]) -> list[str]:
    """Feed (labelled, LogME-PED) per round through the policy the way the round job does: scores are
    compared within a generation, and an update starts a new generation with a fresh history."""
    generation, updates, labels_at_update, previous = 0, 0, 0, None
    out = []
    for labelled, score in history:
        decision = policy.decide(generation=generation, labelled=labelled, logme=score / 2, logme_ped=score,
                                 previous=previous, updates=updates, labels_at_last_update=labels_at_update)
        out.append(decision.decision)
        previous = score
        if decision.fires:
            generation, updates, labels_at_update, previous = generation + 1, updates + 1, labelled, None
    return out


def test_fires_exactly_where_the_gain_falls_below_the_threshold():
    policy = AlignmentPolicy(threshold=0.0, min_labels=0, min_new_labels=0, max_updates=5)
    history = [(100, 0.10), (200, 0.20), (300, 0.25), (400, 0.24), (500, 0.30), (600, 0.35), (700, 0.35)]
    # round 4 falls (0.25 -> 0.24): fire; generation 1 starts fresh (no previous), then 0.30 -> 0.35 rises,
    # then a gain of exactly 0 is not below the threshold 0
    assert replay(policy, history) == ["wait", "wait", "wait", "update", "wait", "wait", "wait"]


def test_a_positive_threshold_fires_on_a_small_gain():
    policy = AlignmentPolicy(threshold=0.02, min_labels=0, min_new_labels=0)
    assert replay(policy, [(100, 0.10), (200, 0.20), (300, 0.21)]) == ["wait", "wait", "update"]


def test_minimum_labels_and_minimum_new_labels_hold_an_update_back():
    policy = AlignmentPolicy(threshold=0.0, min_labels=300, min_new_labels=200, max_updates=5)
    history = [(100, 0.2), (200, 0.1), (300, 0.3), (400, 0.2), (500, 0.4), (600, 0.3), (700, 0.2)]
    # 200: stalled but under ALIGN_MIN_LABELS; 400: fires; 600: stalled, only 200 new since 400 -> fires;
    # 700: first of its generation
    assert replay(policy, history) == ["wait", "wait", "wait", "update", "wait", "update", "wait"]
    blocked = policy.decide(generation=1, labelled=500, logme=None, logme_ped=0.1, previous=0.2, updates=1,
                            labels_at_last_update=400)
    assert not blocked.fires and "ALIGN_MIN_NEW_LABELS=200" in blocked.reason and blocked.gain == pytest.approx(-0.1)


def test_the_cap_stops_further_updates():
    policy = AlignmentPolicy(threshold=1e9, min_labels=0, min_new_labels=0, max_updates=2)
    decisions = replay(policy, [(n, 0.1) for n in range(100, 1100, 100)])
    assert decisions.count("update") == 2
    last = policy.decide(generation=2, labelled=1000, logme=0.0, logme_ped=0.1, previous=0.1, updates=2,
                         labels_at_last_update=500)
    assert not last.fires and "ALIGN_MAX_UPDATES=2" in last.reason


def test_off_never_fires_and_says_so():
    policy = AlignmentPolicy(enabled=False, threshold=1e9, min_labels=0, min_new_labels=0)
    assert set(replay(policy, [(100, 0.3), (200, 0.1), (300, 0.0)])) == {"off"}


def test_no_score_or_first_score_waits_with_its_reason():
    policy = AlignmentPolicy(min_labels=0)
    none = policy.decide(generation=0, labelled=1, logme=None, logme_ped=None, previous=None, updates=0,
                         labels_at_last_update=0)
    first = policy.decide(generation=3, labelled=50, logme=0.1, logme_ped=0.2, previous=None, updates=0,
                          labels_at_last_update=0)
    assert none.decision == first.decision == "wait"
    assert "two labelled classes" in none.reason and "generation 3" in first.reason


def test_every_decision_carries_its_inputs():
    policy = AlignmentPolicy(threshold=0.0, min_labels=10, min_new_labels=5)
    d = policy.decide(generation=0, labelled=40, logme=0.11, logme_ped=0.19, previous=0.2, updates=0,
                      labels_at_last_update=0).to_dict()
    assert d["decision"] == "update" and d["method"] == "ft"
    assert {k: d[k] for k in ("generation", "labelled", "logme", "logme_ped", "previous", "threshold")} == {
        "generation": 0, "labelled": 40, "logme": 0.11, "logme_ped": 0.19, "previous": 0.2, "threshold": 0.0}
    assert d["gain"] == pytest.approx(-0.01) and "fine-tune (ft)" in d["reason"]


@pytest.mark.parametrize(("setting", "generation", "expected"), [
    ("auto", 0, "lpft"), ("auto", 1, "ft"), ("auto", 4, "ft"), ("ft", 0, "ft"), ("lpft", 2, "lpft"),
])
def test_training_method_follows_the_feature_state(setting, generation, expected):
    assert AlignmentPolicy(training_method=setting).method_for(generation) == expected


def test_settings_build_the_policy_and_refuse_bad_values():
    settings = Settings.from_env({"ALIGN": "off", "ALIGN_THRESHOLD": "0.01", "ALIGN_MIN_LABELS": "50",
                                  "ALIGN_MIN_NEW_LABELS": "20", "ALIGN_MAX_UPDATES": "1", "TRAINING_METHOD": "lpft"})
    assert AlignmentPolicy.from_settings(settings) == AlignmentPolicy(False, 0.01, 50, 20, 1, "lpft")
    assert AlignmentPolicy.from_settings(Settings.from_env({})) == AlignmentPolicy()
    with pytest.raises(ConfigError, match="TRAINING_METHOD"):
        Settings.from_env({"TRAINING_METHOD": "sgd"})
    with pytest.raises(ValueError, match="training method"):
        AlignmentPolicy(training_method="sgd")


def test_a_round_on_an_unchanged_labelled_set_never_fires():
    policy = AlignmentPolicy(threshold=1000, min_labels=0, min_new_labels=0)
    same = policy.decide(generation=0, labelled=40, logme=0.1, logme_ped=0.2, previous=0.2, updates=0,
                         labels_at_last_update=0, previous_labelled=40)
    grown = policy.decide(generation=0, labelled=44, logme=0.1, logme_ped=0.2, previous=0.2, updates=0,
                          labels_at_last_update=0, previous_labelled=40)
    assert not same.fires and "did not grow" in same.reason
    assert grown.fires
