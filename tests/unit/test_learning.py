"""learning.py's definitions (the accuracy interval, accepted vs corrected pre-annotations, the running
fine-tune) and what the sync and the round record of them, against a fake Label Studio."""

from __future__ import annotations

import json

import pytest

from asvp_backend.jobs.rounds import run_round
from asvp_backend.jobs.sync import sync_tasks
from asvp_backend.labelstudio.label_config import parse_label_config
from asvp_backend.learning import (
    acceptance_summary,
    accuracy_fields,
    measured_on,
    reviewed_pre_annotations,
    round_accuracy,
    training_now,
    wilson_interval,
)
from asvp_backend.project_summary import learning_summary
from asvp_backend.state import AcceptanceState, ProjectState, config_change
from tests.helpers import IMAGE_CONFIG
from tests.unit.test_rounds_fake_label_studio import PID, Stack

SPEC = parse_label_config(IMAGE_CONFIG)  # cat, dog
BIRD_CONFIG = IMAGE_CONFIG.replace('<Choice value="dog"/>', '<Choice value="dog"/><Choice value="bird"/>')


def choice(label: str) -> list[dict]:
    return [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]


# ------------------------------------------------------------------ the interval
@pytest.mark.parametrize(("k", "n", "low", "high"), [
    (30, 30, 0.8865, 1.0),    # the report's 1.00 at 30 labels
    (34, 40, 0.7093, 0.9294),  # and its 0.85 at 40: the two intervals overlap
    (0, 10, 0.0, 0.2775),     # the textbook value: Wilson's interval is not zero-width at 0 of n
    (10, 10, 0.7225, 1.0),
    (5, 10, 0.2366, 0.7634),
])
def test_wilson_interval_matches_reference_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


def test_wilson_interval_is_symmetric_narrows_with_n_and_refuses_nonsense():
    for k, n in [(3, 7), (17, 40), (400, 1000)]:
        lo, hi = wilson_interval(k, n)
        mirrored = wilson_interval(n - k, n)
        assert lo <= k / n <= hi and lo == pytest.approx(1 - mirrored[1]) and hi == pytest.approx(1 - mirrored[0])
    widths = [hi - lo for lo, hi in (wilson_interval(8 * m, 10 * m) for m in (1, 10, 100))]
    assert widths[0] > widths[1] > widths[2]
    assert wilson_interval(0, 0) is None
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_a_round_records_n_and_interval_and_older_rounds_get_them_from_their_labels():
    assert accuracy_fields(0.85, 40) == {"cv_n": 40, "cv_interval": [0.7093, 0.9294]}
    assert accuracy_fields(None, 40) == {"cv_n": None, "cv_interval": None}
    old = {"version": "asvp-g0-r3", "generation": 0, "labelled": 30, "cv_accuracy": 1.0}  # no cv_n: n = labelled
    assert round_accuracy(old)["cv_n"] == 30 and round_accuracy(old)["cv_interval"] == [0.8865, 1.0]
    assert round_accuracy({**old, "labelled": 5000})["cv_interval"] is None  # subsampled then: n unknown
    assert measured_on(round_accuracy(old)) == \
        "cross-validated on the 30 labelled tasks, which active learning chose (not a random sample: a biased estimate)"
    sampled = round_accuracy({**old, "labelled": 5000, **accuracy_fields(0.9, 1000)})
    assert measured_on(sampled).startswith("cross-validated on a random 1000 of the 5000 labelled tasks")


# ------------------------------------------------------------------ accepted as-is vs corrected
def task_with(predictions: list[dict], annotations: list[dict]) -> dict:
    return {"id": 1, "data": {"image": "x"}, "predictions": predictions, "annotations": annotations}


def test_an_annotation_counts_only_when_it_started_from_our_labelled_prediction():
    ours = {"id": 11, "model_version": "asvp-g0-r2", "result": choice("cat")}
    cold = {"id": 12, "model_version": "asvp-g0-r1", "result": []}  # cold start: no label suggested
    theirs = {"id": 13, "model_version": "someone-else", "result": choice("cat")}
    annotations = [
        {"id": 101, "result": choice("cat"), "parent_prediction": 11},  # accepted as-is
        {"id": 102, "result": choice("dog"), "parent_prediction": 11},  # corrected
        {"id": 103, "result": choice("cat"), "parent_prediction": None},  # labelled from scratch
        {"id": 104, "result": choice("cat"), "parent_prediction": 12},  # no suggestion served
        {"id": 105, "result": choice("cat"), "parent_prediction": 13},  # another model's
        {"id": 106, "result": [], "parent_prediction": 11, "was_cancelled": True},  # skipped
        {"id": 107, "result": choice("cat"), "parent_prediction": 99},  # a prediction deleted since
    ]
    reviews = reviewed_pre_annotations(task_with([ours, cold, theirs], annotations), SPEC)
    assert reviews == [(101, "asvp-g0-r2", True), (102, "asvp-g0-r2", False)]
    assert reviewed_pre_annotations({"id": 2, "annotations": []}, SPEC) == []


