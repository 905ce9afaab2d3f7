"""The `round` job: retrain the proxy on the labelled tasks' cached features, rank the unlabelled pool and
push the ranking into Label Studio (SVPp inside Label Studio).

Order of writes, so that a crash at any point leaves a consistent picture: the round's artefacts are
written to a temporary folder and renamed into place; predictions of the new version are first deleted
(a re-run after a crash does not average two sets) and then imported; the project's model_version is
switched; only then does the backend's state advance. Predictions older than the previous version are
deleted last.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from asvp_backend.jobs.extraction import feature_store
from asvp_backend.state import ProjectState, SyncedTask, TaskSnapshot, project_dir
from asvp_backend.versioning import ModelVersion

log = logging.getLogger(__name__)

UNCERTAINTY_SAMPLING = "Uncertainty sampling"
CV_MAX_LABELS = 5000  # above this the cross-validated accuracy costs more than the round itself


def round_dir(model_dir: Path, project_id: int, version: ModelVersion | str) -> Path:
    return project_dir(model_dir, project_id) / "rounds" / str(version)


def round_due(labelled: int, labels_at_last_round: int, rounds_done: int, retrain_every: int, force: bool) -> bool:
    """The one rule for when a round runs: on Start Training, for the first ranking, and then whenever
    RETRAIN_EVERY labels were added (or removed) since the last round."""
    return force or rounds_done == 0 or abs(labelled - labels_at_last_round) >= retrain_every


def proxy_device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


@dataclass
class RoundInputs:
    """The current generation's features, split into the labelled set and the unlabelled pool."""

    x_lab: np.ndarray  # (m, d) float32
    y_lab: np.ndarray  # (m,) label names
    pool_ids: np.ndarray  # (n,) task ids
    x_pool: np.ndarray  # (n, d) float16, the store's type (2.5 GB at 1M x 1,280); the proxy converts per batch
    labelled_total: int  # every labelled task, with features or not (what round_due compares against)


@dataclass
class RoundRanking:
    strategy: str
    proxy: Any  # None at cold start
    scores: np.ndarray  # (n,) lower = label first
    labels: np.ndarray  # (n,) the proxy's label per pool task, "" at cold start


def load_inputs(generation: Any, tasks: dict[int, SyncedTask]) -> RoundInputs:
    ids, vectors = generation.matrix()
    row_of = {int(tid): row for row, tid in enumerate(ids.tolist())}
    labelled = [(tid, t.label) for tid, t in tasks.items() if t.label is not None and tid in row_of]
    pool_ids = np.array([tid for tid, t in tasks.items() if t.label is None and tid in row_of], dtype=np.int64)
    dim = vectors.shape[1]
    lab_rows = np.array([row_of[tid] for tid, _ in labelled], dtype=np.int64)
    pool_rows = np.array([row_of[tid] for tid in pool_ids.tolist()], dtype=np.int64)
    return RoundInputs(
        x_lab=np.asarray(vectors[lab_rows], dtype=np.float32).reshape(-1, dim),
        y_lab=np.array([label for _, label in labelled], dtype=object),
        pool_ids=pool_ids,
        x_pool=vectors[pool_rows].reshape(-1, dim),
        labelled_total=sum(1 for t in tasks.values() if t.label is not None),
    )


def rank_pool(inputs: RoundInputs, settings: Any, round_no: int, device: str) -> RoundRanking:
    """Train the proxy (from two labelled classes on) and let the strategy score every pool task."""
    from asvp_backend.selection import SelectionInput, create_proxy, create_strategy

    n = len(inputs.pool_ids)
    proxy, probs, labels = None, None, np.full(n, "")
    if len(set(inputs.y_lab.tolist())) >= 2:
        proxy = create_proxy(settings.proxy, device=device, seed=settings.seed).fit(inputs.x_lab, inputs.y_lab)
        if n:
            probs = proxy.predict_proba(inputs.x_pool)
            # label names, not indices: a label config edited later must not turn "cat" into another class
            labels = np.asarray(proxy.classes_).astype(str)[probs.argmax(axis=1)]
        strategy_name = settings.strategy
    else:  # nothing (or one class) labelled: a cold-start strategy ranks on features alone
        strategy_name = settings.cold_start_strategy
    strategy = create_strategy(strategy_name, seed=settings.seed + round_no, epsilon=settings.epsilon)
    scores = np.zeros(0)
    if n:
        ranking = strategy.rank(SelectionInput(inputs.x_pool, probs, inputs.x_lab, proxy), min(n, settings.push_top_k))
        scores = np.asarray(ranking.scores, dtype=np.float64)
    return RoundRanking(strategy_name, proxy, scores, labels)


