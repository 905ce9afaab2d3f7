"""The job kinds: a registry (name -> function and queue) instead of if/elif chains."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from asvp_backend.jobs.context import JobContext

JobFunction = Callable[["JobContext"], Any]


@dataclass(frozen=True)
class JobKind:
    name: str
    queue: str  # "cpu" or "gpu"
    function: JobFunction
    doc: str


JOB_KINDS: dict[str, JobKind] = {}


def register_job(name: str, queue: str) -> Callable[[JobFunction], JobFunction]:
    if queue not in {"cpu", "gpu"}:
        raise ValueError(f"unknown queue {queue!r}")

    def decorator(function: JobFunction) -> JobFunction:
        JOB_KINDS[name] = JobKind(name, queue, function, (function.__doc__ or "").strip().splitlines()[0])
        return function

    return decorator


class UnknownJobKind(KeyError):
    pass


def job_kind(name: str) -> JobKind:
    import asvp_backend.jobs.tasks  # noqa: F401  (registers the job functions)

    try:
        return JOB_KINDS[name]
    except KeyError:
        raise UnknownJobKind(f"unknown job kind {name!r}; known: {', '.join(sorted(JOB_KINDS))}") from None
