"""How the API answers an exception a route lets out: every refusal is JSON with a string `detail` that says
why, and nothing becomes a bare 500 that Label Studio would show as "Internal Server Error".

A damaged project state is a 409 that says how to repair it, a BadRequest a 400, a body that does not fit
its schema a 422 with the fields named (a string, not FastAPI's list: Label Studio shows the detail as
text), Redis away a 503 with Retry-After, and anything else a 500 that names only the exception's type
(never its message, which may carry a secret). HTTPException (the 404 of deps.py) keeps FastAPI's handler.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from asvp_backend.server.schemas import BadRequest
from asvp_backend.state import StateCorrupt

log = logging.getLogger(__name__)


def validation_problems(exc: RequestValidationError) -> str:
    """The first ten problems of a body, each as `field.path: message`."""
    problems = []
    for error in exc.errors()[:10]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        problems.append(f"{where or 'body'}: {error.get('msg')}")
    return "; ".join(problems)


def short_reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:100]}".rstrip(": ")


async def corrupt_state(request: Request, exc: StateCorrupt) -> JSONResponse:
    request.app.state.metrics.errors.labels("corrupt_state").inc()
    return JSONResponse(
        {"detail": f"{exc}. Reconnect the project in Label Studio (it calls /setup) or wait for the next "
                   "sync: both rebuild it from Label Studio."},
        status_code=409,
    )


async def bad_request(_: Request, exc: BadRequest) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=400)


async def invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"detail": "invalid request: " + validation_problems(exc)}, status_code=422)


async def redis_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # a 503 that says why, at once, instead of a 500; Label Studio shows the status, API users the body
    request.app.state.metrics.errors.labels("redis").inc()
    log.warning("%s %s: Redis unavailable: %s", request.method, request.url.path, short_reason(exc))
    return JSONResponse({"detail": "Redis unavailable, try again"}, status_code=503, headers={"Retry-After": "5"})


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    request.app.state.metrics.errors.labels("unhandled").inc()
    log.exception("unhandled error on %s", request.url.path)
    return JSONResponse({"detail": f"internal error ({type(exc).__name__})"}, status_code=500)


HANDLERS: dict[type[Exception], Callable[..., Awaitable[JSONResponse]]] = {
    StateCorrupt: corrupt_state,
    BadRequest: bad_request,
    RequestValidationError: invalid_body,
    RedisConnectionError: redis_unavailable,
    RedisTimeoutError: redis_unavailable,
    Exception: internal_error,
}


def add_exception_handlers(app: FastAPI) -> None:
    for exception, handler in HANDLERS.items():
        app.add_exception_handler(exception, handler)
