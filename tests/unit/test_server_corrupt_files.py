"""A corrupt file of one project is named, isolated to that project, and repaired where it can be rebuilt;
/metrics reads counters, never job records."""

from __future__ import annotations

from asvp_backend.artefacts import RANKING_FILE
from asvp_backend.layout import ProjectLayout
from tests.helpers import IMAGE_CONFIG
from tests.unit.test_server import make_client, write_ranking


def _setup(client, project: int) -> None:
    assert client.post("/setup", json={"project": f"{project}.1", "schema": IMAGE_CONFIG}).status_code == 200


def test_a_truncated_state_breaks_only_its_own_project_and_setup_repairs_it(tmp_path):
    client, _ = make_client(tmp_path)
    _setup(client, 1)
    _setup(client, 2)
    write_ranking(tmp_path, 2, [10, 11], [0.1, 0.2], ["cat", "dog"])
    state_file = ProjectLayout(tmp_path, 2).state_file
    state_file.write_bytes(state_file.read_bytes()[:30])

    listed = client.get("/versions")
    assert listed.status_code == 200 and "asvp-g0-r0" in listed.json()["versions"]  # project 1 still listed
    broken = client.get("/projects/2")
    assert broken.status_code == 409 and "state.json" in broken.json()["detail"]
    assert client.get("/projects/1").status_code == 200

    repaired = client.post("/setup", json={"project": "2.1", "schema": IMAGE_CONFIG})
    assert repaired.status_code == 200
    assert repaired.json()["model_version"] == "asvp-g0-r1"  # resumed from the round on disk, not r0
    served = client.post("/predict", json={"project": "2.1", "tasks": [{"id": 10, "data": {}}]}).json()
    assert abs(served["results"][0]["score"] - 0.1) < 1e-6


def test_a_corrupt_ranking_answers_empty_predictions_and_queues_a_round(tmp_path):
    client, runtime = make_client(tmp_path, LABEL_STUDIO_URL="http://ls.invalid", LABEL_STUDIO_API_KEY="k")
    _setup(client, 3)
    write_ranking(tmp_path, 3, [10, 11], [0.1, 0.2], ["cat", "dog"])
    path = ProjectLayout(tmp_path, 3).round_dir("asvp-g0-r1") / RANKING_FILE
    path.write_bytes(b"not a zip file")
    reply = client.post("/predict", json={"project": "3.1", "tasks": [{"id": 10, "data": {}}]})
    assert reply.status_code == 200 and reply.json()["results"][0]["score"] is None
    queued = runtime.queue.jobs(3)
    assert [(j.kind, "ranking.npz" in j.reason) for j in queued] == [("round", True)]
    problems = client.get("/projects/3").json()["problems"]
    assert any("ranking.npz" in p for p in problems)


def test_predict_does_not_queue_a_sync_per_call_for_known_unranked_tasks(tmp_path):
    client, runtime = make_client(tmp_path, LABEL_STUDIO_URL="http://ls.invalid", LABEL_STUDIO_API_KEY="k")
    _setup(client, 4)
    write_ranking(tmp_path, 4, [10], [0.1], ["cat"])
    runtime.store.update(4, lambda s: (setattr(s, "last_sync", {"max_task_id": 20}), s)[1])
    for _ in range(50):  # task 15 is known to the last sync (its image was skipped, or it is labelled)
        client.post("/predict", json={"project": "4.1", "tasks": [{"id": 15, "data": {}}]})
    assert runtime.queue.jobs(4) == []
    client.post("/predict", json={"project": "4.1", "tasks": [{"id": 21, "data": {}}]})  # a new task
    assert [j.kind for j in runtime.queue.jobs(4)] == ["sync"]


def test_metrics_read_counters_not_job_records(tmp_path):
    client, runtime = make_client(tmp_path)
    _setup(client, 5)
    client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 5}})

    def no_listing(*args, **kwargs):
        raise AssertionError("a scrape must not list jobs")

    runtime.queue.jobs = no_listing  # type: ignore[method-assign]
    text = client.get("/metrics").text
    assert 'asvp_jobs_total{event="submitted",kind="sync"} 1.0' in text
    assert 'asvp_queue_length{queue="cpu"} 1.0' in text
