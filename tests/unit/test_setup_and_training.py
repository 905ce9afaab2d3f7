"""What Label Studio's UI sends to /setup and /webhook, and what the backend does with it at once.

The UI's Connect and Edit forms send `extra_params` as the text of their box ("" when empty); typed as an
object, /setup answered 422 and the UI said the backend "doesn't look like a valid ML backend". Connecting
queues the first sync, so the queue is ranked before the first task is opened, and Start Training pressed
while a training is under way joins it instead of queueing another identical fine-tune.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.helpers import IMAGE_CONFIG
from tests.unit.test_server import make_client


@pytest.fixture
def readable_label_studio() -> Iterator[str]:
    """A stand-in for Label Studio that answers the connection check's one-task read."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802  (http.server's name)
            body = json.dumps({"tasks": [], "total": 0}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def setup_body(hostname: str = "http://127.0.0.1:9", **extra: object) -> dict[str, object]:
    return {"project": "3.1700000000", "schema": IMAGE_CONFIG, "hostname": hostname, "access_token": "tok", **extra}


@pytest.mark.parametrize("extra_params", ["", "  ", '{"threshold": 0.5}', "null", {"threshold": 0.5}, None],
                         ids=["empty-text", "blank-text", "json-text", "json-null", "object", "null"])
def test_setup_accepts_every_form_of_extra_params_label_studio_sends(tmp_path, extra_params):
    client, _ = make_client(tmp_path)
    response = client.post("/setup", json=setup_body(extra_params=extra_params))
    assert response.status_code == 200, response.text
    assert response.json()["model_version"] == "asvp-g0-r0"


def test_setup_without_extra_params_is_fine(tmp_path):
    client, _ = make_client(tmp_path)
    assert client.post("/setup", json=setup_body()).status_code == 200


@pytest.mark.parametrize("extra_params", ["{not json", "[1, 2]", "5", 7, [1]])
def test_extra_params_that_are_no_json_object_are_refused_with_the_reason_logged(tmp_path, caplog, extra_params):
    client, _ = make_client(tmp_path)
    with caplog.at_level(logging.WARNING, logger="asvp_backend.server.app"):
        response = client.post("/setup", json=setup_body(extra_params=extra_params))
    assert response.status_code == 400
    assert "extra_params must be a JSON object" in response.json()["detail"]
    refused = [r for r in caplog.records if r.levelno == logging.WARNING and "/setup refused" in r.getMessage()]
    assert refused and "extra_params" in refused[0].getMessage()
    assert "tok" not in caplog.text


def test_every_setup_refusal_is_logged_at_warning(tmp_path, caplog):
    client, _ = make_client(tmp_path)
    with caplog.at_level(logging.WARNING, logger="asvp_backend.server.app"):
        assert client.post("/setup", json={"project": "3.1"}).status_code == 422  # no schema
        assert client.post("/setup", json=setup_body(schema="<View/>")).status_code == 400
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("/setup refused" in m and "schema" in m for m in messages), messages
    assert any("refused the label config" in m for m in messages), messages


def test_an_integer_literal_too_long_to_parse_is_a_400_not_a_500(tmp_path):
    client, _ = make_client(tmp_path)
    huge = "1" * 5000
    for path, body in [("/setup", f'{{"project": {huge}, "schema": "x"}}'),
                       ("/predict", f'{{"project": 3, "tasks": [{{"id": {huge}}}]}}'),
                       ("/webhook", f'{{"action": "ANNOTATION_CREATED", "project": {huge}}}')]:
        response = client.post(path, content=body.encode(), headers={"content-type": "application/json"})
        assert response.status_code == 400, (path, response.text)
        assert "JSON" in response.json()["detail"]


def queued(runtime, kind: str) -> list:
    return [job for job in runtime.queue.jobs(3) if job.kind == kind]


def test_connecting_queues_the_first_sync_once(tmp_path, readable_label_studio):
    client, runtime = make_client(tmp_path)
    reply = client.post("/setup", json=setup_body(readable_label_studio, extra_params="")).json()
    assert reply["label_studio"]["tasks_readable"] is True
    assert reply["sync"]["reason"] == "connected"
    assert [job.reason for job in queued(runtime, "sync")] == ["/setup: connected"]
    # Label Studio calls /setup again on every settings page and before predictions: still one waiting sync
    again = client.post("/setup", json=setup_body(readable_label_studio)).json()
    assert again["sync"]["job"] == reply["sync"]["job"]
    assert len(queued(runtime, "sync")) == 1


def test_a_synced_project_is_synced_again_only_when_its_label_config_changes(tmp_path, readable_label_studio):
    client, runtime = make_client(tmp_path)
    client.post("/setup", json=setup_body(readable_label_studio))
    runtime.store.update(3, lambda s: (setattr(s, "last_sync", {"at": 1.0, "tasks": 0}), s)[1])
    client, runtime = make_client(tmp_path)  # the same MODEL_DIR, a new process with an empty queue
    assert "sync" not in client.post("/setup", json=setup_body(readable_label_studio)).json()
    assert queued(runtime, "sync") == []
    changed = IMAGE_CONFIG.replace('<Choice value="dog"/>', '<Choice value="dog"/><Choice value="bird"/>')
    reply = client.post("/setup", json=setup_body(readable_label_studio, schema=changed)).json()
    assert reply["sync"]["reason"] == "label config changed"


def test_no_sync_is_queued_when_label_studio_cannot_be_read(tmp_path):
    client, runtime = make_client(tmp_path)
    reply = client.post("/setup", json=setup_body()).json()  # nothing listens at the hostname
    assert "warning" in reply and "sync" not in reply
    assert queued(runtime, "sync") == []


def start_training(client):
    return client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 3}})


def test_start_training_pressed_again_joins_the_training_under_way(tmp_path):
    client, runtime = make_client(tmp_path)
    client.post("/setup", json=setup_body())
    first = start_training(client)
    assert first.status_code == 201 and "Start Training queued" in first.json()["message"]
    second = start_training(client)
    assert second.status_code == 200 and second.json()["deduplicated"] is True
    assert second.json()["job"] == first.json()["job"]
    assert "already queued; this press joins it" in second.json()["message"]
    assert len(queued(runtime, "train")) == 1


def test_start_training_joins_a_running_fine_tune_and_says_how_far_it_is(tmp_path):
    from asvp_backend.jobs.status import JobStatus

    client, runtime = make_client(tmp_path)
    client.post("/setup", json=setup_body())
    job = runtime.queue.submit("finetune", 3, reason="Start Training").job_id
    record = runtime.queue._records[job]
    record.info.status, record.info.started_at = JobStatus.STARTED, __import__("time").time()
    runtime.queue.set_progress(job, {"done": 22, "total": 250, "stage": "fine-tuning", "at": record.info.started_at})
    reply = start_training(client).json()
    assert reply["job"] == job and reply["deduplicated"] is True
    assert "already running (fine-tuning 22/250)" in reply["message"]
    assert queued(runtime, "train") == []


def test_a_running_job_that_went_silent_is_not_joined(tmp_path):
    from asvp_backend.jobs.queue import SILENT_JOB_S
    from asvp_backend.jobs.status import JobStatus

    client, runtime = make_client(tmp_path)
    client.post("/setup", json=setup_body())
    job = runtime.queue.submit("finetune", 3, reason="Start Training").job_id
    record = runtime.queue._records[job]
    record.info.status, record.info.started_at = JobStatus.STARTED, __import__("time").time() - SILENT_JOB_S - 5
    reply = start_training(client)
    assert reply.status_code == 201 and reply.json()["job"] != job
