import pytest

from asvp_backend.jobs.rounds import (
    AUTO_MAX_LABELS,
    AUTO_SECONDS_PER_LABEL,
    labels_between_rounds,
    last_round_seconds,
    round_due,
)


@pytest.mark.parametrize(
    ("labelled", "at_last", "rounds", "every", "force", "due"),
    [
        (0, 0, 0, 10, False, True),  # the first ranking (cold start) as soon as features exist
        (5, 0, 1, 10, False, False),  # not enough new labels
        (10, 0, 1, 10, False, True),
        (3, 13, 1, 10, False, True),  # labels removed count too
        (5, 5, 3, 10, True, True),  # Start Training always retrains
        (5, 5, 3, 1, False, False),  # nothing changed
    ],
)
def test_round_due(labelled, at_last, rounds, every, force, due):
    assert round_due(labelled, at_last, rounds, every, force) is due


@pytest.mark.parametrize(
    ("setting", "seconds", "every"),
    [
        (10, 0.5, 10),  # an explicit RETRAIN_EVERY is kept, however fast or slow rounds are
        (1, 600.0, 1),
        (3, None, 3),
        ("auto", None, 1),  # no round timed yet
        ("auto", 1.4, 1),  # a small project with the logistic proxy: a round after every label
        ("auto", AUTO_SECONDS_PER_LABEL, 1),
        ("auto", AUTO_SECONDS_PER_LABEL + 0.1, 2),
        ("auto", 4.5 * AUTO_SECONDS_PER_LABEL, 5),
        ("auto", 600.0, AUTO_MAX_LABELS),  # large projects: never fewer rounds than the former default
    ],
)
def test_labels_between_rounds(setting, seconds, every):
    assert labels_between_rounds(setting, seconds) == every


def test_auto_grows_with_the_round_cost_and_stays_between_one_and_ten():
    costs = [i / 10 for i in range(0, 1000)]
    cadence = [labels_between_rounds("auto", c) for c in costs]
    assert cadence == sorted(cadence) and min(cadence) == 1 and max(cadence) == AUTO_MAX_LABELS == 10


def test_the_cost_is_the_last_rounds_timings_and_the_sync_before_it():
    from asvp_backend.labelstudio.label_config import parse_label_config
    from asvp_backend.state import ProjectState
    from tests.helpers import IMAGE_CONFIG

    state = ProjectState.new(1, IMAGE_CONFIG, parse_label_config(IMAGE_CONFIG))
    assert last_round_seconds(state) is None
    state.rounds.append({"round": 1, "timings": {"train_and_rank": 1.5, "push": 2.0, "cross_validate": 0.5}})
    assert last_round_seconds(state) == 4.0
    state.last_sync = {"seconds": 1.25}
    assert last_round_seconds(state) == 5.25
    assert labels_between_rounds("auto", last_round_seconds(state)) == 2
    state.rounds.append({"round": 2})  # a round without timings (recovered from disk): one label
    assert last_round_seconds(state) is None


def test_auto_round_due_after_one_label_when_rounds_are_quick_only():
    quick, slow = labels_between_rounds("auto", 2.0), labels_between_rounds("auto", 60.0)
    assert round_due(21, 20, 3, quick, False)
    assert not round_due(21, 20, 3, slow, False) and round_due(30, 20, 3, slow, False)
