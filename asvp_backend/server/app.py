"""The API process: the Label Studio ML-backend protocol plus jobs, versions and metrics.

/health must answer within Label Studio's 1 s at all times, so nothing slow runs on the event loop: bodies
are read there but parsed (when large) and handled in the thread pool, and the middleware refuses what it
can (Host, cross-site requests, credentials, webhook secret, body size, Content-Type; guards.py) before a byte
of the body is read. The API never trains: webhooks become deduplicated jobs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from redis import Redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from asvp_backend import __version__
from asvp_backend.alignment.summary import alignment_summary, generations_of, model_summary
from asvp_backend.artefacts import round_versions_on_disk
from asvp_backend.health import project_problems
from asvp_backend.jobs.alignment import force_update
from asvp_backend.jobs.changes import MAX_POINTERS, Changes, changes_of
from asvp_backend.jobs.queue import Submitted
from asvp_backend.labelstudio.label_config import LabelConfigError, parse_label_config
from asvp_backend.logs import install_secret_filter, secrets_of
from asvp_backend.prediction import predict_tasks
from asvp_backend.runtime import Runtime
from asvp_backend.server.guards import RequestGuard
from asvp_backend.server.metrics import Metrics
from asvp_backend.server.reconcile import reconcile_schedule
from asvp_backend.server.schemas import (
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
    release_gradually,
    take_tasks,
    validate_body,
)
from asvp_backend.server.setup_check import SetupCheck
from asvp_backend.server.ui import ui_router
from asvp_backend.server.webhooks import EVENT_TRIGGERS, IGNORED_EVENTS, joined_message
from asvp_backend.state import ProjectState, StateCorrupt, config_change
from asvp_backend.stopping import StopRule
from asvp_backend.versioning import ModelVersion

log = logging.getLogger(__name__)

KiB, MiB = 1024, 1024 * 1024
HEALTH_ROUTES = {"/", "/health"}  # `curl http://host:9090/` is how Label Studio's guides check a backend
OPEN_ROUTES = HEALTH_ROUTES | {"/webhook"}  # Label Studio's auto-created webhook carries no credentials
KNOWN_ROUTES = HEALTH_ROUTES | {"/setup", "/predict", "/webhook", "/versions", "/metrics", "/jobs"}
# Body limits per route, each also capped by MAX_BODY_BYTES (which alone bounds /predict: Label Studio sends
# every task of a "Retrieve Predictions" in one request). Webhooks: Label Studio sends bulk events with up
# to WEBHOOK_BATCH_SIZE = 5000 tasks or annotations in one payload, so a small bound would refuse real
# TASKS_CREATED events; 8 MiB holds 5000 tasks of about 1.6 KB. /setup carries one label config.
BODY_LIMITS = {"/webhook": 8 * MiB, "/setup": 4 * MiB}
OTHER_BODY_LIMIT = 64 * KiB  # routes that take no body
INLINE_JSON_BYTES = 256 * KiB  # bodies above this are parsed in a worker thread, not on the event loop
MAX_PREDICT_TASKS = 10_000
WEBHOOK_SECRET_HEADER = "x-webhook-secret"
WARM_UP_TIMEOUT_S = 2.0  # a hung Redis must not hold the server's start for the clients' read timeout
# /projects/N/align reads no body, but like every route that changes something it takes JSON only (guards.py)
ALIGN_REQUEST = {"requestBody": {"required": False, "content": {"application/json": {"schema": {"type": "object"}}}}}


class BodyTooLarge(Exception):
    pass


class LimitsAndAuth:
    """ASGI middleware: refuse forged requests (a Host not allowed, a cross-site browser request, a body that is
    not JSON: guards.py), check basic auth and the webhook secret, cap the body size per route, and time every
    request for /metrics. Everything it refuses is refused before the body is read."""

    def __init__(self, app: Any, runtime: Runtime, metrics: Metrics) -> None:
        self.app = app
        settings = runtime.settings
        self.limits = {path: min(limit, settings.max_body_bytes) for path, limit in BODY_LIMITS.items()}
        self.limits["/predict"] = settings.max_body_bytes
        self.other_limit = min(OTHER_BODY_LIMIT, settings.max_body_bytes)
        user, password = settings.basic_auth_user, settings.basic_auth_pass
        self.expected = f"{user}:{password}".encode() if user and password else None
        self.webhook_secret = settings.webhook_secret.encode() if settings.webhook_secret else None
        self.metrics = metrics
        self.guard = RequestGuard(settings.allowed_hosts)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path = scope["path"]
        route = path if path in KNOWN_ROUTES else "other"
        limit = self.limits.get(path, self.other_limit)
        status_holder = {"status": 500}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            method = scope.get("method", "GET")
            # Host and cross-site first: a forged form never gets a 401 that would make the browser ask for a login
            refusal = self.guard.check_host(path, headers) or self.guard.check_cross_site(method, headers)
            if refusal is not None:
                await _send_json(send_wrapper, refusal.status, {"detail": refusal.detail})
                return
            if self.expected is not None and path not in OPEN_ROUTES and not self._authorised(headers):
                await _send_json(
                    send_wrapper,
                    401,
                    {"detail": "authentication required"},
                    extra=[(b"www-authenticate", b'Basic realm="asvp-backend"')],
                )
                return
            if path == "/webhook" and not self._webhook_secret_ok(scope, headers):
                self.metrics.webhooks.labels("unread", "forbidden").inc()
                await _send_json(send_wrapper, 403, {"detail": "bad or missing webhook secret"})
                return
            declared = _declared_length(headers)
            if declared is not None and declared > limit:
                await _send_json(send_wrapper, 413, {"detail": f"request body over {limit} bytes"})
                return
            refusal = self.guard.check_content_type(method, path, headers)
            if refusal is not None:
                await _send_json(send_wrapper, refusal.status, {"detail": refusal.detail})
                return
            await self.app(scope, _capped(receive, limit), send_wrapper)
        except BodyTooLarge:
            await _send_json(send_wrapper, 413, {"detail": f"request body over {limit} bytes"})
        finally:
            self.metrics.observe(
                route, scope.get("method", "?"), status_holder["status"], time.perf_counter() - started
            )

    def _authorised(self, headers: dict[str, str]) -> bool:
        value = headers.get("authorization", "")
        if not value.lower().startswith("basic "):
            return False
        try:
            given = base64.b64decode(value[6:].strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(given, self.expected or b"")

    def _webhook_secret_ok(self, scope: dict, headers: dict[str, str]) -> bool:
        """The secret comes as `?secret=` (Label Studio's webhook URL) or the X-Webhook-Secret header."""
        if self.webhook_secret is None:
            return True
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if "secret" in query:
            given = query["secret"][0].encode()
        else:
            given = headers.get(WEBHOOK_SECRET_HEADER, "").encode("latin-1")
        return hmac.compare_digest(given, self.webhook_secret)


def _declared_length(headers: dict[str, str]) -> int | None:
    value = headers.get("content-length")
    if value is None or not (value.isascii() and value.isdigit()):
        return None  # the server (h11, httptools) rejects a malformed Content-Length itself
    return int(value) if len(value) < 19 else 2**63


def _capped(receive: Any, limit: int) -> Any:
    """Count the body as it arrives (chunked bodies declare no length) and stop at the limit."""
    seen = 0

    async def wrapped() -> dict:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge()
        return message

    return wrapped


async def _send_json(
    send: Any, status: int, body: dict, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": payload})


async def read_body(request: Request) -> bytearray:
    """The body, gathered chunk by chunk: Starlette's request.body() joins a 60 MB body in one call on the
    event loop."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
    return body


async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object; a large one is parsed in a worker thread so /health keeps answering."""
    raw = await read_body(request)
    if len(raw) > INLINE_JSON_BYTES:
        return await run_in_threadpool(_parse_large_json, raw)
    return parse_json_object(raw)


def _parse_large_json(raw: bytearray) -> dict[str, Any]:
    with gc_paused():
        return parse_json_object(raw)


class RedisProbe:
    """Whether Redis answers, for /health: asked at most once per INTERVAL_S with a short timeout, in a
    thread, and /health waits at most WAIT_S for it (then reports the last answer). Without it /health said
    UP while every route that needs Redis failed."""

    INTERVAL_S = 1.0
    TIMEOUT_S = 0.5
    WAIT_S = 0.25

    def __init__(self, url: str) -> None:
        self._client = Redis.from_url(
            url, socket_connect_timeout=self.TIMEOUT_S, socket_timeout=self.TIMEOUT_S, retry=Retry(NoBackoff(), 0)
        )
        self._checking = threading.Lock()
        self._checked_at = float("-inf")
        self._state = "down: no answer yet"

    async def state(self) -> str:
        """Either "ok" or "down: <short reason>"."""
        if time.monotonic() - self._checked_at < self.INTERVAL_S:
            return self._state
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._check), timeout=self.WAIT_S)
        except TimeoutError:
            return self._state if self._state != "ok" else f"down: no answer within {self.WAIT_S} s"

    def _check(self) -> str:
        if not self._checking.acquire(blocking=False):
            return self._state  # another request is asking right now
        try:
            try:
                self._client.ping()
                state = "ok"
            except (RedisError, OSError) as exc:
                state = f"down: {_short_reason(exc)}"
            self._state, self._checked_at = state, time.monotonic()
            return state
        finally:
            self._checking.release()

    def close(self) -> None:
        self._client.close()