def test_labels_compare_as_classes_whatever_alias_label_studio_wrote():
    config = IMAGE_CONFIG.replace('<Choice value="cat"/>', '<Choice value="cat" alias="c"/>')
    spec = parse_label_config(config)
    prediction = {"id": 5, "model_version": "asvp-g1-r4", "result": spec.prediction_result("cat")}  # writes "c"
    annotation = {"id": 9, "result": choice("cat"), "parent_prediction": 5}  # the shown value: still "cat"
    assert reviewed_pre_annotations(task_with([prediction], [annotation]), spec) == [(9, "asvp-g1-r4", True)]


def test_each_annotation_counts_once_and_totals_survive_trimming():
    tally = AcceptanceState()
    assert tally.record([(5, "asvp-g0-r1", True), (3, "asvp-g0-r1", False), (8, "asvp-g0-r2", True)]) == 3
    assert tally.record([(5, "asvp-g0-r1", True), (8, "asvp-g0-r2", True), (9, "asvp-g0-r2", False)]) == 1
    assert tally.by_version == {"asvp-g0-r1": {"accepted": 1, "corrected": 1},
                                "asvp-g0-r2": {"accepted": 1, "corrected": 1}}
    assert (tally.accepted, tally.corrected, tally.last_annotation) == (2, 2, 9)
    summary = acceptance_summary(tally.by_version, tally.accepted, tally.corrected)
    assert summary["overall"] == {"accepted": 2, "corrected": 2, "reviewed": 4, "rate": 0.5,
                                  "interval": [0.15, 0.85]}
    assert [r["version"] for r in summary["rounds"]] == ["asvp-g0-r1", "asvp-g0-r2"]
    assert acceptance_summary({}, 0, 0)["overall"]["rate"] is None


# ------------------------------------------------------------------ state: config changes, older states
def test_config_change_names_classes_added_and_removed():
    bird = parse_label_config(BIRD_CONFIG)
    change = config_change(SPEC, bird, at=5.0)
    assert change == {"at": 5.0, "source": "sync", "added": ["bird"], "removed": [], "classes": ["cat", "dog", "bird"],
                      "other": []}
    assert config_change(bird, SPEC, source="setup")["removed"] == ["bird"]
    assert config_change(SPEC, parse_label_config(IMAGE_CONFIG.replace("<View>", "<View>\n  "))) is None
    aliased = parse_label_config(IMAGE_CONFIG.replace('<Choice value="cat"/>', '<Choice value="cat" alias="c"/>'))
    assert config_change(SPEC, aliased)["other"] == ["aliases"]
    assert config_change(None, SPEC) is None


def test_a_state_stored_before_these_fields_loads_with_their_defaults():
    stored = json.loads(ProjectState.new(3, IMAGE_CONFIG, SPEC).to_json())
    for name in ("title", "acceptance", "config_changes"):
        del stored[name]
    state = ProjectState.from_json(json.dumps(stored))
    assert state.title is None and state.acceptance == AcceptanceState() and state.config_changes == []
    state.record_config_change(None)
    assert state.config_changes == []


# ------------------------------------------------------------------ the fine-tune next to the deliverable
def test_the_running_fine_tune_is_shown_with_its_progress():
    jobs = [{"id": "sync-p3-a", "kind": "sync", "status": "finished", "progress": {"done": 5, "total": 5}},
            {"id": "finetune-p3-b", "kind": "finetune", "status": "started",
             "progress": {"done": 22, "total": 250, "stage": "ft"}},
            {"id": "finetune-p3-old", "kind": "finetune", "status": "finished"}]
    assert training_now(jobs) == {"job": "finetune-p3-b", "kind": "finetune", "status": "started", "done": 22,
                                  "total": 250, "stage": "ft", "text": "fine-tuning 22/250"}
    assert training_now([{"id": "align-p3-c", "kind": "align", "status": "queued"}])["text"] == "feature update queued"
    assert training_now(jobs[:1]) is None


