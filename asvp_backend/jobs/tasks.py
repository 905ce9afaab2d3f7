"""The job functions. Each reads what it needs from Label Studio and the shared volume, never from a
webhook payload, so a lost or forged webhook can neither lose nor inject a label."""

from __future__ import annotations

import logging
import time
from typing import Any

from asvp_backend.jobs.context import JobContext
from asvp_backend.jobs.extraction import extract_project, feature_store
from asvp_backend.jobs.registry import register_job
from asvp_backend.jobs.rounds import round_due, run_round
from asvp_backend.labelstudio.client import task_image, task_label
from asvp_backend.labelstudio.label_config import LabelConfigError, parse_label_config
from asvp_backend.state import ProjectState, SyncedTask, TaskSnapshot

log = logging.getLogger(__name__)


@register_job("sync", queue="cpu")
def sync(ctx: JobContext) -> dict[str, Any]:
    """Read the project's tasks and labels from Label Studio, record them, queue what follows."""
    summary, tasks, state = sync_tasks(ctx)
    summary["next"] = _follow_up(ctx, state, tasks, summary["labelled"])
    return summary


def sync_tasks(ctx: JobContext) -> tuple[dict[str, Any], dict[int, SyncedTask], ProjectState | None]:
    """The sync itself: every task and label, from Label Studio into the snapshot and the state."""
    runtime, pid = ctx.runtime, ctx.project_id
    state = runtime.store.require(pid)
    client = runtime.label_studio()
    started = time.time()

    spec, config_error = state.spec, None
    project = client.get_project(pid)
    label_config = project.get("label_config") or state.label_config
    if label_config != state.label_config:
        try:
            spec = parse_label_config(label_config)
        except LabelConfigError as exc:  # keep serving the last good config, and say why
            config_error, label_config = str(exc), state.label_config

    total = int(project.get("task_number") or 0)
    tasks: dict[int, SyncedTask] = {}
    for task in client.iter_tasks(pid):
        tasks[int(task["id"])] = SyncedTask(image=task_image(task, spec), label=task_label(task, spec))
        ctx.progress(len(tasks), max(total, len(tasks)), stage="reading tasks")
    snapshot = TaskSnapshot(runtime.settings.model_dir, pid)
    previous = snapshot.load()
    snapshot.save(tasks)

    labelled = sum(1 for t in tasks.values() if t.label is not None)
    summary = {
        "at": time.time(),
        "tasks": len(tasks),
        "labelled": labelled,
        "new_tasks": len(tasks.keys() - previous.keys()),
        "deleted_tasks": len(previous.keys() - tasks.keys()),
        "seconds": round(time.time() - started, 3),
        "config_error": config_error,
    }

    def record(current: ProjectState | None) -> ProjectState | None:
        if current is None:
            return None
        current.last_sync = summary
        current.label_config, current.spec = label_config, spec
        current.record_job(ctx.job_id)
        return current

    state = runtime.store.update(pid, record)
    ctx.progress(len(tasks), len(tasks), stage="done", force=True)
    log.info("project %s synced: %s tasks, %s labelled", pid, len(tasks), labelled)
    return summary, tasks, state


def _follow_up(ctx: JobContext, state: ProjectState | None, tasks: dict[int, SyncedTask], labelled: int) -> str:
    """Queue what the sync made necessary: extraction for tasks without features, else a round when due."""
    if state is None:
        return "none"
    force = bool(ctx.params.get("force_round"))
    generation = feature_store(ctx.runtime.settings.model_dir, ctx.project_id).current()
    with_image = [tid for tid, task in tasks.items() if task.image]
    if generation is None or set(generation.missing(with_image)) - set(generation.skipped()) or force:
        ctx.runtime.queue.submit("extract", ctx.project_id, reason="tasks without features", force_round=force)
        return "extract"
    if round_due(labelled, state.labels_at_last_round, len(state.rounds), ctx.runtime.settings.retrain_every, force):
        ctx.runtime.queue.submit("round", ctx.project_id, reason="new labels", force_round=force)
        return "round"
    return "none"


@register_job("extract", queue="gpu")
def extract(ctx: JobContext) -> dict[str, Any]:
    """Cache features for the project's tasks that lack them (and drop deleted tasks)."""
    runtime = ctx.runtime
    force = bool(ctx.params.get("force_round"))
    summary = extract_project(ctx, retry_skipped=force)
    state = runtime.store.require(ctx.project_id)
    labelled = (state.last_sync or {}).get("labelled", 0)
    if round_due(labelled, state.labels_at_last_round, len(state.rounds), runtime.settings.retrain_every, force):
        runtime.queue.submit("round", ctx.project_id, reason="features ready", force_round=force)
        summary["next"] = "round"
    return summary


@register_job("round", queue="cpu")
def selection_round(ctx: JobContext) -> dict[str, Any]:
    """Retrain the proxy, rank the unlabelled tasks and push the ranking into Label Studio."""
    return run_round(ctx)


@register_job("train", queue="cpu")
def train(ctx: JobContext) -> dict[str, Any]:
    """Start Training: sync with Label Studio, then retrain whatever the number of new labels."""
    ctx.params["force_round"] = True
    return sync(ctx)


@register_job("ping", queue="cpu")
def ping(ctx: JobContext) -> dict[str, Any]:
    """Answer from a worker: proves a worker listens and can report progress (`asvp-backend status`)."""
    import os
    import socket

    for step in range(3):
        ctx.progress(step + 1, 3, stage="ping", force=True)
    return {"pid": os.getpid(), "host": socket.gethostname(), "project": ctx.project_id}
