"""Every route fuzzed from the API's own OpenAPI schema with schemathesis (issue 12, item 3): no 5xx, a
documented status with a conforming body or a 4xx whose JSON says why; with basic auth on, every operation but
the open ones is a 401 whatever is sent. In process (embedded queue, never started), derandomized and bounded."""

from __future__ import annotations

import atexit
import base64
import shutil
import tempfile
from typing import Any

import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from asvp_backend.config import Settings
from asvp_backend.jobs.inprocess import InProcessJobQueue
from asvp_backend.runtime import Runtime
from asvp_backend.server.app import OPEN_ROUTES, create_app
from asvp_backend.state import FileStateStore
from tests.helpers import IMAGE_CONFIG

EXAMPLES = 25
CREDENTIALS = {"Authorization": "Basic " + base64.b64encode(b"fuzz:fuzz-pass").decode()}
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


def build_app(**env: str) -> FastAPI:
    """The app on a fresh MODEL_DIR with project 3 set up, so that fuzzed ids can reach real state. Label Studio
    is an address where nothing listens: /setup's connection check fails at once, offline."""
    model_dir = tempfile.mkdtemp(prefix="asvp-fuzz-")
    atexit.register(shutil.rmtree, model_dir, True)
    base = {"MODEL_DIR": model_dir, "LABEL_STUDIO_URL": "http://127.0.0.1:9", "LABEL_STUDIO_API_KEY": "fuzz-token"}
    runtime = Runtime(settings=Settings.from_env({**base, **env}), store=FileStateStore(model_dir),
                      queue=InProcessJobQueue())
    app = create_app(runtime)
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        reply = client.post("/setup", json={"project": 3, "schema": IMAGE_CONFIG}, headers=CREDENTIALS)
        assert reply.status_code == 200
    return app


APP = build_app()
GUARDED_APP = build_app(BASIC_AUTH_USER="fuzz", BASIC_AUTH_PASS="fuzz-pass")
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
guarded_schema = schemathesis.openapi.from_asgi("/openapi.json", GUARDED_APP, headers=CREDENTIALS)
DOCUMENTED: dict[tuple[str, str], set[str]] = {
    (method.upper(), path): set(operation["responses"])
    for path, item in schema.raw_schema["paths"].items()
    for method, operation in item.items()
}


def test_the_schema_describes_the_bodies_read_by_hand():
    """/setup, /predict, /webhook and /projects/N/jobs read their bodies themselves (limits first); without a
    described body the fuzzer would only ever send none."""
    paths = schema.raw_schema["paths"]
    for path in ("/setup", "/predict", "/webhook", "/projects/{project}/jobs"):
        assert "application/json" in paths[path]["post"]["requestBody"]["content"], path
    assert "tasks" in paths["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]["required"]


def _detail(response: Any) -> object:
    try:
        return response.json().get("detail")
    except (ValueError, AttributeError):
        return None


@schema.parametrize()
@FUZZ
def test_no_route_answers_5xx_and_refusals_say_why(case):
    response = case.call()
    status = response.status_code
    assert status < 500, f"{case.method} {case.formatted_path}: {status} {response.text[:300]}"
    if 400 <= status < 500:
        # FastAPI documents 422 as a list of errors; this API answers every refusal with a string detail
        assert isinstance(_detail(response), str), (status, response.text[:300])
        return
    assert str(status) in DOCUMENTED[(case.method, case.path)], f"undocumented {status} on {case.path}"
    case.validate_response(response, checks=[response_schema_conformance, content_type_conformance])


@guarded_schema.parametrize()
@settings(FUZZ, max_examples=5)
def test_with_basic_auth_every_guarded_operation_is_401(case):
    response = case.call()
    if case.path in OPEN_ROUTES:
        assert response.status_code != 401 and response.status_code < 500
    else:
        assert response.status_code == 401, (case.method, case.formatted_path, response.status_code)
