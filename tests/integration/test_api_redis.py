"""The API when Redis is down (a closed port, or a server that accepts and never answers) and when it is up:
/health stays 200 and fast but says DEGRADED and why; routes that need Redis answer 503 with a message."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from asvp_backend.bootstrap import build_runtime
from asvp_backend.config import Settings
from asvp_backend.server.app import RedisProbe, create_app
from tests.helpers import IMAGE_CONFIG, free_port


def client_for(tmp_path, redis_url: str) -> TestClient:
    """Without `with`: the app's start (lifespan) is not run, so nothing waits on a Redis that is down."""
    settings = Settings.from_env({"MODEL_DIR": str(tmp_path), "REDIS_URL": redis_url})
    return TestClient(create_app(build_runtime(settings)), raise_server_exceptions=False)


@pytest.fixture
def silent_redis() -> Iterator[str]:
    """A port that accepts connections and never says a word: a hung or black-holed Redis."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"


def test_health_says_degraded_at_once_when_redis_is_down(tmp_path):
    client = client_for(tmp_path, f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    started = time.perf_counter()
    response = client.get("/health")
    assert time.perf_counter() - started < 1
    body = response.json()
    assert response.status_code == 200 and body["status"] == "DEGRADED"
    assert body["redis"].startswith("down: ConnectionError") and len(body["redis"]) < 150


def test_the_probe_waits_at_most_a_quarter_second_for_a_silent_redis(silent_redis):
    probe = RedisProbe(silent_redis)

    async def ask_three_times() -> list[tuple[float, str]]:
        answers = []
        for _ in range(3):
            started = time.perf_counter()
            state = await probe.state()
            answers.append((time.perf_counter() - started, state))
            await asyncio.sleep(0.6)  # the first ping times out (0.5 s) in the meantime
        return answers

    answers = asyncio.run(ask_three_times())
    assert all(seconds < RedisProbe.WAIT_S + 0.1 for seconds, _ in answers), answers
    assert answers[0][1] == "down: no answer yet"
    assert answers[1][1] == answers[2][1] == "down: TimeoutError: Timeout reading from socket"
    probe.close()


def test_routes_that_need_redis_answer_503_with_a_message(tmp_path):
    client = client_for(tmp_path, f"redis://127.0.0.1:{free_port()}/0")
    calls = [
        ("POST", "/setup", {"project": "1.1", "schema": IMAGE_CONFIG}),
        ("POST", "/predict", {"project": "1.1", "tasks": [{"id": 1, "data": {}}]}),
        ("POST", "/webhook", {"action": "ANNOTATION_CREATED", "project": {"id": 1}}),
        ("GET", "/versions", None),
        ("GET", "/jobs?project=1", None),
        ("GET", "/projects/1", None),
    ]
    for method, path, body in calls:
        started = time.perf_counter()
        response = client.request(method, path, json=body)
        assert time.perf_counter() - started < 5, path
        assert response.status_code == 503, (path, response.text)
        assert response.json() == {"detail": "Redis unavailable, try again"}
        assert response.headers["retry-after"] == "5"


@pytest.mark.integration
def test_health_says_ok_with_redis_up(tmp_path, redis_url):
    client = client_for(tmp_path, redis_url)
    body = client.get("/health").json()
    assert body["status"] == "UP" and body["redis"] == "ok" and body["queue"] == "rq"
    assert client.get("/versions").status_code == 200  # read-only: other tests share this database


def test_a_fresh_api_process_serves_predictions_from_the_shared_volume_while_redis_is_down(tmp_path):
    """A second API process (WORKERS=2) that never read the project answered 503 to every /predict while the
    round's ranking sat readable on the shared volume."""
    import numpy as np

    from asvp_backend.artefacts import RankingArtefact, write_round
    from asvp_backend.layout import ProjectLayout
    from asvp_backend.versioning import ModelVersion

    ranking = RankingArtefact(np.array([11, 12]), np.array([0.2, 0.7]), np.array(["cat", "dog"]))
    write_round(ProjectLayout(tmp_path, 1), ModelVersion(0, 1), ranking, None)  # the round, on the shared volume
    client = client_for(tmp_path, f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    body = {"project": "1.1", "label_config": IMAGE_CONFIG, "tasks": [{"id": 11, "data": {}}, {"id": 99, "data": {}}]}
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.text
    first, unknown = response.json()["results"]
    assert first["model_version"] == "asvp-g0-r1" and first["score"] == pytest.approx(0.2)
    assert first["result"][0]["value"]["choices"] == ["cat"]
    assert unknown["score"] is None
    assert client.get("/health").json()["status"] == "DEGRADED"
    # once read, the process keeps serving it, like a state it read from Redis
    again = client.post("/predict", json={**body, "label_config": None}).json()
    assert again["results"][0]["score"] == pytest.approx(0.2)
    # without a label config (an API user's call) there is nothing to format a result with: still a 503
    write_round(ProjectLayout(tmp_path, 2), ModelVersion(0, 1), ranking, None)
    assert client.post("/predict", json={**body, "project": 2, "label_config": None}).status_code == 503
