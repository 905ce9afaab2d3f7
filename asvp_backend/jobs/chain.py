"""What a job queues after it: the chain sync -> extract -> round / rescore, decided in one place.

A job never calls the next job's body: it queues the next kind by name, so each step runs under its own lease and
time limit, and a burst of events collapses into one waiting job (jobs/queue.py).
"""

from __future__ import annotations

import numpy as np

from asvp_backend.artefacts import read_ranking
from asvp_backend.features.store import FeatureGeneration
from asvp_backend.jobs.context import JobContext
from asvp_backend.layout import ProjectLayout
from asvp_backend.state import PendingStage, ProjectState, SyncedTask


def follow_up(ctx: JobContext, state: ProjectState | None, tasks: dict[int, SyncedTask]) -> str:
    """Queue what the sync made necessary: extraction for tasks without features, else a round when due,
    else a cheap scoring of tasks the current round has not ranked."""
    if state is None:
        return "none"
    runtime, pid = ctx.runtime, ctx.project_id
    force = bool(ctx.params.get("force_round"))
    generation = ctx.project.serving_generation()
    with_image = [tid for tid, task in tasks.items() if task.image]
    if generation is None or set(generation.missing(with_image)) - set(generation.skipped()) or force:
        runtime.queue.submit("extract", pid, reason="tasks without features", force_round=force)
        return "extract"
    if (state.alignment.pending or {}).get("stage") == PendingStage.EXTRACT:  # an update's extraction was cut off
        runtime.queue.submit("extract", pid, reason="feature update")
    return after_features(ctx, state, tasks, generation, force)


def after_features(ctx: JobContext, state: ProjectState, tasks: dict[int, SyncedTask], generation: FeatureGeneration,
                    force: bool) -> str:
    runtime, pid = ctx.runtime, ctx.project_id
    labelled = sum(1 for t in tasks.values() if t.label is not None)
    if round_due(labelled, state.labels_at_last_round, len(state.rounds), runtime.settings.retrain_every, force):
        runtime.queue.submit("round", pid, reason="new labels", force_round=force)
        return "round"
    if unranked_pool(ctx.project.layout, state, generation, tasks):
        runtime.queue.submit("rescore", pid, reason="new tasks without a score")
        return "rescore"
    return "none"


def after_extraction(ctx: JobContext, activated: bool, force: bool) -> str:
    """Queue what a finished extraction made necessary: a round at once when new features began to serve (or
    features caught up with the labels), else what a sync would queue."""
    project = ctx.project
    state, tasks, generation = project.state(), project.tasks(), project.serving_generation()
    if generation is None:
        return "none"
    force = force or bool(activated and state.round)  # new features: rank with them at once
    if not force:
        force = labels_caught_up(state, tasks, generation, ctx.runtime.settings.retrain_every)
    return after_features(ctx, state, tasks, generation, force)


def labels_caught_up(state: ProjectState, tasks: dict[int, SyncedTask], generation: FeatureGeneration,
                     retrain_every: int) -> bool:
    """A round counts every label it saw, but trains only on labelled tasks that had features: when the
    extraction has since given features to RETRAIN_EVERY more of them, a round is due although no label
    changed (bench/results/load_cpu.md found the ranking lagging behind the labels without this)."""
    if not state.rounds:
        return False
    labelled = [tid for tid, task in tasks.items() if task.label is not None]
    with_features = len(labelled) - len(generation.missing(labelled))
    return with_features - int(state.rounds[-1].get("labelled", 0)) >= retrain_every


def round_due(labelled: int, labels_at_last_round: int, rounds_done: int, retrain_every: int, force: bool) -> bool:
    """The one rule for when a round runs: on Start Training, for the first ranking, and then whenever
    `retrain_every` labels (`labels_between_rounds`) were added (or removed) since the last round."""
    return force or rounds_done == 0 or abs(labelled - labels_at_last_round) >= retrain_every


def unranked_pool(layout: ProjectLayout, state: ProjectState, generation: FeatureGeneration,
                  tasks: dict[int, SyncedTask]) -> list[int]:
    """Unlabelled tasks with features that the current round's ranking does not hold (added since)."""
    if not state.round:
        return []
    ranking = read_ranking(layout, state.version)
    if ranking is None:
        return []
    ranked = set(ranking.task_ids.tolist())
    unlabelled = np.array([tid for tid, t in tasks.items() if t.label is None and tid not in ranked], dtype=np.int64)
    found, _ = generation.lookup(unlabelled)
    return [int(t) for t in unlabelled[found].tolist()]
