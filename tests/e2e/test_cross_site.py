"""Forged requests from a real browser (issue 17, item 2), as the probe made them: headless chromium opens a page
on another origin (a second local HTTP server: http://localhost:<other port> is cross-site to the backend on
http://127.0.0.1:<port>, http://127.0.0.1:<other port> is same-site) whose forms submit themselves, top-level,
to the backend: urlencoded to /projects/N/align, text/plain JSON to /setup (new labels EVIL1, EVIL2) and to
/webhook (START_TRAINING). With basic auth off (the default) and on, the browser holding the credentials. The
backend's JSON, read as a script, then shows that nothing changed: the labels, the alignment state and the
jobs. A control posts the same forms to the attacker's own server, proving the browser really sends the
probe's bodies. Then a DNS-rebinding attack: chromium resolves evil.example.com to the backend's address.
The backend is a real `asvp-backend serve` in the embedded mode (no Label Studio needed: /setup names an
address where nothing listens). Refusals in process: tests/unit/test_forged_requests.py."""

from __future__ import annotations

import html
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from tests.conftest import start_backend
from tests.helpers import IMAGE_CONFIG, free_port, wait_for

pytestmark = pytest.mark.e2e

USER, PASSWORD = "ops", "cross-site-pass-1"
PROJECT = 3
EVIL_CONFIG = ('<View><Image name="image" value="$image"/><Choices name="label" toName="image" choice="single">'
               '<Choice value="EVIL1"/><Choice value="EVIL2"/></Choices></View>')
REBOUND = "evil.example.com"


def text_plain_json(payload: dict) -> tuple[str, str]:
    """A form field whose text/plain encoding (`name=value` CRLF) is the JSON `payload`: the probe's trick."""
    text = json.dumps({**payload, "pad": ""}, separators=(",", ":"))
    return text[: -len('"}')], '"}'


def attack_pages(target: str) -> dict[str, str]:
    """The probe's three auto-submitting forms, aimed at `target` (the backend, or the control recorder)."""
    setup_name, setup_value = text_plain_json({"project": f"{PROJECT}.1", "schema": EVIL_CONFIG})
    hook_name, hook_value = text_plain_json({"action": "START_TRAINING", "project": {"id": PROJECT}})
    forms = {
        "align": f'<form method="post" action="{target}/projects/{PROJECT}/align">'
                 '<input name="force" value="1"></form>',
        "setup": f'<form method="post" enctype="text/plain" action="{target}/setup">'
                 f'<input name="{html.escape(setup_name)}" value="{html.escape(setup_value)}"></form>',
        "webhook": f'<form method="post" enctype="text/plain" action="{target}/webhook">'
                   f'<input name="{html.escape(hook_name)}" value="{html.escape(hook_value)}"></form>',
    }
    return {name: f"<!doctype html><html><body><h1>cute cats</h1>{form}"
                  "<script>document.forms[0].submit()</script></body></html>" for name, form in forms.items()}


