"""The requests Label Studio 1.23.2's web UI really sends, replayed against the app.

The fixtures in tests/fixtures/label_studio_ui/ were captured from the UI by tests/e2e/test_label_studio_ui.py
(a recording proxy between Label Studio and the backend; secrets replaced by a placeholder). Hand-written
bodies missed that the Connect and Edit forms send `extra_params` as a string, and the UI's Connect
failed with a 422 while every API test passed; these replays keep the real shapes in the fast suite.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_server import make_client

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "label_studio_ui"
SETUPS = ["setup_connect", "setup_edit"]
ALL = [*SETUPS, "webhook_start_training", "predict_task_open"]
SECRET_KEYS = {"access_token", "password", "basic_auth_pass", "token", "task_data_password"}
CLOSED = "http://127.0.0.1:9"  # nothing listens: /setup's check of Label Studio fails at once, offline


def load(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def offline(setup: dict[str, Any]) -> dict[str, Any]:
    """The captured /setup with only its Label Studio address changed, so the replay never leaves the host."""
    return {**setup, "hostname": CLOSED}


@pytest.fixture
def app(tmp_path):
    return make_client(tmp_path)


def secrets_in(value: Any) -> list[str]:
    """Every non-empty string under a secret's key, anywhere in the body."""
    if isinstance(value, dict):
        return [item for key, v in value.items() for item in
                ([v] if key in SECRET_KEYS and isinstance(v, str) and v else secrets_in(v))]
    if isinstance(value, list):
        return [item for v in value for item in secrets_in(v)]
    return []


@pytest.mark.parametrize("name", ALL)
def test_every_captured_request_is_here_and_carries_no_secret(name):
    body = load(name)
    assert body
    assert set(secrets_in(body)) <= {"<redacted>"}


@pytest.mark.parametrize("name", SETUPS)
def test_the_ui_forms_setup_sends_extra_params_as_text_and_is_accepted(app, name):
    client, _ = app
    body = load(name)
    assert isinstance(body["extra_params"], str)  # the form's text box, sent even when empty
    response = client.post("/setup", json=offline(body))
    assert 200 <= response.status_code < 300, response.text
    assert response.json()["model_version"].startswith("asvp-g0-r")


def test_a_filled_extra_params_box_is_accepted_too(app):
    """What the form sends when a person types JSON into "Any extra params to pass during model connection"."""
    client, _ = app
    body = {**offline(load("setup_connect")), "extra_params": '{"note": "typed in the form"}'}
    response = client.post("/setup", json=body)
    assert 200 <= response.status_code < 300, response.text


def test_start_training_from_the_model_menu_queues_a_train_job(app):
    client, runtime = app
    assert client.post("/setup", json=offline(load("setup_connect"))).status_code == 200
    body = load("webhook_start_training")
    assert body["action"] == "START_TRAINING"
    response = client.post("/webhook", json=body)
    assert response.status_code == 201, response.text
    job = response.json()["job"]
    queued = {j.id: j.kind for j in runtime.queue.jobs(body["project"]["id"])}
    assert queued.get(job) == "train", queued


def test_the_predict_label_studio_sends_when_a_task_opens_is_answered(app):
    client, _ = app
    assert client.post("/setup", json=offline(load("setup_connect"))).status_code == 200
    body = load("predict_task_open")
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(body["tasks"]) == 1
    assert results[0]["model_version"].startswith("asvp-g0-r") and results[0]["result"] == []  # not ranked yet
