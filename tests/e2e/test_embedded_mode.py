"""The README's `make run` mode against a real Label Studio: no Redis, jobs on the in-process worker,
state under MODEL_DIR. One small project goes from connection to a ranked queue."""

from __future__ import annotations

import base64

import pytest
import requests

from tests.conftest import start_backend
from tests.helpers import IMAGE_CONFIG, LabelStudioAPI, free_port, png_bytes, wait_for

pytestmark = pytest.mark.e2e


def test_embedded_backend_ranks_a_project(label_studio, tmp_path):
    url, token = label_studio["url"], label_studio["token"]
    call = LabelStudioAPI(url, token).call

    port = free_port()
    backend = start_backend(tmp_path, port, MODEL_DIR=str(tmp_path / "models"), LABEL_STUDIO_URL=url,
                            LABEL_STUDIO_API_KEY=token, RETRAIN_EVERY="1", DEVICE="cpu")
    try:
        pid = call("POST", "/api/projects", json={"title": "embedded", "label_config": IMAGE_CONFIG})["id"]
        tasks = [{"image": "data:image/png;base64," + base64.b64encode(png_bytes(i)).decode()} for i in range(6)]
        call("POST", f"/api/projects/{pid}/import", json=tasks)
        call("POST", "/api/ml", json={"url": f"http://127.0.0.1:{port}", "project": pid, "title": "embedded"})
        ids = sorted(t["id"] for t in call("GET", "/api/tasks", params={"project": pid})["tasks"])
        for tid, label in zip(ids[:2], ["cat", "dog"], strict=True):  # seeds 0 (red) and 1 (blue)
            result = [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]
            call("POST", f"/api/tasks/{tid}/annotations", json={"result": result})

        def ranked():
            state = requests.get(f"http://127.0.0.1:{port}/projects/{pid}", timeout=5).json()
            rounds = [r for r in state.get("rounds", []) if r["labelled"] == 2 and r["strategy"] == "margin"]
            return rounds[-1] if rounds else None

        record = wait_for(ranked, timeout=180, interval=1, what="a margin round in embedded mode")
        assert record["pool"] == 4 and record["pushed"] == 4
        assert call("GET", f"/api/projects/{pid}")["model_version"] == record["version"]
        assert call("GET", f"/api/projects/{pid}/next")["id"] == record["top_tasks"][0]
        assert (tmp_path / "models" / "projects" / str(pid) / "state.json").exists()  # state on disk, no Redis
    finally:
        backend.stop()
