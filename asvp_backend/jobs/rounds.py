"""The `round` job: retrain the proxy on the labelled tasks' cached features, rank the unlabelled pool and
push the ranking into Label Studio (SVPp inside Label Studio); and the `rescore` job, which scores tasks
added since the round with the round's own proxy.

Order of writes, so that a crash at any point leaves a consistent picture and a re-run converges:
1. the round's artefacts are written completely, then renamed into place (artefacts.py);
2. predictions of the new version are deleted (a re-run after a crash never averages two sets), then
   imported;
3. the project's model_version is switched (Label Studio now serves the new ranking), and its "label next"
   Data Manager tab is kept;
4. the backend's state advances to the new version at once, so /versions and /setup list what Label
   Studio already follows;
5. only then the slow bookkeeping: our older versions are deleted in Label Studio, old round folders are
   pruned, and the cross-validated accuracy (bounded) is added to the round's record;
6. last, the alignment policy scores the labelled set and may queue a feature update (jobs/alignment.py).
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from asvp_backend.artefacts import RankingArtefact, extend_ranking, proxy_path, prune_rounds, write_round
from asvp_backend.config import Settings
from asvp_backend.features.store import FeatureGeneration
from asvp_backend.jobs.alignment import after_round, judge_waiting_refresh, pre_annotations
from asvp_backend.jobs.chain import round_due, unranked_pool
from asvp_backend.jobs.context import JobContext
from asvp_backend.jobs.resources import proxy_device
from asvp_backend.jobs.stop_set import predict_stop_set
from asvp_backend.labelstudio.label_config import ClassificationSpec
from asvp_backend.learning import accuracy_fields
from asvp_backend.prediction import UNRANKED_SUFFIX
from asvp_backend.selection.queue import (
    QueueSettings,
    RoundInputs,
    RoundRanking,
    audit_estimate,
    place_audit,
    rank_pool,
)
from asvp_backend.state import AuditState, ProjectState, SyncedTask
from asvp_backend.versioning import ModelVersion

if TYPE_CHECKING:
    from asvp_backend.runtime import Runtime

log = logging.getLogger(__name__)

UNCERTAINTY_SAMPLING = "Uncertainty sampling"
CV_MAX_LABELS = 1000  # the cross-validation subsamples to this many labels: a bounded cost per round
CV_FOLDS = 3


AUTO_SECONDS_PER_LABEL = 3.0  # RETRAIN_EVERY=auto: a quick annotator's time on one image (single choice)
AUTO_MAX_LABELS = 10  # ... and never fewer rounds than the former default, RETRAIN_EVERY=10


def labels_between_rounds(setting: int | str, round_seconds: float | None) -> int:
    """RETRAIN_EVERY for the next round: a number as it is set; `auto` (the default): after as many labels
    as the last round, with the sync before it, took periods of AUTO_SECONDS_PER_LABEL (at least 1, at most
    AUTO_MAX_LABELS; 1 before any round was timed). A round's cost grows with the project's size (the pool it
    ranks, its push and the deletion of an old version are per prediction) and with the proxy
    (an MLP fits four times per round on a CPU): bench/results/cadence_cpu.md. So a project whose round takes
    at most ~3 s is re-ranked after every label, and the rounds of an annotator who labels an image per ~3 s
    or slower never queue behind each other."""
    if isinstance(setting, int):
        return setting
    if round_seconds is None:
        return 1
    return min(AUTO_MAX_LABELS, max(1, math.ceil(round_seconds / AUTO_SECONDS_PER_LABEL - 1e-9)))


def last_round_seconds(state: ProjectState) -> float | None:
    """What the last round cost with the sync before it (its recorded timings), or None when untimed."""
    timings = (state.rounds[-1].get("timings") or {}) if state.rounds else {}
    if not timings:
        return None
    return float(sum(timings.values())) + float((state.last_sync or {}).get("seconds") or 0.0)


def load_inputs(generation: FeatureGeneration, tasks: dict[int, SyncedTask]) -> RoundInputs:
    ids, vectors = generation.matrix()
    row_of = {int(tid): row for row, tid in enumerate(ids.tolist())}
    labelled = [(tid, t.label) for tid, t in tasks.items() if t.label is not None and tid in row_of]
    pool_ids = np.array([tid for tid, t in tasks.items() if t.label is None and tid in row_of], dtype=np.int64)
    dim = vectors.shape[1]
    lab_rows = np.array([row_of[tid] for tid, _ in labelled], dtype=np.int64)
    pool_rows = np.array([row_of[tid] for tid in pool_ids.tolist()], dtype=np.int64)
    return RoundInputs.from_arrays(
        np.array([tid for tid, _ in labelled], dtype=np.int64), np.asarray(vectors[lab_rows], dtype=np.float32),
        np.array([label for _, label in labelled], dtype=object), pool_ids, vectors[pool_rows].reshape(-1, dim),
        labelled_total=sum(1 for t in tasks.values() if t.label is not None))


def audit_since(audit: AuditState, inputs: RoundInputs, tasks: dict[int, SyncedTask]) -> tuple[int, int]:
    """(labels since the audit started, audit labels): what places this round's audit picks."""
    assert audit.started_labelled is not None
    return max(0, inputs.labelled_total - audit.started_labelled), len(audit.labelled(tasks))


