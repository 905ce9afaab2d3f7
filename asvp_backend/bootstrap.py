"""The composition root: the one place that builds a process's Runtime from its settings (Redis connections, the
state store, the rq or in-process queue and, in the embedded mode, the worker threads that run jobs).

Why a module of its own: the Runtime record is imported by the job bodies and the API, while building it needs
the queue engines and the job runner; keeping the two apart keeps the import graph free of circles.
"""

from __future__ import annotations

import functools
from typing import Any

from asvp_backend.config import Settings
from asvp_backend.jobs.changes import RedisChangeLog
from asvp_backend.jobs.inprocess import InProcessJobQueue
from asvp_backend.jobs.queue import JobQueue
from asvp_backend.jobs.rq_queue import RqJobQueue
from asvp_backend.jobs.runner import run_job
from asvp_backend.layout import queue_journal
from asvp_backend.runtime import Runtime
from asvp_backend.state import create_state_store

REDIS_CONNECT_TIMEOUT = 2.0  # seconds: with Redis down, routes answer 503 quickly instead of hanging
REDIS_READ_TIMEOUT = 5.0


def connect_redis(url: str) -> Any:
    import redis

    return redis.Redis.from_url(
        url, socket_connect_timeout=REDIS_CONNECT_TIMEOUT, socket_timeout=REDIS_READ_TIMEOUT, health_check_interval=30
    )


def connect_redis_async(url: str) -> Any:
    import redis.asyncio

    return redis.asyncio.Redis.from_url(url, socket_connect_timeout=REDIS_CONNECT_TIMEOUT,
                                        socket_timeout=REDIS_READ_TIMEOUT)


def build_runtime(settings: Settings, start_jobs: bool = True) -> Runtime:
    """The runtime of a process. In the embedded mode `start_jobs` starts the in-process worker threads
    (and resumes the journal's jobs); commands that only read state pass False."""
    if settings.redis_url:
        connection, async_connection = connect_redis(settings.redis_url), connect_redis_async(settings.redis_url)
        queue: JobQueue = RqJobQueue(connection, job_timeout=settings.job_timeout, async_redis=async_connection)
        return Runtime(settings=settings, store=create_state_store(settings.model_dir, connection), queue=queue,
                       redis=connection, changes=RedisChangeLog(connection, async_connection))
    # only the process that runs the jobs owns the journal (a CLI command must not overwrite the server's)
    in_process = InProcessJobQueue(journal=queue_journal(settings.model_dir) if start_jobs else None)
    runtime = Runtime(settings=settings, store=create_state_store(settings.model_dir, None), queue=in_process)
    if start_jobs:
        in_process.start(functools.partial(run_job, runtime))
    return runtime
