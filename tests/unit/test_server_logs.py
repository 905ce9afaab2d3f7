"""Secrets never reach a log line: configured secrets, secret query parameters (uvicorn's access log) and
passwords in URLs, in messages, arguments and tracebacks."""

from __future__ import annotations

import io
import logging

import pytest
from uvicorn.logging import AccessFormatter, DefaultFormatter

from asvp_backend.config import Settings
from asvp_backend.logs import SecretFilter, install_secret_filter, secrets_of

SECRET = "hook-secret-4711"


def access_record(path: str) -> logging.LogRecord:
    """A record exactly as uvicorn's access logger makes it."""
    return logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:50000", "POST", path, "1.1", 200), None,
    )


@pytest.mark.parametrize("name", ["secret", "token", "api_key", "access_token", "password", "SECRET"])
def test_access_lines_mask_secret_query_parameters(name):
    record = access_record(f"/webhook?{name}=not-configured-anywhere&project=3")
    assert SecretFilter().filter(record)
    line = AccessFormatter(use_colors=False).format(record)
    assert "not-configured-anywhere" not in line
    assert f'"POST /webhook?{name}=***&project=3 HTTP/1.1" 200' in line


def test_configured_secrets_are_masked_in_messages_arguments_and_tracebacks():
    secret_filter = SecretFilter([SECRET, "abc"])  # too short to mask: it would hit ordinary words
    try:
        raise RuntimeError(f"refused {SECRET}")
    except RuntimeError as exc:
        record = logging.LogRecord("asvp_backend.x", logging.ERROR, __file__, 1, "call with %s failed: %s",
                                   (f"Token {SECRET}", exc), None)
        record.exc_info = (type(exc), exc, exc.__traceback__)
    secret_filter.filter(record)
    line = logging.Formatter("%(message)s").format(record)
    assert SECRET not in line and "call with Token *** failed: refused ***" in line
    assert "RuntimeError: refused ***" in line  # the traceback
    plain = logging.LogRecord("x", logging.INFO, __file__, 1, "redis://:pw-in-url@redis:6379/0 abc", None, None)
    secret_filter.filter(plain)
    assert plain.getMessage() == "redis://:***@redis:6379/0 abc"


def test_uvicorn_color_messages_are_dropped_when_the_message_is_rewritten():
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, "%s=%s", ("secret", SECRET), None)
    record.color_message = "%s=%s"
    SecretFilter([SECRET]).filter(record)
    assert SECRET not in DefaultFormatter("%(message)s", use_colors=True).format(record)


def test_install_puts_one_filter_on_root_handlers_and_uvicorn_loggers():
    settings = Settings.from_env({"WEBHOOK_SECRET": SECRET, "REDIS_URL": "redis://:redis-pass@localhost:6379/0"})
    assert set(secrets_of(settings)) == {SECRET, "redis-pass"}
    stream = io.StringIO()
    access = logging.getLogger("uvicorn.access")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(AccessFormatter(use_colors=False))
    access.addHandler(handler)
    saved = access.propagate, access.level
    access.propagate = False  # as uvicorn configures it
    access.setLevel(logging.INFO)
    try:
        install_secret_filter(secrets_of(settings))
        install_secret_filter(secrets_of(settings))  # twice: still one filter, never stacked
        assert sum(isinstance(f, SecretFilter) for f in access.filters) == 1
        assert sum(isinstance(f, SecretFilter) for f in handler.filters) == 1
        access.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:1", "POST", f"/webhook?secret={SECRET}", "1.1", 200)
    finally:
        access.removeHandler(handler)
        access.propagate = saved[0]
        access.setLevel(saved[1])
        for target in (access, logging.getLogger("uvicorn"), logging.getLogger("uvicorn.error"),
                       *logging.getLogger().handlers):
            for f in [f for f in target.filters if isinstance(f, SecretFilter)]:
                target.removeFilter(f)
    assert SECRET not in stream.getvalue() and "/webhook?secret=*** HTTP/1.1" in stream.getvalue()