def predictions_for(spec: ClassificationSpec, version: ModelVersion, task_ids: np.ndarray, scores: np.ndarray,
                    labels: np.ndarray) -> list[dict[str, Any]]:
    """Label Studio predictions; `spec.prediction_result` is the one rule for which labels may be written."""
    return [
        {
            "task": int(tid),
            "result": spec.prediction_result(str(label)) if label else [],
            "score": float(score),
            "model_version": str(version),
        }
        for tid, score, label in zip(task_ids.tolist(), scores.tolist(), labels.tolist(), strict=True)
    ]


def push_ranking(client: Any, pid: int, spec: ClassificationSpec, version: ModelVersion, pool_ids: np.ndarray,
                 ranking: RoundRanking, settings: Settings) -> tuple[np.ndarray, int]:
    """Steps 2 and 3: predictions of the new version for the top of the ranking, then the project follows
    that version (and keeps its "label next" Data Manager tab). Returns the pushed pool rows, best first,
    and the tab's id."""
    rows = np.argsort(ranking.scores, kind="stable")[: settings.push_top_k]
    predictions = predictions_for(spec, version, pool_ids[rows], ranking.scores[rows], ranking.labels[rows])
    client.delete_model_version(pid, str(version))  # a re-run after a crash must not average two sets
    client.import_predictions(pid, predictions)
    # every task labelled: no prediction of the version exists, and Label Studio refuses to follow it (400)
    fields: dict[str, Any] = {"model_version": str(version)} if predictions else {}
    if settings.ls_sampling == "uncertainty":
        fields["sampling"] = UNCERTAINTY_SAMPLING
    if fields:
        client.update_project(pid, **fields)
    return rows, client.ensure_ranking_view(pid)


def run_round(ctx: JobContext) -> dict[str, Any]:
    runtime, pid = ctx.runtime, ctx.project_id
    settings = runtime.settings
    layout = ctx.project.layout
    state = ctx.project.state()
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str, step: int) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 4)
        clock = now
        ctx.progress(step, 7, stage=name, force=True)

    generation = ctx.project.serving_generation()
    if generation is None:
        return {"status": "skipped", "reason": "no cached features yet"}
    tasks = ctx.project.tasks()
    labelled_now = sum(1 for t in tasks.values() if t.label is not None)
    force = bool(ctx.params.get("force_round"))
    every = labels_between_rounds(settings.retrain_cadence, last_round_seconds(state))
    if not round_due(labelled_now, state.labels_at_last_round, len(state.rounds), every, force):
        # checked again here, under the round's lease: two syncs in a row must not make two rounds
        return _not_due(ctx, state, generation, tasks, abs(labelled_now - state.labels_at_last_round), every)
    inputs = load_inputs(generation, tasks)
    lap("load_features", 1)

    device = proxy_device(settings.device)
    version = ModelVersion(generation.info.generation, state.round + 1)
    queue = QueueSettings.from_settings(settings)
    ranking = rank_pool(inputs, queue, version.round, device,
                        batch=settings.batch_size if settings.batch_size is not None else every)
    if ranking.proxy is not None:
        ranking.labels, label_source = pre_annotations(layout, state, inputs, version.generation, ranking.labels,
                                                       state.audit.labelled(tasks), settings, device)
    else:
        label_source = {"source": None, "reason": "cold start: no label is suggested"}
    audit = state.audit.started(inputs.lab_ids.tolist(), inputs.labelled_total, queue.audit.existing_random)
    audit_picks = inputs.pool_ids[place_audit(ranking, inputs, queue, *audit_since(audit, inputs, tasks))]
    ctx.check_fence()  # the stop set is drawn (written) at the first round
    stop, stop_entry = predict_stop_set(layout, settings.seed, inputs.pool_ids, generation, ranking.proxy,
                                        previous_version=state.version)
    lap("train_and_rank", 2)
    ctx.check_fence()  # a job whose lease was lost writes nothing more (jobs/fencing.py)
    write_round(layout, version, RankingArtefact(inputs.pool_ids, ranking.scores, ranking.labels), ranking.proxy,
                stop=stop)
    lap("save", 3)
    client = runtime.label_studio(pid)
    pushed, view_id = push_ranking(client, pid, state.spec, version, inputs.pool_ids, ranking, settings)
    lap("push", 4)

    record: dict[str, Any] = {
        "round": version.round,
        "version": str(version),
        "generation": version.generation,
        "at": time.time(),
        "labelled": len(inputs.y_lab),
        "classes": len(set(inputs.y_lab.tolist())),
        "pool": int(len(inputs.pool_ids)),
        "pushed": int(len(pushed)),
        "strategy": ranking.strategy,
        "proxy": settings.proxy if ranking.proxy is not None else None,
        "cv_accuracy": None,
        "audit": None,
        "audit_picks": len(audit_picks),
        "top_tasks": [int(inputs.pool_ids[r]) for r in pushed[:10]],
        "view_id": view_id,
        "pre_annotations": label_source,
        "alignment": None,
        "stop": stop_entry,
        "timings": timings,
    }

    def commit(current: ProjectState | None) -> ProjectState | None:
        if current is None:
            return None
        current.advance_to(version)
        current.labels_at_last_round = inputs.labelled_total
        if current.audit.started_labelled is None:
            current.audit.started_labelled, current.audit.tasks = audit.started_labelled, list(audit.tasks)
        current.audit.placed(tasks, audit_picks.tolist())
        current.record_round(record)
        current.record_job(ctx.job_id)
        return current

    ctx.project.update_state(commit)  # step 4: right after the switch
    record["deleted_versions"] = _delete_old_versions(client, pid, previous=state.version, current=version)
    ctx.check_fence()
    prune_rounds(layout, keep={str(version), str(state.version)})
    lap("cleanup", 5)
    record["cv_accuracy"] = _cross_validate(ranking, inputs, settings, device)
    record.update(accuracy_fields(record["cv_accuracy"], min(len(inputs.y_lab), CV_MAX_LABELS)))  # n, interval
    record["audit"] = _audit_estimate_of_round(state, ranking, inputs, tasks, version, settings, device)
    lap("cross_validate", 6)
    waited = judge_waiting_refresh(ctx, state, tasks)  # a refreshed generation that waited for audit labels
    alignment = after_round(ctx, inputs, version.generation, str(version))
    if waited is not None:
        alignment["gate"] = waited
    record["alignment"] = {k: alignment.get(k) for k in ("decision", "reason", "logme", "logme_ped", "gain", "job",
                                                          "gate")}
    lap("alignment", 7)
    _amend_round(runtime, pid, version, record)
    log.info("project %s: round %s (%s) ranked %s tasks, pushed %s", pid, version, ranking.strategy,
             len(inputs.pool_ids), len(pushed))
    return record


