"""Fixtures with real parts: a Redis server, rq workers, Label Studio 1.23.2 and the backend as processes.

`make test` starts Redis when none answers and builds Label Studio's own virtual environment; these
fixtures fail loudly (not skip) when a part is missing, so CI can never pass by skipping.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.helpers import free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
LS_VERSION = "1.23.2"


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


class Process:
    """A child process with its output in a log file, stopped by PID at teardown."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path, cwd: Path = ROOT):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(
            args, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def backend_env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO", "REDIS_URL", "MODEL_DIR"))
    }
    env.update({"PYTHONPATH": str(ROOT), "LOG_LEVEL": "info", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


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
    """Label Studio 1.23.2 from its own venv (LS_VENV), headless, with a legacy token and local backends allowed."""
    venv = Path(os.environ.get("LS_VENV", Path.home() / ".cache/asvp-backend/label-studio-1.23.2"))
    binary = venv / "bin" / "label-studio"
    if not binary.exists():
        pytest.fail(f"Label Studio {LS_VERSION} is not installed at {venv}; run `make ls-venv`")
    tmp = tmp_path_factory.mktemp("label-studio")
    docroot = tmp / "docroot"
    (docroot / "images").mkdir(parents=True)
    port = free_port()
    token = secrets.token_hex(20)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO", "DJANGO"))}
    env.update(
        {
            "LABEL_STUDIO_BASE_DATA_DIR": str(tmp / "data"),
            "LABEL_STUDIO_USERNAME": "admin@example.com",
            "LABEL_STUDIO_PASSWORD": "admin12345",
            "LABEL_STUDIO_USER_TOKEN": token,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
            "LOCAL_FILES_SERVING_ENABLED": "true",
            "LOCAL_FILES_DOCUMENT_ROOT": str(docroot),
            "ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false",
            "COLLECT_ANALYTICS": "false",
            "LATEST_VERSION_CHECK": "false",
        }
    )
    proc = Process(
        "label-studio",
        [str(binary), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)],
        env,
        tmp,
        cwd=tmp,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if not proc.alive():
            raise AssertionError("Label Studio exited:\n" + proc.log()[-5000:])
        try:
            return requests.get(f"{url}/health", timeout=2).ok
        except requests.RequestException:
            return False

    started = time.time()
    wait_for(up, timeout=300, interval=1, what="Label Studio's /health")
    print(f"Label Studio {LS_VERSION} up in {time.time() - started:.0f}s at {url}")
    try:
        yield {"url": url, "token": token, "docroot": str(docroot), "log": str(proc.log_path)}
    finally:
        proc.stop()
