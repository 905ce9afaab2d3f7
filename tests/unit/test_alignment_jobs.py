"""Alignment in the jobs layer, against the fake Label Studio stack: decisions recorded after rounds with
their scores, an update queued once, a failed fine-tune ending its update with a reason, a refreshed
generation followed by a round, the pre-annotation source, the state's round trip, and the verdict of a
fine-tuned model against the proxy on the same audit labels, or held-out ones while they are too few (a model
the proxy beat is no deliverable)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from asvp_backend.alignment.policy import deliverable_rank
from asvp_backend.alignment.summary import alignment_summary, generations_of, model_summary
from asvp_backend.features.store import GenerationInfo
from asvp_backend.jobs.alignment import (
    force_update,
    generation_served,
    judge_against_proxy,
    pre_annotations,
)
from asvp_backend.jobs.chain import follow_up
from asvp_backend.jobs.finetune import run_finetune
from asvp_backend.jobs.resources import Project
from asvp_backend.jobs.rounds import load_inputs, run_round
from asvp_backend.jobs.sync import sync
from asvp_backend.layout import ProjectLayout
from asvp_backend.state import AlignmentState, ProjectState, TaskSnapshot
from tests.helpers import write_checkpoint
from tests.unit.test_rounds_fake_label_studio import DIM, PID, Stack, _vector

FIRES = {"ALIGN_THRESHOLD": "1000", "ALIGN_WINDOW": "1", "ALIGN_MIN_LABELS": "4", "ALIGN_MIN_NEW_LABELS": "0"}


def labelled_rounds(stack: Stack, batches: list[range]) -> list[dict]:
    records = []
    for ids in batches:
        stack.label(ids)
        sync(stack.ctx("sync"))
        records.append(run_round(stack.ctx("round")))
    return records


def test_each_round_records_scores_and_a_decision(tmp_path):
    stack = Stack(tmp_path, ALIGN_WINDOW="10")  # default ALIGN_MIN_LABELS=500, so nothing fires here
    records = labelled_rounds(stack, [range(1, 9), range(9, 17), range(17, 25)])
    alignment = stack.state().alignment
    assert [d["decision"] for d in alignment.decisions] == ["wait", "wait", "wait"]
    assert "ALIGN_WINDOW=10 labels on generation 0; its scores span 0" in alignment.decisions[0]["reason"]
    assert "span 8 so far" in alignment.decisions[1]["reason"]
    third = alignment.decisions[2]
    x = [s["labelled"] for s in alignment.scores]
    assert x == [8, 16, 24] and third["window"] == 16 and third["points"] == 3
    slope = np.polyfit(x, [s["logme_ped"] for s in alignment.scores], 1)[0]
    assert third["gain"] == pytest.approx(slope * 100, abs=1e-6)
    assert ("ALIGN_MIN_LABELS=500" if third["gain"] < 0 else ">= threshold") in third["reason"]
    assert all(np.isfinite(s["logme_ped"]) and np.isfinite(s["logme"]) for s in alignment.scores)
    assert records[2]["alignment"]["decision"] == "wait" and records[2]["alignment"]["logme_ped"] is not None
    assert stack.state().rounds[-1]["alignment"]["decision"] == "wait"  # stored with the round
    assert "align" not in stack.queued()


def test_a_stall_queues_one_finetune_and_a_second_stall_waits_for_it(tmp_path):
    stack = Stack(tmp_path, **FIRES)
    labelled_rounds(stack, [range(1, 9), range(9, 13)])
    state = stack.state()
    last = state.alignment.decisions[-1]
    assert last["decision"] == "update" and last["method"] == "ft" and last["gain"] is not None
    assert state.alignment.pending["stage"] == "finetune"
    assert stack.queued().count("align") == 1
    labelled_rounds(stack, [range(13, 17)])
    again = stack.state().alignment.decisions[-1]
    assert again["decision"] == "wait" and "already in progress" in again["reason"]
    assert stack.queued().count("align") == 1
    summary = alignment_summary(stack.state(), stack.runtime.settings)
    assert summary["pending"]["stage"] == "finetune" and summary["last_decision"] == again
    counters = stack.queue.counters()
    assert counters["decision_update:alignment"] == 1 and counters["decision_wait:alignment"] == 2


def test_a_forced_round_on_the_same_labels_keeps_the_history(tmp_path):
    stack = Stack(tmp_path, **FIRES)
    labelled_rounds(stack, [range(1, 9)])
    run_round(stack.ctx("round", force_round=True))  # Start Training: same 8 labels
    alignment = stack.state().alignment
    assert [d["decision"] for d in alignment.decisions] == ["wait", "wait"]
    assert "did not grow" in alignment.decisions[-1]["reason"] and len(alignment.scores) == 1
    assert "align" not in stack.queued()


def test_align_off_is_plain_svpp(tmp_path):
    stack = Stack(tmp_path, ALIGN="off", **FIRES)
    labelled_rounds(stack, [range(1, 9), range(9, 13)])
    alignment = stack.state().alignment
    assert [d["decision"] for d in alignment.decisions] == ["off", "off"] and not alignment.scores
    assert "align" not in stack.queued()


def test_a_finetune_that_cannot_read_its_images_ends_the_update_with_the_reason(tmp_path):
    stack = Stack(tmp_path, **FIRES)
    labelled_rounds(stack, [range(1, 9), range(9, 13)])
    assert stack.state().alignment.pending is not None
    # the fake tasks' images live on an unresolvable host: every image is skipped, so no class is left
    with pytest.raises(ValueError, match="class"):
        run_finetune(stack.ctx("align", method="ft"))
    alignment = stack.state().alignment
    assert alignment.pending is None and alignment.feature_model is None and alignment.updates == 0
    assert alignment.decisions[-1]["decision"] == "failed" and "ValueError" in alignment.decisions[-1]["reason"]
    assert stack.queue.counters()["decision_failed:alignment"] == 1


def test_finetune_needs_two_labelled_classes(tmp_path):
    stack = Stack(tmp_path)
    stack.fake.annotate(2, "cat")
    sync(stack.ctx("sync"))
    result = run_finetune(stack.ctx("finetune"))
    assert result["status"] == "skipped" and "two classes" in result["reason"]


def test_forced_update_records_the_decision_and_queues_the_finetune(tmp_path):
    stack = Stack(tmp_path)
    labelled_rounds(stack, [range(1, 9)])
    record = force_update(stack.runtime, PID)
    assert record["decision"] == "update" and record["method"] == "ft" and "asvp-backend align" in record["reason"]
    assert stack.state().alignment.pending["forced"] is True
    assert stack.queued().count("align") == 1


def test_an_interrupted_feature_update_extraction_is_queued_again_by_the_next_sync(tmp_path):
    stack = Stack(tmp_path)
    labelled_rounds(stack, [range(1, 9)])

    def extracting(current: ProjectState | None) -> ProjectState | None:
        assert current is not None
        current.alignment.pending = {"stage": "extract", "since": 1e12, "model": "m"}
        return current

    stack.runtime.store.update(PID, extracting)
    before = stack.queued().count("extract")
    follow_up(stack.ctx("sync"), stack.state(), TaskSnapshot(stack.runtime.settings.model_dir, PID).load())
    assert stack.queued().count("extract") == before + 1


def test_a_refreshed_generation_serves_and_the_next_round_ranks_on_it(tmp_path):
    stack = Stack(tmp_path, **FIRES)
    labelled_rounds(stack, [range(1, 9)])

    def fine_tuned(current: ProjectState | None) -> ProjectState | None:
        assert current is not None
        current.alignment.feature_model = "m1"
        current.alignment.pending = {"stage": "extract", "since": 1e12, "model": "m1"}
        # no held-out figure: the proxy keeps pre-annotating (the model's head is tested with a real checkpoint)
        current.alignment.record_model({"id": "m1", "labelled": 8, "holdout_accuracy": None, "at": 1.0,
                                        "method": "ft"})
        return current

    stack.runtime.store.update(PID, fine_tuned)
    write_checkpoint(ProjectLayout(stack.runtime.settings.model_dir, PID).checkpoint_dir("m1"), {"id": "m1"})
    g1 = stack.store.create_generation(GenerationInfo(1, "fake", "tuned", {}, DIM))
    g1.append(list(range(1, 41)), np.stack([_vector(t) * 2 for t in range(1, 41)]))
    stack.store.activate(1)
    generation_served(stack.runtime, PID, 1)
    state = stack.state()
    assert state.alignment.pending is None and state.alignment.generation_models == {"1": "m1"}
    record = run_round(stack.ctx("round", force_round=True))
    assert record["version"] == "asvp-g1-r2" and stack.fake.project["model_version"] == "asvp-g1-r2"
    # generation 1's history starts fresh: its first round has no trend to fit
    assert "generation 1" in stack.state().alignment.decisions[-1]["reason"]
    listed = generations_of(ProjectLayout(stack.runtime.settings.model_dir, PID), stack.state())
    assert [(g["generation"], g["current"], g["model"]) for g in listed] == [(0, False, None), (1, True, "m1")]
    assert listed[1]["versions"] == ["asvp-g1-r2"]
    assert model_summary(stack.state(), stack.runtime.settings)["current"]["id"] == "m1"


def test_pre_annotations_stay_the_proxy_without_a_model_of_these_features(tmp_path):
    stack = Stack(tmp_path)
    labelled_rounds(stack, [range(1, 9)])
    state, settings = stack.state(), stack.runtime.settings
    inputs = load_inputs(stack.store.current(), TaskSnapshot(settings.model_dir, PID).load())
    proxy_labels = np.array(["cat", "dog"])
    labels, why = pre_annotations(ProjectLayout(settings.model_dir, PID), state, inputs, 0, proxy_labels, [],
                                  settings, "cpu")
    assert why["source"] == "proxy" and "no fine-tuned model" in why["reason"] and labels is proxy_labels


def test_alignment_state_round_trips_and_old_states_still_load(tmp_path):
    stack = Stack(tmp_path, **FIRES)
    labelled_rounds(stack, [range(1, 9), range(9, 13)])
    state = stack.state()
    again = ProjectState.from_json(state.to_json())
    assert again.alignment == state.alignment and isinstance(again.alignment, AlignmentState)
    old = json.loads(state.to_json())
    del old["alignment"]
    old["score_history"] = []  # a state written before alignment existed
    loaded = ProjectState.from_json(json.dumps(old))
    assert loaded.alignment == AlignmentState() and loaded.round == state.round


# ------------------------------------------------------------------ the fine-tuned model against the proxy
def _items(labelling) -> list[tuple[int, str, str]]:
    return [(t, f"http://images.invalid/{t}.png", labelling(t)) for t in range(1, 41)]


def test_the_verdict_scores_both_models_on_the_same_held_out_tasks(tmp_path):
    stack = Stack(tmp_path)  # features: even tasks around +3, odd ones around -3
    settings, serving = stack.runtime.settings, Project(stack.runtime, PID).serving_generation()
    held = list(range(10))  # tasks 1..10; the proxy fits the other 30
    items = _items(lambda t: "cat" if t % 2 == 0 else "dog")  # labels the features separate
    truth = [items[i][2] for i in held]
    tie = judge_against_proxy(settings, serving, items, held, truth)
    assert tie["verdict"] == "proxy" and tie["model_accuracy"] == tie["proxy_accuracy"] == 1.0  # a tie: the proxy
    assert tie["n"] == 10 and tie["proxy_trained_on"] == 30 and tie["proxy"] == "logistic"
    assert tie["reason"] == ("the proxy is the better model: 1.000 for the fine-tuned model vs 1.000 for the proxy "
                             "(logistic) on the same 10 held-out labels")
    worse = judge_against_proxy(settings, serving, items, held, ["cat"] * 10)
    assert worse["verdict"] == "proxy" and worse["model_accuracy"] == 0.5 and worse["proxy_only"] == 5
    items = _items(lambda t: "cat" if t % 4 < 2 else "dog")  # labels the features cannot tell apart
    truth = [items[i][2] for i in held]
    win = judge_against_proxy(settings, serving, items, held, truth)
    assert win["verdict"] == "model" and win["model_accuracy"] == 1.0 > win["proxy_accuracy"]
    assert win["model_only"] == round(10 * (1 - win["proxy_accuracy"])) and win["proxy_only"] == 0
    assert win["reason"].startswith("the fine-tuned model beats the proxy: 1.000 for the fine-tuned model vs")
    none = judge_against_proxy(settings, serving, items, [], [])
    assert none["verdict"] == "unjudged" and "no held-out labels" in none["reason"]


def test_held_out_tasks_without_features_are_left_out_of_both_scores(tmp_path):
    stack = Stack(tmp_path)  # features for tasks 1..40 only
    items = _items(lambda t: "cat" if t % 2 == 0 else "dog") + [(41, "u", "dog"), (42, "u", "cat")]
    held = [40, 41, 0, 1]  # tasks 41 and 42 (no features), 1 and 2
    serving = Project(stack.runtime, PID).serving_generation()
    judged = judge_against_proxy(stack.runtime.settings, serving, items, held, ["cat", "dog", "dog", "cat"])
    assert judged["held_out"] == 4 and judged["n"] == 2 and judged["model_accuracy"] == 1.0


class PatternFetcher:
    """Images for the fake tasks: red stripes for even task ids (labelled cat), blue for odd ones (dog)."""

    def load(self, url: str, task_id: int):
        from PIL import Image, ImageDraw

        img = Image.new("RGB", (48, 48), (20, 20, 20))
        draw = ImageDraw.Draw(img)
        for k in range(0, 48, 8):
            box = [0, k, 48, k + 3] if task_id % 2 == 0 else [k, 0, k + 3, 48]
            draw.rectangle(box, fill=(220, 40, 40) if task_id % 2 == 0 else (40, 40, 220))
        return img


TINY_FINETUNE = {"BACKBONE": "test_efficientnet", "BACKBONE_WEIGHTS": "random", "IMAGE_SIZE": "32",
                 "FINETUNE_EPOCHS": "1", "FINETUNE_BATCH_SIZE": "8"}


def test_start_training_records_the_verdict_and_a_model_the_proxy_beat_is_not_the_deliverable(tmp_path,
                                                                                              monkeypatch):
    from asvp_backend.alignment.export import WorseThanProxy, export_model

    monkeypatch.setattr("asvp_backend.jobs.resources.image_fetcher", lambda settings, client: PatternFetcher())
    monkeypatch.setattr("asvp_backend.alignment.finetune.MIN_STEPS", 12)  # the real floor (150) takes too long here
    stack = Stack(tmp_path, **TINY_FINETUNE)
    stack.label(range(1, 41))
    sync(stack.ctx("sync"))
    reports: list[dict] = []
    ctx = stack.ctx("finetune")
    ctx.reporter = reports.append
    info = run_finetune(ctx)
    # FINETUNE_EPOCHS=1 is 4 steps over 32 training images: the (patched) step floor makes it 3 epochs, 12 steps
    assert info["epochs"] == 3 and info["ft_steps"] == 12 and info["holdout_size"] == 8
    stages = [r["stage"] for r in reports]
    assert {"loading", "lp", "ft", "evaluating", "comparing with the proxy"} <= set(stages)
    assert any(r["stage"] == "ft" and r["total"] == 12 and 0 < r["done"] < 12 for r in reports)  # "ft 5/12"
    comparison = info["comparison"]
    # the fake features separate the two classes perfectly: the proxy cannot be beaten, at best tied
    assert comparison["proxy_accuracy"] == 1.0 and comparison["n"] == 8 and info["verdict"] == "proxy"
    state = stack.state()
    (model,) = state.alignment.models
    assert model["verdict"] == "proxy" and model["comparison"] == comparison
    assert state.alignment.current_model() is None and state.alignment.newest_model() == model
    summary = model_summary(state, stack.runtime.settings)
    assert summary["current"] is None and summary["export"] is None
    best = summary["deliverable"]
    assert best["source"] == "proxy" and best["model"] == model["id"] and best["n"] == 8
    assert best["proxy_accuracy"] == 1.0 and best["model_accuracy"] == comparison["model_accuracy"]
    assert best["reason"].startswith("the proxy is the better model: ") and "--even-if-worse" in best["reason"]
    source = ProjectLayout(stack.runtime.settings.model_dir, PID).checkpoint_dir(model["id"])
    assert json.loads((source / "model.json").read_text())["verdict"] == "proxy"
    with pytest.raises(WorseThanProxy, match="the proxy is the better model.*--even-if-worse"):
        export_model(source, tmp_path / "out", {"project": PID})
    assert not (tmp_path / "out").exists()
    out = export_model(source, tmp_path / "out", {"project": PID}, even_if_worse=True)
    assert json.loads((out / "model.json").read_text())["exported_even_if_worse"] is True


def test_the_deliverable_is_the_newest_model_unless_the_proxy_beat_it():
    alignment = AlignmentState()
    state_models = [
        {"id": "old", "labelled": 20, "at": 1.0, "holdout_accuracy": 0.9},  # before verdicts existed: unjudged
        {"id": "m30", "labelled": 30, "at": 2.0, "holdout_accuracy": 0.8, "verdict": "model",
         "comparison": {"verdict": "model", "model_accuracy": 0.8, "proxy_accuracy": 0.7, "n": 10, "proxy": "mlp",
                        "reason": "the fine-tuned model beats the proxy: ..."}},
    ]
    for m in state_models:
        alignment.record_model(m)
    assert alignment.current_model()["id"] == "m30"
    lost = {"id": "m50", "labelled": 50, "at": 3.0, "holdout_accuracy": 0.7, "verdict": "proxy",
            "comparison": {"verdict": "proxy", "model_accuracy": 0.7, "proxy_accuracy": 0.9, "n": 10, "proxy": "mlp",
                           "reason": "the proxy is the better model: ..."}}
    alignment.record_model(lost)
    assert alignment.current_model() is None and alignment.newest_model()["id"] == "m50"
    alignment.record_model({**lost, "id": "m50b", "verdict": "model", "at": 4.0, "holdout_accuracy": 0.6})
    assert alignment.current_model()["id"] == "m50b"  # same labels: the one the proxy did not beat
    old = AlignmentState()
    old.record_model(state_models[0])
    assert old.current_model()["id"] == "old"


def test_with_audit_labels_the_fine_tuned_model_and_its_pre_annotations_are_judged_on_them(tmp_path, monkeypatch):
    """Start Training with 10 audit labels (AUDIT_MIN_LABELS=8): the fine-tune never sees them and the verdict is
    the gate's paired test on them; a generation that model extracted pre-annotates only if they say so."""
    from asvp_backend.alignment.integrity import CHECKPOINT_WEIGHTS
    from asvp_backend.features import create_backbone

    monkeypatch.setattr("asvp_backend.jobs.resources.image_fetcher", lambda settings, client: PatternFetcher())
    monkeypatch.setattr("asvp_backend.alignment.finetune.MIN_STEPS", 12)
    stack = Stack(tmp_path, AUDIT_MIN_LABELS="8", **TINY_FINETUNE)
    stack.label(range(1, 41))
    sync(stack.ctx("sync"))
    audit = list(range(31, 41))

    def with_audit(current: ProjectState | None) -> ProjectState | None:
        assert current is not None
        current.audit.started_labelled, current.audit.tasks = 0, audit
        return current

    stack.runtime.store.update(PID, with_audit)
    info = run_finetune(stack.ctx("finetune"))
    comparison = info["comparison"]
    assert info["labelled"] == 30 and comparison["judged_on"] == "audit" and comparison["n"] == 10
    assert comparison["proxy_trained_on"] == 30 and comparison["proxy_accuracy"] == 1.0  # cross-fitted
    assert comparison["gate"]["n"] == 10 and info["verdict"] == ("model" if comparison["gate"]["decision"] == "adopt"
                                                                 else "proxy")
    assert "audit labels" in comparison["reason"]

    # generation 1 extracted by that model: its head scores the cached features
    settings = stack.runtime.settings
    layout = ProjectLayout(settings.model_dir, PID)
    tuned = create_backbone("test_efficientnet", weights=layout.checkpoint_dir(info["id"]) / CHECKPOINT_WEIGHTS,
                            device="cpu", image_size=32)
    g1 = stack.store.create_generation(GenerationInfo(1, "test_efficientnet", "tuned", {}, tuned.dim))
    g1.append(list(range(1, 41)), tuned.embed_images([PatternFetcher().load("", t) for t in range(1, 41)]))
    stack.store.activate(1)
    state = stack.state()
    state.alignment.generation_models["1"] = info["id"]
    inputs = load_inputs(stack.store.current(), TaskSnapshot(settings.model_dir, PID).load())
    labels, why = pre_annotations(layout, state, inputs, 1, np.zeros(0), audit, settings, "cpu")
    assert why["judged_on"] == "audit" and why["gate"]["n"] == 10 and why["model"] == info["id"]
    assert why["source"] == ("model" if why["gate"]["decision"] == "adopt" else "proxy")
    assert why["reason"] == why["gate"]["reason"]
    few = dataclasses.replace(settings, audit_min_labels=60)
    _, fallback = pre_annotations(layout, state, inputs, 1, np.zeros(0), audit, few, "cpu")
    assert "AUDIT_MIN_LABELS=60" in fallback["reason"] and fallback["source"] == ("model" if info["verdict"] == "model"
                                                                                  else "proxy")