class Attacker:
    """The other site: GET /<target>/<attack> serves an attack page; POST records what a browser sent (the
    control target)."""

    def __init__(self, backend: str) -> None:
        self.recorded: list[dict] = []
        attacker = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                where, _, name = self.path.strip("/").partition("/")
                target = backend if where == "backend" else f"http://{self.headers['host']}/record"
                page = attack_pages(target).get(name) if where in ("backend", "record") else None
                if page is None:  # /favicon.ico
                    self._reply(404, "text/plain", b"")
                else:
                    self._reply(200, "text/html", page.encode())

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                attacker.recorded.append({"path": self.path, "content-type": self.headers.get("content-type"),
                                          "sec-fetch-site": self.headers.get("sec-fetch-site"),
                                          "body": self.rfile.read(length).decode()})
                self._reply(200, "text/plain", b"recorded")

            def _reply(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    # evil.example.com resolves to the backend's address: what a DNS-rebinding attack achieves after its first
    # answer pointed the name at the attacker's server
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 f"--host-resolver-rules=MAP {REBOUND} 127.0.0.1"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # the request headers chromium sent
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module", params=["no auth", "basic auth"])
def backend(request, tmp_path_factory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("cross-site")
    port = free_port()
    auth = request.param == "basic auth"
    env = {"MODEL_DIR": str(tmp / "models"), "DEVICE": "cpu"}
    if auth:
        env.update(BASIC_AUTH_USER=USER, BASIC_AUTH_PASS=PASSWORD)
    process = start_backend(tmp, port, **env)
    script = requests.Session()  # the operator's script: reads the backend's JSON
    if auth:
        script.auth = (USER, PASSWORD)
    url = f"http://127.0.0.1:{port}"
    setup = {"project": f"{PROJECT}.1", "schema": IMAGE_CONFIG, "hostname": "http://127.0.0.1:9"}
    assert script.post(f"{url}/setup", json=setup, timeout=10).status_code == 200
    attacker = Attacker(url)
    try:
        yield {"url": url, "port": port, "auth": auth, "script": script, "attacker": attacker, "process": process}
    finally:
        attacker.close()
        process.stop()


def what_a_script_sees(backend) -> dict:
    """Everything a forged request could have changed, as the backend's JSON says it."""
    script, url = backend["script"], backend["url"]
    projects = script.get(f"{url}/projects", timeout=10).json()["projects"]
    state = script.get(f"{url}/projects/{PROJECT}", timeout=10).json()
    jobs = script.get(f"{url}/jobs", params={"project": PROJECT}, timeout=10).json()["jobs"]
    return {"labels": [p["labels"] for p in projects if p["project"] == PROJECT][0], "spec": state["spec"],
            "alignment": state["alignment"], "config_changes": state["config_changes"],
            "jobs": sorted(j["id"] for j in jobs)}


def page_json(driver) -> dict:
    from selenium.webdriver.common.by import By

    return json.loads(driver.find_element(By.TAG_NAME, "pre").text)  # chromium shows JSON in a <pre>


def sent_headers(driver, url: str) -> dict[str, str]:
    """The headers chromium put on its last request to `url` (its network stack adds Authorization and the
    Sec-Fetch-* headers after the page's view of the request, so they are in ...ExtraInfo)."""
    ids = {}
    extra: dict[str, dict] = {}
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message.get("params", {})
        if message["method"] == "Network.requestWillBeSent" and params["request"]["url"] == url:
            ids[params["requestId"]] = params["request"]
        elif message["method"] == "Network.requestWillBeSentExtraInfo":
            extra[params["requestId"]] = params["headers"]
    found = [extra[i] for i in ids if i in extra]
    assert found, f"chromium sent no request to {url}"
    return {k.lower(): v for k, v in found[-1].items()}


def log_in(driver, backend) -> None:
    """The browser holds the credentials, as after a visit to the status page: the next requests carry them."""
    if backend["auth"]:
        driver.get(f"http://{USER}:{PASSWORD}@127.0.0.1:{backend['port']}/ui/")
        driver.get(f"{backend['url']}/projects/{PROJECT}")  # no credentials in the URL: the cached ones are sent
        assert page_json(driver)["project_id"] == PROJECT


@pytest.mark.parametrize(("origin_host", "site"), [("localhost", "cross-site"), ("127.0.0.1", "same-site")])
def test_forged_forms_from_another_site_change_nothing(backend, browser, origin_host, site):
    log_in(browser, backend)
    before = what_a_script_sees(backend)
    assert before["labels"] == ["cat", "dog"] and before["alignment"]["pending"] is None
    attacker = backend["attacker"]
    paths = {"align": f"/projects/{PROJECT}/align", "setup": "/setup", "webhook": "/webhook"}
    for name, path in paths.items():
        browser.get_log("performance")  # drop what came before
        browser.get(f"http://{origin_host}:{attacker.port}/backend/{name}")
        wait_for(lambda p=path: browser.current_url == backend["url"] + p, timeout=10, what=f"the {name} form's post")
        refusal = page_json(browser)
        assert refusal["detail"].startswith(f"{site} request refused (Sec-Fetch-Site: {site})"), refusal
        headers = sent_headers(browser, backend["url"] + path)
        assert headers["sec-fetch-site"] == site and headers["origin"] == f"http://{origin_host}:{attacker.port}"
        expected_type = "application/x-www-form-urlencoded" if name == "align" else "text/plain"
        assert headers["content-type"] == expected_type
        if backend["auth"]:
            assert headers["authorization"].startswith("Basic ")  # the browser did attach the credentials
    time.sleep(1.0)  # a job queued by a forged request would be listed by now (the embedded queue runs at once)
    assert what_a_script_sees(backend) == before
    assert backend["script"].get(f"{backend['url']}/projects", timeout=10).json()["projects"][0]["labels"] == \
        ["cat", "dog"]


def test_the_forms_send_the_probes_bodies(backend, browser):
    """Control: the same pages posting to the attacker's own recorder. The bodies are what the probe sent (a
    valid /setup with EVIL1 and EVIL2, a START_TRAINING event), so only the backend's refusal stopped them."""
    attacker = backend["attacker"]
    attacker.recorded.clear()
    for count, name in enumerate(("align", "setup", "webhook"), start=1):
        browser.get(f"http://localhost:{attacker.port}/record/{name}")
        wait_for(lambda n=count: len(attacker.recorded) >= n, timeout=10, what=f"the {name} form's post, recorded")
    align, setup, hook = attacker.recorded[-3:]
    assert align["content-type"] == "application/x-www-form-urlencoded" and align["body"] == "force=1"
    assert setup["content-type"] == "text/plain" and hook["content-type"] == "text/plain"
    forged_setup = json.loads(setup["body"])
    assert forged_setup["project"] == f"{PROJECT}.1" and "EVIL1" in forged_setup["schema"]
    assert json.loads(hook["body"])["action"] == "START_TRAINING"


def test_the_status_pages_own_post_still_works(backend, browser):
    """What status.html's Retry does: fetch() from the backend's own page, JSON, same-origin."""
    log_in(browser, backend)
    browser.get(f"{backend['url']}/ui/")
    script = ("const done = arguments[arguments.length - 1];"
              "fetch(arguments[0], {method: 'POST', headers: {'Content-Type': 'application/json',"
              " Accept: 'application/json'}, body: JSON.stringify({kind: 'sync', retry_of: 'x'})})"
              ".then(async r => done([r.status, await r.json()])).catch(e => done([0, String(e)]))")
    status, body = browser.execute_async_script(script, f"/projects/{PROJECT}/jobs")
    assert status == 202, body
    jobs = backend["script"].get(f"{backend['url']}/jobs", params={"project": PROJECT}, timeout=10).json()["jobs"]
    assert body["job"] in {j["id"] for j in jobs}


def test_a_rebound_name_reads_and_changes_nothing(backend, browser):
    """DNS rebinding: evil.example.com now resolves to the backend, so a page of that name is same-origin with
    it in the browser's eyes. The Host header still says evil.example.com: every request is refused with a
    message (health checks aside)."""
    before = what_a_script_sees(backend)
    evil = f"http://{REBOUND}:{backend['port']}"
    browser.get(f"{evil}/projects/{PROJECT}")
    assert "'evil.example.com' is not allowed" in page_json(browser)["detail"]
    script = ("const done = arguments[arguments.length - 1];"
              "Promise.all([fetch('/projects', {headers: {Accept: 'application/json'}}),"
              " fetch('/projects/3/align', {method: 'POST', headers: {'Content-Type': 'application/json'},"
              " body: '{}'})]).then(async rs => done(await Promise.all(rs.map(async r => [r.status, await r.text()]))))"
              ".catch(e => done(String(e)))")
    (read_status, read_body), (align_status, align_body) = browser.execute_async_script(script)
    assert read_status == 400 and "ALLOWED_HOSTS" in json.loads(read_body)["detail"]
    assert align_status == 400 and "ALLOWED_HOSTS" in json.loads(align_body)["detail"]
    for path in ("/projects", "/ui/", f"/projects/{PROJECT}/align"):  # and from a script, with the credentials
        method = "POST" if path.endswith("align") else "GET"
        response = backend["script"].request(method, backend["url"] + path, json={}, timeout=10,
                                             headers={"Host": f"{REBOUND}:{backend['port']}"})
        assert response.status_code == 400 and "is not allowed" in response.json()["detail"], path
    health = requests.get(f"{backend['url']}/health", headers={"Host": REBOUND}, timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "UP"
    time.sleep(1.0)
    assert what_a_script_sees(backend) == before
