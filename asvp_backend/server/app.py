"""The API process: the Label Studio ML-backend protocol plus jobs, projects, the status page and metrics.

`create_app` only assembles: the app, its exception handlers (errors.py), its routers (routes/ and ui.py),
and the middleware that refuses what it can before a body is read (middleware.py). Everything one app owns
(its runtime, its metrics, what the protocol routes remember) goes on `app.state`, because the routers are
module-level and shared by every app a process builds (deps.py). The API never trains: webhooks become
deduplicated jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from asvp_backend import __version__
from asvp_backend.jobs.changes import Changes
from asvp_backend.logs import install_secret_filter, secrets_of
from asvp_backend.runtime import Runtime
from asvp_backend.server import ui
from asvp_backend.server.errors import add_exception_handlers, short_reason
from asvp_backend.server.metrics import Metrics
from asvp_backend.server.middleware import BODY_LIMITS, OPEN_ROUTES, OTHER_BODY_LIMIT, LimitsAndAuth, MiB
from asvp_backend.server.reconcile import reconcile_schedule
from asvp_backend.server.redis_probe import RedisProbe
from asvp_backend.server.routes import projects, protocol

__all__ = ["BODY_LIMITS", "OPEN_ROUTES", "OTHER_BODY_LIMIT", "MiB", "RedisProbe", "create_app"]

log = logging.getLogger(__name__)

WARM_UP_TIMEOUT_S = 2.0  # a hung Redis must not hold the server's start for the clients' read timeout


def create_app(runtime: Runtime) -> FastAPI:
    app = FastAPI(title="asvp-backend", version=__version__, docs_url="/docs", redoc_url=None, lifespan=lifespan)
    metrics = Metrics(runtime.queue.counters, runtime.queue.queue_lengths)
    app.state.runtime, app.state.metrics, app.state.protocol = runtime, metrics, protocol.ProtocolMemory(runtime)
    add_exception_handlers(app)
    app.include_router(protocol.router)
    app.include_router(projects.router)
    app.include_router(ui.router)
    app.add_middleware(LimitsAndAuth, runtime=runtime, metrics=metrics)
    return app


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    runtime: Runtime = app.state.runtime
    # uvicorn has configured its loggers by now: mask secrets in its access lines too
    install_secret_filter(secrets_of(runtime.settings))
    try:
        await asyncio.wait_for(runtime.queue.warm_up(), timeout=WARM_UP_TIMEOUT_S)
    except Exception as exc:  # Redis down or hung at start: serve anyway; /health says DEGRADED, routes 503
        log.warning("could not warm up the job queue: %s", short_reason(exc))
    try:  # webhooks sent while no API listened are lost: each project's next sync reads every task
        await run_in_threadpool(_reconcile_after_downtime, runtime)
    except Exception as exc:
        log.warning("could not mark the projects for a full read: %s", short_reason(exc))
    schedule = asyncio.create_task(reconcile_schedule(runtime))
    yield
    schedule.cancel()
    redis_probe = app.state.protocol.redis_probe
    if redis_probe is not None:
        redis_probe.close()


def _reconcile_after_downtime(runtime: Runtime) -> None:
    for project_id in runtime.store.project_ids():
        runtime.changes.note_now(project_id, Changes(full=True))
