"""The `sync` and `train` jobs: bring the project's snapshot and state up to what Label Studio holds. A sync
reads what it needs from Label Studio, never from a webhook payload, so a lost or forged webhook can neither
lose nor inject a label (a webhook's ids only say which tasks the sync reads again; the reconcile catches
what a lost one did not say).

The chain (jobs/chain.py): `sync` reads the changed tasks (or every task), then queues `extract` (tasks without
features), else a `round` (when due), else a `rescore` (new tasks the current round has not ranked). `extract`
works in time slices and queues its own continuation, so one project's slow image server cannot hold the gpu
queue; a large extraction it splits into `extract_part:<k>` jobs for several gpu workers (jobs/extraction.py).
A round whose alignment decision fires queues `align` (a fine-tune, jobs/finetune.py), which queues `extract` of
the next generation; once that generation serves, a round on it follows (jobs/alignment.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from asvp_backend.alignment.policy import AlignmentPolicy
from asvp_backend.artefacts import round_versions_on_disk
from asvp_backend.config import ConfigError
from asvp_backend.jobs.chain import follow_up
from asvp_backend.jobs.changes import Changes
from asvp_backend.jobs.context import JobContext
from asvp_backend.labelstudio import credentials
from asvp_backend.labelstudio.images import image_value_problem
from asvp_backend.labelstudio.label_config import ClassificationSpec, LabelConfigError, parse_label_config
from asvp_backend.learning import reviewed_pre_annotations
from asvp_backend.state import ProjectState, StateCorrupt, SyncedTask, config_change

log = logging.getLogger(__name__)

TARGETED_MAX_TASKS = 1000  # more changed tasks than this are reconciled instead (a bulk import, a bulk delete)
RECONCILE_PAGE = 500  # tasks per request of a reconcile (keyset pages in id order)


def sync(ctx: JobContext) -> dict[str, Any]:
    """Bring the project's snapshot and state up to what Label Studio holds, then queue what follows
    (`timings`: seconds of each, so that a slow annotation-to-state path says where its time went)."""
    clock = time.perf_counter()
    summary, tasks, state = sync_tasks(ctx)
    read = time.perf_counter()
    summary["next"] = follow_up(ctx, state, tasks)
    summary["timings"] = {"read_and_save": round(read - clock, 3),
                          "follow_up": round(time.perf_counter() - read, 3)}
    return summary


def synced_task(task: dict[str, Any], spec: ClassificationSpec) -> SyncedTask:
    value = spec.image_of(task)
    problem = image_value_problem(value)
    annotations = tuple(sorted(int(a["id"]) for a in task.get("annotations") or () if isinstance(a.get("id"), int)))
    return SyncedTask(image=None if problem else str(value), label=spec.label_of(task), problem=problem,
                      annotations=annotations)


def sync_tasks(ctx: JobContext) -> tuple[dict[str, Any], dict[int, SyncedTask], ProjectState | None]:
    """The sync itself. A targeted read re-reads only the tasks the webhooks pointed at (jobs/changes.py).
    A reconcile reads every task again in time slices of RECONCILE_SLICE_SECONDS, each its own job, so a
    targeted read never waits behind it for longer than one slice: when a pointer cannot be followed or the
    counts do not add up, on Start Training, after an API start, from the status page, and when the last full
    read is older than RECONCILE_EVERY. A whole read (one job) builds a first or unreadable snapshot or state,
    and follows a label config change (`asvp-backend extract` and `/setup` ask for one too). The pointers a
    sync started from are cleared only after the snapshot is saved."""
    runtime, pid = ctx.runtime, ctx.project_id
    pending = runtime.changes.pending(pid)
    whole = _whole_read_reason(ctx)
    if whole is not None:
        result = _read_all(ctx, whole)
    else:
        opened = _open(ctx)
        if isinstance(opened, str):
            result = _read_all(ctx, opened)
        else:
            reason = _reconcile_reason(ctx, pending.changes, opened.state)
            reconciling = opened.state.reconcile is not None
            result = None
            if reason is None or reconciling:  # the pointers first: they never wait behind a whole reconcile
                result, why = _read_changed(ctx, opened, pending.changes, check=reason is None and not reconciling)
                reason = reason or why
            if reason or reconciling:
                result = _reconcile_slice(ctx, opened, reason or "continuing")
    runtime.changes.done(pid, pending.upto)
    assert result is not None
    return result


LABEL_CONFIG_CHANGED = "the label config changed"
SNAPSHOT_UNREADABLE = "the snapshot is unreadable"


@dataclass
class _Opened:
    """What a targeted read and a reconcile slice start from, read once per sync job (they may run one after
    the other in it): the state, Label Studio's project (its counts) and the snapshot, changed in place."""

    state: ProjectState
    client: Any
    project: dict[str, Any]
    tasks: dict[int, SyncedTask]


