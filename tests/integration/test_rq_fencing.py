"""Fencing tokens on a real Redis: each tenure of a lease gets a higher token, stored with it; a holder
whose lease lapsed fails its check (naming who took over), never deletes the new holder's lease, and a
round run through `run_job` that is taken over between two Label Studio writes makes no second write."""

from __future__ import annotations

import dataclasses
import time

import pytest

from asvp_backend.jobs.leases import LeaseLost, RedisLease, lease_holder, lease_key
from asvp_backend.jobs.runner import run_job
from asvp_backend.jobs.sync import sync
from tests.unit.test_rounds_fake_label_studio import PID, Stack

pytestmark = pytest.mark.integration


def _pause(lease: RedisLease) -> None:
    """The holder stops renewing (a paused or starved process), without releasing."""
    lease._stop.set()
    assert lease._thread is not None
    lease._thread.join()


def test_each_tenure_gets_a_higher_token_stored_with_the_lease(clean_redis):
    tokens = []
    for holder in ("job-a", "job-b", "job-c"):
        lease = RedisLease(clean_redis, 1, "round", holder)
        assert lease.acquire()
        assert clean_redis.get(lease_key(1, "round")) == f"{holder}|{lease.token}".encode()
        assert lease_holder(clean_redis, 1, "round") == holder  # readers still see the job id
        assert not RedisLease(clean_redis, 1, "round", "job-x").acquire()  # a refused try takes no token
        lease.check()
        lease.release()
        tokens.append(lease.token)
    assert tokens == [1, 2, 3]
    other = RedisLease(clean_redis, 2, "round", "job-d")  # counters are per (project, lease)
    assert other.acquire() and other.token == 1
    other.release()


def test_a_lapsed_holder_fails_its_check_and_never_frees_the_new_holders_lease(clean_redis):
    old = RedisLease(clean_redis, 1, "round", "round-old", seconds=1.0)
    assert old.acquire()
    _pause(old)
    time.sleep(1.3)  # past the TTL: expired, nobody took it yet
    with pytest.raises(LeaseLost, match="expired .* nobody took it over"):
        old.check()
    assert not old.superseded()
    old.lost = None  # look again once another job holds it
    new = RedisLease(clean_redis, 1, "round", "round-new")
    assert new.acquire() and new.token == old.token + 1
    with pytest.raises(LeaseLost, match=rf"another worker took over .*round-new, token {new.token}"):
        old.check()
    assert old.superseded()
    old.release()  # a late release must not free the new holder's lease
    assert lease_holder(clean_redis, 1, "round") == "round-new"
    new.check()
    new.release()


def test_a_round_taken_over_between_two_writes_makes_no_second_write(tmp_path, clean_redis):
    stack = Stack(tmp_path)
    stack.runtime = dataclasses.replace(stack.runtime, redis=clean_redis)  # RedisLease, on the real Redis
    stack.label(range(1, 9))
    sync(stack.ctx("sync"))
    queued = stack.queue.jobs(PID)[0]
    delete = stack.fake.delete_model_version
    successor: list[RedisLease] = []

    def paused_after_delete(pid: int, version: str) -> None:
        delete(pid, version)
        clean_redis.delete(lease_key(PID, "round"))  # its lease lapses while the work-horse is paused ...
        taker = RedisLease(clean_redis, PID, "round", "round-successor")
        assert taker.acquire()  # ... and another worker's round takes it
        successor.append(taker)

    stack.fake.delete_model_version = paused_after_delete  # type: ignore[method-assign]
    stack.fake.calls.clear()
    try:
        with pytest.raises(LeaseLost, match="another worker took over .*round-successor"):
            run_job(stack.runtime, "round", PID, queued.id, {})
        assert stack.fake.calls == ["delete_model_version"]  # the import never reached Label Studio
        assert stack.fake.predictions == [] and stack.state().round == 0
        assert lease_holder(clean_redis, PID, "round") == "round-successor"  # the loser's release freed nothing
        assert not [j for j in stack.queue.jobs(PID) if "redo" in j.reason]  # taken over: nothing to redo
    finally:
        for taker in successor:
            taker.release()
