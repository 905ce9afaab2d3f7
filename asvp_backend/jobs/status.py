"""The states a job goes through, one enum for rq and the in-process queue (rq's own names)."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    DEFERRED = "deferred"
    SCHEDULED = "scheduled"  # waiting for a delay to pass (a busy project, a retry)
    STARTED = "started"
    FINISHED = "finished"
    FAILED = "failed"
    STOPPED = "stopped"
    CANCELED = "canceled"

    @property
    def waiting(self) -> bool:
        """Not yet running: a new event for its (project, kind) joins it instead of queueing another."""
        return self in WAITING

    @property
    def ended(self) -> bool:
        return self in ENDED


WAITING = frozenset({JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED})
ENDED = frozenset({JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED})


def parse_status(value: object) -> JobStatus:
    """rq reports bytes, str or its own enum; anything unknown counts as failed rather than crashing a listing."""
    text = value.decode() if isinstance(value, bytes) else str(getattr(value, "value", value))
    try:
        return JobStatus(text)
    except ValueError:
        return JobStatus.FAILED
