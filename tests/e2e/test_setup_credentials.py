"""End to end against Label Studio 1.23.2: connecting needs no LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY (the
backend reads the project with /setup's hostname and the creator's token), and a wrong token is reported
when the project is connected, not discovered later as a queue that never re-ranks."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import requests

from tests.conftest import start_backend, start_worker
from tests.e2e.test_label_studio import annotate, backend_state, wait_for_round
from tests.helpers import IMAGE_CONFIG, LabelStudioAPI, free_port, png_bytes

pytestmark = pytest.mark.e2e

WRONG_TOKEN = "not-the-token-0123456789abcdef"


def new_project(ls: LabelStudioAPI, title: str, images: int) -> int:
    pid = ls.call("POST", "/api/projects", json={"title": title, "label_config": IMAGE_CONFIG})["id"]
    files = [(f"file{i}", (f"img_{i}.png", png_bytes(i), "image/png")) for i in range(images)]
    ls.call("POST", f"/api/projects/{pid}/import", files=files)  # uploads: reading them needs URL and token
    return pid


@pytest.fixture(scope="module")
def without_env(label_studio, redis_url, tmp_path_factory):
    """API (two uvicorn workers) and one rq worker, neither told where Label Studio is."""
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    tmp = tmp_path_factory.mktemp("setup-credentials")
    port = free_port()
    env = {"REDIS_URL": redis_url, "MODEL_DIR": str(tmp / "models"), "WORKERS": "2", "RETRAIN_EVERY": "1",
           "EXTRACT_WORKERS": "0", "EXTRACT_BATCH_SIZE": "8", "DEVICE": "cpu"}
    backend = start_backend(tmp, port, **env)
    worker = start_worker(tmp, "worker", **env)
    try:
        yield {"url": f"http://127.0.0.1:{port}", "backend": backend, "worker": worker, "models": tmp / "models"}
    finally:
        worker.stop()
        backend.stop()


def test_setup_credentials_connect_sync_and_rank_a_project(label_studio, without_env):
    ls = LabelStudioAPI(label_studio["url"], label_studio["token"])
    pid = new_project(ls, "asvp /setup credentials", images=6)
    ml = ls.call("POST", "/api/ml", json={"url": without_env["url"], "project": pid, "title": "asvp"})
    assert ml["state"] == "CO", ml

    state = backend_state({"backend": without_env["url"]}, pid)
    assert state["problems"] == [], state["problems"]
    assert label_studio["token"] not in json.dumps(state)
    record = Path(without_env["models"]) / "projects" / str(pid) / "label-studio.json"
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    assert json.loads(record.read_text())["check"]["ok"] is True

    tasks = sorted(ls.tasks(pid), key=lambda t: t["id"])
    for task, label in zip(tasks[:2], ["dog", "cat"], strict=True):  # even seeds are red, odd ones blue
        annotate(ls, task["id"], label)
    stack = {"backend": without_env["url"], "worker": without_env["worker"]}
    record_round = wait_for_round(stack, pid, labelled=2)
    assert record_round["pool"] == 4
    assert ls.call("GET", f"/api/projects/{pid}")["model_version"] == record_round["version"]
    for task in [t for t in ls.tasks(pid) if not t["annotations"]]:
        assert record_round["version"] in [p["model_version"] for p in task["predictions"]]

    logs = without_env["backend"].log() + without_env["worker"].log()
    assert label_studio["token"] not in logs


def test_a_wrong_token_is_reported_when_the_project_is_connected(label_studio, tmp_path):
    port = free_port()
    backend = start_backend(tmp_path, port, MODEL_DIR=str(tmp_path / "models"),
                            LABEL_STUDIO_URL=label_studio["url"], LABEL_STUDIO_API_KEY=WRONG_TOKEN)
    url = f"http://127.0.0.1:{port}"
    try:
        ls = LabelStudioAPI(label_studio["url"], label_studio["token"])
        pid = new_project(ls, "asvp wrong token", images=1)
        ml = ls.call("POST", "/api/ml", json={"url": url, "project": pid, "title": "asvp"})
        assert ml["state"] == "CO", ml  # connected all the same: Label Studio would not show why it was refused

        problems = backend_state({"backend": url}, pid)["problems"]
        assert any("refused the token (HTTP 401)" in p and "LABEL_STUDIO_API_KEY" in p for p in problems), problems
        reply = requests.post(f"{url}/setup", json={"project": pid, "schema": IMAGE_CONFIG}, timeout=5).json()
        assert reply["status"] == "ok" and "refused the token" in reply["warning"]
        assert reply["label_studio"] == {"url": label_studio["url"], "credentials": "environment",
                                         "tasks_readable": False}
        log = backend.log()
        assert "refused the token" in log and WRONG_TOKEN not in log and label_studio["token"] not in log
    finally:
        backend.stop()
