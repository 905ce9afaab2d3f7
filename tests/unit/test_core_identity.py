"""One active-learning core: the round job (against a fake Label Studio) and `simulate`'s step, fed the same
features, labels and settings, rank the pool alike, put the same audit picks in the same places, measure the
same audit estimate and LogME-PED, and make the same alignment decision (selection/queue.py,
alignment/transferability.py `labelled_set_scores`, alignment/policy.py)."""

from __future__ import annotations

import numpy as np
import pytest

from asvp_backend.artefacts import read_ranking
from asvp_backend.config import Settings
from asvp_backend.evaluation.datasets import ArrayImages, Dataset, Split
from asvp_backend.evaluation.simulate import (
    AlignedProxyMethod,
    Features,
    Laps,
    RunState,
    SimulationConfig,
    Workspace,
)
from asvp_backend.features import FeatureStore
from asvp_backend.features.store import GenerationInfo
from asvp_backend.jobs.changes import Changes
from asvp_backend.jobs.context import JobContext
from asvp_backend.jobs.inprocess import InProcessJobQueue
from asvp_backend.jobs.rounds import run_round
from asvp_backend.jobs.sync import sync
from asvp_backend.labelstudio.label_config import parse_label_config
from asvp_backend.layout import ProjectLayout
from asvp_backend.runtime import Runtime
from asvp_backend.state import FileStateStore, ProjectState
from tests.fakes import FakeLabelStudio
from tests.helpers import IMAGE_CONFIG

PID, N, DIM, INITIAL, BUDGET, SEED = 3, 80, 12, 20, 10, 5
CLASSES = ("cat", "dog")  # sorted as their indices: the proxies see the classes in the same order


def features() -> np.ndarray:
    """Two overlapping clusters by the parity of the task id, as the store holds them (float16)."""
    rng = np.random.default_rng(11)
    centre = np.where(np.arange(N) % 2 == 0, 1.0, -1.0)[:, None]
    return (centre + rng.normal(0, 1.5, (N, DIM))).astype(np.float16)


def label_of(tid: int) -> str:
    return CLASSES[tid % 2]


class Backend:
    """The round job on task ids 0..N-1 with a fake Label Studio (the same ids are simulate's train rows)."""

    def __init__(self, tmp_path, vectors: np.ndarray) -> None:
        env = {"MODEL_DIR": str(tmp_path), "LABEL_STUDIO_URL": "http://ls.invalid", "LABEL_STUDIO_API_KEY": "k",
               "DEVICE": "cpu", "RETRAIN_EVERY": str(BUDGET), "PROXY": "logistic", "STRATEGY": "margin",
               "SEED": str(SEED), "ALIGN_THRESHOLD": "1000", "ALIGN_WINDOW": "1", "ALIGN_MIN_LABELS": "4",
               "ALIGN_MIN_NEW_LABELS": "0"}
        self.settings = Settings.from_env(env)
        tasks = [{"id": t, "data": {"image": f"http://images.invalid/{t}.png"}, "annotations": []} for t in range(N)]
        self.fake = FakeLabelStudio(IMAGE_CONFIG, tasks)
        self.runtime = Runtime(settings=self.settings, store=FileStateStore(tmp_path), queue=InProcessJobQueue(),
                               _label_studio=self.fake)
        self.runtime.store.update(PID, lambda _: ProjectState.new(PID, IMAGE_CONFIG, parse_label_config(IMAGE_CONFIG)))
        store = FeatureStore(ProjectLayout(tmp_path, PID).features_dir)
        generation = store.create_generation(GenerationInfo(0, "fake", "none", {}, DIM))
        generation.append(list(range(N)), vectors)
        store.activate(0)
        self.layout = ProjectLayout(tmp_path, PID)
        self.fake.on_change = lambda tid: self.runtime.changes.note_now(PID, Changes(tasks=frozenset({tid})))

    def round(self, label: list[int]) -> dict:
        for tid in label:
            self.fake.annotate(tid, label_of(tid))
        sync(JobContext("sync", PID, "sync-test", {}, self.runtime))
        return run_round(JobContext("round", PID, "round-test", {}, self.runtime))


def simulator(tmp_path, vectors: np.ndarray) -> tuple[AlignedProxyMethod, Workspace]:
    """simulate's asvp step on the same features (injected where extraction would put them) and settings."""
    labels = np.arange(N, dtype=np.int64) % 2
    blank = ArrayImages(np.zeros((N, 4, 4), dtype=np.uint8))
    dataset = Dataset("identity", CLASSES, Split(labels, blank), Split(labels, blank), "own", "identity")
    config = SimulationConfig(dataset="identity", methods=("asvp",), proxy="logistic", strategy="margin",
                              initial=INITIAL, budget_per_round=BUDGET, rounds=1, seeds=1, eval="proxy",
                              device="cpu", align_threshold=1000, align_window=1, align_min_labels=4,
                              align_min_new_labels=0)
    ws = Workspace(config, dataset, tmp_path, progress=False)
    for split in ("train", "test"):
        ws._memo[f"None|{split}"] = Features(vectors, 0.0, f"identity-{split}")
    return AlignedProxyMethod(ws), ws


def test_the_round_job_and_simulate_make_the_same_round(tmp_path):
    vectors = features()
    backend = Backend(tmp_path / "backend", vectors)
    method, ws = simulator(tmp_path / "simulate", vectors)
    run = RunState("asvp", SEED)
    initial = np.sort(np.random.default_rng(0).choice(N, INITIAL, replace=False)).astype(np.int64)

    # round 1: the cold-start labels are given; both rank the pool and place the first audit picks
    first = backend.round(initial.tolist())
    inputs, ranking = method._rank(run, 0, initial, BUDGET, Laps())
    pushed = read_ranking(backend.layout, backend.runtime.store.require(PID).version)
    assert pushed is not None
    np.testing.assert_array_equal(pushed.task_ids, inputs.pool_ids)
    np.testing.assert_array_equal(pushed.scores, ranking.scores.astype(pushed.scores.dtype))
    outcome = method.play(run, 0, initial, BUDGET, Laps())
    served = pushed.task_ids[np.argsort(pushed.scores, kind="stable")][:BUDGET]
    assert outcome.selected.tolist() == served.tolist()  # the batch is the top of the backend's queue
    audit = backend.runtime.store.require(PID).audit
    in_batch = [t for t in audit.tasks if t in set(served.tolist())]
    assert len(in_batch) == 2 and sorted(run.audit) == sorted(in_batch)  # 20% of the first ten labels
    assert first["alignment"]["decision"] == outcome.extra["decision"]["decision"] == "wait"
    assert first["alignment"]["logme_ped"] == pytest.approx(outcome.extra["decision"]["logme_ped"], abs=0)

    # round 2: the batch is labelled; the same audit estimate, LogME-PED and decision (an update fires)
    rows = np.concatenate([initial, outcome.selected])
    second = backend.round(outcome.selected.tolist())
    last = method.play(run, 1, rows, 0, Laps())
    decision = last.extra["decision"]
    assert second["alignment"]["decision"] == decision["decision"] == "update"
    assert second["alignment"]["logme_ped"] == decision["logme_ped"] and second["alignment"]["gain"] == decision["gain"]
    assert {k: second["audit"][k] for k in ("n", "accuracy", "low", "high")} == last.extra["audit"]
    assert last.extra["audit"]["n"] == 2
