"""Cohen's kappa, the stopping rule on scripted round histories, and the round's stop-set step."""

import numpy as np
import pytest

from asvp_backend.artefacts import StopPredictions, read_stop_set, write_round
from asvp_backend.jobs.stop_set import predict_stop_set
from asvp_backend.layout import ProjectLayout
from asvp_backend.stopping import STOP_SET_SIZE, StopRule, cohen_kappa


# ------------------------------------------------------------------------------------------------ kappa
def test_identical_predictions_agree_perfectly():
    assert cohen_kappa(["cat", "dog", "cat", "bird"], ["cat", "dog", "cat", "bird"]) == 1.0


def test_agreement_at_chance_level_is_zero():
    assert cohen_kappa(["a", "a", "b", "b"], ["a", "b", "a", "b"]) == 0.0
    rng = np.random.default_rng(0)
    a, b = rng.choice(["x", "y", "z"], 20_000).tolist(), rng.choice(["x", "y", "z"], 20_000).tolist()
    assert abs(cohen_kappa(a, b)) < 0.02


def test_the_worked_example():
    # 50 items: both yes 20, A yes B no 5, A no B yes 10, both no 15. p_o = 0.7, p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)


def test_kappa_matches_scikit_learn_on_random_labels():
    from sklearn.metrics import cohen_kappa_score

    rng = np.random.default_rng(1)
    a = rng.choice(["cat", "dog", "fox"], 300)
    b = np.where(rng.random(300) < 0.7, a, rng.choice(["cat", "dog", "fox"], 300))
    assert cohen_kappa(a.tolist(), b.tolist()) == pytest.approx(cohen_kappa_score(a, b))


def test_one_class_edge_cases_are_defined():
    assert cohen_kappa(["cat"] * 5, ["cat"] * 5) == 1.0  # 0/0 by the formula: unchanged predictions are stable
    assert cohen_kappa(["cat"] * 5, ["dog"] * 5) == 0.0  # every prediction flipped: no agreement
    with pytest.raises(ValueError):
        cohen_kappa([], [])
    with pytest.raises(ValueError):
        cohen_kappa(["cat"], ["cat", "dog"])


# ------------------------------------------------------------------------------------------- the rule
RULE = StopRule(kappa=0.99, rounds=3)


def rounds(kappas, accuracies):
    return [{"version": f"asvp-g0-r{i + 1}", "labelled": 10 * (i + 1), "cv_accuracy": acc,
             "stop": {"kappa": k}}
            for i, (k, acc) in enumerate(zip(kappas, accuracies, strict=True))]


def test_no_history_and_one_stable_round_never_stop():
    assert not RULE.evaluate([]).can_stop
    signal = RULE.evaluate(rounds([None, 1.0], [0.8, 0.8]))
    assert not signal.can_stop and signal.stable_rounds == 1
    assert "1 of the last 3" in signal.reason


def test_stops_after_the_required_run_of_stable_rounds_with_flat_accuracy():
    history = rounds([None, 0.9, 0.995, 0.999, 1.0], [0.80, 0.90, 0.902, 0.905, 0.903])
    assert not RULE.evaluate(history[:4]).can_stop  # two stable rounds
    signal = RULE.evaluate(history)
    assert signal.can_stop and signal.stable_rounds == 3
    assert signal.recent_best_accuracy == 0.905 and signal.earlier_best_accuracy == 0.90
    assert signal.reason.startswith("labelling can stop")
    assert [h["kappa"] for h in signal.history] == [None, 0.9, 0.995, 0.999, 1.0]  # the evidence, per round


def test_a_drop_in_kappa_resets_the_run():
    history = rounds([None, 0.995, 0.999, 0.98, 0.999, 1.0], [0.8, 0.9, 0.9, 0.9, 0.9, 0.9])
    signal = RULE.evaluate(history)
    assert not signal.can_stop and signal.stable_rounds == 2
    one_more = {"version": "asvp-g0-r7", "labelled": 70, "cv_accuracy": 0.9, "stop": {"kappa": 1.0}}
    assert RULE.evaluate([*history, one_more]).can_stop