def _not_due(ctx: JobContext, state: ProjectState, generation: FeatureGeneration, tasks: dict[int, SyncedTask],
             changed: int, every: int) -> dict[str, Any]:
    """A round job that finds no round due. Under RETRAIN_EVERY=auto a sync queues a round at every label
    (Settings.retrain_every is 1) and the round applies the project's cadence here; the sync then queued
    no rescore, so tasks added since the round are scored by a rescore job, as the sync would have."""
    result: dict[str, Any] = {"status": "skipped", "labels_since_round": changed, "retrain_every": every,
                              "reason": "no round due (labels unchanged since the last round)" if not changed else
                              f"no round due ({changed} of {every} labels since the last round)"}
    settings = ctx.runtime.settings
    if every > settings.retrain_every and unranked_pool(ctx.project.layout, state, generation, tasks):
        result["next"] = "rescore"
        ctx.runtime.queue.submit("rescore", ctx.project_id, reason="new tasks without a score")
    return result


def _cross_validate(ranking: RoundRanking, inputs: RoundInputs, settings: Settings, device: str) -> float | None:
    """Cross-validated proxy accuracy on at most CV_MAX_LABELS labels (a stratified sample): a figure for
    people, not a decision input, so its cost is bounded (CV_FOLDS fits of a small proxy)."""
    from asvp_backend.selection import create_proxy, cross_val_accuracy

    if ranking.proxy is None:
        return None
    x, y = inputs.x_lab, inputs.y_lab
    if len(y) > CV_MAX_LABELS:
        rng = np.random.default_rng(settings.seed)
        keep = rng.choice(len(y), CV_MAX_LABELS, replace=False)
        x, y = x[keep], y[keep]
    return cross_val_accuracy(lambda: create_proxy(settings.proxy, device=device, seed=settings.seed), x, y,
                              folds=CV_FOLDS, seed=settings.seed)


