"""The entry point every queued job runs through, on rq or in-process: lease, deadline, then the job.

A job first takes its (project, kind) lease (kinds may share one: `JobKind.lease`). If another job holding
that lease runs on the project, this one is
re-queued with a delay and returns at once, so it never holds a worker that other projects' jobs need
(jobs/queue.py states the rule). The pending marker is cleared only once the lease is held.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from asvp_backend.jobs.context import JobContext, Reporter
from asvp_backend.jobs.queue import defer_delay
from asvp_backend.jobs.registry import job_kind

if TYPE_CHECKING:
    from asvp_backend.runtime import Runtime

log = logging.getLogger(__name__)


def run_job(runtime: Runtime, kind: str, project_id: int, job_id: str, params: dict[str, Any],
            reporter: Reporter | None = None) -> Any:
    spec = job_kind(kind)
    queue = runtime.queue
    lease = runtime.lease(project_id, spec.lease, job_id)
    if not lease.acquire():
        attempt = int(params.get("busy_attempt", 0))
        later = queue.defer(kind, project_id, job_id, {**params, "busy_attempt": attempt + 1}, defer_delay(attempt))
        log.info("job %s: a %s job of project %s is running; %s", job_id, kind, project_id,
                 f"re-queued as {later}" if later else "another job already waits")
        return {"status": "busy", "requeued_as": later}
    with lease:
        queue.clear_pending(kind, project_id, job_id)
        params = {k: v for k, v in params.items() if k != "busy_attempt"}
        deadline = time.monotonic() + spec.limit(runtime.settings.job_timeout)
        ctx = JobContext(kind, project_id, job_id, params, runtime, reporter or _rq_reporter(), deadline)
        log.info("job %s started (%s, project %s)", job_id, kind, project_id)
        try:
            result = spec.function(ctx)
        except Exception:
            queue.count("failed", kind)
            raise
        queue.count("finished", kind)
        log.info("job %s finished", job_id)
        return result


def _rq_reporter() -> Reporter | None:
    """Progress into the rq job's meta, when running under rq."""
    from rq import get_current_job

    job = get_current_job()
    if job is None:
        return None

    def report(progress: dict[str, Any]) -> None:
        job.meta["progress"] = progress
        job.save_meta()

    return report