def push_ranking(client: Any, pid: int, spec: Any, version: ModelVersion, pool_ids: np.ndarray,
                 ranking: RoundRanking, settings: Any) -> tuple[np.ndarray, int]:
    """Predictions of the new version for the top of the ranking, then the project follows that version.

    Returns the pushed pool rows (best first) and the Data Manager view's id."""
    rows = np.argsort(ranking.scores, kind="stable")[: settings.push_top_k]
    predictions = [
        {
            "task": int(pool_ids[row]),
            "result": [spec.result(str(ranking.labels[row]))] if ranking.labels[row] else [],
            "score": float(ranking.scores[row]),
            "model_version": str(version),
        }
        for row in rows
    ]
    client.delete_model_version(pid, str(version))  # a re-run after a crash must not average two sets
    client.import_predictions(pid, predictions)
    fields: dict[str, Any] = {"model_version": str(version)}
    if settings.ls_sampling == "uncertainty":
        fields["sampling"] = UNCERTAINTY_SAMPLING
    client.update_project(pid, **fields)
    return rows, client.ensure_ranking_view(pid)


def run_round(ctx: Any) -> dict[str, Any]:
    from asvp_backend.selection import create_proxy, cross_val_accuracy

    runtime, pid = ctx.runtime, ctx.project_id
    settings = runtime.settings
    state = runtime.store.require(pid)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str, step: int) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 4)
        clock = now
        ctx.progress(step, 6, stage=name, force=True)

    generation = feature_store(settings.model_dir, pid).current()
    if generation is None:
        return {"status": "skipped", "reason": "no cached features yet"}
    inputs = load_inputs(generation, TaskSnapshot(settings.model_dir, pid).load())
    lap("load_features", 1)

    device = proxy_device(settings.device)
    version = ModelVersion(generation.info.generation, state.round + 1)
    ranking = rank_pool(inputs, settings, version.round, device)
    lap("train_and_rank", 2)
    _write_artefacts(settings.model_dir, pid, version, ranking.proxy, inputs.pool_ids, ranking.scores, ranking.labels)
    lap("save", 3)
    client = runtime.label_studio()
    pushed, view_id = push_ranking(client, pid, state.spec, version, inputs.pool_ids, ranking, settings)
    lap("push", 4)

    cv_accuracy = None
    if ranking.proxy is not None and len(inputs.y_lab) <= CV_MAX_LABELS:  # after the push: off the critical path
        cv_accuracy = cross_val_accuracy(
            lambda: create_proxy(settings.proxy, device=device, seed=settings.seed), inputs.x_lab, inputs.y_lab
        )
        lap("cross_validate", 5)

    record = {
        "round": version.round,
        "version": str(version),
        "generation": version.generation,
        "at": time.time(),
        "labelled": len(inputs.y_lab),
        "classes": len(set(inputs.y_lab.tolist())),
        "pool": int(len(inputs.pool_ids)),
        "pushed": int(len(pushed)),
        "strategy": ranking.strategy,
        "proxy": settings.proxy if ranking.proxy is not None else None,
        "cv_accuracy": cv_accuracy,
        "top_tasks": [int(inputs.pool_ids[r]) for r in pushed[:10]],
        "view_id": view_id,
        "timings": timings,
    }

    def commit(current: ProjectState | None) -> ProjectState | None:
        if current is None:
            return None
        current.advance_to(version)
        current.labels_at_last_round = inputs.labelled_total
        current.record_round(record)
        current.record_job(ctx.job_id)
        return current

    runtime.store.update(pid, commit)
    record["deleted_versions"] = _delete_old_versions(client, pid, previous=state.version, current=version)
    _prune_round_dirs(settings.model_dir, pid, keep={str(version), str(state.version)})
    lap("cleanup", 6)
    log.info("project %s: round %s (%s) ranked %s tasks, pushed %s", pid, version, ranking.strategy,
             len(inputs.pool_ids), len(pushed))
    return record


def _write_artefacts(model_dir: Path, pid: int, version: ModelVersion, proxy: Any, pool_ids: np.ndarray,
                     scores: np.ndarray, predicted_labels: np.ndarray) -> None:
    """Everything /predict needs, complete before it becomes visible (written aside, then renamed)."""
    target = round_dir(model_dir, pid, version)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=target.parent))
    try:
        np.savez(tmp / "ranking.npz", task_ids=pool_ids, scores=scores.astype(np.float32), labels=predicted_labels)
        if proxy is not None:
            proxy.save(tmp / "proxy.pt")
        (tmp / "round.json").write_text(json.dumps({"version": str(version), "pool": int(len(pool_ids))}))
        if target.exists():  # a re-run of a round that crashed after saving
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _delete_old_versions(client: Any, pid: int, previous: ModelVersion, current: ModelVersion) -> list[str]:
    """Keep the current and the previous version's predictions; delete our older ones."""
    deleted = []
    for text in client.model_versions(pid):
        try:
            version = ModelVersion.parse(text)
        except ValueError:
            continue  # not ours: leave it alone
        if version < previous and version != current:
            client.delete_model_version(pid, text)
            deleted.append(text)
    return deleted


def _prune_round_dirs(model_dir: Path, pid: int, keep: set[str]) -> None:
    root = project_dir(model_dir, pid) / "rounds"
    for path in root.iterdir() if root.exists() else []:
        if path.is_dir() and not path.name.startswith(".") and path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)
