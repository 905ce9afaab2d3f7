"""`asvp-backend worker`: an rq worker that builds the runtime once and hands it to every job.

rq calls a job's function with the arguments stored in Redis; the runtime (settings, state store, Label
Studio client, queue) is not something to pickle into every job. So the worker uses `RuntimeJob`, whose
function receives the worker's runtime as its first argument. A thread of the worker also moves deferred
jobs into their queue when due, and fails and re-queues jobs whose worker died.
"""

from __future__ import annotations

import gc
import logging
import threading
from typing import TYPE_CHECKING, Any

from rq import SimpleWorker, Worker
from rq.job import Job

if TYPE_CHECKING:
    from asvp_backend.runtime import Runtime

log = logging.getLogger(__name__)

PROMOTE_INTERVAL = 1.0  # seconds between moves of due deferred jobs into their queue
RECOVERY_EVERY = 10  # promotions between looks for jobs whose worker died


class RuntimeJob(Job):
    """An rq job whose function is called with the worker's runtime first."""

    runtime: Runtime | None = None

    def _execute(self) -> Any:
        if self.runtime is None:
            raise RuntimeError("RuntimeJob ran outside an asvp-backend worker (no runtime)")
        return self.func(self.runtime, *self.args, **self.kwargs)


class _RuntimeMixin:
    runtime: Runtime

    def perform_job(self, job: Any, queue: Any, execution: Any) -> bool:
        job.runtime = self.runtime
        return super().perform_job(job, queue, execution)  # type: ignore[misc]


class RuntimeWorker(_RuntimeMixin, Worker):
    """Forks a work-horse per job (rq's default): a crash or a timeout kills the horse, not the worker."""


class RuntimeSimpleWorker(_RuntimeMixin, SimpleWorker):
    """Runs jobs in the worker process itself (`--in-process`, for debugging)."""


def run_worker(runtime: Runtime, queues: list[str], name: str | None, burst: bool, in_process: bool) -> None:
    from asvp_backend.jobs.rq_queue import RqJobQueue

    worker_class = RuntimeSimpleWorker if in_process else RuntimeWorker
    worker = worker_class(queues, connection=runtime.redis, name=name, job_class=RuntimeJob,
                          maintenance_interval=60)
    worker.runtime = runtime
    queue = runtime.queue
    stop = threading.Event()
    if isinstance(queue, RqJobQueue):
        threading.Thread(target=_housekeeping, args=(queue, stop), name="asvp-housekeeping", daemon=True).start()
    log.info("worker %s listening on %s", worker.name, ",".join(queues))
    if not in_process:
        # Every object made so far (the preloaded libraries: torch, timm, Label Studio's SDK) lives as long as
        # the worker. Frozen, the garbage collector of a forked work-horse skips them instead of writing to
        # each one's header and copying every page they sit on. Our reading of a py-spy profile put that at
        # about 0.4 s of a 1.3 s targeted sync; with the preload, 1.3 s became 0.44 s (bench/results/scale_cpu.md).
        gc.freeze()
    try:
        worker.work(burst=burst, with_scheduler=False)
    finally:
        stop.set()


def _housekeeping(queue: Any, stop: threading.Event) -> None:
    beat = 0
    while not stop.wait(PROMOTE_INTERVAL):
        beat += 1
        try:
            queue.promote_due()
            if beat % RECOVERY_EVERY == 0:
                queue.recover_abandoned()
        except Exception as exc:  # Redis away for a moment: try again at the next beat
            log.warning("worker housekeeping failed: %s", exc)
