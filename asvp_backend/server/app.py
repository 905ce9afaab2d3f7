"""The API process: the Label Studio ML-backend protocol plus jobs, versions and metrics.

Handlers that do CPU work are plain `def` (run in the thread pool), so /health keeps answering within
Label Studio's 1 s while a large /predict is being served. The API never trains: webhooks become
deduplicated jobs.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from asvp_backend import __version__
from asvp_backend.jobs.queue import Submitted
from asvp_backend.labelstudio.label_config import LabelConfigError, parse_label_config
from asvp_backend.prediction import predict_tasks
from asvp_backend.runtime import Runtime
from asvp_backend.server.metrics import Metrics
from asvp_backend.server.schemas import (
    BadRequest,
    PredictRequest,
    SetupRequest,
    WebhookRequest,
    parse_project_id,
)
from asvp_backend.server.webhooks import EVENT_TRIGGERS, IGNORED_EVENTS
from asvp_backend.state import ProjectState
from asvp_backend.versioning import ModelVersion

log = logging.getLogger(__name__)

OPEN_ROUTES = {"/health", "/webhook"}  # Label Studio's auto-created webhook carries no credentials
MAX_PREDICT_TASKS = 10_000


class BodyTooLarge(Exception):
    pass


class LimitsAndAuth:
    """ASGI middleware: cap the body size, check basic auth, and time every request for /metrics."""

    def __init__(self, app: Any, runtime: Runtime, metrics: Metrics) -> None:
        self.app = app
        self.max_body = runtime.settings.max_body_bytes
        user, password = runtime.settings.basic_auth_user, runtime.settings.basic_auth_pass
        self.expected = f"{user}:{password}".encode() if user and password else None
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path = scope["path"]
        route = path if path in KNOWN_ROUTES else "other"
        status_holder = {"status": 500}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            if self.expected is not None and path not in OPEN_ROUTES and not self._authorised(headers):
                await _send_json(
                    send_wrapper,
                    401,
                    {"detail": "authentication required"},
                    extra=[(b"www-authenticate", b'Basic realm="asvp-backend"')],
                )
                return
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body:
                await _send_json(send_wrapper, 413, {"detail": f"request body over {self.max_body} bytes"})
                return
            await self.app(scope, self._capped(receive), send_wrapper)
        except BodyTooLarge:
            await _send_json(send_wrapper, 413, {"detail": f"request body over {self.max_body} bytes"})
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

    def _capped(self, receive: Any) -> Any:
        seen = 0
        limit = self.max_body

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


KNOWN_ROUTES = {"/health", "/setup", "/predict", "/webhook", "/versions", "/metrics", "/jobs"}


def create_app(runtime: Runtime) -> FastAPI:
    settings = runtime.settings
    store, queue = runtime.store, runtime.queue

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            await queue.warm_up()
        except Exception as exc:  # Redis down at start: serve anyway, /health stays UP, jobs will say why
            log.warning("could not warm up the job queue: %s", exc)
        yield

    app = FastAPI(title="asvp-backend", version=__version__, docs_url="/docs", redoc_url=None, lifespan=lifespan)

    def rounds_by_project() -> dict[int, int]:
        out = {}
        for pid in store.project_ids():
            state = store.get(pid)
            if state:
                out[pid] = state.round
        return out

    metrics = Metrics(queue.counts, rounds_by_project)
    app.state.runtime, app.state.metrics = runtime, metrics

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

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        metrics.errors.labels("unhandled").inc()
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__})"}, status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "UP",
            "model_class": "asvp-backend",
            "version": __version__,
            "queue": "rq" if settings.redis_url else "in-process",
        }

    known_projects: set[int] = set()  # projects seen by /setup or found in the store: the webhook's fast path

    @app.post("/setup")
    def setup(body: SetupRequest) -> JSONResponse:
        project_id = parse_project_id(body.project)
        try:
            spec = parse_label_config(body.label_config)
        except LabelConfigError as exc:
            log.warning("project %s: label config refused: %s", project_id, exc)
            return JSONResponse({"detail": str(exc), "status": "error"}, status_code=400)

        def remember(current: ProjectState | None) -> ProjectState:
            if current is None:
                return ProjectState.new(project_id, body.label_config, spec)
            # never reset the counters a round has advanced (the label-studio-ml template bug)
            current.label_config, current.spec = body.label_config, spec
            return current

        state = store.update(project_id, remember)
        assert state is not None
        known_projects.add(project_id)
        return JSONResponse({"model_version": str(state.version), "status": "ok"})

    @app.post("/predict")
    def predict(body: PredictRequest) -> dict[str, Any]:
        if body.project is None:
            raise BadRequest("project is required")
        project_id = parse_project_id(body.project)
        if len(body.tasks) > MAX_PREDICT_TASKS:
            raise BadRequest(f"at most {MAX_PREDICT_TASKS} tasks per request; send smaller batches")
        for index, task in enumerate(body.tasks):
            if not isinstance(task.get("id"), int) or not isinstance(task.get("data", {}), dict):
                raise BadRequest(f"tasks[{index}] needs an integer id and a data object")
        state = store.get(project_id)
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
        results = predict_tasks(runtime, state, body.tasks)
        if settings.label_studio_url and store.exists(project_id) and any(r["score"] is None for r in results):
            # tasks the current round did not rank: a (deduplicated) sync extracts them and re-ranks
            queue.submit("sync", project_id, reason="predict asked for tasks without a ranking")
        return {"results": results}

    @app.post("/webhook")
    async def webhook(
        body: WebhookRequest, request: Request, secret: str | None = Query(default=None)
    ) -> JSONResponse:
        # async on purpose: a burst of webhooks is answered on the event loop; only the rare call that
        # really enqueues a job goes to the thread pool (bench/results/api_cpu.md)
        action = body.action
        label = action if action in EVENT_TRIGGERS or action in IGNORED_EVENTS else "other"
        if settings.webhook_secret:
            given = secret or request.headers.get("x-webhook-secret") or ""
            if not hmac.compare_digest(given.encode(), settings.webhook_secret.encode()):
                metrics.webhooks.labels(label, "forbidden").inc()
                return JSONResponse({"detail": "bad or missing webhook secret"}, status_code=403)
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
        waiting = await queue.waiting_job(trigger.job, project_id)
        if waiting is not None:
            submitted = Submitted(waiting, deduplicated=True)
        else:
            submitted = await run_in_threadpool(queue.submit, trigger.job, project_id, trigger.reason)
        metrics.webhooks.labels(action, "deduplicated" if submitted.deduplicated else "queued").inc()
        return JSONResponse(
            {"status": "ok", "job": submitted.job_id, "deduplicated": submitted.deduplicated},
            status_code=201 if not submitted.deduplicated else 200,
        )

    @app.get("/versions")
    def versions(project: int | None = Query(default=None, ge=1)) -> JSONResponse:
        ids = store.project_ids() if project is None else [project]
        found: set[str] = set()
        for pid in ids:
            state = store.get(pid)
            if state is None:
                if project is not None:
                    return JSONResponse({"detail": f"unknown project {project}"}, status_code=404)
                continue
            found.update(state.versions)
        ordered = sorted(found, key=_version_key, reverse=True)
        return JSONResponse({"versions": ordered})

    @app.get("/jobs")
    def jobs(project: int | None = Query(default=None, ge=1), limit: int = Query(default=50, ge=1, le=500)):
        infos = queue.jobs(project, limit=limit)
        counts: dict[str, int] = {}
        for info in infos:
            counts[info.status] = counts.get(info.status, 0) + 1
        return {"jobs": [i.to_dict() for i in infos], "counts": counts}

    @app.get("/projects/{project_id}")
    def project_status(project_id: int) -> JSONResponse:
        state = store.get(project_id)
        if state is None:
            return JSONResponse({"detail": f"unknown project {project_id}"}, status_code=404)
        data = json.loads(state.to_json())
        data.pop("label_config", None)
        data["model_version"] = str(state.version)
        return JSONResponse(data)

    @app.get("/metrics")
    def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(LimitsAndAuth, runtime=runtime, metrics=metrics)
    return app


def _version_key(text: str) -> tuple[int, int, str]:
    try:
        v = ModelVersion.parse(text)
        return (v.generation, v.round, text)
    except ValueError:
        return (-1, -1, text)
