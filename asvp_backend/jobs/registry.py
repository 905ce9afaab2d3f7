"""The job kinds: a registry (name -> function, queue and time limit) instead of if/elif chains."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from asvp_backend.jobs.context import JobContext

JobFunction = Callable[["JobContext"], Any]
QUEUES = ("cpu", "gpu")


@dataclass(frozen=True)
class JobKind:
    name: str
    queue: str  # "cpu" or "gpu"
    function: JobFunction
    doc: str
    time_limit: int | None  # seconds; None = JOB_TIMEOUT (the long GPU jobs)
    lease: str  # kinds sharing a lease never run at once on a project (extract and finetune: one GPU job)

    def limit(self, job_timeout: int) -> int:
        return min(self.time_limit, job_timeout) if self.time_limit is not None else job_timeout


JOB_KINDS: dict[str, JobKind] = {}


def register_job(name: str, queue: str, time_limit: int | None = None,
                 lease: str | None = None) -> Callable[[JobFunction], JobFunction]:
    if queue not in QUEUES:
        raise ValueError(f"unknown queue {queue!r}")

    def decorator(function: JobFunction) -> JobFunction:
        doc = (function.__doc__ or "").strip().splitlines()[0]
        JOB_KINDS[name] = JobKind(name, queue, function, doc, time_limit, lease or name)
        return function

    return decorator


class UnknownJobKind(KeyError):
    pass


def job_kind(name: str) -> JobKind:
    try:
        return JOB_KINDS[name]
    except KeyError:
        raise UnknownJobKind(f"unknown job kind {name!r}; known: {', '.join(sorted(JOB_KINDS))}") from None
