"""The rq queue against a real Redis server and a real rq worker process."""

import threading

import pytest

from asvp_backend.jobs.rq_queue import RqJobQueue, pending_key
from asvp_backend.labelstudio.label_config import parse_label_config
from asvp_backend.state import ProjectState, RedisStateStore
from tests.conftest import start_worker
from tests.helpers import IMAGE_CONFIG, wait_for

pytestmark = pytest.mark.integration


def test_a_burst_of_submissions_queues_one_job(clean_redis):
    queue = RqJobQueue(clean_redis)
    submitted = [queue.submit("sync", 5, reason="burst") for _ in range(100)]
    assert len({s.job_id for s in submitted}) == 1
    assert sum(not s.deduplicated for s in submitted) == 1
    other = queue.submit("sync", 6)
    assert not other.deduplicated and other.job_id != submitted[0].job_id
    jobs = queue.jobs(5)
    assert [(j.kind, j.status, j.reason) for j in jobs] == [("sync", "queued", "burst")]


def _mark_started(redis, job_id: str, seconds_ago: float) -> None:
    """As rq marks a job when a worker starts it."""
    from datetime import UTC, datetime, timedelta

    from rq.job import Job
    from rq.utils import utcformat

    started = datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=seconds_ago)
    redis.hset(Job.key_for(job_id), mapping={"status": "started", "started_at": utcformat(started)})


def test_submitters_that_all_see_an_abandoned_job_queue_one_waiting_job(clean_redis):
    """The CI flood found three unfinished syncs: every submitter that saw the marked job started long ago
    (its worker died before it took its lease) took the marker over and queued its own. Now only the first
    takeover wins; the rest join it."""
    from rq.job import Job

    queue = RqJobQueue(clean_redis)
    for attempt in range(5):  # a race: several rounds, each with a freshly abandoned job
        running = queue.submit("sync", 7, reason=f"running {attempt}")
        _mark_started(clean_redis, running.job_id, seconds_ago=60)
        barrier = threading.Barrier(16)
        results: list = []

        def submit(barrier=barrier, results=results) -> None:
            barrier.wait()
            results.append(queue.submit("sync", 7, reason="flood"))

        threads = [threading.Thread(target=submit) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        fresh = [s for s in results if not s.deduplicated]
        assert len(fresh) == 1, [s.job_id for s in fresh]
        assert {s.job_id for s in results} == {fresh[0].job_id}
        clean_redis.hset(Job.key_for(fresh[0].job_id), "status", "finished")  # the next round starts clean
        clean_redis.delete(pending_key("sync", 7))


def test_a_job_that_started_but_holds_no_lease_yet_is_still_the_waiting_one(clean_redis):
    """A worker starts the marked job and clears the marker once it holds the lease (or defers it, keeping
    the marker). In between, milliseconds, it has read nothing yet: an event then joins it. Taking the marker
    over there queued a second follow-up behind a running job (test_rq_leases, once in a CI run)."""
    queue = RqJobQueue(clean_redis)
    marked = queue.submit("sync", 8, reason="about to take its lease")
    _mark_started(clean_redis, marked.job_id, seconds_ago=0.05)
    joined = queue.submit("sync", 8, reason="an event meanwhile")
    assert joined.deduplicated and joined.job_id == marked.job_id

    _mark_started(clean_redis, marked.job_id, seconds_ago=60)  # its worker died before it took the lease
    fresh = queue.submit("sync", 8, reason="an event after the grace")
    assert not fresh.deduplicated and fresh.job_id != marked.job_id


def test_a_real_worker_runs_jobs_reports_progress_and_failures(clean_redis, redis_url, tmp_path):
    queue = RqJobQueue(clean_redis)
    worker = start_worker(tmp_path, "worker", REDIS_URL=redis_url, MODEL_DIR=str(tmp_path / "models"))
    try:
        ping = queue.submit("ping", 1)
        failing = queue.submit("sync", 999)  # never set up: the job must fail with a reason, not hang

        def ended():
            jobs = {j.id: j for j in queue.jobs(limit=10)}
            done = [jobs.get(ping.job_id), jobs.get(failing.job_id)]
            return all(j and j.status in {"finished", "failed"} for j in done) and jobs

        jobs = wait_for(ended, timeout=60, what="both jobs to end")
        assert jobs[ping.job_id].status == "finished", worker.log()
        assert jobs[ping.job_id].progress["done"] == 3 and jobs[ping.job_id].result["project"] == 1
        assert jobs[failing.job_id].status == "failed"
        assert "ProjectNotFound" in jobs[failing.job_id].error
        # the pending marker was cleared when the job started, so a new event queues a new job
        again = queue.submit("ping", 1)
        assert not again.deduplicated and again.job_id != ping.job_id
    finally:
        worker.stop()


def test_redis_state_store_serialises_writers(clean_redis):
    store = RedisStateStore(clean_redis)
    spec = parse_label_config(IMAGE_CONFIG)
    store.update(9, lambda _: ProjectState.new(9, IMAGE_CONFIG, spec))

    def bump():
        for _ in range(15):
            store.update(9, lambda s: (s.advance_round(), s)[1])

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.require(9).round == 60
    assert store.project_ids() == [9]


def test_webhook_burst_through_the_api_on_redis_makes_one_job(clean_redis, redis_url, tmp_path):
    from fastapi.testclient import TestClient

    from asvp_backend.bootstrap import build_runtime
    from asvp_backend.config import Settings
    from asvp_backend.server.app import create_app

    settings = Settings.from_env({"REDIS_URL": redis_url, "MODEL_DIR": str(tmp_path)})
    runtime = build_runtime(settings)
    with TestClient(create_app(runtime)) as client:  # runs the start-up warm-up too
        client.post("/setup", json={"project": "8.1", "schema": IMAGE_CONFIG})
        event = {"action": "ANNOTATION_UPDATED", "project": {"id": 8}}
        replies = [client.post("/webhook", json=event).json() for _ in range(50)]
    assert len({r["job"] for r in replies}) == 1 and [r["deduplicated"] for r in replies].count(False) == 1
    assert [j.kind for j in RqJobQueue(clean_redis).jobs(8)] == ["sync"]
