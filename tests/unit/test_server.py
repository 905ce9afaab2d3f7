"""The HTTP contract Label Studio relies on, against the app with the embedded (in-process) queue."""

import base64
import json

import pytest
from fastapi.testclient import TestClient

from asvp_backend.config import Settings
from asvp_backend.jobs.inprocess import InProcessJobQueue
from asvp_backend.runtime import Runtime
from asvp_backend.server.app import create_app
from asvp_backend.state import FileStateStore
from tests.helpers import IMAGE_CONFIG

JSON = {"content-type": "application/json"}  # every route that changes something takes JSON only (guards.py)


def make_client(tmp_path, **env):
    settings = Settings.from_env({"MODEL_DIR": str(tmp_path), **env})
    # the queue is never started: tests observe what is queued, nothing runs
    runtime = Runtime(settings=settings, store=FileStateStore(tmp_path), queue=InProcessJobQueue())
    return TestClient(create_app(runtime), raise_server_exceptions=False), runtime


@pytest.fixture
def client(tmp_path):
    client, _ = make_client(tmp_path)
    return client


def write_ranking(model_dir, project_id, task_ids, scores, labels):
    """A round's ranking as the round job writes it, and the project's state advanced to that round."""
    import numpy as np

    from asvp_backend.artefacts import RankingArtefact, write_round
    from asvp_backend.layout import ProjectLayout
    from asvp_backend.versioning import ModelVersion

    ranking = RankingArtefact(np.array(task_ids), np.array(scores), np.array(labels))
    write_round(ProjectLayout(model_dir, project_id), ModelVersion(0, 1), ranking, None)
    FileStateStore(model_dir).update(project_id, lambda s: (s.advance_round(), s)[1])


def setup_project(client, project="3.1700000000"):
    return client.post(
        "/setup",
        json={
            "project": project,
            "schema": IMAGE_CONFIG,
            "hostname": "http://127.0.0.1:9",  # nothing listens: the connection check fails at once, offline
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
    for item in results:  # nothing ranked yet: placeholders outside the version Label Studio's queue follows
        assert set(item) == {"result", "score", "model_version"} and item["model_version"] == "asvp-g0-r0-unranked"


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
    setup_project(client)
    write_ranking(tmp_path, 3, [11, 12], [0.25, 0.05], ["dog", ""])
    tasks = [{"id": 12, "data": {}}, {"id": 99, "data": {}}, {"id": 11, "data": {}}]
    results = client.post("/predict", json={"tasks": tasks, "project": "3.1"}).json()["results"]
    assert results[0] == {"result": [], "score": pytest.approx(0.05), "model_version": "asvp-g0-r1"}
    assert results[1] == {"result": [], "score": None, "model_version": "asvp-g0-r1-unranked"}  # not ranked yet
    assert results[2]["result"][0]["value"] == {"choices": ["dog"]}
    assert results[2]["score"] == pytest.approx(0.25)


def test_a_label_removed_from_the_config_is_not_offered(client, tmp_path):
    setup_project(client)
    write_ranking(tmp_path, 3, [11], [0.2], ["dog"])
    edited = IMAGE_CONFIG.replace('<Choice value="dog"/>', '<Choice value="bird"/>')
    assert client.post("/setup", json={"project": "3.1", "schema": edited}).json()["model_version"] == "asvp-g0-r1"
    result = client.post("/predict", json={"tasks": [{"id": 11, "data": {}}], "project": "3.1"}).json()
    assert result["results"][0]["result"] == [] and result["results"][0]["score"] == pytest.approx(0.2)


# ------------------------------------------------------------------ ids (issue item 13)
BAD_PROJECTS = [True, False, 0, -5, 2**31, 10**30, 3.0, "true", "²", "٣", "1" * 5000, "-5", "0", " 3", "3x", "3.", ""]


@pytest.mark.parametrize("project", BAD_PROJECTS, ids=lambda value: repr(value)[:12])
def test_setup_refuses_anything_but_a_project_id(client, project):
    response = client.post("/setup", json={"project": project, "schema": IMAGE_CONFIG})
    assert response.status_code == 400 and "project" in response.json()["detail"]


@pytest.mark.parametrize("project", BAD_PROJECTS, ids=lambda value: repr(value)[:12])
def test_predict_and_webhook_refuse_anything_but_a_project_id(client, project):
    setup_project(client, "1.1")
    tasks = [{"id": 1, "data": {}}]
    predict = client.post("/predict", json={"tasks": tasks, "project": project, "label_config": IMAGE_CONFIG})
    assert predict.status_code == 400 and "project" in predict.json()["detail"]
    for named in (project, {"id": project}):
        webhook = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": named})
        assert webhook.status_code == 400 and "project" in webhook.json()["detail"]


@pytest.mark.parametrize("project", ["true", "²", "1" * 5000, "-5", "0", str(2**31), "3x"], ids=lambda v: v[:12])
def test_routes_reading_a_project_from_the_url_refuse_bad_ids(client, project):
    setup_project(client, "1.1")
    for response in (
        client.get("/versions", params={"project": project}),
        client.get("/jobs", params={"project": project}),
        client.get(f"/projects/{project}"),
    ):
        assert response.status_code == 400, response.text
        assert "project" in response.json()["detail"]


def test_true_is_not_project_1(client):
    setup_project(client, "1.1")
    other = IMAGE_CONFIG.replace('<Choice value="dog"/>', '<Choice value="bird"/>')
    assert client.post("/setup", json={"project": True, "schema": other}).status_code == 400
    assert client.get("/projects/1").json()["spec"]["labels"] == ["cat", "dog"]


def test_good_project_ids_in_every_form(client):
    assert setup_project(client, "7").status_code == 200
    assert setup_project(client, 2**31 - 1).status_code == 200
    assert client.get("/projects/7").status_code == 200
    assert client.get("/versions", params={"project": "7.1700000000"}).json()["versions"] == ["asvp-g0-r0"]
    assert client.get("/jobs", params={"project": "7"}).status_code == 200


@pytest.mark.parametrize("task_id", [True, -5, 0, 10**30, 2**31, "5", 5.0, None])
def test_predict_refuses_task_ids_label_studio_cannot_have(client, task_id):
    setup_project(client)
    response = client.post("/predict", json={"tasks": [{"id": task_id, "data": {}}], "project": "3.1"})
    assert response.status_code == 400 and "tasks[0] needs an integer id" in response.json()["detail"]


# ------------------------------------------------------------------ lone surrogates (issue item 14)
def post_raw(client, path, text):
    return client.post(path, content=text.encode(), headers={"content-type": "application/json"})


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/setup", '{"project": "3.1", "schema": "<View>\\ud800</View>"}'),
        ("/setup", '{"project": "3.1", "schema": "x", "extra_params": {"\\udc00": 1}}'),
        ("/predict", '{"project": "3.1", "tasks": [{"id": 1, "data": {"image": ["a", "\\uDBFF"]}}]}'),
        ("/webhook", '{"action": "ANNOTATION_CREATED\\ud800", "project": {"id": 3}}'),
    ],
)
def test_a_lone_surrogate_is_refused_with_a_message(client, path, body):
    setup_project(client)
    response = post_raw(client, path, body)
    assert response.status_code == 422
    assert "lone UTF-16 surrogate" in response.json()["detail"]