def _open(ctx: JobContext) -> _Opened | str:
    """The state, the project and the snapshot; or why only a whole read will do (every task's label under a
    new config, or a snapshot to rebuild)."""
    pid = ctx.project_id
    state = ctx.project.state()
    client = ctx.project.label_studio()
    project = client.get_project(pid)
    if (project.get("label_config") or state.label_config) != state.label_config:
        return LABEL_CONFIG_CHANGED
    try:
        tasks = ctx.project.tasks()
    except StateCorrupt as exc:
        return f"{SNAPSHOT_UNREADABLE} ({exc})"
    return _Opened(state, client, project, tasks)


def _whole_read_reason(ctx: JobContext) -> str | None:
    """Why this sync must read every task in one job, or None."""
    runtime, pid = ctx.runtime, ctx.project_id
    if ctx.params.get("whole"):
        return str(ctx.params.get("full_reason") or "requested")
    try:
        state = runtime.store.get(pid)
        snapshot_exists = ctx.project.snapshot.path.is_file()
    except StateCorrupt:
        return "the state is unreadable"
    if state is None or not snapshot_exists:
        return "first sync"
    return None


def _reconcile_reason(ctx: JobContext, changes: Changes, state: ProjectState) -> str | None:
    """Why this sync must reconcile (read every task again, in slices), or None when the pointers are enough."""
    if ctx.params.get("full"):
        return str(ctx.params.get("full_reason") or "requested")
    if ctx.kind == "train":
        return "Start Training"
    if changes.full:
        return "asked for: an event named no task to read, or the API started (webhooks may have been lost)"
    every = ctx.runtime.settings.reconcile_every
    if state.reconcile_due(every, time.time()):
        return f"reconcile due (RECONCILE_EVERY={every} s)"
    return None


def _read_changed(ctx: JobContext, opened: _Opened, changes: Changes, check: bool = True) -> tuple[
        tuple[dict[str, Any], dict[int, SyncedTask], ProjectState | None] | None, str | None]:
    """The targeted read: the project, then each pointed-at task. Returns (result, None), or (None, why a
    reconcile is needed instead). `check`: verify the task count and the newest id afterwards (not while a
    reconcile is under way: it is bringing them in)."""
    pid, started = ctx.project_id, time.time()
    state, client, project, tasks = opened.state, opened.client, opened.project, opened.tasks
    task_ids = set(changes.tasks)
    if changes.annotations:
        owner = {a: tid for tid, task in tasks.items() for a in task.annotations}
        unknown = sorted(changes.annotations - owner.keys())
        if unknown:
            return None, f"annotation(s) {unknown[:5]} of no task in the snapshot"
        task_ids |= {owner[a] for a in changes.annotations}
    if len(task_ids) > TARGETED_MAX_TASKS and check:
        return None, f"{len(task_ids)} tasks changed (more than {TARGETED_MAX_TASKS} read one by one)"
    reviews: list[tuple[int, str, bool]] = []
    previous = dict(tasks)
    for done, tid in enumerate(sorted(task_ids)):
        task = client.get_task(tid)
        if task is None or task.get("project", pid) != pid:  # deleted, or not this project's (a forged id)
            tasks.pop(tid, None)
        else:
            tasks[tid] = synced_task(task, state.spec)
            reviews += reviewed_pre_annotations(task, state.spec)
        ctx.progress(done + 1, len(task_ids), stage="reading changed tasks")
    total = int(project.get("task_number") or 0)
    if check and total != len(tasks):
        return None, f"Label Studio holds {total} tasks, the snapshot {len(tasks)} after the targeted read"
    newest = client.newest_task_id(pid) if check else None  # a lost create beside a lost delete keeps the count
    if newest is not None and newest > max(tasks, default=0):
        return None, f"task {newest} is newer than every task of the snapshot"
    return _save_sync(ctx, project, state, tasks, previous, reviews, started, read="targeted",
                      tasks_read=len(task_ids)), None


