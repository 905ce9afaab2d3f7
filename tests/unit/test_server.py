"""The HTTP contract Label Studio relies on, against the app with the embedded (in-process) queue."""

import base64
import json

import pytest
from fastapi.testclient import TestClient

from asvp_backend.config import Settings
from asvp_backend.jobs.queue import InProcessJobQueue
from asvp_backend.runtime import Runtime, set_runtime
from asvp_backend.server.app import create_app
from asvp_backend.state import FileStateStore
from tests.helpers import IMAGE_CONFIG


def make_client(tmp_path, **env):
    settings = Settings.from_env({"MODEL_DIR": str(tmp_path), **env})
    runtime = Runtime(settings=settings, store=FileStateStore(tmp_path), queue=InProcessJobQueue(start=False))
    set_runtime(runtime)
    return TestClient(create_app(runtime), raise_server_exceptions=False), runtime


@pytest.fixture
def client(tmp_path):
    client, runtime = make_client(tmp_path)
    yield client
    set_runtime(None)


def setup_project(client, project="3.1700000000"):
    return client.post(
        "/setup",
        json={
            "project": project,
            "schema": IMAGE_CONFIG,
            "hostname": "http://ls",
            "access_token": "tok",
            "extra_params": None,
        },
    )


def test_health_is_json_up(client):
    response = client.get("/health")
    assert response.status_code == 200 and response.json()["status"] == "UP"


def test_setup_returns_version_and_never_resets_it(client, tmp_path):
    assert setup_project(client).json()["model_version"] == "asvp-g0-r0"
    store = FileStateStore(tmp_path)
    store.update(3, lambda s: (s.advance_round(), s)[1])
    store.update(3, lambda s: (s.advance_round(), s)[1])
    assert setup_project(client).json()["model_version"] == "asvp-g0-r2"


def test_setup_refuses_configs_we_cannot_serve_with_a_4xx(client):
    response = client.post(
        "/setup", json={"project": "4.1", "schema": "<View><Text name='t' value='$t'/></View>"}
    )
    assert response.status_code == 400 and "no <Image>" in response.json()["detail"]
    assert client.get("/versions", params={"project": 4}).status_code == 404  # nothing was stored


def test_predict_one_result_per_task_in_order(client):
    setup_project(client)
    tasks = [{"id": i, "data": {"image": f"/data/upload/3/{i}.png"}} for i in (5, 2, 9)]
    response = client.post(
        "/predict", json={"tasks": tasks, "project": "3.1700000000", "label_config": IMAGE_CONFIG}
    )
    results = response.json()["results"]
    assert len(results) == 3
    for item in results:
        assert set(item) == {"result", "score", "model_version"} and item["model_version"] == "asvp-g0-r0"


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ("{not json", 422, "invalid request"),
        (json.dumps({"project": "3.1"}), 422, "tasks"),
        (json.dumps({"tasks": "x", "project": "3.1"}), 422, "tasks"),
        (json.dumps({"tasks": [{"id": "a", "data": {}}], "project": "3.1"}), 400, "integer id"),
        (json.dumps({"tasks": [], "project": "abc"}), 400, "project must be"),
        (json.dumps({"tasks": [{"id": 1, "data": {}}], "project": "99.1"}), 404, "unknown project 99"),
        (json.dumps({"tasks": [{"id": 1, "data": {}}]}), 400, "project is required"),
    ],
)
def test_predict_bad_input_is_a_clear_4xx(client, body, status, message):
    setup_project(client)
    response = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert message in response.json()["detail"]


def test_huge_bodies_are_refused(tmp_path):
    client, _ = make_client(tmp_path, MAX_BODY_BYTES="2048")
    response = client.post(
        "/predict", content=b"{" + b" " * 5000 + b"}", headers={"content-type": "application/json"}
    )
    assert response.status_code == 413


def test_webhook_burst_makes_one_job_and_project_updated_trains_nothing(client):
    setup_project(client)
    payload = {
        "action": "ANNOTATION_CREATED",
        "project": {"id": 3},
        "annotation": {"id": 1},
        "task": {"id": 1},
    }
    replies = [client.post("/webhook", json=payload).json() for _ in range(100)]
    assert len({r["job"] for r in replies}) == 1 and sum(not r["deduplicated"] for r in replies) == 1
    ignored = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 3}}).json()
    assert ignored["status"] == "ignored"
    unknown = client.post("/webhook", json={"action": "SOMETHING_NEW", "project": {"id": 3}})
    assert unknown.status_code == 200 and "unknown event" in unknown.json()["reason"]
    train = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 3}}).json()
    assert train["status"] == "ok" and train["job"].startswith("train-p3-")
    jobs = client.get("/jobs", params={"project": 3}).json()["jobs"]
    assert sorted(j["kind"] for j in jobs) == ["sync", "train"]
    assert all(j["status"] == "queued" for j in jobs)