def test_utf8_encoded_surrogates_are_refused_and_pairs_are_fine(client):
    encoded = b'{"project": "3.1", "schema": "<View>\xed\xa0\x80</View>"}'
    response = client.post("/setup", content=encoded, headers={"content-type": "application/json"})
    assert response.status_code == 422 and "not valid UTF-8" in response.json()["detail"]
    text = json.dumps({"project": "3.1", "schema": IMAGE_CONFIG.replace('value="dog"', 'value="dog \U0001f436"')})
    assert "\\ud83d\\udc36" in text  # json.dumps writes the emoji as an escaped surrogate pair
    response = post_raw(client, "/setup", text)
    assert response.status_code == 200, response.text
    assert client.get("/projects/3").json()["spec"]["labels"] == ["cat", "dog \U0001f436"]


# ------------------------------------------------------------------ GET / (Label Studio's guides curl it)
def test_root_answers_like_health_and_needs_no_credentials(tmp_path):
    client, _ = make_client(tmp_path, BASIC_AUTH_USER="ls", BASIC_AUTH_PASS="s3cret-pass")
    root, health = client.get("/"), client.get("/health")
    assert root.status_code == 200 and root.json() == health.json()
    assert root.json()["status"] == "UP" and root.json()["redis"] == "not used"


# ------------------------------------------------------------------ body limits and the webhook secret
def test_webhook_secret_is_checked_before_the_body(tmp_path):
    client, _ = make_client(tmp_path, WEBHOOK_SECRET="hook-secret")
    not_even_json = b"x" * 100_000
    assert client.post("/webhook", content=not_even_json).status_code == 403
    assert client.post("/webhook?secret=wrong", content=not_even_json).status_code == 403
    assert client.post("/webhook?secret=hook-secret", content=not_even_json, headers=JSON).status_code == 422


def test_each_route_has_its_own_body_limit(client):
    from asvp_backend.server.app import BODY_LIMITS, OTHER_BODY_LIMIT

    over = {"/webhook": BODY_LIMITS["/webhook"] + 1, "/setup": BODY_LIMITS["/setup"] + 1,
            "/versions": OTHER_BODY_LIMIT + 1}
    for path, size in over.items():
        response = client.request("POST" if path != "/versions" else "GET", path, content=b" " * size)
        assert response.status_code == 413, path
    under = client.post("/setup", content=json.dumps({"project": "3.1", "schema": IMAGE_CONFIG + " " * 2**20}),
                        headers=JSON)
    assert under.status_code == 200


def test_large_bodies_are_handled_and_leave_the_garbage_collector_on(client):
    import gc

    setup_project(client)
    tasks = [{"id": i, "data": {"image": f"/data/upload/3/{i}.png" + " " * 100}} for i in range(1, 5001)]
    assert len(json.dumps(tasks)) > 512 * 1024  # parsed in a worker thread, with the collector paused
    response = client.post("/predict", json={"tasks": tasks, "project": "3.1"})
    assert response.status_code == 200 and len(response.json()["results"]) == 5000
    broken = client.post("/predict", content=json.dumps({"tasks": tasks})[:-1].encode(), headers=JSON)
    assert broken.status_code == 422 and "not valid JSON" in broken.json()["detail"]
    bulk = {"action": "TASKS_CREATED", "project": {"id": 3}, "tasks": tasks}  # a bulk event, as Label Studio sends
    hooked = client.post("/webhook", json=bulk)  # /predict queued a sync (with /setup's token) already
    assert hooked.status_code == 200 and hooked.json()["deduplicated"]
    assert gc.isenabled()
