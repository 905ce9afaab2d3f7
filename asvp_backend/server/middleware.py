"""LimitsAndAuth, the API's one middleware: every refusal that needs no route happens here, before a byte of
the body is read.

A forged request (a Host not allowed, a cross-site browser request, a body that is not JSON: guards.py),
missing basic-auth credentials, a bad webhook secret and a body over its route's limit are all answered from
the headers alone, so a hostile or oversized request costs the event loop nothing and never reaches a
route; the body is then counted as it arrives, since a chunked body declares no length. Every request is
timed here for /metrics, refusals included.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import time
from typing import Any
from urllib.parse import parse_qs

from asvp_backend.runtime import Runtime
from asvp_backend.server.guards import RequestGuard
from asvp_backend.server.metrics import Metrics

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
WEBHOOK_SECRET_HEADER = "x-webhook-secret"


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
