"""A large extraction shared by several workers (EXTRACT_PARTS): slotted job kinds, the split by task id, parts
that run at once on two gpu threads of the in-process queue, one activation of a complete generation, and a
part whose generation went stale doing nothing."""

from __future__ import annotations

import time

import numpy as np
import pytest

from asvp_backend.config import Settings
from asvp_backend.features import FeatureStore
from asvp_backend.features.store import GenerationInfo
from asvp_backend.jobs.inprocess import InProcessJobQueue
from asvp_backend.jobs.registry import UnknownJobKind, job_kind, queueable_kinds, slot_of
from asvp_backend.jobs.runner import run_job
from asvp_backend.jobs.status import JobStatus
from asvp_backend.labelstudio.label_config import parse_label_config
from asvp_backend.layout import ProjectLayout
from asvp_backend.runtime import Runtime
from asvp_backend.state import FileStateStore, ProjectState
from tests.fakes import FakeLabelStudio
from tests.helpers import IMAGE_CONFIG, wait_for
from tests.unit.test_alignment_jobs import PatternFetcher

PID = 5
TINY = {"BACKBONE": "test_efficientnet", "BACKBONE_WEIGHTS": "random", "IMAGE_SIZE": "32", "DEVICE": "cpu",
        "EXTRACT_BATCH_SIZE": "4", "EXTRACT_WORKERS": "0", "PROXY": "logistic"}


def test_a_slotted_kind_is_one_job_kind_with_a_lease_per_slot():
    spec = job_kind("extract_part:3")
    assert spec.name == "extract_part" and spec.queue == "gpu" and slot_of("extract_part:3") == 3
    assert spec.lease_for("extract_part:3") == "extract_part:3" and spec.lease_for("extract_part:0") != "gpu"
    assert job_kind("extract").lease_for("extract") == "gpu"
    for wrong in ("extract_part", "extract_part:x", "extract:1", "round:0", "nope:1"):
        with pytest.raises(UnknownJobKind):
            job_kind(wrong)
    assert "extract_part" not in queueable_kinds() and "extract" in queueable_kinds()


class SlowPatternFetcher(PatternFetcher):
    """Slow enough (20 ms an image) that two parts of 30 tasks each are seen running at the same time."""

    def load(self, url: str, task_id: int):
        time.sleep(0.02)
        return super().load(url, task_id)


def _runtime(tmp_path, n_tasks: int, parts: int, monkeypatch) -> tuple[Runtime, InProcessJobQueue]:
    monkeypatch.setattr("asvp_backend.jobs.resources.image_fetcher", lambda settings, client: SlowPatternFetcher())
    monkeypatch.setattr("asvp_backend.jobs.extraction.SPLIT_MIN_TASKS", 20)
    settings = Settings.from_env({"MODEL_DIR": str(tmp_path), "LABEL_STUDIO_URL": "http://ls.invalid",
                                  "LABEL_STUDIO_API_KEY": "k", "EXTRACT_PARTS": str(parts), **TINY})
    fake = FakeLabelStudio(IMAGE_CONFIG, [{"id": t, "data": {"image": f"http://images.invalid/{t}.png"},
                                           "annotations": []} for t in range(1, n_tasks + 1)])
    queue = InProcessJobQueue(threads={"cpu": 1, "gpu": 2})
    runtime = Runtime(settings=settings, store=FileStateStore(tmp_path), queue=queue, _label_studio=fake)
    runtime.store.update(PID, lambda _: ProjectState.new(PID, IMAGE_CONFIG, parse_label_config(IMAGE_CONFIG)))
    queue.start(lambda kind, pid, job_id, params, report: run_job(runtime, kind, pid, job_id, params, report))
    return runtime, queue


def _run_chain(runtime: Runtime, queue: InProcessJobQueue) -> list:
    queue.submit("sync", PID, reason="test", whole=True)

    def idle():
        jobs = queue.jobs(PID, limit=200)
        failed = [j for j in jobs if j.status is JobStatus.FAILED]
        assert not failed, [j.error for j in failed]
        return jobs if jobs and all(j.status.ended for j in jobs) else None

    jobs = wait_for(idle, timeout=120, what="the chain to finish")
    queue.close()
    return jobs


def test_two_parts_share_a_large_extraction_and_the_generation_serves_once_complete(tmp_path, monkeypatch):
    runtime, queue = _runtime(tmp_path / "split", 60, parts=2, monkeypatch=monkeypatch)
    jobs = _run_chain(runtime, queue)
    parts = {j.kind: j for j in jobs if j.kind.startswith("extract_part:")}
    assert set(parts) == {"extract_part:0", "extract_part:1"}
    extracted = {kind: sum(j.result["extracted"] for j in jobs if j.kind == kind) for kind in parts}
    assert extracted == {"extract_part:0": 30, "extract_part:1": 30}  # the even and the odd task ids
    first, second = sorted(parts.values(), key=lambda j: j.started_at)
    assert second.started_at < first.ended_at  # the two parts ran at the same time
    coordinators = [j.result for j in sorted(jobs, key=lambda j: j.started_at) if j.kind == "extract"]
    assert all(r["extracted"] == 0 for r in coordinators)  # the coordinating job extracted nothing itself
    assert [r["activated"] for r in coordinators].count(True) == 1
    assert coordinators[0]["parts"] == {"0": 30, "1": 30}
    store = FeatureStore(ProjectLayout(tmp_path / "split", PID).features_dir)
    current = store.current()
    assert current is not None and current.info.generation == 0
    assert sorted(current.task_ids().tolist()) == list(range(1, 61))

    # the same project extracted by one job: the same vector for every task
    one_runtime, one_queue = _runtime(tmp_path / "one", 60, parts=1, monkeypatch=monkeypatch)
    one_jobs = _run_chain(one_runtime, one_queue)
    assert not [j for j in one_jobs if j.kind.startswith("extract_part")]
    single = FeatureStore(ProjectLayout(tmp_path / "one", PID).features_dir).current()
    assert single is not None
    ids = list(range(1, 61))
    split_vectors, single_vectors = current.lookup(ids)[1], single.lookup(ids)[1]
    np.testing.assert_allclose(split_vectors, single_vectors, atol=1e-2)


def test_a_small_extraction_is_not_split(tmp_path, monkeypatch):
    runtime, queue = _runtime(tmp_path, 12, parts=2, monkeypatch=monkeypatch)
    jobs = _run_chain(runtime, queue)
    assert not [j for j in jobs if j.kind.startswith("extract_part")]
    assert sum(j.result["extracted"] for j in jobs if j.kind == "extract") == 12


def test_a_part_of_a_generation_the_project_no_longer_fills_does_nothing(tmp_path, monkeypatch):
    from asvp_backend.jobs.context import JobContext
    from asvp_backend.jobs.extraction import extract_share

    runtime, queue = _runtime(tmp_path, 24, parts=2, monkeypatch=monkeypatch)
    _run_chain(runtime, queue)
    store = FeatureStore(ProjectLayout(tmp_path, PID).features_dir)
    other = store.create_generation(GenerationInfo(1, "another", "elsewhere", {}, store.generation(0).info.dim))
    ctx = JobContext("extract_part:1", PID, "part-test", {"parts": 2, "generation": 1}, runtime)
    summary = extract_share(ctx)
    assert summary["stale"] is True and summary["extracted"] == 0 and len(other) == 0
