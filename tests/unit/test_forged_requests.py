"""Forged requests (issue 17, item 2): a page on another site, in a browser that holds the backend's credentials
(or none: basic auth is off by default), must change nothing, and neither may a page whose DNS name was
rebound to the backend. Every route that changes something is read from `app.routes` (test_auth.every_route),
so a route added later is covered without editing this file. What Label Studio sends (JSON, no Origin, no
Sec-Fetch-*) and what the status page sends (JSON, same-origin) keep working. The same attacks from a real
browser: tests/e2e/test_cross_site.py."""

from __future__ import annotations

import asyncio
import json

import pytest

from asvp_backend.config import ConfigError, Settings
from asvp_backend.server.guards import SAFE_METHODS, HostRule, RequestGuard, split_host
from tests.helpers import IMAGE_CONFIG
from tests.unit.test_auth import GOOD, PASSWORD, USER, every_route, make_app

EVIL_CONFIG = IMAGE_CONFIG.replace('<Choice value="cat"/>\n    <Choice value="dog"/>',
                                   '<Choice value="EVIL1"/>\n    <Choice value="EVIL2"/>')
FORMS = {  # what a page on another site can send without a CORS preflight
    "urlencoded": {"content-type": "application/x-www-form-urlencoded"},
    "text/plain": {"content-type": "text/plain"},
    "multipart": {"content-type": "multipart/form-data; boundary=x"},
    "none": {},
}
CROSS_SITE = {  # JSON, but marked by the browser as coming from elsewhere
    "cross-site": {"Sec-Fetch-Site": "cross-site"},
    "same-site": {"Sec-Fetch-Site": "same-site"},  # another port of the same host, e.g. Label Studio's page
    "foreign origin": {"Origin": "http://evil.example.com"},
    "label studio's page": {"Origin": "http://localhost:8080"},
    "null origin": {"Origin": "null"},  # sandboxed frames, file: pages
    "same host other port": {"Origin": "http://testserver:8080"},
    "other scheme": {"Origin": "ftp://testserver"},
}


def changing_routes(client) -> list[tuple[str, str]]:
    found = [(method, path) for method, path in every_route(client) if method not in SAFE_METHODS]
    names = {path for _, path in found}
    assert {"/setup", "/predict", "/webhook", "/projects/3/align", "/projects/3/jobs"} <= names, names
    return found


def set_up(client, project: str = "3.1") -> None:
    reply = client.post("/setup", json={"project": project, "schema": IMAGE_CONFIG, "hostname": "http://127.0.0.1:9"})
    assert reply.status_code == 200, reply.text


@pytest.fixture
def app(tmp_path):
    client, runtime = make_app(tmp_path)
    set_up(client)
    return client, runtime


# ------------------------------------------------------------------ 415: only JSON changes anything
@pytest.mark.parametrize("form", list(FORMS), ids=list(FORMS))
def test_every_route_that_changes_something_refuses_what_a_form_sends(app, form):
    client, runtime = app
    for method, path in changing_routes(client):
        body = b"kind=sync" if form != "none" else b""
        response = client.request(method, path, content=body, headers=FORMS[form])
        assert response.status_code == 415, (method, path, response.status_code)
        assert "application/json" in response.json()["detail"], response.text
    assert runtime.queue.jobs(3) == []


def test_the_probes_forms_change_nothing(app):
    """The probe's three requests: a fine-tune queued by an urlencoded form, the labels replaced by a text/plain
    /setup, a text/plain START_TRAINING webhook. Each is refused; labels, predictions and the queue are intact."""
    client, runtime = app
    form = {"content-type": "application/x-www-form-urlencoded"}
    assert client.post("/projects/3/align", content=b"x=1", headers=form).status_code == 415
    text = {"content-type": "text/plain"}
    evil_setup = json.dumps({"project": "3.1", "schema": EVIL_CONFIG})
    assert client.post("/setup", content=evil_setup, headers=text).status_code == 415
    hook = json.dumps({"action": "START_TRAINING", "project": {"id": 3}})
    assert client.post("/webhook", content=hook, headers=text).status_code == 415
    state = runtime.store.require(3)
    assert state.spec.labels == ("cat", "dog") and state.alignment.pending is None
    assert client.get("/projects").json()["projects"][0]["labels"] == ["cat", "dog"]
    assert runtime.queue.jobs(3) == []
    # the same requests as JSON are what Label Studio and scripts send: they work
    assert client.post("/webhook", content=hook, headers={"content-type": "application/json"}).status_code == 201
    assert client.post("/projects/3/align", json={}).status_code == 202
    assert {job.kind for job in runtime.queue.jobs(3)} == {"train", "align"}


