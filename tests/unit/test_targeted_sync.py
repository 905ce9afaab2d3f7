"""The sync that scales: a webhook's pointers make the sync re-read only the tasks they name (one annotation,
one task read), several events coalesce, and every pointer that cannot be trusted (an unknown annotation, a
count that does not add up, an event that names nothing, a due reconcile) makes it read every task. Pointers
are removed only once read, in the memory log and in the Redis one alike."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from asvp_backend.jobs.changes import Changes, MemoryChangeLog, RedisChangeLog, changes_of
from asvp_backend.jobs.sync import sync
from asvp_backend.state import TaskSnapshot
from tests.unit.test_rounds_fake_label_studio import PID, Stack


def reads(stack: Stack) -> dict[str, int]:
    return {name: stack.fake.calls.count(name) for name in ("iter_tasks", "get_task", "get_project")}


def synced(stack: Stack) -> dict:
    stack.fake.calls.clear()
    summary = sync(stack.ctx("sync"))
    return {**summary, "calls": reads(stack)}


def snapshot(stack: Stack) -> dict:
    return TaskSnapshot(stack.runtime.settings.model_dir, PID).load()


@pytest.fixture
def stack(tmp_path) -> Stack:
    stack = Stack(tmp_path)
    first = synced(stack)  # no snapshot yet: the first sync reads every task
    assert first["read"] == "full" and first["reason"] == "first sync" and first["calls"]["iter_tasks"] == 1
    return stack


def test_one_annotation_costs_one_task_read(stack):
    stack.fake.annotate(5, "dog")
    summary = synced(stack)
    assert summary["read"] == "targeted" and summary["tasks_read"] == 1
    assert summary["calls"] == {"iter_tasks": 0, "get_task": 1, "get_project": 1}  # and newest_task_id
    assert snapshot(stack)[5].label == "dog" and snapshot(stack)[5].annotations == (5,)
    assert stack.state().last_sync["labelled"] == 1 and stack.runtime.changes.pending(PID).changes == Changes()


def test_a_burst_of_events_coalesces_into_one_read_of_their_tasks(stack):
    for tid in (3, 4, 3, 8, 9):  # task 3 annotated, then edited
        stack.fake.annotate(tid, "cat")
    summary = synced(stack)
    assert summary["tasks_read"] == 4 and summary["calls"]["get_task"] == 4
    assert synced(stack)["tasks_read"] == 0  # a second sync of the burst finds nothing left to read


def test_a_deletion_names_only_the_annotation_and_its_task_is_found_in_the_snapshot(stack):
    stack.fake.annotate(6, "cat")
    synced(stack)
    stack.fake.tasks[6]["annotations"] = []  # Label Studio deletes it; the webhook names annotation 6 only
    stack.runtime.changes.note_now(PID, changes_of("ANNOTATIONS_DELETED", {"annotations": [{"id": 6}]}))
    summary = synced(stack)
    assert summary["read"] == "targeted" and summary["tasks_read"] == 1 and snapshot(stack)[6].label is None
    stack.runtime.changes.note_now(PID, changes_of("ANNOTATIONS_DELETED", {"annotations": [{"id": 999}]}))
    unknown = synced(stack)
    assert unknown["read"] == "full" and "annotation(s) [999] of no task" in unknown["reason"]


def test_tasks_created_or_deleted_without_a_webhook_are_caught_by_the_count(stack):
    stack.fake.tasks[41] = stack.task(41)  # a lost TASKS_CREATED
    stack.fake.annotate(2, "cat")
    summary = synced(stack)
    assert summary["read"] == "full" and "Label Studio holds 41 tasks, the snapshot 40" in summary["reason"]
    assert 41 in snapshot(stack) and snapshot(stack)[2].label == "cat"
    del stack.fake.tasks[41]  # a TASKS_DELETED that arrives: the task is gone from the snapshot
    stack.runtime.changes.note_now(PID, changes_of("TASKS_DELETED", {"tasks": [{"id": 41}]}))
    summary = synced(stack)
    assert summary["read"] == "targeted" and summary["deleted_tasks"] == 1 and 41 not in snapshot(stack)


def test_a_task_created_and_another_deleted_without_webhooks_are_caught_by_the_newest_id(stack):
    del stack.fake.tasks[40]
    stack.fake.tasks[41] = stack.task(41)  # the count is the same
    stack.fake.annotate(2, "cat")
    summary = synced(stack)
    assert summary["read"] == "full" and summary["reason"] == "task 41 is newer than every task of the snapshot"
    assert 41 in snapshot(stack) and 40 not in snapshot(stack)


def test_a_forged_pointer_reads_a_task_and_injects_nothing(stack):
    real_get_task = stack.fake.get_task
    stack.fake.get_task = lambda tid: {**stack.task(tid), "project": PID + 1} if tid == 77 else real_get_task(tid)
    labelled_before = stack.state().last_sync["labelled"]
    for forged in (77, 123456):  # another project's task, and a task that does not exist
        stack.runtime.changes.note_now(PID, changes_of("ANNOTATION_CREATED", {"annotation": {"task": forged}}))
    summary = synced(stack)
    assert summary["read"] == "targeted" and summary["tasks_read"] == 2
    assert not {77, 123456} & set(snapshot(stack)) and stack.state().last_sync["labelled"] == labelled_before


def test_events_that_name_nothing_usable_and_a_due_reconcile_read_everything(stack):
    stack.runtime.changes.note_now(PID, changes_of("ANNOTATION_CREATED", {"annotation": {"task": "x"}}))
    assert synced(stack)["reason"].startswith("asked for: an event named no task to read")
    stack.runtime.store.update(PID, lambda s: setattr(s, "last_full_sync", time.time() - 7200) or s)
    stack.fake.annotate(7, "dog")
    summary = synced(stack)
    assert summary["read"] == "full" and summary["reason"].startswith("reconcile due (RECONCILE_EVERY=3600")
    assert stack.state().last_full_sync > time.time() - 60


def test_a_task_changed_again_while_the_sync_reads_it_stays_for_the_next_sync(stack):
    stack.fake.annotate(9, "cat")
    read_once = stack.fake.get_task

    def get_task(tid):
        task = read_once(tid)
        stack.fake.annotate(9, "dog")  # the annotator edits it right after the sync read it
        stack.fake.get_task = read_once
        return task

    stack.fake.get_task = get_task
    synced(stack)
    assert snapshot(stack)[9].label == "cat"  # what was read
    assert stack.runtime.changes.pending(PID).changes.tasks == {9}  # and the edit is still pending
    synced(stack)
    assert snapshot(stack)[9].label == "dog"


@pytest.mark.parametrize(("action", "payload", "expected"), [
    ("ANNOTATION_CREATED", {"annotation": {"id": 3, "task": 12}, "task": {"id": 12}}, Changes(tasks=frozenset({12}))),
    ("ANNOTATION_UPDATED", {"task": {"id": 12}}, Changes(tasks=frozenset({12}))),
    ("ANNOTATIONS_CREATED", {"task": [{"id": 1}, {"id": 2}]}, Changes(tasks=frozenset({1, 2}))),
    ("ANNOTATIONS_DELETED", {"annotations": [{"id": 4}, {"id": 5}]}, Changes(annotations=frozenset({4, 5}))),
    ("TASKS_CREATED", {"tasks": [{"id": 7, "data": {}}]}, Changes(tasks=frozenset({7}))),
    ("TASKS_DELETED", {"tasks": [{"id": 8}]}, Changes(tasks=frozenset({8}))),
    ("ANNOTATION_CREATED", {}, Changes(full=True)),
    ("TASKS_DELETED", {"tasks": [{"id": -1}]}, Changes(full=True)),
    ("TASKS_DELETED", {"tasks": [{"id": True}]}, Changes(full=True)),
    ("TASKS_CREATED", {"tasks": [{"id": i} for i in range(1, 10_002)]}, Changes(full=True)),
])
def test_pointers_are_taken_from_each_event_and_nothing_else(action, payload, expected):
    assert changes_of(action, payload) == expected


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_change_logs_remove_only_what_a_sync_saw(kind, clean_redis):
    if kind == "memory":
        log = MemoryChangeLog()
    else:
        import redis.asyncio

        log = RedisChangeLog(clean_redis, redis.asyncio.Redis.from_url(_url(clean_redis)))
    asyncio.run(log.note(1, Changes(tasks=frozenset({1, 2}))))
    log.note_now(1, Changes(annotations=frozenset({9}), full=True))
    log.note_now(2, Changes(tasks=frozenset({5})))
    seen = log.pending(1)
    assert seen.changes == Changes(frozenset({1, 2}), frozenset({9}), True)
    log.note_now(1, Changes(tasks=frozenset({2, 3})))  # while the sync reads: 2 again, and 3
    log.done(1, seen.upto)
    assert log.pending(1).changes == Changes(tasks=frozenset({2, 3}))
    assert log.pending(2).changes == Changes(tasks=frozenset({5}))  # other projects untouched


def _url(connection) -> str:
    kwargs = connection.connection_pool.connection_kwargs
    return f"redis://{kwargs.get('host', '127.0.0.1')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


def test_an_api_that_starts_asks_every_project_for_a_full_read(tmp_path):
    """Webhooks sent while no API listened are lost: the first sync after a start reads every task."""
    from tests.unit.test_server import make_client, setup_project

    client, runtime = make_client(tmp_path)
    assert setup_project(client).status_code == 200
    runtime.changes.done(3, runtime.changes.pending(3).upto)
    assert not runtime.changes.pending(3).changes
    with client:  # the app's lifespan: what a process start runs
        assert runtime.changes.pending(3).changes.full
    webhook = {"action": "ANNOTATION_CREATED", "project": {"id": 3}, "annotation": {"id": 8, "task": 42}}
    assert client.post("/webhook", json=webhook).status_code in (200, 201)
    assert runtime.changes.pending(3).changes == Changes(tasks=frozenset({42}), full=True)


def test_the_schedule_queues_a_full_sync_for_projects_whose_last_full_read_is_old(tmp_path):
    from asvp_backend.server.reconcile import submit_due_reconciles
    from tests.unit.test_server import make_client, setup_project

    client, runtime = make_client(tmp_path, LABEL_STUDIO_URL="http://ls.invalid", LABEL_STUDIO_API_KEY="k")
    assert setup_project(client).status_code == 200
    runtime.store.update(3, lambda s: setattr(s, "last_full_sync", 1000.0) or s)
    assert submit_due_reconciles(runtime, now=1000.0 + 3599) == []
    assert submit_due_reconciles(runtime, now=1000.0 + 3600) == [3]
    (job,) = [j for j in runtime.queue.jobs(3) if j.reason.startswith("scheduled reconcile")]
    assert job.kind == "sync" and "RECONCILE_EVERY=3600" in job.reason
    off = dataclasses.replace(runtime, settings=dataclasses.replace(runtime.settings, reconcile_every=0))
    assert submit_due_reconciles(off, now=10**10) == []


def test_a_reconcile_reads_in_slices_and_targeted_reads_go_between_them(tmp_path, monkeypatch):
    monkeypatch.setattr("asvp_backend.jobs.sync.RECONCILE_PAGE", 10)
    stack = Stack(tmp_path, RECONCILE_SLICE_SECONDS="0")  # one page per slice
    assert synced(stack)["reason"] == "first sync"
    stack.fake.on_change = None  # webhooks lost from here on ...
    stack.fake.annotate(25, "dog")
    del stack.fake.tasks[35]
    stack.fake.tasks[41] = stack.task(41)
    stack.fake.on_change = lambda tid: stack.runtime.changes.note_now(PID, Changes(tasks=frozenset({tid})))
    first = sync(stack.ctx("sync", full=True, full_reason="from the status page"))
    assert first["read"] == "reconcile" and first["reconciled"] == 10 and stack.state().reconcile["cursor"] == 10
    assert stack.queue.jobs(PID)[0].reason == "continuing the reconcile"
    stack.fake.annotate(30, "cat")  # ... but this one arrives while the reconcile is under way
    between = synced(stack)
    assert between["calls"]["get_task"] == 1 and snapshot(stack)[30].label == "cat"  # read before the next slice
    assert between["read"] == "reconcile" and between["reconciled"] == 20
    assert snapshot(stack)[25].label is None and 35 in snapshot(stack)  # not reached yet
    slices = 2
    while (summary := synced(stack))["read"] == "reconcile":
        slices += 1
    assert summary["read"] == "full" and summary["reason"] == "from the status page" and slices == 4
    tasks = snapshot(stack)
    assert tasks[25].label == "dog" and 35 not in tasks and 41 in tasks and tasks[30].label == "cat"
    state = stack.state()
    assert state.reconcile is None and state.last_full_sync == pytest.approx(time.time(), abs=60)


@pytest.mark.parametrize("params", [{}, {"full": True, "full_reason": "from the status page"}])
def test_an_unreadable_snapshot_is_rebuilt_by_a_whole_read(stack, params):
    stack.fake.annotate(4, "cat")
    TaskSnapshot(stack.runtime.settings.model_dir, PID).path.write_text('{"1": ["a"')
    summary = sync(stack.ctx("sync", **params))
    assert summary["read"] == "full" and summary["reason"].startswith("the snapshot is unreadable")
    assert len(snapshot(stack)) == 40 and snapshot(stack)[4].label == "cat"


def test_a_label_config_change_is_read_whole_even_when_a_reconcile_was_asked_for(stack):
    stack.fake.label_config = stack.fake.label_config.replace('<Choice value="dog"/>',
                                                              '<Choice value="dog"/><Choice value="bird"/>')
    summary = sync(stack.ctx("sync", full=True, full_reason="from the status page"))
    assert summary["read"] == "full" and summary["reason"] == "the label config changed"
    assert "bird" in stack.state().spec.labels
