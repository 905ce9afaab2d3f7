"""What a job function gets: its project, the runtime, a deadline, a way to report progress, and its lease
(whose fence stops a job that lost it: jobs/fencing.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from asvp_backend.jobs.leases import LeaseLost
from asvp_backend.jobs.resources import Project

if TYPE_CHECKING:
    from asvp_backend.jobs.leases import Lease
    from asvp_backend.runtime import Runtime

__all__ = ["JobContext", "JobTimeout", "LeaseLost", "Reporter"]

Reporter = Callable[[dict[str, Any]], None]


class JobTimeout(Exception):
    """The job ran past its kind's time limit. Raised at the job's own checkpoints (`ctx.check_deadline`),
    which is how the embedded mode, whose worker threads cannot be killed, enforces time limits; rq also
    kills its work-horse at the same limit."""


@dataclass
class JobContext:
    kind: str
    project_id: int
    job_id: str
    params: dict[str, Any]
    runtime: Runtime
    reporter: Reporter | None = None
    deadline: float | None = None  # time.monotonic() value; None = no limit
    lease: Lease | None = None  # the job's lease (run_job); None: nothing to fence (the CLI, tests)
    _last_report: float = field(default=0.0)

    @property
    def project(self) -> Project:
        """The job's project: its tasks, features, state and Label Studio (jobs/resources.py)."""
        return Project(self.runtime, self.project_id)

    def progress(self, done: int, total: int, stage: str = "", force: bool = False) -> None:
        """Record progress; throttled to two writes a second so a fast loop does not hammer Redis.
        Every report is also a deadline checkpoint, and stops a job whose lease is known to be lost."""
        self.check_deadline()
        if self.lease is not None:
            self.lease.raise_if_lost()
        now = time.monotonic()
        if not force and done < total and now - self._last_report < 0.5:
            return
        self._last_report = now
        if self.reporter is not None:
            self.reporter({"done": int(done), "total": int(total), "stage": stage, "at": time.time()})

    def time_left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def check_deadline(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise JobTimeout(f"{self.kind} job for project {self.project_id} ran past its time limit")

    def check_fence(self) -> None:
        """Raise LeaseLost unless the job still holds its lease with the fencing token it took. Call it right
        before a write that matters; the job's state store and Label Studio client do it themselves
        (run_job gives the job a fenced runtime), so job code calls it only before file artefacts."""
        if self.lease is not None:
            self.lease.check()