def test_webhook_for_an_unknown_project_is_ignored(client):
    reply = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 42}})
    assert reply.status_code == 200 and reply.json()["status"] == "ignored"


def test_versions_lists_every_project_newest_first(client, tmp_path):
    setup_project(client, "3.1")
    setup_project(client, "4.1")
    store = FileStateStore(tmp_path)
    store.update(4, lambda s: (s.advance_round(), s)[1])
    assert client.get("/versions").json()["versions"] == ["asvp-g0-r1", "asvp-g0-r0"]
    assert client.get("/versions", params={"project": 3}).json()["versions"] == ["asvp-g0-r0"]


def test_metrics_are_prometheus_text(client):
    client.get("/health")
    text = client.get("/metrics").text
    assert 'asvp_http_requests_total{method="GET",route="/health",status="200"}' in text
    assert "asvp_jobs" in text and "asvp_http_request_seconds_bucket" in text


def test_basic_auth_guards_everything_but_health_and_webhook(tmp_path):
    client, _ = make_client(
        tmp_path, BASIC_AUTH_USER="ls", BASIC_AUTH_PASS="s3cret-pass", WEBHOOK_SECRET="hook"
    )
    assert client.get("/health").status_code == 200
    assert client.get("/versions").status_code == 401
    good = "Basic " + base64.b64encode(b"ls:s3cret-pass").decode()
    bad = "Basic " + base64.b64encode(b"ls:wrong").decode()
    assert client.get("/versions", headers={"Authorization": bad}).status_code == 401
    assert client.get("/versions", headers={"Authorization": good}).status_code == 200
    event = {"action": "ANNOTATION_CREATED", "project": {"id": 1}}
    assert client.post("/webhook", json=event).status_code == 403
    assert client.post("/webhook", json=event, headers={"X-Webhook-Secret": "hook"}).status_code == 200
    assert client.post("/webhook?secret=hook", json=event).status_code == 200


def test_no_secret_in_error_bodies_or_logs(tmp_path, caplog):
    client, _ = make_client(
        tmp_path, BASIC_AUTH_USER="ls", BASIC_AUTH_PASS="s3cret-pass", WEBHOOK_SECRET="hook"
    )
    auth = {"Authorization": "Basic " + base64.b64encode(b"ls:s3cret-pass").decode()}
    response = client.post(
        "/setup", json={"project": "1.1", "schema": "<View/>", "access_token": "LS-TOKEN-XYZ"}, headers=auth
    )
    assert response.status_code == 400
    combined = response.text + caplog.text
    for secret in ("s3cret-pass", "LS-TOKEN-XYZ", "hook"):
        assert secret not in combined


def test_predict_serves_the_rounds_label_and_score(client, tmp_path):
    import numpy as np

    from asvp_backend.jobs.rounds import _write_artefacts
    from asvp_backend.versioning import ModelVersion

    setup_project(client)
    _write_artefacts(tmp_path, 3, ModelVersion(0, 1), None, np.array([11, 12]), np.array([0.25, 0.05]),
                     np.array(["dog", ""]))
    FileStateStore(tmp_path).update(3, lambda s: (s.advance_round(), s)[1])
    tasks = [{"id": 12, "data": {}}, {"id": 99, "data": {}}, {"id": 11, "data": {}}]
    results = client.post("/predict", json={"tasks": tasks, "project": "3.1"}).json()["results"]
    assert results[0] == {"result": [], "score": pytest.approx(0.05), "model_version": "asvp-g0-r1"}
    assert results[1] == {"result": [], "score": None, "model_version": "asvp-g0-r1"}  # not ranked yet
    assert results[2]["result"][0]["value"] == {"choices": ["dog"]}
    assert results[2]["score"] == pytest.approx(0.25)


def test_a_label_removed_from_the_config_is_not_offered(client, tmp_path):
    import numpy as np

    from asvp_backend.jobs.rounds import _write_artefacts
    from asvp_backend.versioning import ModelVersion

    setup_project(client)
    _write_artefacts(tmp_path, 3, ModelVersion(0, 1), None, np.array([11]), np.array([0.2]), np.array(["dog"]))
    FileStateStore(tmp_path).update(3, lambda s: (s.advance_round(), s)[1])
    edited = IMAGE_CONFIG.replace('<Choice value="dog"/>', '<Choice value="bird"/>')
    assert client.post("/setup", json={"project": "3.1", "schema": edited}).json()["model_version"] == "asvp-g0-r1"
    result = client.post("/predict", json={"tasks": [{"id": 11, "data": {}}], "project": "3.1"}).json()
    assert result["results"][0]["result"] == [] and result["results"][0]["score"] == pytest.approx(0.2)