def test_rounds_without_new_labels_do_not_count_toward_stopping():
    history = rounds([None, 0.9, 0.995], [0.80, 0.90, 0.902])
    same_labels = [{**history[-1], "version": f"asvp-g0-r{4 + i}", "stop": {"kappa": 1.0}} for i in range(3)]
    signal = RULE.evaluate(history + same_labels)  # Start Training pressed three times, no label in between
    assert not signal.can_stop and signal.stable_rounds == 1
    assert [h["version"] for h in signal.history] == ["asvp-g0-r1", "asvp-g0-r2", "asvp-g0-r3"]
    more = [{"version": "asvp-g0-r7", "labelled": 40, "cv_accuracy": 0.9, "stop": {"kappa": 0.999}},
            {"version": "asvp-g0-r8", "labelled": 50, "cv_accuracy": 0.9, "stop": {"kappa": 1.0}}]
    assert RULE.evaluate(history + same_labels + more).can_stop


def test_a_round_without_kappa_breaks_the_run():
    history = rounds([None, 0.995, 0.999, None, 0.999, 1.0], [0.8] * 6)
    assert RULE.evaluate(history).stable_rounds == 2


def test_accuracy_still_rising_blocks_the_stop():
    history = rounds([None, 0.9, 0.995, 0.999, 1.0], [0.70, 0.80, 0.82, 0.84, 0.86])
    signal = RULE.evaluate(history)
    assert signal.stable_rounds == 3 and not signal.can_stop
    assert "still rises" in signal.reason
    # a gain of at most MIN_GAIN (0.005) over the best before counts as flat
    assert RULE.evaluate(rounds([None, 0.9, 0.995, 0.999, 1.0], [0.70, 0.80, 0.802, 0.805, 0.801])).can_stop


def test_without_an_earlier_accuracy_it_cannot_tell():
    signal = StopRule(kappa=0.99, rounds=2).evaluate(rounds([None, 1.0, 1.0], [None, 0.9, 0.9]))
    assert signal.stable_rounds == 2 and not signal.can_stop and "no earlier" in signal.reason


def test_the_audit_accuracy_judges_once_the_newest_round_has_enough_audit_labels():
    # the cv accuracy on the chosen labels keeps rising; the audit estimate (unbiased) has stopped
    history = rounds([None, 0.9, 0.9, 0.995, 0.999, 1.0], [0.70, 0.80, 0.82, 0.84, 0.86, 0.88])
    audits = [{"n": 40, "accuracy": 0.9}, {"n": 60, "accuracy": 0.81}, {"n": 62, "accuracy": 0.8},
              {"n": 64, "accuracy": 0.812}, {"n": 66, "accuracy": 0.809}, {"n": 70, "accuracy": 0.811}]
    with_audit = [{**r, "audit": a} for r, a in zip(history, audits, strict=True)]
    signal = RULE.evaluate(with_audit)
    assert signal.can_stop and signal.accuracy_source == "audit" and "audit accuracy stopped rising" in signal.reason
    # the round with 40 audit labels does not count: 0.81 is the earlier best, not 0.9
    assert signal.earlier_best_accuracy == 0.81 and signal.recent_best_accuracy == 0.812
    assert [h["audit_accuracy"] for h in signal.history] == [None, 0.81, 0.8, 0.812, 0.809, 0.811]
    too_few = StopRule(kappa=0.99, rounds=3, min_audit=100).evaluate(with_audit)
    assert not too_few.can_stop and too_few.accuracy_source == "cross-validated" and "still rises" in too_few.reason


