"""Label Studio's ML-backend protocol: `/` and `/health`, `/setup`, `/predict`, `/webhook` and `/versions`.

/health must answer within Label Studio's 1 s at all times, so nothing slow runs on the event loop: bodies
are read there but parsed (when large) and handled in the thread pool; the middleware has refused what it
can before a byte of the body was read (middleware.py). The API never trains: webhooks become deduplicated
jobs. What the routes remember between requests (ProtocolMemory) is one app's, on `app.state.protocol`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from asvp_backend import __version__
from asvp_backend.alignment.summary import generations_of
from asvp_backend.artefacts import round_versions_on_disk
from asvp_backend.jobs.changes import MAX_POINTERS, Changes, changes_of
from asvp_backend.jobs.queue import Submitted
from asvp_backend.labelstudio.label_config import LabelConfigError, parse_label_config
from asvp_backend.prediction import predict_tasks
from asvp_backend.runtime import Runtime
from asvp_backend.server.deps import MetricsDep, RuntimeDep, UnknownProject, project_state
from asvp_backend.server.errors import validation_problems
from asvp_backend.server.redis_probe import RedisProbe
from asvp_backend.server.schemas import (
    INLINE_JSON_BYTES,
    BadRequest,
    PredictRequest,
    SetupRequest,
    WebhookRequest,
    check_tasks,
    gc_paused,
    openapi_body,
    parse_extra_params,
    parse_json_object,
    parse_project_id,
    read_body,
    read_json,
    release_gradually,
    take_tasks,
    validate_body,
)
from asvp_backend.server.setup_check import SetupCheck
from asvp_backend.server.webhooks import EVENT_TRIGGERS, IGNORED_EVENTS, joined_message
from asvp_backend.state import ProjectState, StateCorrupt, config_change
from asvp_backend.versioning import ModelVersion

log = logging.getLogger(__name__)

MAX_PREDICT_TASKS = 10_000

router = APIRouter()


class ProtocolMemory:
    """What the protocol routes of one app remember between requests."""

    def __init__(self, runtime: Runtime) -> None:
        url = runtime.settings.redis_url
        self.redis_probe = RedisProbe(url) if url else None  # closed when the app stops (app.py's lifespan)
        self.known_projects: set[int] = set()  # seen by /setup or found in the store: the webhook's fast path
        self.setup_check = SetupCheck(runtime)  # can the backend read the project's tasks? (reported, never refused)
        # per project, the state /predict last read: served while Redis restarts
        self.last_states: dict[int, ProjectState] = {}


async def app_memory(request: Request) -> ProtocolMemory:
    return request.app.state.protocol


MemoryDep = Annotated[ProtocolMemory, Depends(app_memory)]


@router.get("/")
@router.get("/health")
async def health(request: Request, runtime: RuntimeDep, memory: MemoryDep) -> Any:
    """Always 200 (Label Studio disconnects a backend whose health check fails); `status` is DEGRADED
    while Redis does not answer, and `redis` says why. A browser asking for `/` (Accept: text/html) is
    sent to the status page; Label Studio, curl and scripts (Accept: */* or JSON) get the JSON."""
    if request.url.path == "/" and "text/html" in request.headers.get("accept", ""):
        return RedirectResponse("/ui/", status_code=303)
    report: dict[str, Any] = {
        "status": "UP",
        "model_class": "asvp-backend",
        "version": __version__,
        "queue": "rq" if runtime.settings.redis_url else "in-process",
        "redis": "not used",
    }
    if memory.redis_probe is not None:
        report["redis"] = await memory.redis_probe.state()
        if report["redis"] != "ok":
            report["status"] = "DEGRADED"
    return report


@router.post("/setup", openapi_extra=openapi_body(SetupRequest))
async def setup(request: Request, runtime: RuntimeDep, memory: MemoryDep) -> JSONResponse:
    raw = await read_body(request)
    return await run_in_threadpool(setup_from_body, runtime, memory, raw)


def setup_from_body(runtime: Runtime, memory: ProtocolMemory, raw: bytearray) -> JSONResponse:
    store, queue = runtime.store, runtime.queue
    try:
        body = validate_body(SetupRequest, parse_json_object(raw))
        project_id = parse_project_id(body.project)
        parse_extra_params(body.extra_params)  # checked, not used: nothing in them changes the backend
    except (BadRequest, RequestValidationError) as exc:
        # Label Studio shows only "400 Client Error" (or 422): the reason is in our log
        reason = validation_problems(exc) if isinstance(exc, RequestValidationError) else str(exc)
        log.warning("/setup refused: %s", reason)
        raise
    try:
        spec = parse_label_config(body.label_config)
    except LabelConfigError as exc:
        log.warning("project %s: /setup refused the label config: %s", project_id, exc)
        return JSONResponse({"detail": str(exc), "status": "error"}, status_code=400)
    why_sync: list[str] = []

    def remember(current: ProjectState | None) -> ProjectState:
        why_sync.clear()  # the update may run again after a conflict
        if current is None:
            why_sync.append("connected")
            return ProjectState.new(project_id, body.label_config, spec)
        if current.last_sync is None:
            why_sync.append("connected, not synced yet")
        elif current.label_config != body.label_config:
            why_sync.append("label config changed")
        current.record_config_change(config_change(current.spec, spec, source="setup"))
        # never reset the counters a round has advanced (the label-studio-ml template bug)
        current.label_config, current.spec = body.label_config, spec
        return current

    try:
        state = store.update(project_id, remember)
    except StateCorrupt as exc:  # reconnecting repairs it: a fresh state from the newest round on disk
        log.error("project %s: %s; /setup rebuilds it", project_id, exc)
        store.quarantine(project_id)
        fresh = ProjectState.recovered(project_id, body.label_config, spec,
                                       round_versions_on_disk(runtime.layout(project_id)))
        state = store.update(project_id, lambda current: current if current is not None else fresh)
        why_sync[:] = ["state rebuilt"]
    assert state is not None
    memory.known_projects.add(project_id)
    connection = memory.setup_check(project_id, body.hostname, body.access_token)
    reply = {"model_version": str(state.version), "status": "ok", **connection}
    under_way = queue.active(project_id, frozenset({"sync"})) if why_sync else None
    if under_way is not None:  # Label Studio calls /setup twice on connecting: one first read is enough
        reply["sync"] = {"job": under_way.id, "reason": f"{why_sync[0]}; the first sync is under way"}
    elif why_sync and connection.get("label_studio", {}).get("tasks_readable"):
        # ranked before the first task is opened: the sync queues extraction and the cold-start round
        submitted = queue.submit("sync", project_id, reason=f"/setup: {why_sync[0]}", whole=True,
                                 full_reason=f"/setup: {why_sync[0]}")
        reply["sync"] = {"job": submitted.job_id, "reason": why_sync[0]}
    return JSONResponse(reply)


@router.post("/predict", openapi_extra=openapi_body(PredictRequest))
async def predict(request: Request, runtime: RuntimeDep, memory: MemoryDep) -> JSONResponse:
    raw = await read_body(request)
    return await run_in_threadpool(predict_from_body, runtime, memory, raw)


def predict_from_body(runtime: Runtime, memory: ProtocolMemory, raw: bytearray) -> JSONResponse:
    with gc_paused() if len(raw) > INLINE_JSON_BYTES else contextlib.nullcontext():
        data = parse_json_object(raw)
        tasks = take_tasks(data)
        try:
            return serve_predictions(runtime, memory, validate_body(PredictRequest, data), tasks)
        finally:
            release_gradually(tasks)


def serve_predictions(runtime: Runtime, memory: ProtocolMemory, body: PredictRequest,
                      tasks: list[Any]) -> JSONResponse:
    store, queue = runtime.store, runtime.queue
    if body.project is None:
        raise BadRequest("project is required")
    project_id = parse_project_id(body.project)
    if len(tasks) > MAX_PREDICT_TASKS:
        raise BadRequest(f"at most {MAX_PREDICT_TASKS} tasks per request; send smaller batches")
    task_ids = [task["id"] for task in check_tasks(tasks)]
    redis_down = False
    try:
        state = store.get(project_id)
    except (RedisConnectionError, RedisTimeoutError):
        # Redis down: serve the last good state this process read, else the newest round on the shared
        # volume with the label config Label Studio sends along (a fresh API process has read nothing)
        state = memory.last_states.get(project_id) or state_from_disk(runtime, memory, project_id, body.label_config)
        redis_down = True
        if state is None:
            raise
    else:
        if state is not None:
            memory.last_states[project_id] = state
    if state is None:
        if not body.label_config:
            raise UnknownProject(project_id, "connect the backend to it first (/setup)")
        try:
            spec = parse_label_config(body.label_config)
        except LabelConfigError as exc:
            raise BadRequest(str(exc)) from None
        state = ProjectState.new(project_id, body.label_config, spec)
    outcome = predict_tasks(runtime.settings.model_dir, state, task_ids)
    if not redis_down and store.exists(project_id) and runtime.has_label_studio(project_id):
        if outcome.problem:  # the round's ranking is unreadable: a new round replaces it
            queue.submit("round", project_id, reason=outcome.problem[:200], force_round=True)
        elif outcome.needs_sync(state):
            # tasks no sync has seen yet: a (deduplicated) sync reads them, extracts them and re-ranks
            asked = frozenset(int(t) for t in task_ids)
            runtime.changes.note_now(project_id, Changes(tasks=asked) if len(asked) <= MAX_POINTERS
                                     else Changes(full=True))
            queue.submit("sync", project_id, reason="predict asked for tasks no sync has seen")
    # rendered here, in the worker thread: FastAPI would encode a returned dict on the event loop
    return JSONResponse({"results": outcome.results})


def state_from_disk(runtime: Runtime, memory: ProtocolMemory, project_id: int,
                    label_config: str | None) -> ProjectState | None:
    """What /predict serves while Redis is down in a process that never read the project: the newest
    complete round folder (rounds are published whole, so any one found is servable) and the label config
    of the request. None when either is missing."""
    if not label_config:
        return None
    try:
        spec = parse_label_config(label_config)
    except LabelConfigError:
        return None
    state = ProjectState.recovered(project_id, label_config, spec, round_versions_on_disk(runtime.layout(project_id)))
    if not state.round:
        return None
    log.warning("project %s: Redis is down; serving round %s from the shared volume", project_id, state.version)
    memory.last_states[project_id] = state  # once per process and outage, not on every request
    return state


@router.post("/webhook", openapi_extra=openapi_body(WebhookRequest))
async def webhook(request: Request, runtime: RuntimeDep, metrics: MetricsDep, memory: MemoryDep) -> JSONResponse:
    # async on purpose: a burst of webhooks is answered on the event loop; only the rare call that
    # really enqueues a job goes to the thread pool (bench/results/api_cpu.md). The secret was checked
    # by the middleware before the body was read.
    store, queue = runtime.store, runtime.queue
    body = validate_body(WebhookRequest, await read_json(request))
    action = body.action
    label = action if action in EVENT_TRIGGERS or action in IGNORED_EVENTS else "other"
    trigger = EVENT_TRIGGERS.get(action)
    if trigger is None:
        outcome = "ignored" if action in IGNORED_EVENTS else "unknown"
        metrics.webhooks.labels(label, outcome).inc()
        return JSONResponse({"status": "ignored", "reason": f"{outcome} event {action[:60]!r}"})
    project_id = parse_project_id(body.project)
    if project_id not in memory.known_projects:
        if not await run_in_threadpool(store.exists, project_id):
            metrics.webhooks.labels(action, "unknown_project").inc()
            return JSONResponse({"status": "ignored", "reason": f"project {project_id} is not set up"})
        memory.known_projects.add(project_id)
    if trigger.joins:
        under_way = await run_in_threadpool(queue.active, project_id, trigger.joins)
        if under_way is not None:
            metrics.webhooks.labels(action, "deduplicated").inc()
            message = joined_message(under_way.kind, under_way.status.value, under_way.progress)
            return JSONResponse({"status": "ok", "job": under_way.id, "deduplicated": True, "message": message})
    if trigger.job == "sync":  # pointers for the sync's targeted read, never data (jobs/changes.py)
        await runtime.changes.note(project_id, changes_of(action, body.model_dump()))
    waiting = await queue.waiting_job(trigger.job, project_id)
    if waiting is not None:
        submitted = Submitted(waiting, deduplicated=True)
    else:
        submitted = await run_in_threadpool(queue.submit, trigger.job, project_id, trigger.reason)
    metrics.webhooks.labels(action, "deduplicated" if submitted.deduplicated else "queued").inc()
    reply: dict[str, Any] = {"status": "ok", "job": submitted.job_id, "deduplicated": submitted.deduplicated}
    if trigger.joins:
        reply["message"] = ("Start Training queued: the backend reads the labels, retrains the ranking model "
                            "and fine-tunes the backbone; progress on the status page (/ui/)")
    return JSONResponse(reply, status_code=201 if not submitted.deduplicated else 200)


@router.get("/versions")
def versions(runtime: RuntimeDep, project: str | None = Query(default=None)) -> JSONResponse:
    """Every model version the backend served (one project's, with its feature generations, when asked)."""
    if project is not None:
        state = project_state(parse_project_id(project), runtime)
        generations = generations_of(runtime.layout(state.project_id), state)
        return JSONResponse({"versions": newest_first(state.versions), "generations": generations})
    states, corrupt = runtime.store.readable()  # one broken project never hides the others' versions
    for project_id, problem in corrupt.items():
        log.error("project %s: %s", project_id, problem)
    return JSONResponse({"versions": newest_first({v for state in states for v in state.versions})})


def newest_first(versions: Iterable[str]) -> list[str]:
    def key(text: str) -> tuple[int, int, str]:
        try:
            v = ModelVersion.parse(text)
            return (v.generation, v.round, text)
        except ValueError:
            return (-1, -1, text)

    return sorted(set(versions), key=key, reverse=True)
