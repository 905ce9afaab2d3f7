"""Leases on a real Redis with real rq workers: a killed worker frees its project within a minute, and
jobs of one (project, kind) never pile up while one runs."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from asvp_backend.jobs.leases import RedisLease, lease_holder
from asvp_backend.jobs.rq_queue import RqJobQueue
from asvp_backend.jobs.status import JobStatus
from tests.conftest import start_worker
from tests.helpers import wait_for

pytestmark = pytest.mark.integration


def _kill_worker_and_horse(worker_pid: int) -> None:
    """rq's work-horse runs in a session of its own (setsid), so killing the worker's group spares it."""
    children = subprocess.run(["pgrep", "-P", str(worker_pid)], capture_output=True, text=True).stdout.split()
    assert children, "the worker has no work-horse"
    for pid in [worker_pid, *map(int, children)]:
        os.kill(pid, signal.SIGKILL)


def _status(queue: RqJobQueue, job_id: str) -> JobStatus | None:
    return next((j.status for j in queue.jobs(limit=200) if j.id == job_id), None)


def test_a_lease_expires_when_its_holder_stops_renewing(clean_redis):
    lease = RedisLease(clean_redis, 1, "extract", "job-a", seconds=1.5)
    assert lease.acquire()
    time.sleep(2.5)  # renewed meanwhile: still held
    assert lease_holder(clean_redis, 1, "extract") == "job-a"
    assert not RedisLease(clean_redis, 1, "extract", "job-b").acquire()
    lease._stop.set()  # the holder dies without releasing (kill -9)
    lease._thread.join()
    time.sleep(1.7)
    assert RedisLease(clean_redis, 1, "extract", "job-b").acquire()


def test_a_killed_worker_is_followed_within_a_minute_and_shows_failed(clean_redis, redis_url, tmp_path):
    queue = RqJobQueue(clean_redis)
    env = {"REDIS_URL": redis_url, "MODEL_DIR": str(tmp_path / "models")}
    doomed = start_worker(tmp_path, "doomed", **env)
    survivor = None
    try:
        long_job = queue.submit("ping", 1, seconds=300)
        wait_for(lambda: lease_holder(clean_redis, 1, "ping") == long_job.job_id, timeout=60,
                 what="the long ping to hold its lease")
        _kill_worker_and_horse(doomed.proc.pid)  # kill -9 of both, mid-job
        doomed.proc.wait()
        killed_at = time.time()
        survivor = start_worker(tmp_path, "survivor", **env)
        other = queue.submit("ping", 2)  # another project is never held up by project 1
        follow = queue.submit("ping", 1)
        wait_for(lambda: _status(queue, other.job_id) is JobStatus.FINISHED, timeout=45, what="project 2's ping")

        def project_1_ran_again() -> bool:
            return any(j.project == 1 and j.status is JobStatus.FINISHED and (j.result or {}).get("pid")
                       for j in queue.jobs(1))

        wait_for(project_1_ran_again, timeout=75, interval=1, what="project 1's next ping")
        assert time.time() - killed_at < 60 + 15  # worker start-up (imports) included
        assert _status(queue, long_job.job_id) is JobStatus.FAILED  # not "started" for hours
        failed = next(j for j in queue.jobs(1, limit=50) if j.id == long_job.job_id)
        assert "died" in (failed.error or "") or "Abandoned" in (failed.error or "")
        assert not follow.deduplicated  # the follow-up was a new waiting job, not the dead one
    finally:
        if survivor is not None:
            survivor.stop()
        doomed.stop()


def test_at_most_one_running_and_one_waiting_job_per_project_and_kind(clean_redis, redis_url, tmp_path):
    queue = RqJobQueue(clean_redis)
    env = {"REDIS_URL": redis_url, "MODEL_DIR": str(tmp_path / "models")}
    workers = [start_worker(tmp_path, f"w{i}", **env) for i in range(2)]
    try:
        first = queue.submit("ping", 5, seconds=8)
        wait_for(lambda: lease_holder(clean_redis, 5, "ping") == first.job_id, timeout=60, what="the first ping")
        fresh = []
        deadline = time.time() + 5
        while time.time() < deadline:  # webhooks keep arriving while the first job runs
            submitted = queue.submit("ping", 5)
            if not submitted.deduplicated:
                fresh.append(submitted.job_id)
            time.sleep(0.1)
        assert len(fresh) == 1, fresh  # one waiting follow-up, however many events (the old code made 4+)

        def both_done() -> bool:
            jobs = queue.jobs(5, limit=50)
            return len([j for j in jobs if j.status is JobStatus.FINISHED and (j.result or {}).get("pid")]) == 2

        wait_for(both_done, timeout=60, interval=0.5, what="the running and the waiting ping to finish")
        listed = queue.jobs(5, limit=50)
        assert sum(1 for j in listed if not j.status.ended) == 0 and len(listed) == 2  # one entry per logical job
    finally:
        for worker in workers:
            worker.stop()
