"""The entry point every queued job runs through, on rq or in-process: lease, deadline, then the job.

A job first takes its (project, kind) lease (kinds may share one: `JobKind.lease`). If another job holding
that lease runs on the project, this one is
re-queued with a delay and returns at once, so it never holds a worker that other projects' jobs need
(jobs/queue.py states the rule). The pending marker is cleared only once the lease is held.

The job then runs with a fenced runtime (jobs/fencing.py): its state and Label Studio writes check the
lease's fencing token first. A job whose lease was lost (it was paused or starved past LEASE_SECONDS)
stops at its next check with LeaseLost: it fails with "lease lost: ..." in its record, is counted as
`lease_lost`, and is not run again as it was. If nobody holds the lease by then, a fresh job of the kind
is queued (it reads everything again under a new token); if another job took it over, that job is the
one that brings the project up to date.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from asvp_backend.jobs.context import JobContext, Reporter
from asvp_backend.jobs.leases import Lease, LeaseLost
from asvp_backend.jobs.queue import defer_delay
from asvp_backend.jobs.registry import job_kind

if TYPE_CHECKING:
    from asvp_backend.runtime import Runtime

log = logging.getLogger(__name__)

MAX_REDOS_AFTER_LOST_LEASE = 3  # fresh jobs queued in a row for a kind whose jobs keep losing their lease


def run_job(runtime: Runtime, kind: str, project_id: int, job_id: str, params: dict[str, Any],
            reporter: Reporter | None = None) -> Any:
    spec = job_kind(kind)
    queue = runtime.queue
    lease = runtime.lease(project_id, spec.lease_for(kind), job_id)
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
        ctx = JobContext(kind, project_id, job_id, params, runtime.fenced(lease.check), reporter or _rq_reporter(),
                         deadline, lease=lease)
        log.info("job %s started (%s, project %s, lease token %s)", job_id, kind, project_id, lease.token)
        try:
            result = spec.function()(ctx)
        except LeaseLost as exc:
            queue.count("failed", kind)
            queue.count("lease_lost", kind)
            log.warning("job %s stopped before its next write: %s", job_id, exc)
            _redo_if_nobody_took_over(runtime, lease, kind, project_id, job_id, params)
            raise
        except Exception:
            queue.count("failed", kind)
            raise
        queue.count("finished", kind)
        log.info("job %s finished", job_id)
        return result


def _redo_if_nobody_took_over(runtime: Runtime, lease: Lease, kind: str, project_id: int, job_id: str,
                              params: dict[str, Any]) -> None:
    """A job whose lease expired without another job taking it (no later fencing token) queues a fresh job
    of its kind, unless one already waits (the queue de-duplicates) or this happened
    MAX_REDOS_AFTER_LOST_LEASE times in a row. A job that was taken over queues nothing."""
    try:
        if lease.superseded():
            return
    except Exception as exc:  # Redis away: the next event or the recovery of dead jobs follows up
        log.warning("job %s: cannot tell whether its lease was taken over: %s", job_id, exc)
        return
    redo = int(params.get("redo_after_lost_lease", 0)) + 1
    if redo > MAX_REDOS_AFTER_LOST_LEASE:
        log.error("job %s: %s jobs of %s lost their lease in a row; not queueing another", job_id, redo - 1, kind)
        return
    fresh = {k: v for k, v in params.items() if k not in {"retry_after_death", "resumed"}}
    submitted = runtime.queue.submit(kind, project_id, reason=f"redo: {job_id} lost its lease",
                                     **{**fresh, "redo_after_lost_lease": redo})
    log.info("job %s: queued %s to redo its work under a new lease", job_id, submitted.job_id)


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
