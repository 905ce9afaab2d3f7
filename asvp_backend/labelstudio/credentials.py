"""Where a project's Label Studio is, which token reads it, and whether that worked when it was connected.

`LABEL_STUDIO_URL` / `LABEL_STUDIO_API_KEY`, when set, serve every project. Without them each project uses
what Label Studio sends in `/setup`: its `hostname` and the project creator's `access_token` (a legacy
token). The environment's token only ever goes to the environment's URL, so a forged `/setup` cannot send
it elsewhere; `/setup`'s token goes to `LABEL_STUDIO_URL` when that is set (inside Docker, Label Studio's
idea of its own hostname is usually `http://localhost:8080`, useless to another container).

The record lives beside the project's files, because MODEL_DIR is what the API and every worker share; it
is written 0600 by `atomic_write_bytes` and never enters the state document `GET /projects/N` returns.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from asvp_backend.config import ConfigError, Settings, _http_url
from asvp_backend.fsutil import atomic_write_bytes
from asvp_backend.layout import ProjectLayout
from asvp_backend.logs import register_secret

log = logging.getLogger(__name__)

LEGACY_TOKEN_HINT = (
    "/setup's token is the project creator's legacy token, which Label Studio 1.23 refuses unless legacy tokens are "
    "enabled (Organization > API Token Settings, or LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true at its first start); "
    "or set LABEL_STUDIO_API_KEY to a personal access token"
)


@dataclass(frozen=True)
class Connection:
    url: str
    token: str = ""
    source: str = "environment"  # which settings: "environment", "setup", or "LABEL_STUDIO_URL + /setup token"

    def describe(self) -> dict[str, str]:
        """What may be shown (API, logs): never the token."""
        return {"url": self.url, "credentials": self.source}


def load(layout: ProjectLayout) -> dict[str, Any]:
    """The project's record, {} when none was written or it cannot be read (the next /setup rewrites it)."""
    try:
        record = json.loads(layout.label_studio_file.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("project %s: %s is unreadable (%s); the next /setup rewrites it",
                    layout.project_id, layout.label_studio_file, type(exc).__name__)
        return {}
    if not isinstance(record, dict):
        return {}
    register_secret(record.get("access_token"))
    return record


def _write(layout: ProjectLayout, record: dict[str, Any]) -> None:
    atomic_write_bytes(layout.label_studio_file, json.dumps(record, indent=1).encode())


def remember_setup(layout: ProjectLayout, hostname: str | None, access_token: str | None) -> dict[str, Any]:
    """Keep what /setup sent (written only when it changed: Label Studio calls /setup before every prediction
    batch); returns the record."""
    register_secret(access_token)
    record = load(layout)
    if record.get("hostname") != hostname or record.get("access_token") != access_token:
        record.update({"hostname": hostname, "access_token": access_token})
        record.pop("check", None)  # it was about other credentials
        _write(layout, record)
    return record


def record_check(layout: ProjectLayout, check: dict[str, Any]) -> None:
    record = load(layout)
    record["check"] = check
    _write(layout, record)


def connection(settings: Settings, record: dict[str, Any], project_id: int) -> Connection:
    """The URL and token to read project `project_id` with; ConfigError says what is missing."""
    if settings.label_studio_url and settings.label_studio_api_key:
        return Connection(settings.label_studio_url, settings.label_studio_api_key, "environment")
    token = record.get("access_token") or ""
    if settings.label_studio_url:
        if not token:
            raise ConfigError(f"project {project_id}: no Label Studio token: LABEL_STUDIO_API_KEY is not set and "
                              "/setup sent no access_token (reconnect the project in Label Studio)")
        return Connection(settings.label_studio_url, token, "LABEL_STUDIO_URL + /setup token")
    hostname = record.get("hostname")
    if not hostname or not token:
        raise ConfigError(f"project {project_id}: no Label Studio address and token: set LABEL_STUDIO_URL and "
                          "LABEL_STUDIO_API_KEY, or connect the project in Label Studio (its /setup sends both)")
    try:
        url = _http_url("hostname", hostname)
    except ConfigError:
        raise ConfigError(f"project {project_id}: Label Studio's /setup hostname {hostname[:100]!r} is no http(s) "
                          "URL; set LABEL_STUDIO_URL") from None
    return Connection(url, token, "setup")


def check_access(conn: Connection, project_id: int, timeout: float) -> dict[str, Any]:
    """Read one task of the project with `conn`: {"ok", "at", "url", "credentials", "problem"}."""
    from asvp_backend.labelstudio.client import LabelStudioClient, LabelStudioError

    check: dict[str, Any] = {"ok": False, "at": time.time(), **conn.describe(), "problem": None}
    try:
        client = LabelStudioClient(conn.url, conn.token, timeout=timeout)
        client.request("GET", "/api/tasks", params={"project": int(project_id), "page_size": 1,
                                                    "fields": "task_only"}, timeout=(timeout, timeout))
    except LabelStudioError as exc:
        check["problem"] = _explain(exc, conn, project_id)
    else:
        check["ok"] = True
    return check


def _explain(exc: Any, conn: Connection, project_id: int) -> str:
    where = f"Label Studio at {conn.url} ({conn.source} credentials)"
    if exc.status in {401, 403}:
        hint = LEGACY_TOKEN_HINT if "setup" in conn.source else "check LABEL_STUDIO_API_KEY"
        return f"{where} refused the token (HTTP {exc.status}): {hint}"
    if exc.status == 404:
        return f"{where} has no project {project_id} (HTTP 404): is LABEL_STUDIO_URL the Label Studio that called?"
    if exc.status is None:
        return (f"{where} did not answer ({exc}): set LABEL_STUDIO_URL to an address this backend can reach "
                "(inside Docker not localhost: the service name, or host.docker.internal)")
    return f"{where} answered an error: {exc}"


def problem(layout: ProjectLayout) -> str | None:
    """The last connection check's problem, if it failed (for GET /projects/N and the status page)."""
    check = load(layout).get("check") or {}
    if check.get("ok", True):
        return None
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(check.get("at", 0)))
    return f"cannot read the project's tasks (checked at /setup, {when}): {check.get('problem')}"
