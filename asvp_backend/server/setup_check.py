"""`/setup`'s connection check: can the backend read the project's tasks with what it has?

Without it a missing or refused token showed only later, as a queue that never re-ranks. Label Studio
calls `/setup` with a 3-second timeout, before every prediction batch and on every settings-page load, so
the check is bounded (WAIT_S, after which the reply goes out and the check finishes in the background),
runs once per project at a time, and is repeated only when it failed, the credentials changed, or
RECHECK_S passed. Its outcome goes to the log, to `MODEL_DIR/projects/<id>/label-studio.json` (whence
`GET /projects/N` and the status page show it under `problems`) and to the `/setup` reply.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from asvp_backend.config import ConfigError
from asvp_backend.labelstudio import credentials
from asvp_backend.runtime import Runtime

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 1.0  # connect and read, per call to Label Studio (a PAT makes two: refresh, then tasks)
WAIT_S = 1.5  # what /setup waits for the check; Label Studio gives /setup 3 s in all
RECHECK_S = 600.0


class SetupCheck:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="setup-check")
        self._lock = threading.Lock()
        self._running: dict[int, Future[dict[str, Any]]] = {}
        self._passed: dict[tuple[int, str, str], float] = {}  # (project, url, token) -> when it last passed

    def __call__(self, project_id: int, hostname: str | None, access_token: str | None) -> dict[str, Any]:
        """Remember /setup's credentials when they are needed, check them, and say how it went: the keys
        `label_studio` (where and with whose credentials, never the token) and `warning` (when it failed)."""
        settings, layout = self.runtime.settings, self.runtime.layout(project_id)
        if not (settings.label_studio_url and settings.label_studio_api_key):
            credentials.remember_setup(layout, hostname, access_token)
        try:
            conn = self.runtime.label_studio_connection(project_id)
        except ConfigError as exc:
            credentials.record_check(layout, {"ok": False, "at": time.time(), "problem": str(exc)})
            log.warning("project %s: %s", project_id, exc)
            return {"warning": str(exc)}
        key = (project_id, conn.url, conn.token)
        if time.time() - self._passed.get(key, float("-inf")) < RECHECK_S:
            return {"label_studio": {**conn.describe(), "tasks_readable": True}}
        with self._lock:
            future = self._running.get(project_id)
            if future is None:
                future = self._pool.submit(self._check, project_id, conn)
                self._running[project_id] = future
        try:
            check = future.result(timeout=WAIT_S)
        except FutureTimeout:
            return {"label_studio": conn.describe(),
                    "warning": f"Label Studio at {conn.url} did not answer the backend's check within {WAIT_S} s; "
                               f"GET /projects/{project_id} shows the outcome once it comes"}
        except Exception as exc:  # the check itself broke (a full disk): /setup still answers
            log.exception("project %s: the connection check failed", project_id)
            return {"label_studio": conn.describe(), "warning": f"the connection check failed ({type(exc).__name__})"}
        report: dict[str, Any] = {"label_studio": {**conn.describe(), "tasks_readable": check["ok"]}}
        if not check["ok"]:
            report["warning"] = check["problem"]
        return report

    def _check(self, project_id: int, conn: credentials.Connection) -> dict[str, Any]:
        try:
            check = credentials.check_access(conn, project_id, REQUEST_TIMEOUT_S)
            credentials.record_check(self.runtime.layout(project_id), check)
            if check["ok"]:
                self._passed[(project_id, conn.url, conn.token)] = check["at"]
                log.info("project %s: tasks readable at %s (%s credentials)", project_id, conn.url, conn.source)
            else:
                log.warning("project %s: %s", project_id, check["problem"])
            return check
        finally:
            with self._lock:
                self._running.pop(project_id, None)
