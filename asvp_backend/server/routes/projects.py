"""The project routes: jobs, what the backend knows about each project, a forced feature update, and the
Prometheus metrics; the status page (server/ui.py) reads them, and so can scripts.

A route about one project takes it through deps.py (`ProjectStateDep`, or `known_project`), which answers
404 for a project the backend does not serve; what a route says about a project comes from its one read
model (project_summary.py), which `asvp-backend status` prints too. Every route here sits behind the app's
basic auth, and the two that change something take JSON only (guards.py), so a cross-site form cannot queue
a job with a browser's stored credentials.

Task links go to LABEL_STUDIO_URL, else to the address Label Studio sent to /setup (the embedded default
has no LABEL_STUDIO_URL): a person's browser opens Label Studio where Label Studio says it lives.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from asvp_backend.artefacts import ArtefactCorrupt, read_ranking
from asvp_backend.jobs.alignment import force_update
from asvp_backend.jobs.registry import queueable_kinds
from asvp_backend.labelstudio import credentials
from asvp_backend.project_summary import ProjectSummary
from asvp_backend.runtime import Runtime
from asvp_backend.server.deps import MetricsDep, ProjectId, ProjectStateDep, RuntimeDep, known_project
from asvp_backend.server.schemas import parse_project_id
from asvp_backend.state import StateCorrupt, TaskSnapshot

MAX_NEXT = 200
JOBS_READ = 100  # the project's newest jobs the learning summary looks through for a running fine-tune
_HTTP_URL = re.compile(r"https?://[^\s/?#@]+(/[^\s?#]*)?", flags=re.I)
# /projects/N/align reads no body, but like every route that changes something it takes JSON only (guards.py)
ALIGN_REQUEST = {"requestBody": {"required": False, "content": {"application/json": {"schema": {"type": "object"}}}}}
_JOB_BODY = {"type": "object", "required": ["kind"],
             "properties": {"kind": {"enum": queueable_kinds()}, "retry_of": {"type": "string"}}}
JOB_REQUEST = {"requestBody": {"required": True, "content": {"application/json": {"schema": _JOB_BODY}}}}

router = APIRouter()


@router.get("/jobs")
def jobs(runtime: RuntimeDep, project: str | None = Query(default=None),
         limit: int = Query(default=50, ge=1, le=500)) -> Any:
    project_id = None if project is None else parse_project_id(project)
    infos = [info.to_dict() for info in runtime.queue.jobs(project_id, limit=limit)]
    counts: dict[str, int] = {}
    for info in infos:
        counts[info["status"]] = counts.get(info["status"], 0) + 1
    return {"jobs": infos, "counts": counts}


@router.get("/projects")
def projects(runtime: RuntimeDep) -> JSONResponse:
    """Every project served, with what the list page shows; a corrupt one is listed with its problem."""
    states, corrupt = runtime.store.readable()
    listed: list[dict[str, Any]] = [ProjectSummary(runtime.settings, state).row() for state in states]
    listed += [{"project": pid, "problem": problem} for pid, problem in sorted(corrupt.items())]
    return JSONResponse({"projects": sorted(listed, key=lambda p: p["project"])})


@router.get("/projects/{project}")
def project_status(state: ProjectStateDep, runtime: RuntimeDep) -> JSONResponse:
    return JSONResponse(ProjectSummary(runtime.settings, state).detail())


@router.post("/projects/{project}/align", openapi_extra=ALIGN_REQUEST)
def project_align(state: ProjectStateDep, runtime: RuntimeDep) -> JSONResponse:
    """Force a feature update now (what `asvp-backend align` does with workers on Redis)."""
    return JSONResponse(force_update(runtime, state.project_id), status_code=202)


@router.get("/projects/{project}/model")
def project_model(state: ProjectStateDep, runtime: RuntimeDep) -> JSONResponse:
    return JSONResponse(ProjectSummary(runtime.settings, state).model)


@router.get("/projects/{project}/learning")
def learning(state: ProjectStateDep, runtime: RuntimeDep) -> JSONResponse:
    """Is it learning? Title and classes, accuracy per round with its 95% interval and what it is measured
    on, pre-annotations accepted as-is vs corrected per round and overall, label-config changes, and the
    deliverable model with any fine-tune in progress (learning.py defines each)."""
    jobs = [info.to_dict() for info in runtime.queue.jobs(state.project_id, limit=JOBS_READ)]
    return JSONResponse(ProjectSummary(runtime.settings, state).learning(jobs))


@router.get("/projects/{project}/next")
def next_tasks(state: ProjectStateDep, runtime: RuntimeDep,
               limit: int = Query(default=20, ge=1, le=MAX_NEXT)) -> JSONResponse:
    """The current round's queue order (lowest score first) without the tasks labelled since, each with
    its suggested label and a link into Label Studio; and the images that could not be used."""
    from asvp_backend.features import FeatureStore, FeatureStoreError

    project_id = state.project_id
    layout = runtime.layout(project_id)
    address = label_studio_address(runtime, project_id)
    body: dict[str, Any] = {"model_version": str(state.version), "tasks": [], "skipped": [], "problem": None}
    try:
        ranking = read_ranking(layout, state.version) if state.round else None
        labelled = {tid for tid, t in TaskSnapshot(runtime.settings.model_dir, project_id).load().items() if t.label}
    except (ArtefactCorrupt, StateCorrupt) as exc:
        ranking, labelled, body["problem"] = None, set(), str(exc)
    if ranking is not None:
        order = np.argsort(ranking.scores, kind="stable")
        ids, scores, labels = ranking.task_ids[order], ranking.scores[order], ranking.labels[order]
        for tid, score, label in zip(ids.tolist(), scores.tolist(), labels.tolist(), strict=True):
            if tid in labelled:
                continue
            body["tasks"].append({"id": tid, "score": round(float(score), 6), "label": str(label) or None,
                                  "url": task_url(address, project_id, tid)})
            if len(body["tasks"]) >= limit:
                break
    try:
        generation = FeatureStore(layout.features_dir).current()
        skipped = generation.skipped() if generation is not None else {}
    except (FeatureStoreError, OSError, ValueError) as exc:
        skipped, body["problem"] = {}, body["problem"] or f"{type(exc).__name__}: {str(exc)[:200]}"
    body["skipped"] = [{"id": tid, "reason": why, "url": task_url(address, project_id, tid)}
                       for tid, why in sorted(skipped.items())]
    return JSONResponse(body)


@router.post("/projects/{project}/jobs", openapi_extra=JOB_REQUEST)  # the body is read by hand: described here
async def queue_job(project_id: ProjectId, request: Request, runtime: RuntimeDep) -> JSONResponse:
    """Queue a job of `kind` for the project (the page's Retry). The body is checked before the project is
    looked up, so a malformed request is a 400 whether or not the project exists."""
    try:
        body = json.loads(await request.body())
    except ValueError:
        return JSONResponse({"detail": "the body is not JSON"}, status_code=400)
    kind = body.get("kind") if isinstance(body, dict) else None
    if kind not in queueable_kinds():
        return JSONResponse({"detail": f"kind must be one of {', '.join(queueable_kinds())}"}, status_code=400)
    await run_in_threadpool(known_project, project_id, runtime)
    retry_of = str(body.get("retry_of") or "")[:100]
    reason = f"queued again from the status page (retry of {retry_of})" if retry_of else "from the status page"
    # a sync a person asks for reads every task again (a retry goes on from the pointers left pending)
    params = {"full": True, "full_reason": reason} if kind == "sync" and not retry_of else {}
    submitted = await run_in_threadpool(functools.partial(runtime.queue.submit, kind, project_id, reason, **params))
    return JSONResponse({"job": submitted.job_id, "deduplicated": submitted.deduplicated}, status_code=202)


@router.get("/metrics", response_class=PlainTextResponse)  # documented as text, not JSON
def prometheus(metrics: MetricsDep) -> PlainTextResponse:
    return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def task_url(label_studio_url: str | None, project_id: int, task_id: int) -> str | None:
    """The task opened in Label Studio's Data Manager (None when the backend does not know Label Studio)."""
    if not label_studio_url:
        return None
    return f"{label_studio_url.rstrip('/')}/projects/{int(project_id)}/data?task={int(task_id)}"


def label_studio_address(runtime: Runtime, project_id: int) -> str | None:
    """Where a person opens the project in Label Studio: LABEL_STUDIO_URL, else the hostname Label Studio
    sent to /setup (kept in the project's connection record); None when neither is an http(s) address."""
    if runtime.settings.label_studio_url:
        return runtime.settings.label_studio_url
    hostname = credentials.load(runtime.layout(project_id)).get("hostname")
    return hostname if isinstance(hostname, str) and _HTTP_URL.fullmatch(hostname) else None