def test_the_rule_comes_from_the_settings():
    from asvp_backend.config import Settings

    rule = StopRule.from_settings(Settings.from_env({"STOP_KAPPA": "0.95", "STOP_ROUNDS": "2",
                                                     "AUDIT_MIN_LABELS": "80"}))
    assert (rule.kappa, rule.rounds, rule.min_audit) == (0.95, 2, 80)


# ------------------------------------------------------------------------------------- the round's step
class Generation:
    """A feature generation: vectors for some task ids (deleted tasks have none)."""

    def __init__(self, ids):
        self.vectors = {int(t): np.array([float(t % 2), 1.0 - t % 2], dtype=np.float16) for t in ids}

    def lookup(self, ids):
        found = np.array([int(t) in self.vectors for t in ids], dtype=bool)
        rows = [self.vectors[int(t)] for t in np.asarray(ids)[found]]
        return found, np.array(rows, dtype=np.float16).reshape(-1, 2)


class Proxy:
    """Labels odd tasks "cat" and even ones "dog", or flips them."""

    classes_ = np.array(["cat", "dog"])

    def __init__(self, flip=False):
        self.flip = flip

    def predict_proba(self, x):
        p = np.asarray(x, dtype=np.float32)
        return p[:, ::-1] if self.flip else p


def test_the_stop_set_is_drawn_once_seeded_and_compared_over_the_same_tasks(tmp_path):
    layout = ProjectLayout(tmp_path, 1)
    pool = np.arange(100, 5100, dtype=np.int64)
    first, entry = predict_stop_set(layout, 0, pool, Generation(pool), Proxy(), previous_version="asvp-g0-r0")
    drawn = read_stop_set(layout)
    assert len(drawn) == STOP_SET_SIZE and set(drawn.tolist()) <= set(pool.tolist())
    assert entry == {"kappa": None, "stop_set": STOP_SET_SIZE, "compared_with": None, "compared": 0}
    write_round(layout, "asvp-g0-r1", _empty_ranking(), None, stop=first)

    # later: a smaller pool (tasks labelled) and 10 stop-set tasks deleted; the set stays the same
    deleted = set(drawn[:10].tolist())
    generation = Generation([t for t in pool.tolist() if t not in deleted])
    same, entry = predict_stop_set(layout, 0, pool[:50], generation, Proxy(), previous_version="asvp-g0-r1")
    assert np.array_equal(read_stop_set(layout), drawn)
    assert entry["kappa"] == 1.0 and entry["compared_with"] == "asvp-g0-r1"
    assert entry["stop_set"] == entry["compared"] == STOP_SET_SIZE - 10
    write_round(layout, "asvp-g0-r2", _empty_ranking(), None, stop=same)

    _, entry = predict_stop_set(layout, 0, pool, generation, Proxy(flip=True), previous_version="asvp-g0-r2")
    assert entry["kappa"] < 0  # every prediction changed


def test_no_kappa_at_cold_start(tmp_path):
    layout = ProjectLayout(tmp_path, 1)
    pool = np.arange(10, dtype=np.int64)
    predictions, entry = predict_stop_set(layout, 0, pool, Generation(pool), None, previous_version="asvp-g0-r0")
    assert predictions is None and entry["kappa"] is None
    assert len(read_stop_set(layout)) == 10  # drawn all the same: the set is fixed from the first round


def _empty_ranking():
    from asvp_backend.artefacts import RankingArtefact

    return RankingArtefact(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32), np.zeros(0, dtype=str))


def test_stop_predictions_round_trip(tmp_path):
    from asvp_backend.artefacts import read_stop_predictions

    layout = ProjectLayout(tmp_path, 1)
    stop = StopPredictions(np.array([3, 1], dtype=np.int64), np.array(["cat", "dog \U0001f436"]))
    write_round(layout, "asvp-g0-r1", _empty_ranking(), None, stop=stop)
    assert read_stop_predictions(layout, "asvp-g0-r1").by_task() == {3: "cat", 1: "dog \U0001f436"}
    assert read_stop_predictions(layout, "asvp-g0-r9") is None