# ------------------------------------------------------------------ 403: cross-site browser requests
@pytest.mark.parametrize("marks", list(CROSS_SITE), ids=list(CROSS_SITE))
def test_every_route_that_changes_something_refuses_a_cross_site_browser_request(app, marks):
    client, runtime = app
    for method, path in changing_routes(client):
        response = client.request(method, path, json={"kind": "sync"}, headers=CROSS_SITE[marks])
        assert response.status_code == 403, (method, path, response.status_code)
        assert "refused" in response.json()["detail"]
    assert runtime.queue.jobs(3) == []


def test_a_cross_site_request_is_refused_before_basic_auth_asks_for_a_login(tmp_path):
    client, _ = make_app(tmp_path, BASIC_AUTH_USER=USER, BASIC_AUTH_PASS=PASSWORD)
    forged = client.post("/projects/3/align", content=b"x=1", headers={
        "content-type": "application/x-www-form-urlencoded", "Sec-Fetch-Site": "cross-site",
        "Origin": "http://evil.example.com"})
    assert forged.status_code == 403 and "www-authenticate" not in forged.headers  # no login box on a forged form
    with_credentials = client.post("/projects/3/align", content=b"x=1", headers={
        **GOOD, "content-type": "application/x-www-form-urlencoded"})
    assert with_credentials.status_code == 415  # the cached credentials do not make a form acceptable
    assert client.post("/projects/3/align", json={}).status_code == 401  # JSON without credentials: auth as before


def test_cross_site_reads_still_work(app):
    """A link from Label Studio to the status page is a cross-site GET: reading is not refused."""
    client, _ = app
    marks = {"Sec-Fetch-Site": "cross-site", "Origin": "http://localhost:8080"}
    assert client.get("/ui/", headers=marks).status_code == 200
    assert client.get("/projects/3", headers=marks).status_code == 200


# ------------------------------------------------------------------ what keeps working
@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON;charset=UTF-8", " application/json "])
def test_label_studios_requests_work(tmp_path, content_type):
    """Label Studio's server sends JSON (requests' json=) with no Origin and no Sec-Fetch-* header."""
    client, runtime = make_app(tmp_path)
    headers = {"content-type": content_type, "User-Agent": "heartex/1.23.2"}
    setup = {"project": "3.1", "schema": IMAGE_CONFIG, "hostname": "http://127.0.0.1:9"}
    assert client.post("/setup", content=json.dumps(setup), headers=headers).status_code == 200
    predict = {"project": "3.1", "tasks": [{"id": 1, "data": {"image": "x"}}], "label_config": IMAGE_CONFIG}
    assert client.post("/predict", content=json.dumps(predict), headers=headers).status_code == 200
    train = {"action": "START_TRAINING", "project": {"id": 3}}
    assert client.post("/webhook", content=json.dumps(train), headers=headers).status_code == 201
    assert [job.kind for job in runtime.queue.jobs(3)] == ["train"]


@pytest.mark.parametrize("host", ["testserver", "127.0.0.1:9090", "localhost:9090", "[::1]:9090"])
def test_the_status_pages_retry_works(app, host):
    """What status.html's fetch() sends from the page the backend served: JSON, same-origin, its own Origin."""
    client, runtime = app
    headers = {"Host": host, "Origin": f"http://{host}", "Sec-Fetch-Site": "same-origin",
               "Sec-Fetch-Mode": "cors", "Accept": "application/json"}
    reply = client.post("/projects/3/jobs", json={"kind": "sync", "retry_of": "sync-p3-x"}, headers=headers)
    assert reply.status_code == 202, reply.text
    assert [job.kind for job in runtime.queue.jobs(3)] == ["sync"]