def _read_all(ctx: JobContext, reason: str) -> tuple[dict[str, Any], dict[int, SyncedTask], ProjectState | None]:
    """The whole read: every task and label in one job, from Label Studio into the snapshot and the state."""
    runtime, pid = ctx.runtime, ctx.project_id
    started = time.time()
    try:
        stored: ProjectState | None = runtime.store.require(pid)  # an unknown project fails before any call
    except StateCorrupt as exc:
        log.error("project %s: %s; rebuilding it from Label Studio", pid, exc)
        stored = None
    client = runtime.label_studio(pid)
    project = client.get_project(pid)
    state = stored if stored is not None else _rebuild_state(ctx, project)

    total = int(project.get("task_number") or 0)
    tasks: dict[int, SyncedTask] = {}
    reviews: list[tuple[int, str, bool]] = []  # served pre-annotations accepted or corrected (learning.py)
    spec = _spec_of(project, state)[0]
    for task in client.iter_tasks(pid):
        tasks[int(task["id"])] = synced_task(task, spec)
        reviews += reviewed_pre_annotations(task, spec)
        ctx.progress(len(tasks), max(total, len(tasks)), stage="reading tasks")
    _clear_connection_problem(ctx)
    try:
        previous = ctx.project.tasks()
    except StateCorrupt as exc:  # rebuilt right below from what Label Studio just said
        log.warning("project %s: %s; rebuilding it", pid, exc)
        previous = {}
    return _save_sync(ctx, project, state, tasks, previous, reviews, started, read="full", reason=reason,
                      reconcile=None, full_started=started)


def _reconcile_slice(ctx: JobContext, opened: _Opened, reason: str) -> tuple[
        dict[str, Any], dict[int, SyncedTask], ProjectState | None]:
    """One slice of a reconcile: tasks in id order from the last one read (keyset pages, stable while tasks are
    added or deleted), each page written over the snapshot; a snapshot task inside a page's id range that Label
    Studio no longer returns is gone. Queues the next slice until the last page; then the read is complete."""
    runtime, pid, started = ctx.runtime, ctx.project_id, time.time()
    state, client, project, tasks = opened.state, opened.client, opened.project, opened.tasks
    progress = dict(state.reconcile or {"started": started, "cursor": 0, "reason": reason, "read": 0})
    previous = dict(tasks)
    reviews: list[tuple[int, str, bool]] = []
    deadline = time.monotonic() + runtime.settings.reconcile_slice_seconds
    total = int(project.get("task_number") or 0)
    finished = False
    while not finished:
        cursor = int(progress["cursor"])
        page = client.tasks_after(pid, cursor, RECONCILE_PAGE)
        read = {int(task["id"]): task for task in page}
        finished = len(page) < RECONCILE_PAGE
        upper = None if finished else max(read)
        for tid in [t for t in tasks if t > cursor and (upper is None or t <= upper) and t not in read]:
            del tasks[tid]  # in the range just read, and not in Label Studio any more
        for tid, task in read.items():
            tasks[tid] = synced_task(task, state.spec)
            reviews += reviewed_pre_annotations(task, state.spec)
        progress["cursor"], progress["read"] = upper if upper is not None else cursor, progress["read"] + len(page)
        ctx.progress(int(progress["read"]), max(total, int(progress["read"])), stage="reconciling")
        if time.monotonic() >= deadline:
            break
    if finished:
        _clear_connection_problem(ctx)
    result = _save_sync(ctx, project, state, tasks, previous, reviews, started,
                        read="full" if finished else "reconcile", reason=str(progress["reason"]),
                        reconciled=int(progress["read"]), reconcile=None if finished else progress,
                        full_started=float(progress["started"]))
    if not finished:  # behind the other projects' jobs and this project's targeted reads
        runtime.queue.submit("sync", pid, reason="continuing the reconcile")
    return result


def _spec_of(project: dict[str, Any], state: ProjectState) -> tuple[ClassificationSpec, str, str | None]:
    """The label config to serve (Label Studio's, or the last good one when it cannot be served) and why not."""
    label_config = project.get("label_config") or state.label_config
    if label_config == state.label_config:
        return state.spec, label_config, None
    try:
        return parse_label_config(label_config), label_config, None
    except LabelConfigError as exc:  # keep serving the last good config, and say why
        return state.spec, state.label_config, str(exc)


