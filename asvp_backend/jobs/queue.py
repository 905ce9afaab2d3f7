"""What every job queue promises, whichever engine runs it (rq on Redis, or in-process threads).

The rule, per (project, job kind): at most one job running and at most one waiting. A burst of 100
webhooks makes one waiting job; an event that arrives while a job runs makes exactly one follow-up, so the
last label is never missed. A pending marker names the waiting job; the job clears it only once it holds
the kind's lease (jobs/leases.py), i.e. once it really runs. A job that finds the lease taken is
re-queued with a delay (`defer`) and keeps the marker, so it stays the one waiting job. So the marked job
is still the waiting one after a worker starts it, until it holds the lease (`marked_job_waits`).
"""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any

from asvp_backend.jobs.status import JobStatus

SILENT_JOB_S = 600.0  # a running job that reported nothing for this long is not joined (Start Training)
START_GRACE = 10.0  # seconds a started job may take to reach its lease (milliseconds, unless its worker died)
DEFER_DELAYS = (1, 2, 4, 8, 15)  # seconds; capped so a dead lease holder (30 s TTL) is followed within a minute


def marked_job_waits(status: JobStatus, started_at: float | None, now: float) -> bool:
    """Whether the job a pending marker names is still the waiting one: queued, deferred or scheduled, or
    started without its lease yet (it has read nothing; it takes the lease or defers within START_GRACE).
    A new event joins it; otherwise the submitter takes the marker over and queues a fresh job."""
    if status is JobStatus.STARTED:
        return started_at is not None and now - started_at < START_GRACE
    return status.waiting


def defer_delay(attempt: int) -> float:
    return float(DEFER_DELAYS[min(attempt, len(DEFER_DELAYS) - 1)])


@dataclass
class JobInfo:
    """What /jobs and `asvp-backend status` show of one job."""

    id: str
    kind: str
    project: int
    queue: str
    status: JobStatus
    reason: str = ""
    progress: dict[str, Any] | None = None
    enqueued_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    error: str | None = None
    result: Any = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        return data


@dataclass(frozen=True)
class Submitted:
    job_id: str
    deduplicated: bool


def new_job_id(kind: str, project_id: int) -> str:
    """`extract-p3-<hex>`; a slotted kind's colon becomes a dash (rq allows letters, digits, `_` and `-`)."""
    return f"{kind.replace(':', '-')}-p{project_id}-{uuid.uuid4().hex[:10]}"


class JobQueue(ABC):
    """Submit deduplicated jobs, re-queue busy ones, and report jobs and counters."""

    @abstractmethod
    def submit(self, kind: str, project_id: int, reason: str = "", **params: Any) -> Submitted: ...

    @abstractmethod
    def defer(self, kind: str, project_id: int, job_id: str, params: dict[str, Any], delay: float) -> str | None:
        """Re-queue a job whose (project, kind) is busy, to run after `delay` seconds. Returns the new job's
        id, or None when another job already waits in its place."""

    @abstractmethod
    def clear_pending(self, kind: str, project_id: int, job_id: str) -> None:
        """Called by the job once it runs: from now on an event queues a follow-up."""

    @abstractmethod
    def jobs(self, project_id: int | None = None, limit: int = 50) -> list[JobInfo]: ...

    @abstractmethod
    def count(self, event: str, kind: str) -> None:
        """Add one to the counter "<event>:<kind>" (the runner counts finished and failed jobs)."""

    @abstractmethod
    def counters(self) -> dict[str, int]:
        """Cumulative counts by "<event>:<kind>" (submitted, deduplicated, deferred, finished, failed):
        cheap to read, for /metrics."""

    @abstractmethod
    def queue_lengths(self) -> dict[str, int]:
        """Jobs waiting in each queue (cpu, gpu), for /metrics."""

    def active(self, project_id: int, kinds: frozenset[str]) -> JobInfo | None:
        """The newest job of one of `kinds` for the project that has not ended (waiting or running), if any.
        Start Training uses it: a press while a fine-tune is queued or running joins it instead of queueing
        another identical one."""
        now = time.time()
        for info in self.jobs(project_id, limit=200):  # newest first
            if info.kind not in kinds or info.status.ended:
                continue
            heard = max((info.progress or {}).get("at") or 0.0, info.started_at or 0.0)
            if info.status == JobStatus.STARTED and now - heard > SILENT_JOB_S:
                continue  # its worker died without rq noticing yet: do not join it
            return info
        return None

    async def waiting_job(self, kind: str, project_id: int) -> str | None:
        """The id of a job of this kind that still waits for a worker, if any: the webhook's fast path."""
        return None

    async def warm_up(self) -> None:  # noqa: B027  (only the rq queue has connections to open)
        """Open connections before the first webhook burst instead of during it."""

    def close(self) -> None:  # noqa: B027  (only the in-process queue has threads to stop)
        """Stop background threads, if any."""