@pytest.mark.parametrize(("host", "origin"), [("127.0.0.1", "http://127.0.0.1:80"), ("127.0.0.1:80", "http://127.0.0.1"),
                                               ("10.0.0.5", "https://10.0.0.5:443"), ("10.0.0.5:443", "https://10.0.0.5")])
def test_an_origin_with_the_default_port_matches_a_host_without_one(app, host, origin):
    client, _ = app
    headers = {"Host": host, "Origin": origin, "Sec-Fetch-Site": "same-origin"}
    assert client.post("/projects/3/jobs", json={"kind": "sync"}, headers=headers).status_code == 202


def test_behind_a_proxy_that_rewrites_host_the_listed_public_name_is_a_trusted_origin(tmp_path):
    client, _ = make_app(tmp_path, ALLOWED_HOSTS="asvp.example.com")
    set_up(client)
    page = {"Host": "api:9090", "Origin": "https://asvp.example.com", "Sec-Fetch-Site": "same-origin"}
    assert client.post("/projects/3/jobs", json={"kind": "sync"}, headers=page).status_code == 202
    other = {**page, "Origin": "https://other.example.com"}
    assert client.post("/projects/3/jobs", json={"kind": "sync"}, headers=other).status_code == 403


def test_user_initiated_requests_are_not_cross_site(app):
    client, _ = app
    assert client.post("/projects/3/align", json={}, headers={"Sec-Fetch-Site": "none"}).status_code == 202


# ------------------------------------------------------------------ Host: DNS rebinding
def test_a_rebound_name_is_refused_with_a_message(app):
    client, runtime = app
    evil = {"Host": "evil.example.com:9090"}
    for method, path in [("GET", "/projects/3"), ("GET", "/ui/"), ("GET", "/jobs"), ("POST", "/projects/3/align"),
                         ("POST", "/setup")]:
        response = client.request(method, path, json={}, headers={**evil, "Origin": "http://evil.example.com:9090",
                                                                  "Sec-Fetch-Site": "same-origin"})
        assert response.status_code == 400, (method, path)
        assert "'evil.example.com' is not allowed" in response.json()["detail"]
        assert "ALLOWED_HOSTS" in response.json()["detail"]
    assert runtime.queue.jobs(3) == []


def test_health_answers_any_host(app):
    client, _ = app
    for path in ("/health", "/"):
        response = client.get(path, headers={"Host": "evil.example.com"})
        assert response.status_code == 200 and response.json()["status"] == "UP"


@pytest.mark.parametrize("host", ["localhost", "localhost:9090", "127.0.0.1:9090", "[::1]:9090", "[::1]",
                                  "192.168.1.20:9090", "10.0.0.5", "api:9090", "api", "label_studio_api:9090",
                                  "host.docker.internal:9090", "mybox.local", "asvp.localhost:9090",
                                  "nas.home.arpa", "TESTSERVER"])
def test_the_default_allows_what_connects_without_configuration(app, host):
    client, _ = app
    assert client.get("/projects/3", headers={"Host": host}).status_code == 200, host


@pytest.mark.parametrize("host", ["evil.example.com", "evil.example.com:9090", "127.0.0.1.nip.io",
                                  "localhost.evil.example.com", "evil.", "a b", "evil.local.example.com",
                                  "xn--80ak6aa92e.com"])
def test_the_default_refuses_other_dotted_names(app, host):
    client, _ = app
    assert client.get("/projects/3", headers={"Host": host}).status_code == 400, host


