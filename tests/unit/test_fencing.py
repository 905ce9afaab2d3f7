"""Fencing without Redis: the guard on the job's Label Studio client and state store, the embedded lease's
token, and a round run through `run_job` whose lease is lost between two Label Studio writes (the second
never reaches Label Studio). tests/integration/test_rq_fencing.py does the same on a real Redis, and
tests/e2e/test_fencing_label_studio.py with a paused work-horse against a real Label Studio."""

from __future__ import annotations

import pytest

from asvp_backend.jobs.fencing import FencedLabelStudio, FencedStateStore
from asvp_backend.jobs.leases import FileLease, Lease, LeaseLost
from asvp_backend.jobs.runner import run_job
from asvp_backend.jobs.sync import sync
from asvp_backend.labelstudio.client import PREDICTION_BATCH
from asvp_backend.state import FileStateStore, ProjectState
from tests.fakes import FakeLabelStudio
from tests.helpers import IMAGE_CONFIG
from tests.unit.test_rounds_fake_label_studio import PID, Stack


class LosableLease(Lease):
    """A lease a test takes away: `lose()` as if the holder was paused past its TTL and `taken_over` says
    whether another job took it meanwhile."""

    def __init__(self) -> None:
        self.token = 7
        self.lost: str | None = None
        self.taken_over = False
        self.checks = 0

    def acquire(self) -> bool:
        return True

    def release(self) -> None:
        pass

    def lose(self, taken_over: bool = True) -> None:
        self.lost = "lease lost: another worker took over (test)" if taken_over else "lease lost: expired (test)"
        self.taken_over = taken_over

    def check(self) -> None:
        self.checks += 1
        self.raise_if_lost()

    def raise_if_lost(self) -> None:
        if self.lost:
            raise LeaseLost(self.lost)

    def superseded(self) -> bool:
        return self.taken_over


def fake_label_studio() -> FakeLabelStudio:
    return FakeLabelStudio(IMAGE_CONFIG, [{"id": t, "data": {"image": f"http://x.invalid/{t}.png"}, "annotations": []}
                                          for t in range(1, 4)])


def test_the_embedded_lease_token_grows_and_its_check_needs_the_flock(tmp_path):
    tokens = []
    for _ in range(3):
        lease = FileLease(tmp_path / ".round.lease")
        assert lease.acquire()
        lease.check()  # held: an flock cannot be lost while its process lives
        tokens.append(lease.token)
        lease.release()
        with pytest.raises(LeaseLost, match="not held"):
            lease.check()
    assert tokens == [1, 2, 3]
    other = FileLease(tmp_path / ".round.lease")
    first = FileLease(tmp_path / ".round.lease")
    assert first.acquire() and not other.acquire() and first.token == 4
    first.release()


def test_a_write_after_the_lease_is_lost_never_reaches_label_studio():
    fake, lease = fake_label_studio(), LosableLease()
    client = FencedLabelStudio(fake, lease.check)
    client.delete_model_version(1, "asvp-g0-r1")
    client.update_project(1, model_version="asvp-g0-r1")
    lease.lose()
    for write in (lambda: client.import_predictions(1, [{"task": 1, "result": [], "model_version": "v"}]),
                  lambda: client.delete_model_version(1, "asvp-g0-r1"),
                  lambda: client.update_project(1, sampling="x"),
                  lambda: client.ensure_ranking_view(1),
                  lambda: client.request("POST", "/api/dm/views/", json={})):
        with pytest.raises(LeaseLost):
            write()
    assert fake.calls == ["delete_model_version", "update_project"]  # nothing after the loss
    assert fake.predictions == []
    assert client.model_versions(1) == {} and client.url == fake.url  # reads pass through


def test_an_import_is_fenced_batch_by_batch():
    fake, lease = fake_label_studio(), LosableLease()
    calls = []

    def fence() -> None:
        calls.append(1)
        if len(calls) == 2:  # lost while the first batch was being sent
            lease.lose()
        lease.check()

    predictions = [{"task": i, "result": [], "model_version": "v"} for i in range(PREDICTION_BATCH * 2 + 10)]
    with pytest.raises(LeaseLost):
        FencedLabelStudio(fake, fence).import_predictions(1, predictions)
    assert len(fake.predictions) == PREDICTION_BATCH  # the batch in flight when the loss happened, no more


def test_a_state_write_is_fenced_under_the_lock_right_before_it_is_stored(tmp_path):
    from asvp_backend.labelstudio.label_config import parse_label_config

    inner = FileStateStore(tmp_path)
    inner.update(1, lambda _: ProjectState.new(1, IMAGE_CONFIG, parse_label_config(IMAGE_CONFIG)))
    lease = LosableLease()
    store = FencedStateStore(inner, lease.check)

    def bump(state: ProjectState | None) -> ProjectState | None:
        assert state is not None
        state.labels_at_last_round += 1
        return state

    store.update(1, bump)
    assert inner.require(1).labels_at_last_round == 1 and lease.checks == 1
    lease.lose()
    with pytest.raises(LeaseLost):
        store.update(1, bump)
    with pytest.raises(LeaseLost):
        store.quarantine(1)
    assert inner.require(1).labels_at_last_round == 1  # unchanged, and not moved aside
    assert store.require(1).labels_at_last_round == 1  # reads pass through


@pytest.mark.parametrize("taken_over", [True, False])
def test_a_round_whose_lease_is_lost_between_two_writes_stops_and_says_why(tmp_path, taken_over):
    stack = Stack(tmp_path)
    stack.label(range(1, 9))
    sync(stack.ctx("sync"))
    before = stack.state()
    lease = LosableLease()
    stack.runtime.lease = lambda project_id, kind, holder: lease  # type: ignore[method-assign]
    delete = stack.fake.delete_model_version

    def paused_after_delete(pid: int, version: str) -> None:
        delete(pid, version)
        lease.lose(taken_over)  # the work-horse stops here for longer than the lease lives

    stack.fake.delete_model_version = paused_after_delete  # type: ignore[method-assign]
    stack.fake.calls.clear()
    queued = stack.queue.jobs(PID)[0]  # the round the sync queued: this test runs it
    assert queued.kind == "round"
    with pytest.raises(LeaseLost, match="lease lost"):
        run_job(stack.runtime, "round", PID, queued.id, {})
    assert stack.fake.calls == ["delete_model_version"]  # no import, no PATCH, no tab
    assert stack.fake.predictions == [] and stack.fake.project["model_version"] == ""
    after = stack.state()
    assert after.round == before.round and after.rounds == before.rounds  # the state did not advance
    counters = stack.queue.counters()
    assert counters.get("lease_lost:round") == 1 and counters.get("failed:round") == 1
    redone = [j for j in stack.queue.jobs(PID) if j.kind == "round" and j.reason == f"redo: {queued.id} lost its lease"]
    # taken over: the new holder converges the project; expired with nobody taking it: one fresh round
    assert len(redone) == (0 if taken_over else 1), [j.reason for j in stack.queue.jobs(PID)]
