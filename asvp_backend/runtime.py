"""The record of one process's parts: settings, Redis (if any), the state store, the job queue, job leases and
Label Studio clients. It is built in one place (bootstrap.py, the composition root) and handed down: the API
gives it to `create_app`, the rq worker to every job (jobs/worker.py), the in-process queue runs jobs through a
callback bound to it. There is no process-global runtime, and this module imports no queue engine or job code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from asvp_backend.config import ConfigError, Settings
from asvp_backend.jobs.changes import ChangeLog, MemoryChangeLog
from asvp_backend.jobs.leases import FileLease, Lease, RedisLease
from asvp_backend.jobs.queue import JobQueue
from asvp_backend.labelstudio import credentials
from asvp_backend.labelstudio.credentials import Connection
from asvp_backend.layout import ProjectLayout
from asvp_backend.state import StateStore


@dataclass
class Runtime:
    settings: Settings
    store: StateStore
    queue: JobQueue
    redis: Any = None
    _label_studio: Any = field(default=None, repr=False)  # one client for every project (tests inject a fake)
    _clients: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False)
    fence: Callable[[], None] | None = field(default=None, repr=False)  # a job's lease check (fenced())
    changes: ChangeLog = field(default_factory=MemoryChangeLog)  # what webhooks said changed (jobs/changes.py)

    def label_studio(self, project_id: int | None = None) -> Any:
        """The Label Studio client that reads `project_id`: the environment's, or the one /setup's hostname and
        token make (labelstudio/credentials.py). Jobs need it, the API's hot paths do not. In a job's runtime
        (`fenced`) its writes check the job's lease first."""
        client = self._label_studio if self._label_studio is not None else self._client(
            self.label_studio_connection(project_id))
        if self.fence is None:
            return client
        from asvp_backend.jobs.fencing import FencedLabelStudio

        return FencedLabelStudio(client, self.fence)

    def fenced(self, fence: Callable[[], None]) -> Runtime:
        """This runtime as one job sees it: the same parts, but every state write and Label Studio write
        calls `fence` (the job's lease check, raising LeaseLost) right before it (jobs/fencing.py)."""
        from asvp_backend.jobs.fencing import FencedStateStore

        return dataclasses.replace(self, store=FencedStateStore(self.store, fence), fence=fence)

    def label_studio_connection(self, project_id: int | None = None) -> Connection:
        """Where and with which token `project_id` is read; ConfigError says what is missing."""
        if project_id is None:
            if not (self.settings.label_studio_url and self.settings.label_studio_api_key):
                raise ConfigError("LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are needed to read tasks")
            return credentials.connection(self.settings, {}, 0)
        return credentials.connection(self.settings, credentials.load(self.layout(project_id)), project_id)

    def has_label_studio(self, project_id: int) -> bool:
        """Whether jobs of `project_id` can reach Label Studio at all (else they work without it)."""
        if self._label_studio is not None:
            return True
        try:
            self.label_studio_connection(project_id)
        except ConfigError:
            return False
        return True

    def _client(self, conn: Connection) -> Any:
        from asvp_backend.labelstudio.client import LabelStudioClient

        key = (conn.url, conn.token)
        if key not in self._clients:  # one per Label Studio and token: a PAT's access token is refreshed once
            self._clients[key] = LabelStudioClient(conn.url, conn.token)
        return self._clients[key]

    def layout(self, project_id: int) -> ProjectLayout:
        return ProjectLayout(self.settings.model_dir, project_id)

    def lease(self, project_id: int, kind: str, holder: str) -> Lease:
        """The right to run `kind` on the project (jobs/leases.py): Redis across workers, flock in-process."""
        if self.redis is not None:
            return RedisLease(self.redis, project_id, kind, holder, seconds=self.settings.lease_seconds)
        return FileLease(self.layout(project_id).lease_file(kind))

    def close(self) -> None:
        self.queue.close()
