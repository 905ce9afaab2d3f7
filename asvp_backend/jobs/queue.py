"""Job queues: rq on Redis, or an in-process worker running the same job functions.

Both give the same promise: at most one *queued* job of a kind per project. A burst of 100 webhooks makes
one job, and a webhook that arrives while that job runs queues exactly one follow-up (so no label is
missed). The pending marker is cleared by the job itself when it starts.
"""

from __future__ import annotations

import asyncio
import logging
import queue as stdlib_queue
import threading
import time
import traceback
import uuid
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

from asvp_backend.jobs.registry import job_kind

log = logging.getLogger(__name__)

WAITING_STATES = {"queued", "deferred", "scheduled"}


@dataclass
class JobInfo:
    """What /jobs and `asvp-backend status` show of one job."""

    id: str
    kind: str
    project: int
    queue: str
    status: str  # queued | started | finished | failed | stopped | canceled
    reason: str = ""
    progress: dict[str, Any] | None = None
    enqueued_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    error: str | None = None
    result: Any = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Submitted:
    job_id: str
    deduplicated: bool


def new_job_id(kind: str, project_id: int) -> str:
    return f"{kind}-p{project_id}-{uuid.uuid4().hex[:10]}"


class JobQueue(ABC):
    """Submit deduplicated jobs and report their state."""

    @abstractmethod
    def submit(self, kind: str, project_id: int, reason: str = "", **params: Any) -> Submitted: ...

    @abstractmethod
    def jobs(self, project_id: int | None = None, limit: int = 50) -> list[JobInfo]: ...

    async def waiting_job(self, kind: str, project_id: int) -> str | None:
        """The id of a job of this kind that still waits for a worker, if any: the webhook's fast path."""
        return None

    async def warm_up(self) -> None:  # noqa: B027  (only the rq queue has connections to open)
        """Open connections before the first webhook burst instead of during it."""

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for info in self.jobs(limit=500):
            out[info.status] = out.get(info.status, 0) + 1
        return out

    def close(self) -> None:  # noqa: B027  (only the in-process queue has threads to stop)
        """Stop background threads, if any."""


# --------------------------------------------------------------------------------------------- rq
_CLEAR_IF_MINE = """
local v = redis.call('get', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. '|' then return redis.call('del', KEYS[1]) end
return 0
"""


def pending_key(kind: str, project_id: int) -> str:
    return f"asvp:pending:{int(project_id)}:{kind}"


def jobs_key(project_id: int) -> str:
    return f"asvp:jobs:{int(project_id)}"


ALL_JOBS_KEY = "asvp:jobs:all"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RqJobQueue(JobQueue):
    """rq queues `cpu` and `gpu` on Redis; workers are `asvp-backend worker --queues cpu,gpu`."""

    PENDING_TTL = 24 * 3600
    ENQUEUE_GRACE = 30.0  # seconds a marker may point at a job that is still being enqueued

    def __init__(self, redis: Any, job_timeout: int = 6 * 3600, async_redis: Any = None) -> None:
        from rq import Queue

        self.redis = redis
        self.job_timeout = job_timeout
        self._queues = {name: Queue(name, connection=redis) for name in ("cpu", "gpu")}
        self._async_redis = async_redis  # redis.asyncio client for the API's event loop, if given

    def submit(self, kind: str, project_id: int, reason: str = "", **params: Any) -> Submitted:
        spec = job_kind(kind)
        key = pending_key(kind, project_id)
        job_id = new_job_id(kind, project_id)
        marker = f"{job_id}|{time.time():.3f}"
        if not self.redis.set(key, marker, nx=True, ex=self.PENDING_TTL):
            waiting = self._waiting_sync(kind, project_id)
            if waiting is not None:
                return Submitted(waiting, deduplicated=True)
            # the marker outlived its job (a worker died, or rq expired the job): take it over
            self.redis.set(key, marker, ex=self.PENDING_TTL)
        self._queues[spec.queue].enqueue_call(
            "asvp_backend.jobs.runner.run_job",
            args=(kind, int(project_id), job_id, params),
            job_id=job_id,
            timeout=self.job_timeout,
            result_ttl=7 * 24 * 3600,
            failure_ttl=7 * 24 * 3600,
            meta={"kind": kind, "project": int(project_id), "reason": reason, "queue": spec.queue},
        )
        pipe = self.redis.pipeline()
        pipe.lpush(jobs_key(project_id), job_id)
        pipe.ltrim(jobs_key(project_id), 0, 199)
        pipe.lpush(ALL_JOBS_KEY, job_id)
        pipe.ltrim(ALL_JOBS_KEY, 0, 999)
        pipe.execute()
        return Submitted(job_id, deduplicated=False)

    async def waiting_job(self, kind: str, project_id: int) -> str | None:
        from rq.job import Job

        if self._async_redis is None:  # no asyncio client given: same check, in a thread
            return await asyncio.to_thread(self._waiting_sync, kind, project_id)
        marker = await self._async_redis.get(pending_key(kind, project_id))
        if marker is None:
            return None
        status = await self._async_redis.hget(Job.key_for(_text(marker).partition("|")[0]), "status")
        return self._waiting(marker, status)

    async def warm_up(self) -> None:
        await asyncio.to_thread(self.redis.ping)
        if self._async_redis is not None:
            await asyncio.gather(*(self._async_redis.ping() for _ in range(8)))

    def _waiting_sync(self, kind: str, project_id: int) -> str | None:
        from rq.job import Job

        marker = self.redis.get(pending_key(kind, project_id))
        if marker is None:
            return None
        return self._waiting(marker, self.redis.hget(Job.key_for(_text(marker).partition("|")[0]), "status"))

    def _waiting(self, marker: bytes | str, status: bytes | str | None) -> str | None:
        """The one rule: the marked job waits while rq says so, or while it is still being enqueued by
        another API thread (no job hash yet, and the marker is younger than ENQUEUE_GRACE)."""
        job_id, _, stamp = _text(marker).partition("|")
        if status is None:
            return job_id if time.time() - float(stamp or 0) < self.ENQUEUE_GRACE else None
        return job_id if _text(status) in WAITING_STATES else None

    def clear_pending(self, kind: str, project_id: int, job_id: str) -> None:
        self.redis.eval(_CLEAR_IF_MINE, 1, pending_key(kind, project_id), job_id)

    def jobs(self, project_id: int | None = None, limit: int = 50) -> list[JobInfo]:
        from rq.job import Job

        key = ALL_JOBS_KEY if project_id is None else jobs_key(project_id)
        ids = [i.decode() if isinstance(i, bytes) else i for i in self.redis.lrange(key, 0, limit - 1)]
        out = []
        for job_id, job in zip(ids, Job.fetch_many(ids, connection=self.redis), strict=True):
            if job is None:  # expired
                continue
            meta = job.get_meta(refresh=False) or {}
            status = job.get_status(refresh=False).value
            error = None
            if status == "failed":
                latest = job.latest_result()
                exc = latest.exc_string if latest else None
                error = exc.strip().splitlines()[-1] if exc and exc.strip() else "failed"
            out.append(
                JobInfo(
                    id=job_id,
                    kind=meta.get("kind", "?"),
                    project=int(meta.get("project", -1)),
                    queue=meta.get("queue", job.origin),
                    status=status,
                    reason=meta.get("reason", ""),
                    progress=meta.get("progress"),
                    enqueued_at=job.enqueued_at.timestamp() if job.enqueued_at else None,
                    started_at=job.started_at.timestamp() if job.started_at else None,
                    ended_at=job.ended_at.timestamp() if job.ended_at else None,
                    error=error,
                    result=job.return_value() if status == "finished" else None,
                )
            )
        return out


