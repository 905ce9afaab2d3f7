import threading

import pytest

from asvp_backend.labelstudio.label_config import parse_label_config
from asvp_backend.state import FileStateStore, ProjectState, SyncedTask, TaskSnapshot
from asvp_backend.versioning import ModelVersion
from tests.helpers import IMAGE_CONFIG


def test_version_string_round_trips_and_orders():
    v = ModelVersion(1, 12)
    assert str(v) == "asvp-g1-r12" and ModelVersion.parse("asvp-g1-r12") == v
    assert ModelVersion(0, 3).next_round() == ModelVersion(0, 4)
    assert ModelVersion(0, 3).next_generation() == ModelVersion(1, 4)
    assert ModelVersion(1, 2) > ModelVersion(0, 9)
    with pytest.raises(ValueError):
        ModelVersion.parse("0.0.1")


def test_file_store_survives_concurrent_updates(tmp_path):
    store = FileStateStore(tmp_path)
    spec = parse_label_config(IMAGE_CONFIG)
    store.update(7, lambda _: ProjectState.new(7, IMAGE_CONFIG, spec))

    def bump() -> None:
        for _ in range(20):
            store.update(7, lambda s: (s.advance_round(), s)[1])

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    state = store.require(7)
    assert state.round == 80  # no lost update
    assert state.versions[-1] == "asvp-g0-r80" and len(state.versions) == 50
    assert store.project_ids() == [7]
    assert not list(tmp_path.rglob("*.tmp"))


def test_state_json_round_trip():
    spec = parse_label_config(IMAGE_CONFIG)
    state = ProjectState.new(3, IMAGE_CONFIG, spec)
    state.advance_round()
    state.record_round({"round": 1, "labels": 5})
    again = ProjectState.from_json(state.to_json())
    assert again == state and again.spec.labels == ("cat", "dog")


def test_task_snapshot_round_trip(tmp_path):
    snap = TaskSnapshot(tmp_path, 4)
    assert snap.load() == {}
    tasks = {1: SyncedTask("/data/upload/1/a.png", "cat"), 2: SyncedTask(None, None)}
    snap.save(tasks)
    assert snap.load() == tasks
