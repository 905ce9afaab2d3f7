"""The embedded job engine: the waiting rule, eviction, the journal across restarts, deferral, deadlines."""

from __future__ import annotations

import threading
import time

import pytest

from asvp_backend.bootstrap import build_runtime
from asvp_backend.config import Settings
from asvp_backend.jobs.context import JobContext, JobTimeout
from asvp_backend.jobs.inprocess import InProcessJobQueue
from asvp_backend.jobs.runner import run_job
from asvp_backend.jobs.status import JobStatus
from tests.helpers import wait_for


def test_a_waiting_job_is_never_evicted_by_other_submissions():
    release = threading.Event()

    def execute(kind, project, job_id, params, reporter):
        if kind == "extract":
            release.wait(30)  # the gpu thread is busy with project 1's extract
        return "ok"

    queue = InProcessJobQueue()
    queue.start(execute)
    running = queue.submit("extract", 1)
    wait_for(lambda: queue.jobs(1)[0].status is JobStatus.STARTED, what="the first extract to start")
    waiting = queue.submit("extract", 2)
    for project in range(100, 100 + InProcessJobQueue.MAX_ENDED_RECORDS + 200):
        queue.submit("ping", project)
    wait_for(lambda: queue.jobs(100 + InProcessJobQueue.MAX_ENDED_RECORDS + 199)[0].status.ended, timeout=60,
             what="the pings to end")
    assert [j.id for j in queue.jobs(2)] == [waiting.job_id]  # still there after 1,200 other jobs
    release.set()
    wait_for(lambda: queue.jobs(2)[0].status is JobStatus.FINISHED, what="the waiting extract to run")
    assert queue.jobs(1)[0].id == running.job_id
    queue.close()


def test_unfinished_jobs_resume_after_a_restart(tmp_path):
    journal = tmp_path / "queue.json"
    first = InProcessJobQueue(journal=journal)  # a server that queued jobs and then died before running them
    first.submit("extract", 3, reason="tasks without features")
    first.submit("sync", 4)
    ran: list[tuple[str, int]] = []
    second = InProcessJobQueue(journal=journal)
    resumed = second.start(lambda kind, project, job_id, params, reporter: ran.append((kind, project)))
    assert len(resumed) == 2
    wait_for(lambda: len(ran) == 2, what="the resumed jobs to run")
    assert sorted(ran) == [("extract", 3), ("sync", 4)]
    wait_for(lambda: all(j.status.ended for j in second.jobs()), what="the journal to be written")
    third = InProcessJobQueue(journal=journal)
    assert third.start(lambda *a: None) == []  # finished jobs are not resumed again
    for queue in (second, third):
        queue.close()


def test_a_job_whose_lease_is_taken_waits_without_holding_the_worker(tmp_path):
    runtime = build_runtime(Settings.from_env({"MODEL_DIR": str(tmp_path)}))
    try:
        busy = runtime.queue.submit("ping", 1, seconds=3)
        wait_for(lambda: runtime.queue.jobs(1)[0].status is JobStatus.STARTED, what="the first ping")
        # a second ping of project 1 must wait for the lease; project 2's ping must not wait behind it
        lease = runtime.lease(1, "ping", "someone-else")
        follow = runtime.queue.submit("ping", 1)
        other = runtime.queue.submit("ping", 2)
        wait_for(lambda: runtime.queue.jobs(2)[0].status is JobStatus.FINISHED, timeout=3,
                 what="project 2's ping while project 1 is busy")
        assert not lease.acquire()  # the running ping holds it
        duplicates = {runtime.queue.submit("ping", 1).job_id for _ in range(20)}
        assert len(duplicates) == 1 and follow.job_id not in {busy.job_id, other.job_id}
        wait_for(lambda: [j.status for j in runtime.queue.jobs(1)] == [JobStatus.FINISHED, JobStatus.FINISHED],
                 timeout=30, what="both pings of project 1")
        counters = runtime.queue.counters()
        assert counters["finished:ping"] == 3 and counters.get("deferred:ping", 0) >= 1
    finally:
        runtime.close()


def test_a_job_past_its_time_limit_stops_at_its_next_checkpoint(tmp_path):
    runtime = build_runtime(Settings.from_env({"MODEL_DIR": str(tmp_path)}), start_jobs=False)
    ctx = JobContext("ping", 1, "j", {}, runtime, deadline=time.monotonic() - 1)
    with pytest.raises(JobTimeout, match="time limit"):
        ctx.progress(1, 10)


def test_run_job_gives_each_kind_its_time_limit(tmp_path):
    runtime = build_runtime(Settings.from_env({"MODEL_DIR": str(tmp_path), "JOB_TIMEOUT": "10"}),
                            start_jobs=False)
    with pytest.raises(JobTimeout):  # JOB_TIMEOUT caps every kind: a 30 s ping stops after 10 s
        run_job(runtime, "ping", 1, "ping-1", {"seconds": 30})