def _refusal_reason(exc: Exception) -> str:
    if isinstance(exc, RequestValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                         for e in exc.errors()[:10])
    return str(exc)


def _short_reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:100]}".rstrip(": ")


def create_app(runtime: Runtime) -> FastAPI:
    settings = runtime.settings
    store, queue = runtime.store, runtime.queue
    redis_probe = RedisProbe(settings.redis_url) if settings.redis_url else None

    def reconcile_after_downtime() -> None:
        for project_id in store.project_ids():
            runtime.changes.note_now(project_id, Changes(full=True))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # uvicorn has configured its loggers by now: mask secrets in its access lines too
        install_secret_filter(secrets_of(settings))
        try:
            await asyncio.wait_for(queue.warm_up(), timeout=WARM_UP_TIMEOUT_S)
        except Exception as exc:  # Redis down or hung at start: serve anyway; /health says DEGRADED, routes 503
            log.warning("could not warm up the job queue: %s", _short_reason(exc))
        try:  # webhooks sent while no API listened are lost: each project's next sync reads every task
            await run_in_threadpool(reconcile_after_downtime)
        except Exception as exc:
            log.warning("could not mark the projects for a full read: %s", _short_reason(exc))
        schedule = asyncio.create_task(reconcile_schedule(runtime))
        yield
        schedule.cancel()
        if redis_probe is not None:
            redis_probe.close()

    app = FastAPI(title="asvp-backend", version=__version__, docs_url="/docs", redoc_url=None, lifespan=lifespan)

    metrics = Metrics(queue.counters, queue.queue_lengths)
    app.state.runtime, app.state.metrics = runtime, metrics

    @app.exception_handler(StateCorrupt)
    async def corrupt_state(_: Request, exc: StateCorrupt) -> JSONResponse:
        metrics.errors.labels("corrupt_state").inc()
        return JSONResponse(
            {"detail": f"{exc}. Reconnect the project in Label Studio (it calls /setup) or wait for the next "
                       "sync: both rebuild it from Label Studio."},
            status_code=409,
        )

    @app.exception_handler(BadRequest)
    async def bad_request(_: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors()[:10]:
            where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
            problems.append(f"{where or 'body'}: {error.get('msg')}")
        return JSONResponse({"detail": "invalid request: " + "; ".join(problems)}, status_code=422)

    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(RedisTimeoutError)
    async def redis_unavailable(request: Request, exc: Exception) -> JSONResponse:
        # a 503 that says why, at once, instead of a 500; Label Studio shows the status, API users the body
        metrics.errors.labels("redis").inc()
        log.warning("%s %s: Redis unavailable: %s", request.method, request.url.path, _short_reason(exc))
        return JSONResponse(
            {"detail": "Redis unavailable, try again"}, status_code=503, headers={"Retry-After": "5"}
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        metrics.errors.labels("unhandled").inc()
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__})"}, status_code=500)

    @app.get("/")
    @app.get("/health")
    async def health(request: Request) -> Any:
        """Always 200 (Label Studio disconnects a backend whose health check fails); `status` is DEGRADED
        while Redis does not answer, and `redis` says why. A browser asking for `/` (Accept: text/html) is
        sent to the status page; Label Studio, curl and scripts (Accept: */* or JSON) get the JSON."""
        if request.url.path == "/" and "text/html" in request.headers.get("accept", ""):
            return RedirectResponse("/ui/", status_code=303)
        report: dict[str, Any] = {
            "status": "UP",
            "model_class": "asvp-backend",
            "version": __version__,
            "queue": "rq" if settings.redis_url else "in-process",
            "redis": "not used",
        }
        if redis_probe is not None:
            report["redis"] = await redis_probe.state()
            if report["redis"] != "ok":
                report["status"] = "DEGRADED"
        return report

    known_projects: set[int] = set()  # projects seen by /setup or found in the store: the webhook's fast path
    setup_check = SetupCheck(runtime)  # can the backend read the project's tasks? (reported, never refused)

    @app.post("/setup", openapi_extra=openapi_body(SetupRequest))
    async def setup(request: Request) -> JSONResponse:
        raw = await read_body(request)
        return await run_in_threadpool(setup_from_body, raw)

    def setup_from_body(raw: bytearray) -> JSONResponse:
        try:
            body = validate_body(SetupRequest, parse_json_object(raw))
            project_id = parse_project_id(body.project)
            parse_extra_params(body.extra_params)  # checked, not used: nothing in them changes the backend
        except (BadRequest, RequestValidationError) as exc:
            # Label Studio shows only "400 Client Error" (or 422): the reason is in our log
            log.warning("/setup refused: %s", _refusal_reason(exc))
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
        known_projects.add(project_id)
        connection = setup_check(project_id, body.hostname, body.access_token)
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

    @app.post("/predict", openapi_extra=openapi_body(PredictRequest))
    async def predict(request: Request) -> JSONResponse:
        raw = await read_body(request)
        return await run_in_threadpool(predict_from_body, raw)

    def predict_from_body(raw: bytearray) -> JSONResponse:
        with gc_paused() if len(raw) > INLINE_JSON_BYTES else contextlib.nullcontext():
            data = parse_json_object(raw)
            tasks = take_tasks(data)
            try:
                return serve_predictions(validate_body(PredictRequest, data), tasks)
            finally:
                release_gradually(tasks)

    last_states: dict[int, ProjectState] = {}  # per project, the state /predict last read: served while Redis restarts

    def serve_predictions(body: PredictRequest, tasks: list[Any]) -> JSONResponse:
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
            state, redis_down = last_states.get(project_id) or state_from_disk(project_id, body.label_config), True
            if state is None:
                raise
        else:
            if state is not None:
                last_states[project_id] = state
        if state is None:
            if not body.label_config:
                return JSONResponse(
                    {"detail": f"unknown project {project_id}: connect the backend to it first (/setup)"},
                    status_code=404,
                )
            try:
                spec = parse_label_config(body.label_config)
            except LabelConfigError as exc:
                raise BadRequest(str(exc)) from None
            state = ProjectState.new(project_id, body.label_config, spec)
        outcome = predict_tasks(settings.model_dir, state, task_ids)
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

    def state_from_disk(project_id: int, label_config: str | None) -> ProjectState | None:
        """What /predict serves while Redis is down in a process that never read the project: the newest
        complete round folder (rounds are published whole, so any one found is servable) and the label config
        of the request. None when either is missing."""
        if not label_config:
            return None
        try:
            spec = parse_label_config(label_config)
        except LabelConfigError:
            return None
        state = ProjectState.recovered(project_id, label_config, spec,
                                       round_versions_on_disk(runtime.layout(project_id)))
        if not state.round:
            return None
        log.warning("project %s: Redis is down; serving round %s from the shared volume", project_id, state.version)
        last_states[project_id] = state  # once per process and outage, not on every request
        return state

    @app.post("/webhook", openapi_extra=openapi_body(WebhookRequest))
    async def webhook(request: Request) -> JSONResponse:
        # async on purpose: a burst of webhooks is answered on the event loop; only the rare call that
        # really enqueues a job goes to the thread pool (bench/results/api_cpu.md). The secret was checked
        # by the middleware before the body was read.
        body = validate_body(WebhookRequest, await read_json(request))
        action = body.action
        label = action if action in EVENT_TRIGGERS or action in IGNORED_EVENTS else "other"
        trigger = EVENT_TRIGGERS.get(action)
        if trigger is None:
            outcome = "ignored" if action in IGNORED_EVENTS else "unknown"
            metrics.webhooks.labels(label, outcome).inc()
            return JSONResponse({"status": "ignored", "reason": f"{outcome} event {action[:60]!r}"})
        project_id = parse_project_id(body.project)
        if project_id not in known_projects:
            if not await run_in_threadpool(store.exists, project_id):
                metrics.webhooks.labels(action, "unknown_project").inc()
                return JSONResponse({"status": "ignored", "reason": f"project {project_id} is not set up"})
            known_projects.add(project_id)
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

    @app.get("/versions")
    def versions(project: str | None = Query(default=None)) -> JSONResponse:
        project_id = None if project is None else parse_project_id(project)
        ids = store.project_ids() if project_id is None else [project_id]
        found: set[str] = set()
        for pid in ids:
            try:
                state = store.get(pid)
            except StateCorrupt as exc:  # one broken project never hides the others' versions
                if project_id is not None:
                    raise
                log.error("project %s: %s", pid, exc)
                continue
            if state is None:
                if project_id is not None:
                    return JSONResponse({"detail": f"unknown project {project_id}"}, status_code=404)
                continue
            found.update(state.versions)
        ordered = sorted(found, key=_version_key, reverse=True)
        if project_id is None or state is None:
            return JSONResponse({"versions": ordered})
        return JSONResponse({"versions": ordered, "generations": generations_of(runtime.layout(project_id), state)})

    @app.get("/jobs")
    def jobs(project: str | None = Query(default=None), limit: int = Query(default=50, ge=1, le=500)) -> Any:
        project_id = None if project is None else parse_project_id(project)
        infos = [info.to_dict() for info in queue.jobs(project_id, limit=limit)]
        counts: dict[str, int] = {}
        for info in infos:
            counts[info["status"]] = counts.get(info["status"], 0) + 1
        return {"jobs": infos, "counts": counts}

    @app.get("/projects/{project}")
    def project_status(project: str) -> JSONResponse:
        project_id = parse_project_id(project)
        state = store.get(project_id)
        if state is None:
            return JSONResponse({"detail": f"unknown project {project_id}"}, status_code=404)
        data = json.loads(state.to_json())
        data.pop("label_config", None)
        data["model_version"] = str(state.version)
        data["problems"] = project_problems(runtime.layout(project_id), state)
        data["alignment_summary"] = alignment_summary(state, runtime.settings)
        data["stopping"] = StopRule.from_settings(runtime.settings).evaluate(state.rounds).to_dict()
        return JSONResponse(data)

    @app.post("/projects/{project}/align", openapi_extra=ALIGN_REQUEST)
    def project_align(project: str) -> JSONResponse:
        """Force a feature update now (what `asvp-backend align` does with workers on Redis)."""
        project_id = parse_project_id(project)
        if store.get(project_id) is None:
            return JSONResponse({"detail": f"unknown project {project_id}"}, status_code=404)
        return JSONResponse(force_update(runtime, project_id), status_code=202)

    @app.get("/projects/{project}/model")
    def project_model(project: str) -> JSONResponse:
        project_id = parse_project_id(project)
        state = store.get(project_id)
        if state is None:
            return JSONResponse({"detail": f"unknown project {project_id}"}, status_code=404)
        return JSONResponse(model_summary(state, runtime.settings))

    @app.get("/metrics", response_class=PlainTextResponse)  # documented as text, not JSON
    def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(ui_router(runtime))  # /ui/ and the JSON it reads; behind basic auth like the rest
    app.add_middleware(LimitsAndAuth, runtime=runtime, metrics=metrics)
    return app


def _version_key(text: str) -> tuple[int, int, str]:
    try:
        v = ModelVersion.parse(text)
        return (v.generation, v.round, text)
    except ValueError:
        return (-1, -1, text)
