"""Fencing end to end, the way it broke (issue 17): a round's work-horse is paused (SIGSTOP, standing in for
a VM pause or CPU starvation) in the middle of its push, past the lease's life; the recovery re-queues the
round, a second worker runs it under a new fencing token; the paused work-horse is resumed and must write
nothing more. Before fencing it imported its predictions too: two predictions of one version per task.

Real Label Studio 1.23.2 behind a TCP proxy (to catch the round at its first write), a private Redis, the
API and two rq workers with a short lease (LEASE_SECONDS) so the test takes well under two minutes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections import Counter

import pytest

from asvp_backend.jobs.leases import lease_holder
from tests.e2e.test_faults_label_studio import converged, jobs_of, label_some, new_project, private_stack
from tests.helpers import TcpProxy, wait_for

pytestmark = pytest.mark.e2e

LEASE_SECONDS = 4


@pytest.fixture(scope="module")
def stack(label_studio, tmp_path_factory):
    with private_stack(label_studio, tmp_path_factory.mktemp("e2e-fencing"), workers=2,
                       LEASE_SECONDS=str(LEASE_SECONDS)) as state:
        yield state


def work_horses(stack) -> list[int]:
    """The rq work-horses of our workers: a worker forks one per job, so each child runs a job now."""
    horses = []
    for worker in stack["workers"]:
        found = subprocess.run(["pgrep", "-P", str(worker.proc.pid)], capture_output=True, text=True).stdout
        horses += [int(pid) for pid in found.split()]
    return horses


def predictions_per_version(stack, pid: int) -> dict[int, Counter]:
    return {t["id"]: Counter(p["model_version"] for p in t["predictions"]) for t in stack["ls"].tasks(pid)}


def test_a_round_paused_past_its_lease_writes_nothing_after_another_worker_took_over(stack):
    started = time.time()
    proxy: TcpProxy = stack["proxy"]
    redis = stack["redis"].client()
    project = new_project(stack, "fencing: paused round")
    pid = project["id"]
    label_some(stack, project, [0, 1])
    converged(stack, pid)

    # the next round is caught at its first write (the DELETE of its new version's predictions) ...
    first_write = re.compile(rb"^DELETE /api/projects/%d/model-versions/" % pid)
    proxy.hold = lambda data: bool(first_write.match(data))
    earlier = {j["id"] for j in jobs_of(stack, pid)}
    label_some(stack, project, [2])  # -> a sync -> a round
    wait_for(lambda: proxy.held >= 1 and lease_holder(redis, pid, "round"), timeout=90,
             what="the round to reach its first Label Studio write")
    paused_job = lease_holder(redis, pid, "round")
    horses = work_horses(stack)
    assert len(horses) == 1, f"one work-horse expected (the round's), found {horses}"
    os.kill(horses[0], signal.SIGSTOP)  # ... and its work-horse paused there, past the lease's life
    paused_at = time.time()
    try:
        proxy.hold = None  # the DELETE it had sent lands now, while its lease is still valid

        def successor_finished() -> dict | None:
            return next((j for j in jobs_of(stack, pid) if j["kind"] == "round" and j["id"] != paused_job
                         and j["id"] not in earlier and j["status"] == "finished"
                         and (j["result"] or {}).get("version")), None)

        successor = wait_for(successor_finished, timeout=90, interval=0.5,
                             what="another worker to take the round over and push it")
    finally:
        os.kill(horses[0], signal.SIGCONT)
    paused_for = time.time() - paused_at
    version = successor["result"]["version"]  # re-queued by the recovery of dead jobs, under a new token
    wait_for(lambda: horses[0] not in work_horses(stack), timeout=60, what="the resumed work-horse to end")
    # exactly one prediction set per version: no task has two predictions of one model_version
    counts = predictions_per_version(stack, pid)
    doubled = {tid: dict(c) for tid, c in counts.items() if any(n > 1 for n in c.values())}
    assert not doubled, f"tasks with two predictions of one version: {doubled}"

    def paused_job_ended() -> dict | None:
        job = next(j for j in jobs_of(stack, pid) if j["id"] == paused_job)
        return job if job["status"] == "failed" and "lease lost" in (job["error"] or "") else None

    stopped = wait_for(paused_job_ended, timeout=30, interval=0.5, what="the paused round's record: lease lost")
    assert "another worker took over" in stopped["error"], stopped
    record = converged(stack, pid)
    assert record["version"] == version and record["labelled"] == 3
    counts = predictions_per_version(stack, pid)
    open_tasks = [t["id"] for t in stack["ls"].tasks(pid) if not t["annotations"]]
    assert all(counts[tid][version] == 1 for tid in open_tasks), counts  # the successor's set, whole
    assert not any(n > 1 for c in counts.values() for n in c.values()), counts
    redone = [j for j in jobs_of(stack, pid) if j["reason"].startswith(f"redo: {paused_job}")]
    assert not redone, redone  # it was taken over: the lost job is not run again
    log = "".join(worker.log() for worker in stack["workers"])
    assert f"job {paused_job} stopped before its next write: lease lost" in log
    print(f"round paused {paused_for:.0f}s past a {LEASE_SECONDS}s lease: taken over by {successor['id']}, the "
          f"paused one stopped with {stopped['error']!r}; {time.time() - started:.0f}s in all")
