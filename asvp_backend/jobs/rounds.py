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
from pathlib import Path
from typing import Any

import numpy as np

from asvp_backend.jobs.extraction import feature_store
from asvp_backend.state import ProjectState, TaskSnapshot, project_dir
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


def run_round(ctx: Any) -> dict[str, Any]:
    from asvp_backend.selection import SelectionInput, create_proxy, create_strategy, cross_val_accuracy

    runtime, pid = ctx.runtime, ctx.project_id
    settings = runtime.settings
    state = runtime.store.require(pid)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 4)
        clock = now

    generation = feature_store(settings.model_dir, pid).current()
    if generation is None:
        return {"status": "skipped", "reason": "no cached features yet"}
    tasks = TaskSnapshot(settings.model_dir, pid).load()
    ids, vectors = generation.matrix()
    row_of = {int(tid): row for row, tid in enumerate(ids.tolist())}
    labelled = [(tid, t.label) for tid, t in tasks.items() if t.label is not None and tid in row_of]
    pool_ids = np.array([tid for tid, t in tasks.items() if t.label is None and tid in row_of], dtype=np.int64)
    x_lab = np.asarray(vectors[[row_of[tid] for tid, _ in labelled]], dtype=np.float32).reshape(-1, vectors.shape[1])
    y_lab = np.array([label for _, label in labelled], dtype=object)
    # the pool stays float16 (the store's type; 2.5 GB for 1M x 1,280): the proxy converts batch by batch
    x_pool = vectors[np.array([row_of[tid] for tid in pool_ids.tolist()], dtype=np.int64)].reshape(-1, vectors.shape[1])
    lap("load_features")
    ctx.progress(1, 4, stage="features loaded", force=True)

    device = proxy_device(settings.device)
    classes = sorted(set(y_lab.tolist()))
    proxy, probs, predicted, cv_accuracy = None, None, None, None
    if len(classes) >= 2:
        proxy = create_proxy(settings.proxy, device=device, seed=settings.seed).fit(x_lab, y_lab)
        lap("train_proxy")
        if len(pool_ids):
            probs = proxy.predict_proba(x_pool)
            predicted = np.asarray(proxy.classes_)[probs.argmax(axis=1)]
        lap("score_pool")
        strategy_name = settings.strategy
    else:  # nothing (or one class) labelled: a cold-start strategy ranks on features alone
        strategy_name = settings.cold_start_strategy
    ctx.progress(2, 4, stage="proxy trained", force=True)

    version = ModelVersion(generation.info.generation, state.round + 1)
    strategy = create_strategy(strategy_name, seed=settings.seed + version.round, epsilon=settings.epsilon)
    budget = min(len(pool_ids), settings.push_top_k)
    if len(pool_ids):
        ranking = strategy.rank(SelectionInput(x_pool, probs, x_lab, proxy), budget)
        scores = np.asarray(ranking.scores, dtype=np.float64)
    else:
        scores = np.zeros(0)
    lap("select")

    # label names, not indices: a label config edited later must not turn "cat" into another class
    predicted_labels = (
        np.array([str(p) for p in predicted], dtype=str) if predicted is not None else np.full(len(pool_ids), "")
    )
    _write_artefacts(settings.model_dir, pid, version, proxy, pool_ids, scores, predicted_labels)
    lap("save")

    push_rows = np.argsort(scores, kind="stable")[: settings.push_top_k]
    predictions = [
        {
            "task": int(pool_ids[row]),
            "result": [state.spec.result(str(predicted_labels[row]))] if predicted_labels[row] else [],
            "score": float(scores[row]),
            "model_version": str(version),
        }
        for row in push_rows
    ]
    client = runtime.label_studio()
    client.delete_model_version(pid, str(version))
    client.import_predictions(pid, predictions)
    project_fields: dict[str, Any] = {"model_version": str(version)}
    if settings.ls_sampling == "uncertainty":
        project_fields["sampling"] = UNCERTAINTY_SAMPLING
    client.update_project(pid, **project_fields)
    view_id = client.ensure_ranking_view(pid)
    lap("push")
    ctx.progress(3, 4, stage="ranking pushed", force=True)

    if proxy is not None and len(y_lab) <= CV_MAX_LABELS:  # after the push: not on the ranking's critical path
        cv_accuracy = cross_val_accuracy(
            lambda: create_proxy(settings.proxy, device=device, seed=settings.seed), x_lab, y_lab, folds=5
        )
        lap("cross_validate")

    record = {
        "round": version.round,
        "version": str(version),
        "generation": version.generation,
        "at": time.time(),
        "labelled": len(labelled),
        "classes": len(classes),
        "pool": int(len(pool_ids)),
        "pushed": len(predictions),
        "strategy": strategy_name,
        "proxy": settings.proxy if proxy is not None else None,
        "cv_accuracy": cv_accuracy,
        "top_tasks": [int(pool_ids[r]) for r in push_rows[:10]],
        "view_id": view_id,
        "timings": timings,
    }

    def commit(current: ProjectState | None) -> ProjectState | None:
        if current is None:
            return None
        current.advance_to(version)
        current.labels_at_last_round = len(labelled)
        current.record_round(record)
        current.record_job(ctx.job_id)
        return current

    runtime.store.update(pid, commit)
    deleted = _delete_old_versions(client, pid, previous=state.version, current=version)
    _prune_round_dirs(settings.model_dir, pid, keep={str(version), str(state.version)})
    lap("cleanup")
    record["deleted_versions"] = deleted
    record["timings"] = timings
    ctx.progress(4, 4, stage="done", force=True)
    log.info("project %s: round %s (%s) ranked %s tasks, pushed %s", pid, version, strategy_name,
             len(pool_ids), len(predictions))
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
