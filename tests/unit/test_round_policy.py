import pytest

from asvp_backend.jobs.rounds import round_due


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
