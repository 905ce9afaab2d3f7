"""The entry point every queued job runs through (rq or in-process)."""

from __future__ import annotations

import logging
from typing import Any

from asvp_backend.jobs.context import JobContext
from asvp_backend.jobs.registry import job_kind

log = logging.getLogger(__name__)


def run_job(kind: str, project_id: int, job_id: str, params: dict[str, Any], queue: Any = None) -> Any:
    """Clear the job's pending marker, then run its function with a JobContext."""
    from asvp_backend.runtime import get_runtime

    runtime = get_runtime()
    queue = queue if queue is not None else runtime.queue
    queue.clear_pending(kind, project_id, job_id)
    spec = job_kind(kind)
    ctx = JobContext(kind=kind, project_id=project_id, job_id=job_id, params=params, runtime=runtime)
    ctx._reporter = _reporter_for(job_id, queue)
    log.info("job %s started (%s, project %s)", job_id, kind, project_id)
    with runtime.exclusive(project_id, kind):  # never two jobs of a kind on one project at once
        result = spec.function(ctx)
    log.info("job %s finished", job_id)
    return result


def _reporter_for(job_id: str, queue: Any):
    if hasattr(queue, "set_progress"):
        return lambda progress: queue.set_progress(job_id, progress)
    from rq import get_current_job

    job = get_current_job()
    if job is None:
        return None

    def report(progress: dict[str, Any]) -> None:
        job.meta["progress"] = progress
        job.save_meta()

    return report