def test_the_machines_own_name_is_allowed(tmp_path, monkeypatch):
    import asvp_backend.server.guards as guards

    monkeypatch.setattr(guards.socket, "gethostname", lambda: "Build-Box.example.net")
    client, _ = make_app(tmp_path)
    assert client.get("/jobs", headers={"Host": "build-box.example.net:9090"}).status_code == 200
    assert client.get("/jobs", headers={"Host": "other-box.example.net:9090"}).status_code == 400


def test_allowed_hosts_adds_names_and_domains(tmp_path):
    client, _ = make_app(tmp_path, ALLOWED_HOSTS="asvp.example.com, .example.org")
    for host in ("asvp.example.com", "ASVP.example.com:443", "example.org", "ml.example.org:9090", "localhost", "api"):
        assert client.get("/jobs", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example.com", "evilexample.org", "example.org.evil.com"):
        assert client.get("/jobs", headers={"Host": host}).status_code == 400, host


def test_a_star_allows_any_host_but_not_cross_site_requests(tmp_path):
    client, _ = make_app(tmp_path, ALLOWED_HOSTS="*")
    set_up(client)
    assert client.get("/jobs", headers={"Host": "evil.example.com"}).status_code == 200
    forged = {"Host": "testserver", "Origin": "http://evil.example.com"}
    assert client.post("/projects/3/align", json={}, headers=forged).status_code == 403


# ------------------------------------------------------------------ refused before the body is read
@pytest.mark.parametrize(("headers", "status"), [
    ([(b"content-type", b"text/plain")], 415),
    ([(b"content-type", b"application/json"), (b"sec-fetch-site", b"cross-site")], 403),
    ([(b"content-type", b"application/json"), (b"origin", b"http://evil.example.com")], 403),
    ([(b"content-type", b"application/json"), (b"host", b"evil.example.com")], 400),
])
def test_refusals_come_before_the_body_is_read(app, headers, status):
    client, _ = app
    asgi = client.app
    sent: list[dict] = []

    async def receive() -> dict:
        raise AssertionError("the body was read")

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/setup", "raw_path": b"/setup", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"testserver"), *headers] if all(k != b"host" for k, _ in headers) else headers,
             "client": ("127.0.0.1", 1), "server": ("testserver", 80)}
    asyncio.run(asgi(scope, receive, send))
    assert sent[0]["status"] == status


# ------------------------------------------------------------------ the setting and the rule
def test_allowed_hosts_is_parsed_and_validated():
    assert Settings.from_env({}).allowed_hosts == ()
    parsed = Settings.from_env({"ALLOWED_HOSTS": " A.example.com, .Example.org ,, [::1], 10.0.0.1, api_1, *"})
    assert parsed.allowed_hosts == ("a.example.com", ".example.org", "::1", "10.0.0.1", "api_1", "*")
    for bad in ("http://asvp.example.com", "asvp.example.com:9090", "asvp.example.com/ui", "*.example.com",
                "a b", "-x.example.com", "x..example.com"):
        with pytest.raises(ConfigError, match="ALLOWED_HOSTS takes host names"):
            Settings.from_env({"ALLOWED_HOSTS": bad})


def test_split_host_and_the_rule():
    assert split_host("Example.COM:9090") == ("example.com", "9090")
    assert split_host("[::1]:9090") == ("::1", "9090") and split_host("[::1]") == ("::1", "")
    assert split_host("api") == ("api", "") and split_host("a:b") == ("a:b", "")
    rule = HostRule([".example.org", "asvp.example.com"], own_names=["box.lan"])
    assert rule.allows("box.lan") and rule.allows("asvp.example.com") and rule.allows("x.example.org")
    assert rule.listed("example.org") and not rule.listed("localhost") and not rule.allows("a:b")
    guard = RequestGuard([], own_names=[])
    assert guard.check_host("/health", {"host": "evil.example.com"}) is None
    assert guard.check_host("/jobs", {}) is None  # HTTP/1.0 without Host: no browser sends that
    assert guard.check_content_type("GET", "/jobs", {}) is None and guard.check_cross_site("GET", {}) is None
    refusal = guard.check_content_type("DELETE", "/x", {"content-type": "text/plain"})
    assert refusal is not None and refusal.status == 415
