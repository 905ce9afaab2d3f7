"""FastAPI dependencies: what a route takes from its app, and the project its path names.

`project_state` (and `known_project`, which only asks whether the project exists) is the one place that
answers 404 "unknown project N": a route under /projects/{project} declares it (`/versions?project=N` and
the jobs route, which checks its body first, call it) instead of reading the store and writing its own 404,
so the message and the status cannot drift apart between routes; /predict, whose project comes in the body,
raises the same UnknownProject with advice. The routers are
module-level and included in every app a process (or a test) builds, so what belongs to one app (its
runtime, its metrics) is on `app.state`, where `create_app` put it.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from asvp_backend.runtime import Runtime
from asvp_backend.server.metrics import Metrics
from asvp_backend.server.schemas import parse_project_id
from asvp_backend.state import ProjectState


async def app_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


async def app_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


RuntimeDep = Annotated[Runtime, Depends(app_runtime)]
MetricsDep = Annotated[Metrics, Depends(app_metrics)]


class UnknownProject(HTTPException):
    """404 "unknown project N", and what to do about it when there is something to say."""

    def __init__(self, project_id: int, advice: str = "") -> None:
        super().__init__(404, f"unknown project {project_id}" + (f": {advice}" if advice else ""))


async def path_project_id(project: str) -> int:
    """The path's project: "3" or Label Studio's "3.1700000000"; anything else is a 400 (schemas.py)."""
    return parse_project_id(project)


ProjectId = Annotated[int, Depends(path_project_id)]


def project_state(project_id: ProjectId, runtime: RuntimeDep) -> ProjectState:
    """The project's state (a damaged one is the 409 of errors.py); 404 when the backend does not serve it."""
    state = runtime.store.get(project_id)
    if state is None:
        raise UnknownProject(project_id)
    return state


def known_project(project_id: int, runtime: Runtime) -> int:
    """The project's id once the store holds it (without reading its state); 404 otherwise. Called, not
    declared, by a route that checks its body first."""
    if not runtime.store.exists(project_id):
        raise UnknownProject(project_id)
    return project_id


ProjectStateDep = Annotated[ProjectState, Depends(project_state)]