def _save_sync(ctx: JobContext, project: dict[str, Any], state: ProjectState, tasks: dict[int, SyncedTask],
               previous: dict[int, SyncedTask], reviews: list[tuple[int, str, bool]], started: float, *,
               read: str, reconcile: dict[str, Any] | None | bool = False, full_started: float | None = None,
               **detail: Any) -> tuple[dict[str, Any], dict[int, SyncedTask], ProjectState | None]:
    """Save the snapshot, then record the sync in the state (the label config, pre-annotation reviews, and a
    reconcile's progress: `reconcile` False leaves it as it is, None ends it)."""
    pid = ctx.project_id
    spec, label_config, config_error = _spec_of(project, state)
    ctx.check_fence()  # a job whose lease was lost writes nothing more (jobs/fencing.py)
    ctx.project.snapshot.save(tasks)
    labelled = sum(1 for t in tasks.values() if t.label is not None)
    summary = {
        "at": time.time(),
        "read": read,
        **detail,
        "tasks": len(tasks),
        "labelled": labelled,
        "max_task_id": max(tasks, default=-1),
        "new_tasks": len(tasks.keys() - previous.keys()),
        "deleted_tasks": len(previous.keys() - tasks.keys()),
        "image_problems": sum(1 for t in tasks.values() if t.problem),
        "seconds": round(time.time() - started, 3),
        "config_error": config_error,
    }

    def record(current: ProjectState | None) -> ProjectState | None:
        if current is None:
            return None
        current.last_sync = summary
        if read == "full" and full_started is not None:
            current.last_full_sync = full_started
        if not isinstance(reconcile, bool):  # False: leave a reconcile under way as it is
            current.reconcile = reconcile
        current.title = str(project["title"])[:200] if project.get("title") else current.title
        current.record_config_change(config_change(current.spec, spec))
        current.acceptance.record(reviews)
        current.label_config, current.spec = label_config, spec
        current.record_job(ctx.job_id)
        return current

    new_state = ctx.project.update_state(record)
    ctx.progress(len(tasks), len(tasks), stage="done", force=True)
    log.info("project %s synced (%s read%s): %s tasks, %s labelled", pid, read,
             f", {detail['reason']}" if detail.get("reason") else "", len(tasks), labelled)
    return summary, tasks, new_state


def _clear_connection_problem(ctx: JobContext) -> None:
    """This sync read every task: a failed /setup check (a timeout on a busy machine) no longer applies,
    so `problems` stops showing it without waiting for Label Studio's next /setup."""
    layout = ctx.project.layout
    if credentials.problem(layout) is None:
        return
    try:
        conn = ctx.runtime.label_studio_connection(ctx.project_id)
    except ConfigError:
        return
    credentials.record_check(layout, {"ok": True, "at": time.time(), **conn.describe(), "problem": None})


def _rebuild_state(ctx: JobContext, project: dict[str, Any]) -> ProjectState:
    """A corrupt state is moved aside and rebuilt from Label Studio's label config and the newest round on
    disk (so the version never goes back)."""
    store, pid = ctx.runtime.store, ctx.project_id
    label_config = str(project.get("label_config") or "")
    spec = parse_label_config(label_config)  # a config we cannot serve: the job fails and says why
    store.quarantine(pid)
    fresh = ProjectState.recovered(pid, label_config, spec, round_versions_on_disk(ctx.project.layout))
    store.update(pid, lambda current: current if current is not None else fresh)
    return store.require(pid)


def train(ctx: JobContext) -> dict[str, Any]:
    """Start Training: sync, retrain the proxy whatever the number of new labels, and fine-tune the
    deliverable model with the policy's training methods (features refresh only through the trigger)."""
    ctx.params["force_round"] = True
    summary = sync(ctx)
    state = ctx.project.state()
    under_way = ctx.runtime.queue.active(ctx.project_id, frozenset({"finetune"}))
    if under_way is not None:  # pressed again meanwhile: one fine-tune of the same labels is enough
        summary["finetune"], summary["finetune_joined"] = under_way.id, True
        return summary
    methods = list(AlignmentPolicy.from_settings(ctx.runtime.settings).deliverable_methods(state.generation))
    summary["finetune"] = ctx.runtime.queue.submit("finetune", ctx.project_id, reason="Start Training",
                                                   methods=methods).job_id
    return summary


