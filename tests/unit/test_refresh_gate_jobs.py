"""The refresh gate in the jobs layer, against the fake Label Studio stack: a complete refreshed generation
serves only when the proxy on its features beats the serving one on the audit labels; a worse one stays on
disk as rejected with both accuracies; with too few audit labels it waits and a later round judges it; the
audit picks are interleaved into the pushed queue and fine-tuning never trains on audit labels."""

from __future__ import annotations

import numpy as np

from asvp_backend.features.store import GenerationInfo
from asvp_backend.jobs.alignment import serve_generation
from asvp_backend.jobs.rounds import run_round
from asvp_backend.jobs.sync import sync
from asvp_backend.selection.audit import audit_keys
from asvp_backend.state import ProjectState
from tests.unit.test_rounds_fake_label_studio import DIM, PID, Stack

N_TASKS = 160
GATED = {"AUDIT_MIN_LABELS": "20", "ALIGN_MIN_LABELS": "100000", "RETRAIN_EVERY": "1"}  # the policy never fires


def by_parity(tid: int) -> str:
    return "cat" if tid % 2 == 0 else "dog"  # what the serving features (tests' _vector) separate


def by_pairs(tid: int) -> str:
    return "cat" if (tid // 2) % 2 == 0 else "dog"  # what they do not


def _features(rule, tids) -> np.ndarray:
    """Features that separate `rule`'s classes (rule=None: noise)."""
    rows = []
    for tid in tids:
        rng = np.random.default_rng(1_000 + tid)
        vector = rng.normal(0, 1, DIM)
        if rule is not None:
            vector[["cat", "dog"].index(rule(tid))] += 6.0
        rows.append(vector)
    return np.stack(rows).astype(np.float32)


def _labelled_with_audit(stack: Stack, rule, labelled: range, audit: list[int]) -> None:
    for tid in labelled:
        stack.fake.annotate(tid, rule(tid))
    sync(stack.ctx("sync"))

    def audited(current: ProjectState | None) -> ProjectState | None:
        assert current is not None
        current.audit.started_labelled = 0
        current.audit.tasks = list(audit)
        return current

    stack.runtime.store.update(PID, audited)


def _refresh(stack: Stack, rule, model: str = "m1") -> object:
    """A fine-tune finished and its backbone extracted generation 1 completely (its features follow `rule`)."""

    def fine_tuned(current: ProjectState | None) -> ProjectState | None:
        assert current is not None
        current.alignment.feature_model = model
        current.alignment.updates = 1
        current.alignment.pending = {"stage": "extract", "since": 1e12, "model": model}
        return current

    stack.runtime.store.update(PID, fine_tuned)
    candidate = stack.store.create_generation(GenerationInfo(1, "fake", "tuned", {}, DIM))
    candidate.append(list(range(1, N_TASKS + 1)), _features(rule, range(1, N_TASKS + 1)))
    return candidate


def test_a_refresh_worse_on_the_audit_labels_is_rejected_kept_on_disk_and_the_serving_generation_stays(tmp_path):
    stack = Stack(tmp_path, n_tasks=N_TASKS, **GATED)
    _labelled_with_audit(stack, by_parity, range(1, 81), audit=list(range(41, 81)))
    candidate = _refresh(stack, rule=None)  # noise: the proxy on it guesses
    served, verdict = serve_generation(stack.ctx("extract"), stack.store, candidate)
    assert not served and verdict is not None and verdict.decision == "reject"
    assert stack.store.current().info.generation == 0 and 1 in stack.store.generations()
    state = stack.state()
    rejected = state.alignment.decisions[-1]
    assert rejected["decision"] == "rejected" and rejected["generation"] == 1 and rejected["model"] == "m1"
    gate = rejected["gate"]
    assert gate["n"] == 40 and gate["incumbent_accuracy"] > 0.9 and gate["challenger_accuracy"] < 0.8
    assert "not better" in rejected["reason"] and "40 audit labels" in rejected["reason"]
    assert state.alignment.pending is None and state.alignment.feature_model is None  # g0's backbone again
    assert run_round(stack.ctx("round", force_round=True))["version"].startswith("asvp-g0-")


def test_a_refresh_better_on_the_audit_labels_is_adopted_and_serves(tmp_path):
    stack = Stack(tmp_path, n_tasks=N_TASKS, **GATED)
    _labelled_with_audit(stack, by_pairs, range(1, 91), audit=list(range(31, 91)))
    candidate = _refresh(stack, rule=by_pairs)
    served, verdict = serve_generation(stack.ctx("extract"), stack.store, candidate)
    assert served and verdict is not None and verdict.adopts
    assert verdict.challenger_accuracy > verdict.incumbent_accuracy + 0.2
    assert stack.store.current().info.generation == 1
    state = stack.state()
    assert state.alignment.decisions[-1]["decision"] == "adopted" and state.alignment.pending is None
    assert state.alignment.generation_models == {"1": "m1"}


def test_a_refresh_waits_for_audit_labels_and_a_later_round_adopts_it(tmp_path):
    stack = Stack(tmp_path, n_tasks=N_TASKS, **GATED)
    _labelled_with_audit(stack, by_pairs, range(1, 61), audit=list(range(51, 61)))  # 10 < AUDIT_MIN_LABELS
    candidate = _refresh(stack, rule=by_pairs)
    served, verdict = serve_generation(stack.ctx("extract"), stack.store, candidate)
    assert not served and verdict is not None and verdict.decision == "wait" and "10 audit labels" in verdict.reason
    state = stack.state()
    assert state.alignment.pending["stage"] == "judge" and state.alignment.pending["generation"] == 1
    assert state.alignment.decisions[-1]["decision"] == "waiting" and state.alignment.feature_model is None
    assert stack.store.current().info.generation == 0

    _labelled_with_audit(stack, by_pairs, range(61, 91), audit=list(range(51, 91)))  # 40 audit labels now
    record = run_round(stack.ctx("round", force_round=True))
    assert record["alignment"]["gate"]["decision"] == "adopt"
    assert stack.store.current().info.generation == 1
    state = stack.state()
    assert state.alignment.feature_model == "m1" and state.alignment.pending is None
    assert "extract" in stack.queued()  # g1's backbone extracts what was added meanwhile, then a round on g1


def test_align_gate_off_serves_a_refresh_unjudged(tmp_path):
    stack = Stack(tmp_path, n_tasks=N_TASKS, ALIGN_GATE="false", **GATED)
    _labelled_with_audit(stack, by_parity, range(1, 81), audit=list(range(41, 81)))
    served, verdict = serve_generation(stack.ctx("extract"), stack.store, _refresh(stack, rule=None))
    assert served and verdict is None and stack.store.current().info.generation == 1


def test_rounds_interleave_audit_picks_into_the_pushed_queue_and_record_the_estimate(tmp_path):
    stack = Stack(tmp_path, n_tasks=N_TASKS, AUDIT_MIN_LABELS="20", RETRAIN_EVERY="1")
    for tid in range(1, 11):
        stack.fake.annotate(tid, by_parity(tid))
    sync(stack.ctx("sync"))
    run_round(stack.ctx("round"))
    state = stack.state()
    assert state.audit.started_labelled == 10 and state.audit.tasks
    unlabelled = np.arange(11, N_TASKS + 1)
    smallest = unlabelled[np.argsort(audit_keys(unlabelled, stack.runtime.settings.seed))][:len(state.audit.tasks)]
    assert sorted(state.audit.tasks) == sorted(smallest.tolist())  # the smallest keys, nothing the strategy chose

    served = 0
    for _ in range(30):  # an annotator who always labels the queue's first task
        version = stack.fake.project["model_version"]
        scores = {p["task"]: p["score"] for p in stack.fake.predictions if p["model_version"] == version}
        first = min((tid for tid in scores if not stack.fake.tasks[tid]["annotations"]), key=scores.__getitem__)
        served += first in stack.state().audit.tasks
        stack.fake.annotate(first, by_parity(first))
        sync(stack.ctx("sync"))
        run_round(stack.ctx("round"))
    state = stack.state()
    assert served == len(state.audit.labelled(state_tasks(stack))) == 6  # AUDIT_EARLY_FRACTION=0.2 of 30 labels
    estimate = state.rounds[-1]["audit"]
    assert estimate["n"] == 6 and 0.0 <= estimate["low"] <= estimate["accuracy"] <= estimate["high"] <= 1.0


def state_tasks(stack: Stack) -> dict:
    from asvp_backend.state import TaskSnapshot

    return TaskSnapshot(stack.runtime.settings.model_dir, PID).load()


def test_labels_the_user_says_were_random_start_the_audit_and_no_pick_is_owed_yet(tmp_path):
    stack = Stack(tmp_path, n_tasks=N_TASKS, AUDIT_MIN_LABELS="20", RETRAIN_EVERY="1", AUDIT_EXISTING="random")
    for tid in range(1, 11):
        stack.fake.annotate(tid, by_parity(tid))
    sync(stack.ctx("sync"))
    run_round(stack.ctx("round"))
    state = stack.state()
    # the ten labels count as audit labels: the quota (20% of the labels since the start) owes no new one for
    # the next 50 labels, so the first audit pick of the queue comes after its first 50 tasks
    assert state.audit.started_labelled == 10 and state.audit.tasks[:10] == list(range(1, 11))
    assert state.audit.labelled(state_tasks(stack)) == list(range(1, 11))
    version = stack.fake.project["model_version"]
    queue = sorted((p["score"], p["task"]) for p in stack.fake.predictions if p["model_version"] == version)
    positions = [i for i, (_, tid) in enumerate(queue) if tid in state.audit.tasks]
    assert state.rounds[-1]["audit_picks"] == len(positions) > 0 and min(positions) >= 50
    run_round(stack.ctx("round", force_round=True))
    assert stack.state().rounds[-1]["audit"]["n"] == 10  # they judge the proxy from the next round on
    ignored = Stack(tmp_path / "ignore", n_tasks=N_TASKS, AUDIT_MIN_LABELS="20", RETRAIN_EVERY="1")
    for tid in range(1, 11):
        ignored.fake.annotate(tid, by_parity(tid))
    sync(ignored.ctx("sync"))
    run_round(ignored.ctx("round"))
    assert not set(ignored.state().audit.tasks) & set(range(1, 11))  # the default: unknown selection, not audit
