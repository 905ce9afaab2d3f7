"""End to end against a real Label Studio 1.23.2: connect, predict, webhook -> job, versions, Start Training."""

from __future__ import annotations

import base64
import json
import re

import pytest
import requests

from tests.conftest import start_backend, start_worker
from tests.helpers import IMAGE_CONFIG, LabelStudioAPI, free_port, png_bytes, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(label_studio, redis_url, tmp_path_factory):
    """Label Studio + backend (rq mode) + one rq worker, all real processes."""
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    tmp = tmp_path_factory.mktemp("e2e")
    port = free_port()
    env = {
        "REDIS_URL": redis_url,
        "MODEL_DIR": str(tmp / "models"),
        "LABEL_STUDIO_URL": label_studio["url"],
        "LABEL_STUDIO_API_KEY": label_studio["token"],
        "LOCAL_FILES_DOCUMENT_ROOT": label_studio["docroot"],
        "RETRAIN_EVERY": "1",
        "EXTRACT_WORKERS": "1",
        "EXTRACT_BATCH_SIZE": "8",
        "DEVICE": "cpu",
    }
    backend = start_backend(tmp, port, **env)
    worker = start_worker(tmp, "worker", **env)
    ls = LabelStudioAPI(label_studio["url"], label_studio["token"])
    try:
        yield {
            "ls": ls,
            "backend": f"http://127.0.0.1:{port}",
            "backend_proc": backend,
            "worker": worker,
            "env": env,
            **label_studio,
        }
    finally:
        worker.stop()
        backend.stop()


@pytest.fixture(scope="module")
def project(stack):
    ls: LabelStudioAPI = stack["ls"]
    created = ls.call("POST", "/api/projects", json={"title": "asvp e2e", "label_config": IMAGE_CONFIG})
    pid = created["id"]
    files = [(f"file{i}", (f"img_{i}.png", png_bytes(i), "image/png")) for i in range(6)]
    ls.call("POST", f"/api/projects/{pid}/import", files=files)
    data_uri_tasks = [
        {"image": "data:image/png;base64," + base64.b64encode(png_bytes(10 + i)).decode()} for i in range(4)
    ]
    ls.call("POST", f"/api/projects/{pid}/import", json=data_uri_tasks)
    assert len(ls.tasks(pid)) == 10
    ml = ls.call("POST", "/api/ml", json={"url": stack["backend"], "project": pid, "title": "asvp"})
    return {"id": pid, "ml": ml["id"]}


def backend_jobs(stack, pid: int) -> list[dict]:
    return requests.get(f"{stack['backend']}/jobs", params={"project": pid}, timeout=5).json()["jobs"]


def test_label_studio_connects_and_gets_a_prediction_for_every_task(stack, project):
    ls: LabelStudioAPI = stack["ls"]
    ml = ls.call("GET", f"/api/ml/{project['ml']}")
    assert ml["state"] == "CO", ml
    assert ml["model_version"] == "asvp-g0-r0"

    reply = ls.call(
        "POST",
        "/api/dm/actions",
        params={"id": "retrieve_tasks_predictions", "project": project["id"]},
        json={"selectedItems": {"all": True, "excluded": []}},
    )
    assert reply is not None
    tasks = ls.tasks(project["id"])
    for task in tasks:
        # a task no round has ranked yet gets an empty prediction under the version's "-unranked" placeholder
        # (an empty one under the version itself would have a NULL score, which uncertainty sampling serves first)
        versions = [p["model_version"] for p in task["predictions"]]
        assert versions, f"task {task['id']} has no prediction"
        assert all(re.fullmatch(r"asvp-g0-r\d+(-unranked)?", v) for v in versions), versions


