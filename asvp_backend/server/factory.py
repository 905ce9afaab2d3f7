"""The app as uvicorn builds it in each worker process (`WORKERS`): one process, one runtime.

uvicorn starts several workers only from an import string, so each process reads the settings, sets up
its logging and builds its own runtime here, and closes it when it stops.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from asvp_backend.bootstrap import build_runtime
from asvp_backend.config import Settings
from asvp_backend.logs import configure_logging
from asvp_backend.server.app import create_app

APP_FACTORY = "asvp_backend.server.factory:create_app_from_env"


def create_app_from_env() -> FastAPI:
    settings = Settings.from_env()
    configure_logging(settings)
    runtime = build_runtime(settings)
    app = create_app(runtime)
    serve = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(served: FastAPI) -> AsyncIterator[None]:
        try:
            async with serve(served):
                yield
        finally:
            runtime.close()

    app.router.lifespan_context = lifespan
    return app