# ------------------------------------------------------------------ what the sync and the round record
def test_the_sync_records_title_config_changes_and_reviews_once(tmp_path):
    stack = Stack(tmp_path, n_tasks=6)
    stack.fake.project["title"] = "Pets <b>at home</b>"
    served = {tid: {"id": 100 + tid, "model_version": "asvp-g0-r1", "result": SPEC.prediction_result("cat")}
              for tid in (1, 2, 3)}
    for tid, label in [(1, "cat"), (2, "dog"), (3, "cat")]:
        stack.fake.tasks[tid]["predictions"] = [served[tid]]
        stack.fake.tasks[tid]["annotations"] = [{"id": 10 + tid, "result": choice(label), "was_cancelled": False,
                                                  "parent_prediction": 100 + tid}]
    stack.fake.annotate(4, "dog")  # labelled from scratch: not counted
    sync_tasks(stack.ctx("sync"))
    sync_tasks(stack.ctx("sync"))  # the same annotations again: counted once
    state = stack.state()
    assert state.title == "Pets <b>at home</b>" and state.config_changes == []
    assert state.acceptance.by_version == {"asvp-g0-r1": {"accepted": 2, "corrected": 1}}
    assert (state.acceptance.accepted, state.acceptance.corrected) == (2, 1)

    stack.fake.label_config = BIRD_CONFIG
    sync_tasks(stack.ctx("sync"))
    changes = stack.state().config_changes
    assert [(c["added"], c["removed"], c["source"]) for c in changes] == [(["bird"], [], "sync")]
    summary = learning_summary(stack.state())
    assert summary["title"] == "Pets <b>at home</b>" and summary["classes"] == ["cat", "dog", "bird"]
    assert summary["pre_annotations"]["overall"]["rate"] == pytest.approx(2 / 3, abs=1e-4)


def test_a_round_records_how_many_predictions_its_accuracy_is_measured_on(tmp_path):
    stack = Stack(tmp_path, n_tasks=20)
    stack.label(range(1, 11))
    sync_tasks(stack.ctx("sync"))
    record = run_round(stack.ctx("round"))
    assert record["cv_accuracy"] is not None and record["cv_n"] == record["labelled"] == 10
    low, high = record["cv_interval"]
    assert low <= record["cv_accuracy"] <= high
    stored = stack.runtime.store.require(PID).rounds[-1]
    assert stored["cv_n"] == 10 and stored["cv_interval"] == record["cv_interval"]
    summary = learning_summary(stack.state())
    assert summary["accuracy"]["latest"]["cv_interval"] == record["cv_interval"]
    assert summary["accuracy"]["measured_on"] == \
        "cross-validated on the 10 labelled tasks, which active learning chose (not a random sample: a biased estimate)"


def test_the_audit_estimate_and_the_gates_verdicts_are_in_the_learning_answer():
    state = ProjectState.new(PID, IMAGE_CONFIG, SPEC)
    state.record_round({"version": "asvp-g0-r1", "generation": 0, "labelled": 20, "cv_accuracy": 0.9, "audit": None})
    state.record_round({"version": "asvp-g0-r2", "generation": 0, "labelled": 40, "cv_accuracy": 0.95,
                        "audit": {"n": 8, "accuracy": 0.75, "low": 0.41, "high": 0.93, "generation": 0}})
    state.alignment.record_decision({"decision": "update", "reason": "stalled", "version": "asvp-g0-r2"})
    state.alignment.record_decision({
        "decision": "rejected", "reason": "the refreshed features are not better: ...", "generation": 1, "model": "m1",
        "gate": {"decision": "reject", "n": 60, "challenger_accuracy": 0.7, "incumbent_accuracy": 0.8,
                 "difference": -0.1, "standard_error": 0.05}})
    learning = learning_summary(state)
    audit = learning["audit"]
    assert [p["version"] for p in audit["curve"]] == ["asvp-g0-r2"]  # a round without audit labels has no point
    assert audit["latest"]["interval"] == [0.41, 0.93] and "8 audit labels" in audit["measured_on"]
    assert "unbiased" in audit["measured_on"]
    (verdict,) = learning["refreshes"]
    assert verdict["decision"] == "rejected" and verdict["refreshed_accuracy"] == 0.7
    assert verdict["serving_accuracy"] == 0.8 and verdict["n"] == 60 and verdict["model"] == "m1"
    assert json.loads(json.dumps(learning)) == learning