def test_an_annotation_reaches_the_backend_and_becomes_a_sync_job(stack, project):
    ls: LabelStudioAPI = stack["ls"]
    task = ls.tasks(project["id"])[0]
    result = [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": ["cat"]}}]
    ls.call("POST", f"/api/tasks/{task['id']}/annotations", json={"result": result})

    def synced():
        jobs = [j for j in backend_jobs(stack, project["id"]) if j["kind"] == "sync"]
        return jobs if jobs and jobs[0]["status"] in {"finished", "failed"} else None

    jobs = wait_for(synced, timeout=90, what="a sync job from the annotation webhook")
    latest = jobs[0]
    assert latest["status"] == "finished", stack["worker"].log()[-3000:]
    assert latest["result"]["tasks"] == 10 and latest["result"]["labelled"] == 1
    state = requests.get(f"{stack['backend']}/projects/{project['id']}", timeout=5).json()
    assert state["last_sync"]["labelled"] == 1


def test_versions_come_back_through_label_studio(stack, project):
    ls: LabelStudioAPI = stack["ls"]
    body = ls.call("GET", f"/api/ml/{project['ml']}/versions")
    assert "asvp-g0-r0" in body["versions"], body


def test_start_training_queues_a_job(stack, project):
    ls: LabelStudioAPI = stack["ls"]
    before = {j["id"] for j in backend_jobs(stack, project["id"])}
    ls.call("POST", f"/api/ml/{project['ml']}/train", json={})
    new = wait_for(
        lambda: [
            j for j in backend_jobs(stack, project["id"]) if j["id"] not in before and j["kind"] == "train"
        ],
        timeout=30,
        what="a train job",
    )
    assert new[0]["reason"] == "Start Training pressed"


def test_no_secret_in_backend_logs(stack, project):
    logs = stack["backend_proc"].log() + stack["worker"].log()
    assert stack["token"] not in logs
    assert json.dumps(stack["token"]) not in logs


# ---------------------------------------------------------------------------------------------- rounds
def backend_state(stack, pid: int) -> dict:
    return requests.get(f"{stack['backend']}/projects/{pid}", timeout=5).json()


def annotate(ls: LabelStudioAPI, task_id: int, label: str) -> None:
    result = [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]
    ls.call("POST", f"/api/tasks/{task_id}/annotations", json={"result": result})


def wait_for_round(stack, pid: int, labelled: int, timeout: float = 240) -> dict:
    def done():
        state = backend_state(stack, pid)
        rounds = [r for r in state.get("rounds", []) if r["labelled"] >= labelled]
        failed = [j for j in backend_jobs(stack, pid) if j["status"] == "failed"]
        assert not failed, f"failed jobs: {failed}\n{stack['worker'].log()[-4000:]}"
        return rounds[-1] if rounds else None

    return wait_for(done, timeout=timeout, interval=1, what=f"a round with {labelled} labels")


def unlabelled_ranking(ls: LabelStudioAPI, pid: int, view_id: int) -> list[int]:
    body = ls.call("GET", "/api/tasks", params={"project": pid, "view": view_id, "page_size": 100})
    return [t["id"] for t in body["tasks"]]


def test_annotations_make_the_queue_rerank_itself(stack, project):
    ls: LabelStudioAPI = stack["ls"]
    pid = project["id"]
    tasks = sorted(ls.tasks(pid), key=lambda t: t["id"])
    unlabelled = [t for t in tasks if not t["annotations"]]
    # uploaded PNGs alternate red (even seed) and blue (odd seed); label a few of each
    for task, label in zip(unlabelled[:4], ["dog", "cat", "dog", "cat"], strict=True):
        annotate(ls, task["id"], label)
    record = wait_for_round(stack, pid, labelled=5)
    assert record["strategy"] == "margin" and record["classes"] == 2
    version = record["version"]

    project_body = ls.call("GET", f"/api/projects/{pid}")
    assert project_body["model_version"] == version
    assert project_body["sampling"] == "Uncertainty sampling"

    tasks = ls.tasks(pid)
    open_tasks = [t for t in tasks if not t["annotations"]]
    assert len(open_tasks) == record["pool"] == 5
    scores = {}
    for task in open_tasks:
        current = [p for p in task["predictions"] if p["model_version"] == version]
        assert len(current) == 1, f"task {task['id']}: {[p['model_version'] for p in task['predictions']]}"
        assert current[0]["result"][0]["value"]["choices"][0] in {"cat", "dog"}  # a pre-annotation
        scores[task["id"]] = current[0]["score"]

    expected = sorted(scores, key=lambda tid: (scores[tid], tid))
    assert unlabelled_ranking(ls, pid, record["view_id"])[: len(expected)] == expected
    assert record["top_tasks"][0] == expected[0]
    next_task = ls.call("GET", f"/api/projects/{pid}/next")
    assert next_task["id"] == expected[0], (next_task["id"], scores)

    # /predict, as the labelling UI calls it, serves the same label and score
    reply = requests.post(f"{stack['backend']}/predict", json={"project": f"{pid}.1", "tasks": open_tasks}, timeout=30)
    served = {t["id"]: r for t, r in zip(open_tasks, reply.json()["results"], strict=True)}
    assert all(served[tid]["score"] == pytest.approx(scores[tid], abs=1e-6) for tid in scores)


def test_a_second_round_replaces_the_first_ranking(stack, project):
    ls: LabelStudioAPI = stack["ls"]
    pid = project["id"]
    first = backend_state(stack, pid)["rounds"][-1]
    open_tasks = [t for t in ls.tasks(pid) if not t["annotations"]]
    for task, label in zip(open_tasks[:2], ["dog", "cat"], strict=True):
        annotate(ls, task["id"], label)
    second = wait_for_round(stack, pid, labelled=7)
    assert second["round"] > first["round"]
    # a press while an earlier Start Training's fine-tune runs joins it (no round): wait until none runs
    wait_for(lambda: not [j for j in backend_jobs(stack, pid) if j["kind"] in {"train", "finetune"}
                          and j["status"] not in {"finished", "failed", "stopped", "canceled"}],
             timeout=600, interval=2, what="the earlier fine-tune to end")
    ls.call("POST", f"/api/ml/{project['ml']}/train", json={})  # Start Training: one more round, forced
    third = wait_for(lambda: [r for r in backend_state(stack, pid)["rounds"] if r["round"] > second["round"]],
                     timeout=240, interval=1, what="the forced round")[-1]

    def names() -> set[str]:
        versions = ls.call("GET", f"/api/projects/{pid}/model-versions/")
        return set(versions) if isinstance(versions, dict) else {v["model_version"] for v in versions}

    assert third["version"] in names() and second["version"] in names()
    # older than the previous version: deleted, right after the round's state advanced (its slow cleanup)
    wait_for(lambda: first["version"] not in names(), timeout=60, what=f"{first['version']} deleted")
    assert ls.call("GET", f"/api/projects/{pid}")["model_version"] == third["version"]
    for task in [t for t in ls.tasks(pid) if not t["annotations"]]:
        assert third["version"] in [p["model_version"] for p in task["predictions"]]


def test_extract_from_the_cli_with_a_progress_bar(stack, project):
    import subprocess
    import sys

    from tests.conftest import ROOT, backend_env

    out = subprocess.run([sys.executable, "-m", "asvp_backend", "extract", "--project", str(project["id"])],
                         env=backend_env(**stack["env"]), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["sync"]["tasks"] == 10
    assert report["extract"]["cached"] == 10 and report["extract"]["extracted"] == 0  # the worker did it already
    assert report["extract"]["next"].startswith("round-p")
    assert "project" in out.stderr  # the tqdm bar