def test_training_method_audit_trains_lpft_and_ft_after_a_refresh_and_the_audit_labels_pick_the_deliverable(
        tmp_path, monkeypatch):
    monkeypatch.setattr("asvp_backend.jobs.resources.image_fetcher", lambda settings, client: PatternFetcher())
    monkeypatch.setattr("asvp_backend.alignment.finetune.MIN_STEPS", 12)
    stack = Stack(tmp_path, AUDIT_MIN_LABELS="8", TRAINING_METHOD="audit", **TINY_FINETUNE)
    stack.label(range(1, 41))
    sync(stack.ctx("sync"))

    def refreshed_with_audit(current: ProjectState | None) -> ProjectState | None:
        assert current is not None
        current.generation = 1  # a refresh served (its features do not matter here: the models are judged)
        current.audit.started_labelled, current.audit.tasks = 0, list(range(31, 41))
        return current

    stack.runtime.store.update(PID, refreshed_with_audit)
    best = run_finetune(stack.ctx("finetune"))  # no method given: the policy's, as Start Training queues it
    models = stack.state().alignment.models
    assert [m["method"] for m in models] == ["lpft", "ft"] and all(m["labelled"] == 30 for m in models)
    assert all(m["comparison"]["judged_on"] == "audit" and m["comparison"]["n"] == 10 for m in models)
    assert [c["id"] for c in best["candidates"]] == [m["id"] for m in models]
    lpft, ft = (m["comparison"]["model_accuracy"] for m in models)
    assert best["id"] == max(models, key=deliverable_rank)["id"] == stack.state().alignment.newest_model()["id"]
    if models[0]["verdict"] == models[1]["verdict"] and lpft != ft:
        assert best["method"] == ("lpft" if lpft > ft else "ft")  # the audit labels decide
