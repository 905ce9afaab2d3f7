"""The rq engine: queues `cpu` and `gpu` on Redis, served by `asvp-backend worker` processes.

Invariants: one pending marker per (project, kind) names the waiting job (Redis `SET NX`); a job listed
as started whose lease is gone (its worker died) is reported as failed at once and recovered by
`recover_abandoned` (rq itself would notice only after its own heartbeat TTL and maintenance interval).
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, timedelta
from typing import Any

from asvp_backend.jobs.leases import lease_holder
from asvp_backend.jobs.queue import START_GRACE, JobInfo, JobQueue, Submitted, marked_job_waits, new_job_id
from asvp_backend.jobs.registry import QUEUES, UnknownJobKind, job_kind
from asvp_backend.jobs.status import JobStatus, parse_status

log = logging.getLogger(__name__)

JOB_FUNCTION = "asvp_backend.jobs.runner.run_job"  # receives the worker's runtime first (worker.RuntimeJob)
ALL_JOBS_KEY = "asvp:jobs:all"
COUNTERS_KEY = "asvp:counters"
MAX_RETRIES_AFTER_DEATH = 3

_CLEAR_IF_MINE = """
local v = redis.call('get', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. '|' then return redis.call('del', KEYS[1]) end
return 0
"""
_MOVE_IF_MINE = """
local v = redis.call('get', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. '|' then
  redis.call('set', KEYS[1], ARGV[2], 'EX', ARGV[3]) return 1 end
return 0
"""
_REPLACE_IF_SAME = """
local v = redis.call('get', KEYS[1])
if v == ARGV[1] then redis.call('set', KEYS[1], ARGV[2], 'EX', ARGV[3]) return 1 end
return 0
"""


def pending_key(kind: str, project_id: int) -> str:
    return f"asvp:pending:{int(project_id)}:{kind}"


def jobs_key(project_id: int) -> str:
    return f"asvp:jobs:{int(project_id)}"


def _job_key(marker: bytes | str) -> str:
    """rq's hash of the job a pending marker (`<job id>|<stamp>`) names."""
    from rq.job import Job

    return Job.key_for(_text(marker).partition("|")[0])


def _utc_timestamp(rq_time: bytes | str) -> float:
    """Seconds since the epoch of a time as rq writes it in a job's hash (UTC, no zone in the text)."""
    from rq.utils import utcparse

    return utcparse(_text(rq_time)).replace(tzinfo=UTC).timestamp()


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
        self._queues = {name: Queue(name, connection=redis) for name in QUEUES}
        self._async_redis = async_redis  # redis.asyncio client for the API's event loop, if given

    # ------------------------------------------------------------------ submitting
    def submit(self, kind: str, project_id: int, reason: str = "", **params: Any) -> Submitted:
        job_kind(kind)  # unknown kinds fail here, not in a worker
        key = pending_key(kind, project_id)
        job_id = new_job_id(kind, project_id)
        marker = f"{job_id}|{time.time():.3f}"
        while not self.redis.set(key, marker, nx=True, ex=self.PENDING_TTL):
            seen = self.redis.get(key)
            if seen is None:
                continue  # cleared meanwhile: SET NX again
            waiting = self._waiting(seen, *self.redis.hmget(_job_key(seen), "status", "started_at"))
            if waiting is not None:
                self.count("deduplicated", kind)
                return Submitted(waiting, deduplicated=True)
            # the marked job outlived its worker: take the marker over, but only if no other submitter took
            # it first; two that both saw it would otherwise queue two waiting jobs
            if self.redis.eval(_REPLACE_IF_SAME, 1, key, seen, marker, self.PENDING_TTL):
                break
        self._enqueue(kind, project_id, job_id, reason, params, delay=0.0)
        self.count("submitted", kind)
        return Submitted(job_id, deduplicated=False)

    def defer(self, kind: str, project_id: int, job_id: str, params: dict[str, Any], delay: float) -> str | None:
        new_id = new_job_id(kind, project_id)
        moved = self.redis.eval(
            _MOVE_IF_MINE, 1, pending_key(kind, project_id), job_id, f"{new_id}|{time.time() + delay:.3f}",
            self.PENDING_TTL,
        )
        if not moved:
            return None  # a newer job already waits for this (project, kind)
        reason = f"waiting for the running {kind} job of project {project_id}"
        self._enqueue(kind, project_id, new_id, reason, params, delay=delay, replaces=job_id)
        self.count("deferred", kind)
        return new_id

    def _enqueue(self, kind: str, project_id: int, job_id: str, reason: str, params: dict[str, Any],
                 delay: float, replaces: str | None = None) -> None:
        spec = job_kind(kind)
        options: dict[str, Any] = {
            "args": (kind, int(project_id), job_id, params),
            "job_id": job_id,
            "result_ttl": 7 * 24 * 3600,
            "failure_ttl": 7 * 24 * 3600,
            "meta": {"kind": kind, "project": int(project_id), "reason": reason, "queue": spec.queue},
        }
        queue = self._queues[spec.queue]
        timeout = spec.limit(self.job_timeout) + 60  # the job's own deadline (JobContext) fires first
        if delay > 0:
            queue.enqueue_in(timedelta(seconds=delay), JOB_FUNCTION, job_timeout=timeout, **options)
        else:
            queue.enqueue_call(JOB_FUNCTION, timeout=timeout, **options)
        pipe = self.redis.pipeline()
        for key, keep in ((jobs_key(project_id), 199), (ALL_JOBS_KEY, 999)):
            if replaces:  # one entry per logical job: a deferral replaces its predecessor in the lists
                pipe.lrem(key, 0, replaces)
            pipe.lpush(key, job_id)
            pipe.ltrim(key, 0, keep)
        pipe.execute()

    def clear_pending(self, kind: str, project_id: int, job_id: str) -> None:
        self.redis.eval(_CLEAR_IF_MINE, 1, pending_key(kind, project_id), job_id)

    # ------------------------------------------------------------------ the waiting rule
    async def waiting_job(self, kind: str, project_id: int) -> str | None:
        if self._async_redis is None:  # no asyncio client given: same check, in a thread
            return await asyncio.to_thread(self._waiting_sync, kind, project_id)
        marker = await self._async_redis.get(pending_key(kind, project_id))
        if marker is None:
            return None
        return self._waiting(marker, *await self._async_redis.hmget(_job_key(marker), "status", "started_at"))

    async def warm_up(self) -> None:
        await asyncio.to_thread(self.redis.ping)
        if self._async_redis is not None:
            await asyncio.gather(*(self._async_redis.ping() for _ in range(8)))

    def _waiting_sync(self, kind: str, project_id: int) -> str | None:
        marker = self.redis.get(pending_key(kind, project_id))
        if marker is None:
            return None
        return self._waiting(marker, *self.redis.hmget(_job_key(marker), "status", "started_at"))

    def _waiting(self, marker: bytes | str, status: bytes | str | None, started_at: bytes | str | None) -> str | None:
        """The marked job, if it still waits (`marked_job_waits`), or while another thread is still enqueueing
        it (no job hash yet, and the marker is younger than ENQUEUE_GRACE)."""
        job_id, _, stamp = _text(marker).partition("|")
        if status is None:
            return job_id if time.time() - float(stamp or 0) < self.ENQUEUE_GRACE else None
        started = _utc_timestamp(started_at) if started_at else None
        return job_id if marked_job_waits(parse_status(status), started, time.time()) else None

    # ------------------------------------------------------------------ reporting
    def count(self, event: str, kind: str) -> None:
        self.redis.hincrby(COUNTERS_KEY, f"{event}:{kind}", 1)

    def counters(self) -> dict[str, int]:
        raw = self.redis.hgetall(COUNTERS_KEY)
        return {_text(k): int(v) for k, v in raw.items()}

    def queue_lengths(self) -> dict[str, int]:
        return {name: self.redis.llen(queue.key) for name, queue in self._queues.items()}

    def jobs(self, project_id: int | None = None, limit: int = 50) -> list[JobInfo]:
        from rq.job import Job

        key = ALL_JOBS_KEY if project_id is None else jobs_key(project_id)
        ids = [_text(i) for i in self.redis.lrange(key, 0, limit - 1)]
        out = []
        for job_id, job in zip(ids, Job.fetch_many(ids, connection=self.redis), strict=True):
            if job is None:  # expired
                continue
            out.append(self._info(job_id, job))
        return out

    def _info(self, job_id: str, job: Any) -> JobInfo:
        meta = job.get_meta(refresh=False) or {}
        kind, project = meta.get("kind", "?"), int(meta.get("project", -1))
        status = parse_status(job.get_status(refresh=False))
        error = None
        if status is JobStatus.FAILED:
            latest = job.latest_result()
            exc = latest.exc_string if latest else None
            error = exc.strip().splitlines()[-1] if exc and exc.strip() else "failed"
        elif status is JobStatus.STARTED and self._abandoned(job_id, kind, project, job.started_at):
            status, error = JobStatus.FAILED, "the worker running it died (its lease expired)"
        return JobInfo(
            id=job_id,
            kind=kind,
            project=project,
            queue=meta.get("queue", job.origin),
            status=status,
            reason=meta.get("reason", ""),
            progress=meta.get("progress"),
            enqueued_at=job.enqueued_at.timestamp() if job.enqueued_at else None,
            started_at=job.started_at.timestamp() if job.started_at else None,
            ended_at=job.ended_at.timestamp() if job.ended_at else None,
            error=error,
            result=job.return_value() if status is JobStatus.FINISHED else None,
        )

    def _abandoned(self, job_id: str, kind: str, project: int, started_at: Any) -> bool:
        """Started a while ago and not holding its lease: nobody runs it any more. (A job takes its lease, or
        is deferred, within milliseconds of starting; a holder's lease lapses LEASE_SECONDS after it died.)"""
        if started_at is None or time.time() - started_at.timestamp() < START_GRACE:
            return False
        try:
            lease = job_kind(kind).lease_for(kind)
        except UnknownJobKind:
            lease = kind
        return lease_holder(self.redis, project, lease) != job_id

    # ------------------------------------------------------------------ delayed jobs
    def promote_due(self) -> list[str]:
        """Move deferred jobs whose delay has passed into their queue. Every worker calls this each second;
        ZREM decides which one promotes a job. (rq's own scheduler would do it too, but after a worker
        dies its lock blocks the others for up to three minutes: too slow for "followed within a minute".)"""
        from rq.job import Job

        promoted = []
        for queue in self._queues.values():
            registry = queue.scheduled_job_registry
            for job_id in registry.get_jobs_to_schedule(int(time.time())):
                if not self.redis.zrem(registry.key, job_id):
                    continue  # another worker promoted it
                job = Job.fetch_many([job_id], connection=self.redis)[0]
                if job is not None:
                    queue.enqueue_job(job)
                    promoted.append(job_id)
        return promoted

    # ------------------------------------------------------------------ recovery
    def recover_abandoned(self) -> list[str]:
        """Fail the jobs whose worker died and queue each one's kind again (at most MAX_RETRIES_AFTER_DEATH
        times in a row). Safe to call from every worker: a job is recovered once."""
        from rq.job import Job

        recovered = []
        for name, queue in self._queues.items():
            registry = queue.started_job_registry
            entries = [_text(e) for e in self.redis.zrange(registry.key, 0, -1)]
            for entry in entries:
                job_id = entry.partition(":")[0]
                job = Job.fetch_many([job_id], connection=self.redis)[0]
                if job is None:
                    continue
                meta = job.get_meta(refresh=False) or {}
                kind, project = meta.get("kind", "?"), int(meta.get("project", -1))
                if parse_status(job.get_status(refresh=False)) is not JobStatus.STARTED:
                    continue
                if not self._abandoned(job_id, kind, project, job.started_at):
                    continue
                if not self.redis.set(f"asvp:recovered:{job_id}", "1", nx=True, ex=7 * 24 * 3600):
                    continue
                self.redis.zadd(registry.key, {entry: 1})  # rq's own cleanup then records the failure
                registry.cleanup()
                params = dict(job.args[3]) if len(job.args) > 3 else {}
                attempt = int(params.get("retry_after_death", 0)) + 1
                self.count("died", kind)
                if attempt > MAX_RETRIES_AFTER_DEATH:
                    log.error("job %s (%s, project %s) died %s times in a row; not retrying", job_id, kind,
                              project, attempt - 1)
                    continue
                params["retry_after_death"] = attempt
                reason = f"retry: {job_id} died with its worker"
                submitted = self.submit(kind, project, reason=reason, **params)
                log.warning("job %s (%s, project %s, queue %s) died with its worker; queued %s", job_id, kind,
                            project, name, submitted.job_id)
                recovered.append(job_id)
        return recovered
