"""ASVP end to end against a real Label Studio 1.23.2, a real rq worker and the real Lite0 weights: an
automatic feature update driven by the LogME-PED history (a threshold that forces it), the method chosen by
the policy, a worker killed mid-update, the new generation followed by the project, every decision visible,
and the trained model exported and used by `asvp-backend predict`."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import requests

from tests.conftest import ROOT, backend_env, stack_env, start_backend, start_worker
from tests.e2e.test_label_studio import annotate, backend_jobs, backend_state, wait_for_round
from tests.helpers import IMAGE_CONFIG, LabelStudioAPI, free_port, png_bytes, wait_for
from tests.integration.test_rq_leases import _kill_worker_and_horse

pytestmark = pytest.mark.e2e

N_TASKS = 12


def label_of(index: int) -> str:
    return "dog" if index % 2 == 0 else "cat"  # png_bytes: even seeds are red, odd ones blue


@pytest.fixture(scope="module")
def stack(label_studio, redis_url, tmp_path_factory):
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    tmp = tmp_path_factory.mktemp("e2e-align")
    port = free_port()
    env = stack_env(
        label_studio, redis_url, tmp,  # the real Lite0 weights at 64 px: the flow, not the accuracy, is tested
        RETRAIN_EVERY="2",
        # any trend is below this threshold, and a window of one label is the gain since the last round: the
        # second scored round of a generation fires an update
        ALIGN_THRESHOLD="1000",
        ALIGN_WINDOW="1",
        ALIGN_MIN_LABELS="4",
        ALIGN_MIN_NEW_LABELS="2",
        ALIGN_MAX_UPDATES="1",
        # the update's mechanics are under test here, not the gate: on twelve red or blue images both generations
        # are right on every audit label, so the gate could only reject (tests/unit/test_refresh_gate_jobs.py)
        ALIGN_GATE="false",
        FINETUNE_EPOCHS="3",
    )
    backend = start_backend(tmp, port, **env)
    worker = start_worker(tmp, "worker", **env)
    ls = LabelStudioAPI(label_studio["url"], label_studio["token"])
    state = {"ls": ls, "backend": f"http://127.0.0.1:{port}", "worker": worker, "env": env, "tmp": tmp}
    try:
        yield state
    finally:
        state["worker"].stop()
        backend.stop()


@pytest.fixture(scope="module")
def project(stack):
    ls: LabelStudioAPI = stack["ls"]
    pid = ls.call("POST", "/api/projects", json={"title": "asvp alignment", "label_config": IMAGE_CONFIG})["id"]
    files = [(f"file{i}", (f"img_{i}.png", png_bytes(i), "image/png")) for i in range(N_TASKS)]
    ls.call("POST", f"/api/projects/{pid}/import", files=files)
    ml = ls.call("POST", "/api/ml", json={"url": stack["backend"], "project": pid, "title": "asvp"})
    tasks = sorted(ls.tasks(pid), key=lambda t: t["id"])
    assert len(tasks) == N_TASKS
    return {"id": pid, "ml": ml["id"], "task_ids": [t["id"] for t in tasks]}


def label(stack, project, indices) -> None:
    for i in indices:
        annotate(stack["ls"], project["task_ids"][i], label_of(i))


def scored_round(stack, pid: int, labelled: int) -> dict:
    """The round with `labelled` labels once its alignment decision is recorded (the round's last step)."""
    wait_for_round(stack, pid, labelled)
    return wait_for(lambda: next((r for r in backend_state(stack, pid)["rounds"]
                                  if r["labelled"] >= labelled and r["alignment"]), None),
                    timeout=120, interval=0.5, what=f"the alignment decision of the round with {labelled} labels")


def model_view(stack, pid: int) -> dict:
    return requests.get(f"{stack['backend']}/projects/{pid}/model", timeout=5).json()


def test_start_training_fine_tunes_the_deliverable_with_lp_ft_on_the_pretrained_features(stack, project):
    pid = project["id"]
    label(stack, project, range(4))
    first = scored_round(stack, pid, labelled=4)
    assert first["version"] == "asvp-g0-r1"
    assert first["alignment"]["decision"] == "wait" and first["alignment"]["logme_ped"] is not None
    stack["ls"].call("POST", f"/api/ml/{project['ml']}/train", json={})  # Start Training
    model = wait_for(lambda: model_view(stack, pid)["current"], timeout=300, interval=1,
                     what="the deliverable model")
    assert model["method"] == "lpft" and model["purpose"] == "deliverable"  # generation 0: LP-FT
    assert model["labelled"] == 4 and model["trained_on_version"].startswith("asvp-g0-")
    summary = backend_state(stack, pid)["alignment_summary"]
    assert summary["generation"] == 0 and summary["updates"] == 0 and summary["next_training_method"] == "lpft"


def test_a_stalled_logme_ped_refreshes_the_features_even_through_a_killed_worker(stack, project):
    pid = project["id"]
    ls: LabelStudioAPI = stack["ls"]
    before = ls.call("GET", f"/api/projects/{pid}")["model_version"]
    label(stack, project, range(4, 6))
    second = scored_round(stack, pid, labelled=6)
    assert second["alignment"]["decision"] == "update", second["alignment"]
    decision = backend_state(stack, pid)["alignment"]["decisions"][-1]
    assert decision["method"] == "ft" and decision["gain"] < 1000 and decision["previous"] is not None
    assert "fine-tune (ft)" in decision["reason"]

    # kill -9 the worker while the update's fine-tune runs: generation 0 keeps serving
    def finetune_running():
        return [j for j in backend_jobs(stack, pid) if j["kind"] == "align" and j["status"] == "started"]

    wait_for(finetune_running, timeout=120, interval=0.2, what="the update's align job")
    _kill_worker_and_horse(stack["worker"].proc.pid)
    stack["worker"].stop()  # reaps it and closes its log
    serving = ls.call("GET", f"/api/projects/{pid}")["model_version"]
    assert serving.startswith("asvp-g0-") and serving >= before
    open_tasks = [t for t in ls.tasks(pid) if not t["annotations"]]
    reply = requests.post(f"{stack['backend']}/predict", json={"project": f"{pid}.1", "tasks": open_tasks}, timeout=30)
    assert reply.ok and all(r["model_version"] == serving for r in reply.json()["results"])
    assert backend_state(stack, pid)["alignment"]["pending"]["stage"] == "finetune"

    stack["worker"] = start_worker(stack["tmp"], "worker-2", **stack["env"])  # the recovery re-queues the job
    refreshed = wait_for(
        lambda: next((r for r in backend_state(stack, pid)["rounds"] if r["generation"] == 1 and r["alignment"]),
                     None),
        timeout=420, interval=1, what="a round on generation 1")
    assert refreshed["version"].startswith("asvp-g1-")
    assert ls.call("GET", f"/api/projects/{pid}")["model_version"] == refreshed["version"]
    current = [p for t in ls.tasks(pid) if not t["annotations"] for p in t["predictions"]
               if p["model_version"] == refreshed["version"]]
    assert len(current) == N_TASKS - 6

    state = backend_state(stack, pid)
    alignment = state["alignment"]
    assert alignment["updates"] == 1 and alignment["pending"] is None
    model_id = alignment["generation_models"]["1"]
    assert model_id == alignment["feature_model"]
    assert next(m for m in alignment["models"] if m["id"] == model_id)["method"] == "ft"
    assert state["alignment_summary"]["next_training_method"] == "ft"
    assert refreshed["alignment"]["decision"] == "wait"  # generation 1's first score: a fresh history
    assert refreshed["pre_annotations"]["source"] in {"proxy", "model"}

    versions = requests.get(f"{stack['backend']}/versions", params={"project": pid}, timeout=5).json()
    assert refreshed["version"] in versions["versions"] and second["version"] in versions["versions"]
    gens = {g["generation"]: g for g in versions["generations"]}
    assert gens[1]["current"] and gens[1]["model"] == model_id and not gens[0]["current"]
    assert gens[0]["weights_hash"] != gens[1]["weights_hash"]

    status = subprocess.run([sys.executable, "-m", "asvp_backend", "status", "--project", str(pid), "--json"],
                            env=backend_env(**stack["env"]), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr[-2000:]
    shown = json.loads(status.stdout)["projects"][0]["alignment"]
    assert shown["updates"] == 1 and shown["last_decision"]["decision"] == "wait"
    metrics = requests.get(f"{stack['backend']}/metrics", timeout=5).text
    assert 'asvp_alignment_decisions_total{decision="update"} 1.0' in metrics


def test_the_trained_model_is_exported_and_classifies_a_folder(stack, project, tmp_path):
    pid = project["id"]
    current = model_view(stack, pid)["current"]
    labelled = {t["id"] for t in stack["ls"].tasks(pid) if t["annotations"]}
    audit = labelled & set(backend_state(stack, pid)["audit"]["tasks"])  # fine-tuning never trains on these
    assert len(labelled) == 6 and current["labelled"] == 6 - len(audit) and current["method"] == "ft"
    out = tmp_path / "model"
    run = subprocess.run([sys.executable, "-m", "asvp_backend", "export", "--project", str(pid), "--out", str(out)],
                         env=backend_env(**stack["env"]), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    meta = json.loads((out / "model.json").read_text())
    assert meta["classes"] == ["cat", "dog"] and meta["model_version"].startswith("asvp-g1-")
    assert (out / "labels.txt").read_text().split() == ["cat", "dog"]

    images = tmp_path / "images"
    images.mkdir()
    for i in range(100, 106):
        (images / f"{label_of(i)}_{i}.png").write_bytes(png_bytes(i))
    (images / "broken.png").write_bytes(b"not a png")
    table = tmp_path / "predictions.csv"
    run = subprocess.run([sys.executable, "-m", "asvp_backend", "predict", "--model", str(out), "--images",
                          str(images), "--out", str(table), "--device", "cpu"],
                         env=backend_env(**stack["env"]), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 7
    good = [r for r in rows if r["path"] != "broken.png"]
    assert all(r["label"] in {"cat", "dog"} and 0.5 <= float(r["confidence"]) <= 1.0 for r in good)
    assert next(r for r in rows if r["path"] == "broken.png")["error"]