# --------------------------------------------------------------------------------- in-process
@dataclass
class _Record:
    info: JobInfo
    params: dict[str, Any] = field(default_factory=dict)


class InProcessJobQueue(JobQueue):
    """The embedded default: one background thread per queue name, same job functions, same dedup rule."""

    MAX_RECORDS = 1000

    def __init__(self, start: bool = True) -> None:
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, int], str] = {}
        self._records: OrderedDict[str, _Record] = OrderedDict()
        self._inboxes = {name: stdlib_queue.Queue() for name in ("cpu", "gpu")}
        self._threads: list[threading.Thread] = []
        if start:
            self.start()

    def start(self) -> None:
        """Start one worker thread per queue (tests create the queue paused to observe deduplication)."""
        for name, inbox in self._inboxes.items():
            thread = threading.Thread(target=self._loop, args=(inbox,), name=f"asvp-{name}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def submit(self, kind: str, project_id: int, reason: str = "", **params: Any) -> Submitted:
        spec = job_kind(kind)
        with self._lock:
            existing = self._waiting_locked(kind, project_id)
            if existing is not None:
                return Submitted(existing, deduplicated=True)
            job_id = new_job_id(kind, project_id)
            info = JobInfo(job_id, kind, int(project_id), spec.queue, "queued", reason)
            info.enqueued_at = time.time()
            self._records[job_id] = _Record(info, params)
            while len(self._records) > self.MAX_RECORDS:
                self._records.popitem(last=False)
            self._pending[(kind, project_id)] = job_id
        self._inboxes[spec.queue].put(job_id)
        return Submitted(job_id, deduplicated=False)

    async def waiting_job(self, kind: str, project_id: int) -> str | None:
        with self._lock:
            return self._waiting_locked(kind, project_id)

    def _waiting_locked(self, kind: str, project_id: int) -> str | None:
        """The marked job, if it still waits for the worker thread (call with the lock held)."""
        job_id = self._pending.get((kind, project_id))
        record = self._records.get(job_id) if job_id else None
        return job_id if record is not None and record.info.status == "queued" else None

    def clear_pending(self, kind: str, project_id: int, job_id: str) -> None:
        with self._lock:
            if self._pending.get((kind, project_id)) == job_id:
                del self._pending[(kind, project_id)]

    def set_progress(self, job_id: str, progress: dict[str, Any]) -> None:
        with self._lock:
            record = self._records.get(job_id)
            if record:
                record.info.progress = progress

    def _loop(self, inbox: stdlib_queue.Queue[str | None]) -> None:
        from asvp_backend.jobs.runner import run_job

        while True:
            job_id = inbox.get()
            if job_id is None:
                return
            with self._lock:
                record = self._records.get(job_id)
                if record is None:
                    continue
                record.info.status, record.info.started_at = "started", time.time()
            info = record.info
            try:
                result = run_job(info.kind, info.project, job_id, record.params, queue=self)
                info.status, info.result = "finished", result
            except Exception as exc:  # a failed job must never kill the worker thread
                log.error("job %s failed: %s\n%s", job_id, exc, traceback.format_exc())
                info.status, info.error = "failed", f"{type(exc).__name__}: {exc}"
            finally:
                info.ended_at = time.time()

    def jobs(self, project_id: int | None = None, limit: int = 50) -> list[JobInfo]:
        with self._lock:
            infos = [r.info for r in reversed(self._records.values())]
        if project_id is not None:
            infos = [i for i in infos if i.project == project_id]
        return infos[:limit]

    def close(self) -> None:
        for inbox in self._inboxes.values():
            inbox.put(None)