def _audit_estimate_of_round(state: ProjectState, ranking: RoundRanking, inputs: RoundInputs,
                             tasks: dict[int, SyncedTask], version: ModelVersion, settings: Settings,
                             device: str) -> dict[str, Any] | None:
    """The round's audit estimate: measured again when the audit labels changed (AUDIT_FOLDS proxy fits), else
    the last one carried forward with the version it was measured at (most rounds add no audit label)."""
    if ranking.proxy is None:
        return None
    audit_ids = state.audit.labelled(tasks)
    n = int(np.isin(inputs.lab_ids, np.asarray(audit_ids, dtype=np.int64)).sum())
    last = next((r.get("audit") for r in reversed(state.rounds) if r.get("audit")), None)
    if last is not None and last.get("n") == n and last.get("generation") == version.generation:
        return {**last, "carried": True}
    estimate = audit_estimate(inputs, audit_ids, QueueSettings.from_settings(settings), device)
    if estimate is None:
        return None
    return {**estimate, "generation": version.generation, "version": str(version), "carried": False}


def _amend_round(runtime: Runtime, pid: int, version: ModelVersion, record: dict[str, Any]) -> None:
    """Add what was measured after the commit (accuracy, cleanup) to the round's stored record."""

    def amend(current: ProjectState | None) -> ProjectState | None:
        if current is None:
            return None
        for stored in reversed(current.rounds):
            if stored.get("version") == str(version):
                stored.update(record)
                return current
        return None  # the record was trimmed meanwhile: nothing to amend

    runtime.store.update(pid, amend)


def _delete_old_versions(client: Any, pid: int, previous: ModelVersion, current: ModelVersion) -> list[str]:
    """Keep the current and the previous version's predictions; delete our older ones and every placeholder
    for unranked tasks up to this round."""
    deleted = []
    for text in client.model_versions(pid):
        try:  # "<version>-unranked": /predict's placeholders for tasks a round had not ranked (prediction.py)
            version = ModelVersion.parse(text.removesuffix(UNRANKED_SUFFIX))
        except ValueError:
            continue  # not ours: leave it alone
        if text.endswith(UNRANKED_SUFFIX) and version <= current:
            client.delete_model_version(pid, text)  # this round ranked every unlabelled task
            deleted.append(text)
        elif version < previous and version != current:
            client.delete_model_version(pid, text)
            deleted.append(text)
    return deleted


# --------------------------------------------------------------------------------------------- rescore
def rescore_new_tasks(ctx: JobContext) -> dict[str, Any]:
    """Score tasks added since the round with the round's own proxy and strategy (no retrain), add them
    to the round's ranking and push their predictions under the current version."""
    from asvp_backend.selection import SelectionInput, create_strategy, load_proxy

    runtime, pid = ctx.runtime, ctx.project_id
    settings = runtime.settings
    layout = ctx.project.layout
    state = ctx.project.state()
    generation = ctx.project.serving_generation()
    if generation is None or not state.round or generation.info.generation != state.generation:
        return {"status": "skipped", "reason": "no current round on the current features"}
    tasks = ctx.project.tasks()
    new_ids = unranked_pool(layout, state, generation, tasks)
    if not new_ids:
        return {"status": "skipped", "reason": "every unlabelled task with features is ranked"}
    found, vectors = generation.lookup(new_ids)
    ids = np.asarray(new_ids, dtype=np.int64)[found]
    device = proxy_device(settings.device)
    saved = proxy_path(layout, state.version)
    probs, labels = None, np.full(len(ids), "")
    if saved is not None:
        proxy = load_proxy(saved, device=device)
        probs = proxy.predict_proba(np.asarray(vectors))
        labels = np.asarray(proxy.classes_).astype(str)[probs.argmax(axis=1)]
        strategy_name = state.rounds[-1].get("strategy", settings.strategy) if state.rounds else settings.strategy
    else:
        proxy, strategy_name = None, "random"  # cold start: typicality needs the whole pool; keep it cheap
    strategy = create_strategy(strategy_name, seed=settings.seed + state.round, epsilon=0.0, device=device)
    # budget 0: no new picks, only the strategy's per-task score (set-based ones: the proxy's margin)
    pool = np.asarray(vectors)
    no_labels = np.zeros((0, pool.shape[1]), dtype=np.float32)
    scores = np.asarray(strategy.rank(SelectionInput(pool, probs, no_labels, proxy), 0).scores)
    ctx.check_deadline()
    ctx.check_fence()
    extend_ranking(layout, state.version, RankingArtefact(ids, scores.astype(np.float32), labels))
    predictions = predictions_for(state.spec, state.version, ids, scores, labels)
    runtime.label_studio(pid).import_predictions(pid, predictions)
    log.info("project %s: scored %s new task(s) under %s", pid, len(ids), state.version)
    return {"status": "scored", "tasks": len(ids), "version": str(state.version), "strategy": strategy_name}


def selection_round(ctx: JobContext) -> dict[str, Any]:
    """Retrain the proxy, rank the unlabelled tasks and push the ranking into Label Studio."""
    return run_round(ctx)


def rescore(ctx: JobContext) -> dict[str, Any]:
    """Score new tasks with the current round's proxy (no retrain) and push their predictions."""
    return rescore_new_tasks(ctx)
