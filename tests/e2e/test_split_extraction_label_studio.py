"""One project's extraction shared by two rq workers, end to end: a real Label Studio 1.23.2 with 2,100 image
tasks, the backend API, two `asvp-backend worker` processes and EXTRACT_PARTS=2. Connecting the project splits
its first extraction into two part jobs that run at once on the two workers; the generation becomes current
once, complete, and every vector is the one the real Lite0 backbone gives that task's image."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import requests
from PIL import Image

from asvp_backend.features import FeatureStore
from asvp_backend.layout import ProjectLayout
from tests.conftest import FAST_STACK, stack_env, start_backend, start_worker
from tests.e2e.test_targeted_sync_label_studio import idle
from tests.helpers import IMAGE_CONFIG, LabelStudioAPI, free_port, png_bytes, wait_for

pytestmark = pytest.mark.e2e

N_TASKS = 2100  # above SPLIT_MIN_TASKS (2,000): smaller extractions are not split


def test_two_workers_share_one_projects_extraction(label_studio, redis_url, tmp_path):
    import redis
    from rq.job import Job

    connection = redis.Redis.from_url(redis_url)
    connection.flushdb()
    port = free_port()
    # one torch thread each: two workers on this machine's two cores (docs/operations.md)
    env = stack_env(label_studio, redis_url, tmp_path, EXTRACT_PARTS="2", OMP_NUM_THREADS="1",
                    EXTRACT_BATCH_SIZE="64")
    backend = start_backend(tmp_path, port, **env)
    workers = [start_worker(tmp_path, f"worker-{k}", **env) for k in range(2)]
    ls = LabelStudioAPI(label_studio["url"], label_studio["token"])
    images = [png_bytes(seed) for seed in range(64)]
    try:
        pid = ls.call("POST", "/api/projects", json={"title": "two workers", "label_config": IMAGE_CONFIG})["id"]
        ls.call("POST", f"/api/projects/{pid}/import", json=[
            {"image": "data:image/png;base64," + base64.b64encode(images[i % 64]).decode()} for i in range(N_TASKS)])
        ls.call("POST", "/api/ml", json={"url": f"http://127.0.0.1:{port}", "project": pid, "title": "asvp"})
        try:
            wait_for(lambda: idle(port, pid), timeout=600, what="the sync and the split extraction after /setup")
        except AssertionError:
            raise AssertionError("\n".join(w.log()[-3000:] for w in workers)) from None
        jobs = requests.get(f"http://127.0.0.1:{port}/jobs", params={"project": pid}, timeout=5).json()["jobs"]
        assert not [(j["kind"], j["error"]) for j in jobs if j["status"] == "failed"]
        parts = [j for j in jobs if j["kind"].startswith("extract_part:")]
        assert {j["kind"] for j in parts} == {"extract_part:0", "extract_part:1"}, jobs
        assert sum(j["result"]["extracted"] for j in parts) == N_TASKS
        # each part's first slice ran on its own worker, both at once
        first = {kind: min((j for j in parts if j["kind"] == kind), key=lambda j: j["started_at"])
                 for kind in ("extract_part:0", "extract_part:1")}
        ran_on = {Job.fetch(j["id"], connection=connection).worker_name for j in first.values()}
        assert len(ran_on) == 2, ran_on
        a, b = first.values()
        assert a["started_at"] < b["ended_at"] and b["started_at"] < a["ended_at"], (a, b)
        coordinators = [j["result"] for j in jobs if j["kind"] == "extract"]
        assert sum(r["extracted"] for r in coordinators) == 0
        assert [r["activated"] for r in coordinators].count(True) == 1, coordinators

        current = FeatureStore(ProjectLayout(tmp_path / "models", pid).features_dir).current()
        assert current is not None and current.info.generation == 0
        task_ids = sorted(t["id"] for t in ls.call("GET", "/api/tasks", params={"project": pid, "page_size": 3000,
                                                                                 "fields": "all"})["tasks"])
        assert sorted(current.task_ids().tolist()) == task_ids
        # the vectors are the right ones for their tasks: four tasks of each part, embedded here
        from asvp_backend.features import create_backbone

        backbone = create_backbone("tf_efficientnet_lite0", "auto", "cpu", int(FAST_STACK["IMAGE_SIZE"]))
        sample = [task_ids[i] for i in (0, 1, 2, 3, 1000, 1001, 2098, 2099)]
        expected = backbone.embed_images([Image.open(io.BytesIO(images[task_ids.index(t) % 64])).convert("RGB")
                                          for t in sample])
        _, stored = current.lookup(sample)
        np.testing.assert_allclose(stored.astype(np.float32), expected, rtol=2e-2, atol=2e-2)
    finally:
        for worker in workers:
            worker.stop()
        backend.stop()
