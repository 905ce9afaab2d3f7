"""Webhooks as pointers, end to end: a real Label Studio 1.23.2 whose webhooks pass through a relay that drops
every third one, the backend API and a real rq worker. Each delivered annotation costs the sync one task read;
the dropped ones are missing until the reconcile; a forged webhook injects nothing; the next full read (due
after RECONCILE_EVERY) makes the backend hold exactly Label Studio's labels."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from asvp_backend.state import TaskSnapshot
from tests.conftest import stack_env, start_backend, start_worker
from tests.e2e.test_label_studio import annotate, backend_state
from tests.helpers import IMAGE_CONFIG, LabelStudioAPI, free_port, png_bytes, wait_for

pytestmark = pytest.mark.e2e

N_TASKS, RECONCILE_EVERY = 12, 45


class DroppingRelay:
    """Receives Label Studio's webhooks and forwards them to the backend, except every `drop_every`-th
    annotation event, which it answers 200 and forgets (a webhook lost on the way)."""

    def __init__(self, target: str, drop_every: int = 3) -> None:
        self.target, self.drop_every = target, drop_every
        self.seen: list[str] = []
        self.dropped: list[dict] = []
        relay = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                action = json.loads(body or b"{}").get("action", "")
                relay.seen.append(action)
                annotations = [a for a in relay.seen if a.startswith("ANNOTATION")]
                if action.startswith("ANNOTATION") and len(annotations) % relay.drop_every == 0:
                    relay.dropped.append(json.loads(body))
                else:
                    requests.post(f"{relay.target}/webhook", data=body, timeout=10,
                                  headers={"Content-Type": "application/json"})
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def stop(self) -> None:
        self.server.shutdown()


def labels_in_label_studio(ls: LabelStudioAPI, pid: int) -> dict[int, str | None]:
    out = {}
    for task in ls.tasks(pid):
        results = [a["result"] for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        out[task["id"]] = results[-1][0]["value"]["choices"][0] if results and results[-1] else None
    return out


def test_lost_webhooks_are_caught_by_the_reconcile_and_a_forged_one_injects_nothing(label_studio, redis_url,
                                                                                     tmp_path):
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    port = free_port()
    env = stack_env(label_studio, redis_url, tmp_path, RETRAIN_EVERY="100", RECONCILE_EVERY=str(RECONCILE_EVERY))
    backend = start_backend(tmp_path, port, **env)
    worker = start_worker(tmp_path, "worker", **env)
    relay = DroppingRelay(f"http://127.0.0.1:{port}")
    ls = LabelStudioAPI(label_studio["url"], label_studio["token"])
    try:
        pid = ls.call("POST", "/api/projects", json={"title": "pointers", "label_config": IMAGE_CONFIG})["id"]
        files = [(f"file{i}", (f"img_{i}.png", png_bytes(i), "image/png")) for i in range(N_TASKS)]
        ls.call("POST", f"/api/projects/{pid}/import", files=files)
        ls.call("POST", "/api/ml", json={"url": f"http://127.0.0.1:{port}", "project": pid, "title": "asvp"})
        first = wait_for(lambda: idle(port, pid), timeout=180, what="the syncs, extraction and round after /setup")
        assert first["last_sync"]["read"] == "full" and first["last_sync"]["tasks"] == N_TASKS
        jobs = requests.get(f"http://127.0.0.1:{port}/jobs", params={"project": pid}, timeout=5).json()["jobs"]
        # Label Studio calls /setup twice on connecting: the second joins the first sync, never a second read
        assert len([j for j in jobs if j["kind"] == "sync" and j["reason"].startswith("/setup")]) == 1, jobs
        (hook,) = [h for h in ls.call("GET", "/api/webhooks/", params={"project": pid})
                   if h["url"].startswith(f"http://127.0.0.1:{port}")]
        ls.call("PATCH", f"/api/webhooks/{hook['id']}/", json={"url": relay.url})

        task_ids = sorted(t["id"] for t in ls.tasks(pid))
        from asvp_backend.labelstudio.client import LabelStudioClient

        client = LabelStudioClient(label_studio["url"], label_studio["token"])
        assert client.newest_task_id(pid) == task_ids[-1]
        assert [t["id"] for t in client.tasks_after(pid, task_ids[3], 4)] == task_ids[4:8]  # a reconcile's page
        for tid in task_ids[:9]:  # nine annotations: the relay drops the 3rd, 6th and 9th webhook
            annotate(ls, tid, "cat" if tid % 2 else "dog")
        assert len(relay.dropped) == 3
        # a forged webhook: it says an unlabelled task is "dog" and points at a task that does not exist
        forged = {"action": "ANNOTATION_CREATED", "project": {"id": pid},
                  "annotation": {"id": 10**6, "task": task_ids[10], "result": [{"value": {"choices": ["dog"]}}]},
                  "task": {"id": task_ids[10]}}
        for body in (forged, {**forged, "annotation": {"id": 10**6 + 1, "task": 10**7}}):
            assert requests.post(f"http://127.0.0.1:{port}/webhook", json=body, timeout=5).status_code in (200, 201)

        snapshot = TaskSnapshot(tmp_path / "models", pid)

        def settled() -> dict | None:
            state = idle(port, pid) or {}
            return state["last_sync"] if (state.get("last_sync") or {}).get("labelled") == 6 else None

        try:
            targeted = wait_for(settled, timeout=120, what="the delivered annotations in the backend")
        except AssertionError:
            jobs = requests.get(f"http://127.0.0.1:{port}/jobs", params={"project": pid}, timeout=5).json()["jobs"]
            raise AssertionError(f"last_sync {backend_state(_stack(port), pid).get('last_sync')}\nrelay {relay.seen}"
                                 f"\njobs {[(j['kind'], j['status'], j.get('result')) for j in jobs[:8]]}\n"
                                 f"{worker.log()[-3000:]}") from None
        assert targeted["read"] == "targeted", targeted
        labels = {tid: task.label for tid, task in snapshot.load().items()}
        dropped_tasks = {d["annotation"]["task"] for d in relay.dropped}
        assert {tid for tid, label in labels.items() if label} == set(task_ids[:9]) - dropped_tasks
        assert labels[task_ids[10]] is None and 10**7 not in labels  # nothing injected

        # the reconcile: the first sync after RECONCILE_EVERY reads every task, so one more delivered
        # annotation brings every label in, the dropped ones too
        since = time.time() - (backend_state(_stack(port), pid).get("last_full_sync") or time.time())
        time.sleep(max(0.0, RECONCILE_EVERY - since + 1))
        annotate(ls, task_ids[9], "cat")  # the 10th annotation webhook: delivered
        truth = labels_in_label_studio(ls, pid)
        reconciled = wait_for(
            lambda: (s := backend_state(_stack(port), pid).get("last_sync") or {}).get("labelled") == 10 and s,
            timeout=120, what="the reconcile")
        assert reconciled["read"] == "full" and reconciled["reason"].startswith("reconcile due"), reconciled
        assert {tid: task.label for tid, task in snapshot.load().items()} == truth
        assert sum(1 for label in truth.values() if label) == 10
    finally:
        relay.stop()
        worker.stop()
        backend.stop()


def _stack(port: int) -> dict:
    return {"backend": f"http://127.0.0.1:{port}"}


def idle(port: int, pid: int) -> dict | None:
    """The project's state once it has synced and no job of it is queued or running."""
    reply = requests.get(f"http://127.0.0.1:{port}/projects/{pid}", timeout=5)
    jobs = requests.get(f"http://127.0.0.1:{port}/jobs", params={"project": pid}, timeout=5).json()["jobs"]
    if not reply.ok or not reply.json().get("last_sync"):
        return None
    return None if any(j["status"] in ("queued", "started", "deferred", "scheduled") for j in jobs) else reply.json()
