"""Logging for every process: one format, and secrets masked in every line, uvicorn's access log included.

A secret reaches a log line in three ways: a configured secret quoted in a message or an exception, a
query parameter in an access line (Label Studio's webhook URL carries `?secret=`), or a password inside a
URL. The filter masks all three on the record itself, before any formatter sees it.

The filter must sit on uvicorn's loggers too: uvicorn's access logger does not propagate to the root
handler, and `uvicorn.run` replaces uvicorn's handlers after we configured them, so `install_secret_filter`
is called again once uvicorn has started (the app's lifespan does it).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlparse

from asvp_backend.config import Settings

MASK = "***"
MIN_SECRET_LENGTH = 4  # shorter "secrets" would mask ordinary words
SECRET_QUERY_PARAMETERS = ("secret", "token", "api_key", "apikey", "access_token", "password")
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_QUERY_SECRET = re.compile(r"(?i)([?&;](?:" + "|".join(SECRET_QUERY_PARAMETERS) + r")=)[^&;#\s\"']*")
_URL_PASSWORD = re.compile(r"(://[^/\s:@]*:)[^@/\s]+@")
_FORMATTER = logging.Formatter()


def secrets_of(settings: Settings) -> list[str]:
    """Every configured secret: the Label Studio token, basic-auth password, webhook secret, Redis password."""
    secrets = [settings.label_studio_api_key, settings.basic_auth_pass, settings.webhook_secret]
    if settings.redis_url:
        secrets.append(urlparse(settings.redis_url).password)
    return [s for s in secrets if s]


class SecretFilter(logging.Filter):
    """Masks secrets in a record's message, arguments and traceback; never drops a record."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        # longest first, so a secret that contains another is masked whole
        self.secrets = sorted({s for s in secrets if len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        text = _QUERY_SECRET.sub(r"\g<1>" + MASK, text)
        return _URL_PASSWORD.sub(r"\g<1>" + MASK + "@", text)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            self._redact_record(record)
        except Exception:  # a filter that raises would lose the line; better to log it unmasked than crash
            return True
        return True

    def _redact_record(self, record: logging.LogRecord) -> None:
        if record.args:
            # argument by argument, keeping their shape: uvicorn's access formatter unpacks record.args
            record.args = self._redact_args(record.args)
        else:
            record.msg = self.redact(str(record.msg))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.redact(_FORMATTER.formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        if record.args and record.name != "uvicorn.access":
            # a secret built from the format and an argument, or inside a non-string argument
            message = record.getMessage()
            masked = self.redact(message)
            if masked != message:
                record.msg, record.args = masked, None
                record.__dict__.pop("color_message", None)  # uvicorn would format it with the old args

    def _redact_args(self, args: Any) -> Any:
        if isinstance(args, Mapping):
            return {k: self.redact(v) if isinstance(v, str) else v for k, v in args.items()}
        if isinstance(args, tuple):
            return tuple(self.redact(a) if isinstance(a, str) else a for a in args)
        return args


_registered: set[str] = set()  # secrets learnt at run time (a project's token from /setup), kept across installs


def register_secret(secret: str | None) -> None:
    """Mask `secret` from now on in every installed filter (and in filters installed later)."""
    if not secret or len(secret) < MIN_SECRET_LENGTH or secret in _registered:
        return
    _registered.add(secret)
    for target in _filter_targets(UVICORN_LOGGERS):
        for installed in [f for f in target.filters if isinstance(f, SecretFilter)]:
            installed.secrets = sorted({*installed.secrets, secret}, key=len, reverse=True)


def _filter_targets(loggers: Iterable[str]) -> list[logging.Filterer]:
    targets: list[logging.Filterer] = list(logging.getLogger().handlers)
    for name in loggers:
        logger = logging.getLogger(name)
        targets.append(logger)  # records created on this logger, whatever handlers uvicorn installs later
        targets.extend(logger.handlers)
    return targets


def install_secret_filter(secrets: Iterable[str], loggers: Iterable[str] = UVICORN_LOGGERS) -> SecretFilter:
    """Put one SecretFilter on the root logger's handlers and on uvicorn's loggers and their handlers,
    replacing any earlier SecretFilter (so calling it twice never masks twice or with stale secrets)."""
    secret_filter = SecretFilter([*secrets, *_registered])
    for target in _filter_targets(loggers):
        for old in [f for f in target.filters if isinstance(f, SecretFilter)]:
            target.removeFilter(old)
        target.addFilter(secret_filter)
    return secret_filter


def configure_logging(settings: Settings) -> None:
    """The process's logging: LOG_LEVEL, one line per record on stderr, secrets masked everywhere."""
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    install_secret_filter(secrets_of(settings))
