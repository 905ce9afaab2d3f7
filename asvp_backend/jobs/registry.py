"""The job kinds: a registry (name -> function, queue and time limit) instead of if/elif chains.

A kind registered with `slots=True` runs as several independent jobs per project, one per slot, named
`<kind>:<slot>` (`extract_part:0`, `extract_part:1`): each slot has its own pending marker and lease, so the
queue's rule (one running and one waiting job per project and kind) holds per slot, and slots run at once on
different workers."""

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
    slots: bool = False  # submitted as `<name>:<slot>`, one lease per slot

    def lease_for(self, kind: str) -> str:
        """The lease a job submitted as `kind` takes: the kind's lease, per slot for a slotted kind."""
        slot = kind.partition(":")[2]
        return f"{self.lease}:{slot}" if slot else self.lease

    def limit(self, job_timeout: int) -> int:
        return min(self.time_limit, job_timeout) if self.time_limit is not None else job_timeout


JOB_KINDS: dict[str, JobKind] = {}


def register_job(name: str, queue: str, time_limit: int | None = None, lease: str | None = None,
                 slots: bool = False) -> Callable[[JobFunction], JobFunction]:
    if queue not in QUEUES:
        raise ValueError(f"unknown queue {queue!r}")

    def decorator(function: JobFunction) -> JobFunction:
        doc = (function.__doc__ or "").strip().splitlines()[0]
        JOB_KINDS[name] = JobKind(name, queue, function, doc, time_limit, lease or name, slots)
        return function

    return decorator


class UnknownJobKind(KeyError):
    pass


def job_kind(name: str) -> JobKind:
    """The kind a job submitted as `name` runs: `name` itself, or `<kind>:<slot>` of a slotted kind."""
    base, _, slot = name.partition(":")
    spec = JOB_KINDS.get(base)
    if spec is None or spec.slots != bool(slot) or (slot and not slot.isdigit()):
        raise UnknownJobKind(f"unknown job kind {name!r}; known: {', '.join(sorted(JOB_KINDS))}")
    return spec


def slot_of(kind: str) -> int:
    """The slot of a slotted kind's job (`extract_part:3` -> 3)."""
    return int(kind.partition(":")[2])


def slotted(name: str, slot: int) -> str:
    return f"{name}:{int(slot)}"


def queueable_kinds() -> list[str]:
    """The kinds a person may queue by name (the status page's Retry): slotted kinds are queued by their
    coordinating job, with the parameters it computes."""
    return sorted(name for name, spec in JOB_KINDS.items() if not spec.slots)
