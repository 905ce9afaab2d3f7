"""The status page (`/ui/`) and the JSON routes it reads besides `GET /projects/N` and `/jobs`.

One static HTML file (static/status.html, vanilla JS, no build step, nothing from the internet) serves
both the project list (`/ui/`) and a project (`/ui/projects/N`); it polls JSON routes that scripts can
use too, and `GET /projects/N/learning` answers "is it learning?" (learning.py holds its definitions). Every
value is inserted as text, never as HTML, and a Content-Security-Policy that allows only the page's own
script and style (by hash) stops any injected markup from running. The routes sit behind the app's basic
auth like every route but /health and /webhook.

Task links go to LABEL_STUDIO_URL, else to the address Label Studio sent to /setup (the embedded default
has no LABEL_STUDIO_URL): a person's browser opens Label Studio where Label Studio says it lives.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
from importlib import resources
from typing import Any

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse

from asvp_backend.alignment.summary import damaged_models
from asvp_backend.artefacts import ArtefactCorrupt, read_ranking
from asvp_backend.jobs.registry import queueable_kinds
from asvp_backend.labelstudio import credentials
from asvp_backend.learning import acceptance_summary, learning_summary, round_accuracy
from asvp_backend.runtime import Runtime
from asvp_backend.server.schemas import parse_project_id
from asvp_backend.state import StateCorrupt, TaskSnapshot
from asvp_backend.stopping import StopRule

PAGE = "status.html"
MAX_NEXT = 200
JOBS_READ = 100  # the project's newest jobs the learning summary looks through for a running fine-tune
_HTTP_URL = re.compile(r"https?://[^\s/?#@]+(/[^\s?#]*)?", flags=re.I)


def _page() -> tuple[str, str]:
    """The page and its Content-Security-Policy: its inline script and style are allowed by hash only."""
    html = resources.files("asvp_backend.server").joinpath("static", PAGE).read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    policy = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
              "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html, policy


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


def ui_router(runtime: Runtime) -> APIRouter:
    router = APIRouter()
    store, settings = runtime.store, runtime.settings
    html, policy = _page()
    headers = {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}

    @router.get("/ui", include_in_schema=False)
    def ui_root() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=308)

    @router.get("/ui/", response_class=HTMLResponse, include_in_schema=False)
    @router.get("/ui/projects/{project}", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(html, headers=headers)

    @router.get("/projects")
    def projects() -> JSONResponse:
        """Every project served, with what the list page shows; a corrupt one is listed with its problem."""
        states, corrupt = store.readable()
        rule = StopRule.from_settings(settings)
        listed: list[dict[str, Any]] = []
        for s in states:
            accuracy = round_accuracy(s.rounds[-1]) if s.rounds else {}
            accepted = acceptance_summary({}, s.acceptance.accepted, s.acceptance.corrected)["overall"]
            listed.append({"project": s.project_id, "title": s.title, "model_version": str(s.version),
                           "labels": list(s.spec.labels), "rounds": len(s.rounds), "last_sync": s.last_sync,
                           "cv_accuracy": accuracy.get("cv_accuracy"), "cv_n": accuracy.get("cv_n"),
                           "cv_interval": accuracy.get("cv_interval"), "pre_annotations_accepted": accepted,
                           "can_stop": rule.evaluate(s.rounds).can_stop})
        listed += [{"project": pid, "problem": problem} for pid, problem in sorted(corrupt.items())]
        return JSONResponse({"projects": sorted(listed, key=lambda p: p["project"])})

    @router.get("/projects/{project}/learning")
    def learning(project: str) -> JSONResponse:
        """Is it learning? Title and classes, accuracy per round with its 95% interval and what it is measured
        on, pre-annotations accepted as-is vs corrected per round and overall, label-config changes, and the
        deliverable model with any fine-tune in progress (learning.py defines each)."""
        project_id = parse_project_id(project)
        state = store.get(project_id)
        if state is None:
            return JSONResponse({"detail": f"unknown project {project_id}"}, status_code=404)
        jobs = [info.to_dict() for info in runtime.queue.jobs(project_id, limit=JOBS_READ)]
        damaged = damaged_models(runtime.layout(project_id), state)
        return JSONResponse(learning_summary(state, jobs, damaged))

    @router.get("/projects/{project}/next")
    def next_tasks(project: str, limit: int = Query(default=20, ge=1, le=MAX_NEXT)) -> JSONResponse:
        """The current round's queue order (lowest score first) without the tasks labelled since, each with
        its suggested label and a link into Label Studio; and the images that could not be used."""
        from asvp_backend.features import FeatureStore, FeatureStoreError

        project_id = parse_project_id(project)
        state = store.get(project_id)
        if state is None:
            return JSONResponse({"detail": f"unknown project {project_id}"}, status_code=404)
        layout = runtime.layout(project_id)
        address = label_studio_address(runtime, project_id)
        body: dict[str, Any] = {"model_version": str(state.version), "tasks": [], "skipped": [], "problem": None}
        try:
            ranking = read_ranking(layout, state.version) if state.round else None
            labelled = {tid for tid, t in TaskSnapshot(settings.model_dir, project_id).load().items() if t.label}
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

    job_body = {"type": "object", "required": ["kind"],
                "properties": {"kind": {"enum": queueable_kinds()}, "retry_of": {"type": "string"}}}
    job_request = {"requestBody": {"required": True, "content": {"application/json": {"schema": job_body}}}}

    @router.post("/projects/{project}/jobs", openapi_extra=job_request)  # the body is read by hand: described here
    async def queue_job(project: str, request: Request) -> JSONResponse:
        """Queue a job of `kind` for the project (the page's Retry). JSON only: a cross-site form cannot
        send it, so a browser holding the basic-auth credentials cannot be made to queue jobs."""
        if not request.headers.get("content-type", "").startswith("application/json"):
            return JSONResponse({"detail": "send a JSON body"}, status_code=415)
        project_id = parse_project_id(project)
        try:
            body = json.loads(await request.body())
        except ValueError:
            return JSONResponse({"detail": "the body is not JSON"}, status_code=400)
        kind = body.get("kind") if isinstance(body, dict) else None
        if kind not in queueable_kinds():
            return JSONResponse({"detail": f"kind must be one of {', '.join(queueable_kinds())}"}, status_code=400)
        if not await run_in_threadpool(store.exists, project_id):
            return JSONResponse({"detail": f"unknown project {project_id}"}, status_code=404)
        retry_of = str(body.get("retry_of") or "")[:100]
        reason = f"queued again from the status page (retry of {retry_of})" if retry_of else "from the status page"
        # a sync a person asks for reads every task again (a retry goes on from the pointers left pending)
        params = {"full": True, "full_reason": reason} if kind == "sync" and not retry_of else {}
        submitted = await run_in_threadpool(functools.partial(runtime.queue.submit, kind, project_id, reason, **params))
        return JSONResponse({"job": submitted.job_id, "deduplicated": submitted.deduplicated}, status_code=202)

    return router
