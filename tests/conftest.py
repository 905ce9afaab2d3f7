"""Fixtures with real parts: a Redis server, rq workers, Label Studio 1.23.2 and the backend as processes.

`make test` starts Redis when none answers and builds Label Studio's own virtual environment; these
fixtures fail loudly (not skip) when a part is missing, so CI can never pass by skipping.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.helpers import wait_for
from tests.processes import Process, start_label_studio

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    url = os.environ.get("ASVP_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
    connection = redis.Redis.from_url(url)
    try:
        connection.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"no Redis at {url} ({exc}); run `make redis` or set ASVP_TEST_REDIS_URL")
    return url


@pytest.fixture
def clean_redis(redis_url: str):
    import redis

    connection = redis.Redis.from_url(redis_url)
    connection.flushdb()
    yield connection
    connection.flushdb()


def backend_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO", "REDIS_URL", "MODEL_DIR"))}
    env.update({"PYTHONPATH": str(ROOT), "LOG_LEVEL": "info", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


#: a small, fast e2e stack: the real Lite0 weights at 64 px, the logistic proxy, images decoded in the worker
FAST_STACK = {"EXTRACT_WORKERS": "0", "EXTRACT_BATCH_SIZE": "8", "DEVICE": "cpu", "IMAGE_SIZE": "64",
              "PROXY": "logistic"}


def stack_env(label_studio: dict[str, str], redis_url: str, tmp: Path, **overrides: str) -> dict[str, str]:
    """An e2e stack's settings: Redis, MODEL_DIR under `tmp`, the Label Studio connection and FAST_STACK;
    `overrides` win."""
    return {"REDIS_URL": redis_url, "MODEL_DIR": str(tmp / "models"), "LABEL_STUDIO_URL": label_studio["url"],
            "LABEL_STUDIO_API_KEY": label_studio["token"], **FAST_STACK, **overrides}


def start_worker(tmp: Path, name: str, **env: str) -> Process:
    return Process(
        name, [sys.executable, "-m", "asvp_backend", "worker", "--queues", "cpu,gpu"], backend_env(**env), tmp
    )


def start_backend(tmp: Path, port: int, **env: str) -> Process:
    proc = Process(
        "backend",
        [sys.executable, "-m", "asvp_backend", "serve", "--host", "127.0.0.1", "--port", str(port)],
        backend_env(**env),
        tmp,
    )

    def up() -> bool:
        if not proc.alive():
            raise AssertionError("backend exited:\n" + proc.log())
        try:
            return requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok
        except requests.RequestException:
            return False

    wait_for(up, timeout=60, what="the backend's /health")
    return proc


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory) -> Iterator[dict[str, str]]:
    """Label Studio 1.23.2 from its own venv (LS_VENV), headless, legacy token on, local backends allowed."""
    server = start_label_studio(tmp_path_factory.mktemp("label-studio"))
    try:
        yield server.info
    finally:
        server.process.stop()
