"""No secret in any log at any level: a whole run against the real Label Studio 1.23.2 with every secret
configured (the Label Studio token, basic auth, the webhook secret, a /setup access token), the API with
its access log and both processes at DEBUG, then a grep of everything they wrote."""

from __future__ import annotations

import base64
import re
import secrets
import sys

import pytest
import requests

from tests.conftest import backend_env, stack_env, start_worker
from tests.e2e.test_label_studio import annotate
from tests.helpers import IMAGE_CONFIG, LabelStudioAPI, free_port, png_bytes, wait_for
from tests.processes import Process

pytestmark = pytest.mark.e2e

USER = "ops"


@pytest.fixture(scope="module")
def run(label_studio, redis_url, tmp_path_factory):
    """Everything that handles a secret happens once: connect, /setup, webhooks right and wrong, refused
    requests, a sync, an extraction and a round that read Label Studio with the token."""
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    tmp = tmp_path_factory.mktemp("e2e-secrets")
    password, webhook_secret, setup_token = (secrets.token_hex(16) for _ in range(3))
    port = free_port()
    env = stack_env(label_studio, redis_url, tmp, BASIC_AUTH_USER=USER, BASIC_AUTH_PASS=password,
                    WEBHOOK_SECRET=webhook_secret, LOG_LEVEL="debug", RETRAIN_EVERY="2")
    backend = Process("backend", [sys.executable, "-m", "asvp_backend", "serve", "--host", "127.0.0.1", "--port",
                                  str(port), "--access-log"], backend_env(**env), tmp)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _answers(url), timeout=60, what="the backend's /health")
    worker = start_worker(tmp, "worker", **env)
    try:
        ls = LabelStudioAPI(label_studio["url"], label_studio["token"])
        pid = ls.call("POST", "/api/projects", json={"title": "secrets", "label_config": IMAGE_CONFIG})["id"]
        files = [(f"file{i}", (f"img_{i}.png", png_bytes(i), "image/png")) for i in range(6)]
        ls.call("POST", f"/api/projects/{pid}/import", files=files)
        ls.call("POST", "/api/ml", json={"url": url, "project": pid, "title": "asvp", "auth_method": "BASIC_AUTH",
                                         "basic_auth_user": USER, "basic_auth_pass": password})
        auth = (USER, password)
        # /setup as Label Studio sends it, with the project creator's token (another secret)
        setup = {"project": f"{pid}.1", "label_config": IMAGE_CONFIG, "hostname": label_studio["url"],
                 "access_token": setup_token, "model_version": ""}
        assert requests.post(f"{url}/setup", json=setup, auth=auth, timeout=30).ok
        # refused requests: wrong password, no auth, wrong webhook secret (error paths log too)
        assert requests.get(f"{url}/jobs", auth=(USER, password[::-1]), timeout=5).status_code == 401
        assert requests.post(f"{url}/setup", json=setup, timeout=5).status_code == 401
        event = {"action": "ANNOTATION_CREATED", "project": {"id": pid}}
        assert requests.post(f"{url}/webhook", params={"secret": webhook_secret[::-1]}, json=event,
                             timeout=5).status_code == 403
        # accepted webhooks, both forms of the secret
        assert requests.post(f"{url}/webhook", params={"secret": webhook_secret}, json=event, timeout=5).ok
        assert requests.post(f"{url}/webhook", headers={"X-Webhook-Secret": webhook_secret}, json=event,
                             timeout=5).ok
        for task in sorted(ls.tasks(pid), key=lambda t: t["id"])[:4]:
            annotate(ls, task["id"], "dog" if task["id"] % 2 else "cat")
        assert requests.post(f"{url}/webhook", params={"secret": webhook_secret}, json=event, timeout=5).ok

        def ranked() -> bool:
            state = requests.get(f"{url}/projects/{pid}", auth=auth, timeout=5).json()
            return any(r["labelled"] >= 4 for r in state.get("rounds", []))

        wait_for(ranked, timeout=240, interval=1, what="a round that read Label Studio with the token")
        yield {"logs": backend.log() + worker.log(),
               "secrets": {"Label Studio token": label_studio["token"], "basic auth password": password,
                           "basic auth header": base64.b64encode(f"{USER}:{password}".encode()).decode(),
                           "webhook secret": webhook_secret, "/setup access token": setup_token}}
    finally:
        worker.stop()
        backend.stop()


def _answers(url: str) -> bool:
    try:
        return requests.get(f"{url}/health", timeout=1).ok
    except requests.RequestException:
        return False


def test_the_run_logged_at_debug_level_and_the_access_log(run):
    logs = run["logs"]
    assert " DEBUG " in logs  # the level the grep below is about
    # the access log wrote the request whose query carried the webhook secret, masked
    # (201 when it queued a sync, 200 when it joined the one /setup had queued)
    assert re.search(r'"POST /webhook\?secret=\*\*\* HTTP/1\.1" 20[01]', logs) and "/setup" in logs


@pytest.mark.parametrize("name", ["Label Studio token", "basic auth password", "basic auth header",
                                  "webhook secret", "/setup access token"])
def test_no_secret_appears_in_any_log(run, name):
    secret = run["secrets"][name]
    assert secret not in run["logs"], f"the {name} appears in the logs"
