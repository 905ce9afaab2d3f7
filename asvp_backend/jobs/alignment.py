"""Alignment in the jobs layer (shared by the job bodies, none itself): after each round, score the labelled set
and record the policy's decision; judge a fine-tuned model against the proxy on labels it did not train on;
choose the model that pre-annotates; and make a refreshed generation serve only through the gate. The
fine-tuning jobs themselves (`align` for a feature update, `finetune` for the deliverable model on Start
Training; two kinds, so that the queue's de-duplication never merges one into the other) are in
jobs/finetune.py.

The order that keeps a project serving throughout a feature update:
1. a round's decision fires: `pending` is set in the state (under the project's lock, so two rounds
   cannot both fire) and an `align` job (a fine-tune for the feature update) is queued on the gpu queue;
2. the fine-tuned checkpoint is written completely before the state names it (`feature_model`), then an
   `extract` job fills generation g+1 with its backbone, while rounds go on with generation g;
3. only a complete generation g+1 becomes current (features/store.py), `pending` is cleared and a round on
   the new features follows. A worker killed at any step leaves generation g serving; the job is retried
   (jobs/worker.py) and a `pending` older than twice JOB_TIMEOUT no longer blocks a new update.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from asvp_backend.alignment.gate import WAIT as GATE_WAIT
from asvp_backend.alignment.gate import Gate, GateDecision, Verdict, cross_fitted_right, judge_features, judge_model
from asvp_backend.alignment.policy import UPDATE, WAIT, AlignmentPolicy, Decision
from asvp_backend.config import Settings
from asvp_backend.features.store import FeatureGeneration, FeatureStore
from asvp_backend.jobs.context import JobContext
from asvp_backend.jobs.resources import Project, proxy_device
from asvp_backend.layout import ProjectLayout
from asvp_backend.state import AlignmentState, PendingStage, ProjectState

if TYPE_CHECKING:
    from asvp_backend.runtime import Runtime
    from asvp_backend.selection.queue import RoundInputs

log = logging.getLogger(__name__)

def pending_is_live(alignment: AlignmentState, job_timeout: int) -> bool:
    """An update in progress; one stuck for twice JOB_TIMEOUT (its jobs failed for good) no longer counts."""
    pending = alignment.pending
    return pending is not None and time.time() - float(pending.get("since", 0)) < 2 * job_timeout


def transferability(inputs: RoundInputs, seed: int) -> tuple[float | None, float | None, float]:
    """LogME and LogME-PED of the round's labelled set (alignment/transferability.py `labelled_set_scores`),
    and the seconds it took."""
    from asvp_backend.alignment.transferability import labelled_set_scores

    started = time.perf_counter()
    plain, ped = labelled_set_scores(inputs.x_lab, inputs.y_lab, inputs.x_pool, seed)
    return plain, ped, time.perf_counter() - started


def after_round(ctx: JobContext, inputs: RoundInputs, generation: int, version: str) -> dict[str, Any]:
    """Score the round's labelled set, let the policy decide, record it, and queue a fine-tune when it
    fires. Returns the decision record (also stored in the state)."""
    runtime, pid = ctx.runtime, ctx.project_id
    settings = runtime.settings
    policy = AlignmentPolicy.from_settings(settings)
    scores: tuple[float | None, float | None, float] = (None, None, 0.0)
    if policy.enabled:
        scores = transferability(inputs, settings.seed)
    plain, ped, seconds = scores
    labelled = len(inputs.y_lab)
    record: dict[str, Any] = {}

    def decide(current: ProjectState | None) -> ProjectState | None:
        if current is None:
            return None
        alignment = current.alignment
        history = alignment.score_history(generation)
        decision = policy.decide(generation=generation, labelled=labelled, logme=plain, logme_ped=ped,
                                 history=history, updates=alignment.updates,
                                 labels_at_last_update=alignment.labels_at_last_update)
        if decision.fires and pending_is_live(alignment, settings.job_timeout):
            decision = replace(decision, decision=WAIT, method=None,
                               reason=f"{decision.reason}; but an update is already in progress "
                                      f"({(alignment.pending or {}).get('stage')})")
        if ped is not None and (not history or history[-1][0] != labelled):
            alignment.record_score({"round": version, "generation": generation, "labelled": labelled,
                                    "logme": plain, "logme_ped": ped, "seconds": round(seconds, 3)})
        record.clear()
        record.update(decision.to_dict(), version=version, at=time.time(), seconds=round(seconds, 3))
        alignment.record_decision(dict(record))
        if decision.fires:
            alignment.pending = {"stage": PendingStage.FINETUNE, "since": time.time(), "version": version,
                                 "method": decision.method, "labelled": labelled}
        return current

    if runtime.store.update(pid, decide) is None:
        return {}  # the project was removed meanwhile
    runtime.queue.count(f"decision_{record['decision']}", "alignment")
    if record.get("decision") == UPDATE:
        record["job"] = runtime.queue.submit("align", pid, reason="features stalled (LogME-PED)",
                                             method=record["method"]).job_id
    log.info("project %s: alignment after %s: %s (%s)", pid, version, record.get("decision"), record.get("reason"))
    return record


def force_update(runtime: Runtime, pid: int) -> dict[str, Any]:
    """`asvp-backend align --project N`: fine-tune and refresh the features now, whatever the scores say
    (the cap and the minimums do not apply; an update in progress is replaced)."""
    policy = AlignmentPolicy.from_settings(runtime.settings)
    record: dict[str, Any] = {}

    def force(current: ProjectState | None) -> ProjectState | None:
        if current is None:
            return None
        labelled = current.rounds[-1]["labelled"] if current.rounds else 0
        method = policy.method_for(current.generation + 1)
        record.update(Decision(UPDATE, "forced by `asvp-backend align`", current.generation, labelled,
                               method=method).to_dict(), version=str(current.version), at=time.time())
        current.alignment.record_decision(dict(record))
        current.alignment.pending = {"stage": PendingStage.FINETUNE, "since": time.time(),
                                     "version": str(current.version), "method": method, "labelled": labelled,
                                     "forced": True}
        return current

    if runtime.store.update(pid, force) is None:
        raise KeyError(pid)
    record["job"] = runtime.queue.submit("align", pid, reason="forced feature update",
                                         method=record["method"]).job_id
    return record


# ------------------------------------------------------------------------------ the verdict against the proxy
MODEL, PROXY, UNJUDGED = Verdict.MODEL, Verdict.PROXY, Verdict.UNJUDGED
JUDGING = "comparing with the proxy"


def judge_against_proxy(settings: Settings, generation: FeatureGeneration | None,
                        items: Sequence[tuple[int, str, str]], held: Sequence[int],
                        predictions: Sequence[str]) -> dict[str, Any]:
    """The fine-tuned model against the proxy on the same held-out labelled tasks: both never trained on them.

    `held` are indices into `items` (task id, URL, label) that the fine-tune held out, `predictions` the
    fine-tuned model's class for each. The proxy is the rounds' kind (PROXY, SEED), fitted on the cached
    features of the current generation of every other labelled task, and scored on the held-out tasks that
    have features; the model is scored on the same tasks. The verdict is "model" only when the model is the
    more accurate: on a tie the proxy, which is already there, stays the better model. "unjudged" when there
    is nothing to compare on (no held-out slice, no features, fewer than two classes to fit the proxy on).
    On a generation extracted by a fine-tuned backbone, that backbone may have trained on the held-out tasks,
    which favours the proxy (`proxy_generation` says which features were used)."""
    from asvp_backend.selection import create_proxy

    if not held:
        return {"verdict": UNJUDGED, "reason": "not compared with the proxy: no held-out labels (fewer than 10 "
                                               "readable labelled images)", "n": 0}
    if generation is None:
        return {"verdict": UNJUDGED, "reason": "not compared with the proxy: no cached features", "n": 0}
    held_set = set(held)
    ids = np.array([tid for tid, _, _ in items], dtype=np.int64)
    labels = np.array([label for _, _, label in items], dtype=object)
    train_pos = np.array([i for i in range(len(items)) if i not in held_set], dtype=np.int64)
    test_pos = np.asarray(held, dtype=np.int64)
    found_train, x_train = generation.lookup(ids[train_pos])
    found_test, x_test = generation.lookup(ids[test_pos])
    y_train = labels[train_pos][found_train]
    record: dict[str, Any] = {"judged_on": "held-out", "n": int(found_test.sum()), "held_out": len(held),
                              "proxy": settings.proxy, "proxy_generation": generation.info.generation,
                              "proxy_trained_on": len(y_train)}
    if not record["n"] or len(set(y_train.tolist())) < 2:
        return {**record, "verdict": UNJUDGED,
                "reason": "not compared with the proxy: too few held-out or training tasks have features"}
    proxy = create_proxy(settings.proxy, device=proxy_device(settings.device), seed=settings.seed)
    proxy.fit(np.asarray(x_train, dtype=np.float32), y_train)
    truth = labels[test_pos][found_test]
    proxy_right = np.asarray(proxy.predict(np.asarray(x_test, dtype=np.float32))) == truth
    model_right = np.asarray(predictions, dtype=object)[found_test] == truth
    model_accuracy, proxy_accuracy = float(model_right.mean()), float(proxy_right.mean())
    verdict = MODEL if model_accuracy > proxy_accuracy else PROXY
    record.update(verdict=verdict, model_accuracy=model_accuracy, proxy_accuracy=proxy_accuracy,
                  model_only=int((model_right & ~proxy_right).sum()),
                  proxy_only=int((proxy_right & ~model_right).sum()))
    record["reason"] = verdict_text(record)
    return record


def judge_on_audit(settings: Settings, generation: FeatureGeneration | None, items: Sequence[tuple[int, str, str]],
                   audit_items: Sequence[tuple[int, str, str]], result: Any, fetcher: Any) -> dict[str, Any] | None:
    """The fine-tuned model against the proxy on the audit labels (the gate's paired test, alignment/gate.py):
    the model never trained on them, and each is predicted by a proxy fitted on every other label
    (cross-fitting), the proxy that serves. None while fewer than AUDIT_MIN_LABELS audit labels have a readable
    image and features (the held-out slice judges then, `judge_against_proxy`)."""
    from asvp_backend.alignment.checkpoint import FineTunedModel
    from asvp_backend.selection import create_proxy

    gate = Gate.from_settings(settings)
    if generation is None or len(audit_items) < gate.min_labels:
        return None
    ids, images, truth = [], [], []
    for tid, url, label in audit_items:
        try:
            images.append(fetcher.load(url, tid))
        except Exception:  # an unreadable audit image leaves the comparison, as it left the fine-tune
            continue
        ids.append(tid)
        truth.append(label)
    found, x_audit = generation.lookup(np.asarray(ids, dtype=np.int64))
    found_other, x_other = generation.lookup(np.asarray([tid for tid, _, _ in items], dtype=np.int64))
    y_other = np.array([label for _, _, label in items], dtype=object)[found_other]
    y_audit = np.array(truth, dtype=object)[found]
    if len(y_audit) < gate.min_labels:
        return None
    import torch

    model = FineTunedModel(result.model, result.backbone, result.classes, result.preprocessing, {},
                           torch.device("cpu"))
    probs = model.predict_proba([image for image, keep in zip(images, found.tolist(), strict=True) if keep])
    model_right = np.asarray(result.classes, dtype=object)[probs.argmax(axis=1)] == y_audit
    device = proxy_device(settings.device)
    record = judge_model(gate, lambda: create_proxy(settings.proxy, device=device, seed=settings.seed), model_right,
                         x_other, y_other, x_audit, y_audit, seed=settings.seed)
    if record is None:
        return None
    record.update(proxy=settings.proxy, proxy_generation=generation.info.generation, proxy_trained_on=int(len(y_other)))
    record["reason"] = verdict_text(record)
    return record


def verdict_text(comparison: dict[str, Any]) -> str:
    """One sentence with both figures, for the page, the CLI and the log."""
    verdict = comparison.get("verdict")
    if verdict not in (MODEL, PROXY):
        return str(comparison.get("reason") or "not compared with the proxy")
    on = "audit labels" if comparison.get("judged_on") == "audit" else "held-out labels"
    figures = (f"{comparison['model_accuracy']:.3f} for the fine-tuned model vs {comparison['proxy_accuracy']:.3f} "
               f"for the proxy ({comparison.get('proxy')}) on the same {comparison['n']} {on}")
    if comparison.get("judged_on") == "audit" and verdict == PROXY and comparison["model_accuracy"] > \
            comparison["proxy_accuracy"]:
        return f"the proxy stays the better model: the fine-tuned one is not better beyond noise ({figures})"
    if verdict == MODEL:
        return f"the fine-tuned model beats the proxy: {figures}"
    return f"the proxy is the better model: {figures}"


def finish_pending(runtime: Runtime, pid: int, purpose: str, model: str | None, failed: str | None = None) -> None:
    """An update that cannot go on ends here, with its reason among the decisions."""
    if purpose != "align":
        return

    def clear(current: ProjectState | None) -> ProjectState | None:
        if current is None:
            return None
        if failed:
            current.alignment.record_decision({"decision": "failed", "reason": failed, "at": time.time(),
                                               "generation": current.generation, "model": model})
        current.alignment.pending = None
        return current

    runtime.store.update(pid, clear)
    if failed:
        runtime.queue.count("decision_failed", "alignment")


def generation_served(runtime: Runtime, pid: int, generation: int, verdict: GateDecision | None = None) -> None:
    """Extraction made `generation` current: the update (if one was pending) is complete."""

    def done(current: ProjectState | None) -> ProjectState | None:
        if current is None:
            return None
        alignment = current.alignment
        if alignment.feature_model is not None:
            alignment.generation_models[str(generation)] = alignment.feature_model
        if verdict is not None:
            alignment.record_decision({"decision": "adopted", "reason": verdict.reason, "at": time.time(),
                                       "generation": generation, "model": alignment.feature_model,
                                       "gate": verdict.to_dict()})
        alignment.pending = None
        return current

    runtime.store.update(pid, done)


# ------------------------------------------------------------------------------------ the refresh gate
ADOPTED, REJECTED = "adopted", "rejected"  # the gate's decisions as the alignment history records them


def serve_generation(ctx: JobContext, store: FeatureStore,
                     generation: FeatureGeneration) -> tuple[bool, GateDecision | None]:
    """A complete new generation becomes current, unless it is a feature update's that the gate holds
    (rejected, or waiting for audit labels): then the serving generation stays. Returns (served, verdict)."""
    runtime, pid = ctx.runtime, ctx.project_id
    state = ctx.project.state()
    verdict = None
    if is_refresh(state.alignment) and (serving := store.current(repair=True)) is not None:
        verdict = judge_refresh(runtime, pid, serving, generation)
        if verdict is not None and not verdict.adopts:
            ctx.check_fence()
            refresh_held(runtime, pid, generation.info.generation, verdict)
            return False, verdict
    _activate(ctx, store, generation.info.generation, verdict)
    return True, verdict


def _activate(ctx: JobContext, store: FeatureStore, generation: int, verdict: GateDecision | None) -> None:
    """The one place a generation becomes current: fenced, then the store's switch, then the state's record."""
    ctx.check_fence()
    store.activate(generation)
    generation_served(ctx.runtime, ctx.project_id, generation, verdict)


def is_refresh(alignment: AlignmentState) -> bool:
    """The generation being extracted is a feature update's (its fine-tuned backbone extracts it), which the
    gate judges; the first generation and one made for a new BACKBONE serve as soon as they are complete."""
    pending = alignment.pending or {}
    model = alignment.feature_model
    return model is not None and pending.get("stage") == PendingStage.EXTRACT and pending.get("model") == model


def judge_refresh(runtime: Runtime, pid: int, serving: FeatureGeneration,
                  candidate: FeatureGeneration) -> GateDecision | None:
    """The gate's verdict on a refreshed generation against the serving one, on the audit labels with features
    in both (None: ALIGN_GATE=off, it serves unjudged)."""
    from asvp_backend.selection import create_proxy

    settings = runtime.settings
    if not settings.align_gate:
        return None
    project = Project(runtime, pid)
    state, tasks = project.state(), project.tasks()
    labelled = np.array(sorted(tid for tid, t in tasks.items() if t.label is not None), dtype=np.int64)
    found_s, x_s = serving.lookup(labelled)
    found_c, x_c = candidate.lookup(labelled)
    both = found_s & found_c
    ids = labelled[both]
    y = np.array([tasks[int(tid)].label for tid in ids.tolist()], dtype=object)
    device = proxy_device(settings.device)
    return judge_features(Gate.from_settings(settings),
                          lambda: create_proxy(settings.proxy, device=device, seed=settings.seed),
                          x_c[both[found_c]], x_s[both[found_s]], y,
                          np.isin(ids, np.asarray(state.audit.labelled(tasks), dtype=np.int64)), seed=settings.seed)


def refresh_held(runtime: Runtime, pid: int, generation: int, verdict: GateDecision) -> None:
    """A refreshed generation that may not serve: rejected (kept on disk, named in the decision) or waiting
    for enough audit labels. Either way the serving generation's backbone extracts new tasks again."""

    def hold(current: ProjectState | None) -> ProjectState | None:
        if current is None:
            return None
        alignment = current.alignment
        model = (alignment.pending or {}).get("model") or alignment.feature_model
        alignment.feature_model = alignment.generation_models.get(str(current.generation))
        if verdict.decision == GATE_WAIT:
            if (alignment.pending or {}).get("stage") != PendingStage.JUDGE:  # one decision per wait, not one per round
                alignment.record_decision({"decision": "waiting", "reason": verdict.reason, "at": time.time(),
                                           "generation": generation, "model": model, "gate": verdict.to_dict()})
            alignment.pending = {"stage": PendingStage.JUDGE, "since": time.time(), "model": model,
                                 "generation": generation, "audit": verdict.n}
        else:
            alignment.record_decision({"decision": REJECTED, "reason": verdict.reason, "at": time.time(),
                                       "generation": generation, "model": model, "gate": verdict.to_dict()})
            alignment.pending = None
        return current

    runtime.store.update(pid, hold)
    runtime.queue.count(f"decision_{'waiting' if verdict.decision == GATE_WAIT else REJECTED}", "alignment")
    log.info("project %s: refreshed generation %s %s: %s", pid, generation,
             "waits" if verdict.decision == GATE_WAIT else "rejected", verdict.reason)


def judge_waiting_refresh(ctx: JobContext, state: ProjectState, tasks: dict[int, Any]) -> dict[str, Any] | None:
    """A round's part: a refreshed generation that waited for audit labels is judged once there are enough.
    Adopted, it becomes current, its backbone extracts the tasks added meanwhile and a round on it follows."""

    runtime, pid = ctx.runtime, ctx.project_id
    pending = state.alignment.pending or {}
    if pending.get("stage") != PendingStage.JUDGE:
        return None
    if len(state.audit.labelled(tasks)) < runtime.settings.audit_min_labels:
        return None
    store = ctx.project.features()
    serving, generation = store.current(repair=True), int(pending["generation"])
    if serving is None or generation not in store.generations():
        finish_pending(runtime, pid, "align", pending.get("model"),
                        failed=f"the refreshed generation {generation} is gone from disk")
        return {"decision": "failed"}
    verdict = judge_refresh(runtime, pid, serving, store.generation(generation))
    if verdict is not None and not verdict.adopts:
        refresh_held(runtime, pid, generation, verdict)
        return verdict.to_dict()

    def adopt(current: ProjectState | None) -> ProjectState | None:
        if current is None:
            return None
        current.alignment.feature_model = pending.get("model")  # its backbone extracts the project from now on
        return current

    ctx.check_fence()
    runtime.store.update(pid, adopt)
    _activate(ctx, store, generation, verdict)
    runtime.queue.count("decision_adopted", "alignment")
    runtime.queue.submit("extract", pid, reason="adopted feature update", force_round=True)
    return verdict.to_dict() if verdict is not None else {"decision": ADOPTED, "reason": "ALIGN_GATE is off"}


# ------------------------------------------------------------------------------------ pre-annotations
def pre_annotations(layout: ProjectLayout, state: ProjectState, inputs: RoundInputs, generation: int,
                    proxy_labels: np.ndarray, audit_ids: Sequence[int], settings: Settings,
                    device: str) -> tuple[np.ndarray, dict[str, Any]]:
    """The labels to pre-annotate with: the proxy's, or the fine-tuned model's when that model extracted this
    generation (its head then scores the cached features, no image is read) and the audit labels say it is the
    better one (the gate's paired test: the model never trained on them, each is predicted by a proxy that did
    not). While the audit labels are too few, the model's own verdict decides (judged on its held-out slice)."""
    model_id = state.alignment.generation_models.get(str(generation))
    model = next((m for m in state.alignment.models if m.get("id") == model_id), None)
    if model is None:
        return proxy_labels, {"source": "proxy", "reason": "no fine-tuned model extracted these features"}
    from asvp_backend.alignment.checkpoint import CheckpointError, load_checkpoint
    from asvp_backend.selection import create_proxy

    try:
        fine_tuned = load_checkpoint(layout.checkpoint_dir(model["id"]), device="cpu")
    except CheckpointError as exc:  # a damaged checkpoint is a problem on the status page, not a failed round
        return proxy_labels, {"source": "proxy", "reason": f"the fine-tuned model is damaged: {exc}"[:300],
                              "model": model_id}
    is_audit = np.isin(inputs.lab_ids, np.asarray(audit_ids, dtype=np.int64))
    gate = Gate.from_settings(settings)
    choice: dict[str, Any] = {"model": model_id}
    proxy_right = cross_fitted_right(lambda: create_proxy(settings.proxy, device=device, seed=settings.seed),
                                     inputs.x_lab[~is_audit], inputs.y_lab[~is_audit], inputs.x_lab[is_audit],
                                     inputs.y_lab[is_audit], seed=settings.seed) if is_audit.any() else None
    if proxy_right is not None and len(proxy_right) >= gate.min_labels:
        head = fine_tuned.head_proba(inputs.x_lab[is_audit])
        model_right = np.asarray(fine_tuned.classes, dtype=object)[head.argmax(axis=1)] == inputs.y_lab[is_audit]
        verdict = gate.judge(model_right, proxy_right, what="the fine-tuned model's labels")
        choice.update(judged_on="audit", gate=verdict.to_dict(), model_accuracy=verdict.challenger_accuracy,
                      proxy_accuracy=verdict.incumbent_accuracy)
        better, why = verdict.adopts, verdict.reason
    else:
        comparison = model.get("comparison") or {}
        choice.update(judged_on=comparison.get("judged_on", "held-out"), model_accuracy=comparison.get(
            "model_accuracy"), proxy_accuracy=comparison.get("proxy_accuracy"))
        better = model.get("verdict") == MODEL
        why = (f"{len(proxy_right) if proxy_right is not None else 0} audit labels (AUDIT_MIN_LABELS="
               f"{gate.min_labels}); the model's own verdict: {comparison.get('reason') or model.get('verdict')}")
    if not better:
        return proxy_labels, {"source": "proxy", "reason": why, **choice}
    labels = proxy_labels  # no unlabelled task: nothing to label
    if len(inputs.x_pool):
        probs = fine_tuned.head_proba(np.asarray(inputs.x_pool))
        labels = np.asarray(fine_tuned.classes).astype(str)[probs.argmax(axis=1)]
    return labels, {"source": "model", "reason": why, **choice}
