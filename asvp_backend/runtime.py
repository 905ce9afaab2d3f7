"""The process-wide wiring: settings, Redis (if any), the state store and the job queue.

The API process and each worker build one Runtime from the environment. Tests build their own and install
it with `set_runtime`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from asvp_backend.config import ConfigError, Settings
from asvp_backend.fsutil import flocked
from asvp_backend.jobs.queue import InProcessJobQueue, JobQueue, RqJobQueue
from asvp_backend.state import StateStore, create_state_store, project_dir


@dataclass
class Runtime:
    settings: Settings
    store: StateStore
    queue: JobQueue
    redis: Any = None
    _label_studio: Any = field(default=None, repr=False)

    def label_studio(self):
        """The Label Studio client; jobs need it, the API's hot paths do not."""
        from asvp_backend.labelstudio.client import LabelStudioClient

        if self._label_studio is None:
            if not self.settings.label_studio_url:
                raise ConfigError("LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY are needed to read tasks")
            self._label_studio = LabelStudioClient(
                self.settings.label_studio_url, self.settings.label_studio_api_key or ""
            )
        return self._label_studio

    @contextlib.contextmanager
    def exclusive(self, project_id: int, name: str) -> Iterator[None]:
        """Serialise jobs of one kind on one project across workers (Redis lock) or threads (flock)."""
        if self.redis is not None:
            lock = self.redis.lock(f"asvp:running:{int(project_id)}:{name}", timeout=self.settings.job_timeout)
            with lock:
                yield
            return
        with flocked(project_dir(self.settings.model_dir, project_id) / f".{name}.running"):
            yield

    def close(self) -> None:
        self.queue.close()


def connect_redis(url: str):
    import redis

    return redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30)


def connect_redis_async(url: str):
    import redis.asyncio

    return redis.asyncio.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30)


def build_runtime(settings: Settings) -> Runtime:
    if settings.redis_url:
        connection = connect_redis(settings.redis_url)
        queue: JobQueue = RqJobQueue(
            connection, job_timeout=settings.job_timeout, async_redis=connect_redis_async(settings.redis_url)
        )
    else:
        connection = None
        queue = InProcessJobQueue()
    store = create_state_store(settings.model_dir, connection)
    return Runtime(settings=settings, store=store, queue=queue, redis=connection)


_runtime: Runtime | None = None
_lock = threading.Lock()


def get_runtime() -> Runtime:
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = build_runtime(Settings.from_env())
        return _runtime


def set_runtime(runtime: Runtime | None) -> None:
    global _runtime
    with _lock:
        _runtime = runtime
