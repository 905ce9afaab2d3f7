"""A Label Studio user's path through Label Studio 1.23.2's own web UI, in headless Debian chromium.

Why a browser: every API-driven test passed while the UI's *Connect Model* was broken. The UI's forms send
`"extra_params": ""` (a string) to `/setup`, `POST /api/ml` sends nothing, and the backend answered the
string with a 422, so the UI said "doesn't look like a valid ML backend". Only the UI's own requests find
that kind of bug, so this module drives the UI a person uses, one step per test, each asserted on what the
page shows and on what the backend and Label Studio recorded:

1. log in through the login form;
2. *Settings › Model › Connect Model* (the project itself is created through the API: setup, not the path);
3. the first task *Label All Tasks* serves is the backend's first pick (/setup queues the first sync);
4. label tasks by clicking the choices; once the queue re-ranks, the served task is the backend's first
   pick and its pre-annotation is the selected choice;
5. *Start Training* from the model card's menu queues a train job;
6. *Edit* the model's URL: it stays connected (the second form that sends `extra_params`);
7. a task no round has seen yet is opened: Label Studio asks `/predict` for it.

Label Studio talks to the backend through a small recording reverse proxy (`RecordingProxy`), so the test
sees the requests the UI causes. `ASVP_UPDATE_UI_FIXTURES=1` writes them, secrets replaced, to
`tests/fixtures/label_studio_ui/` (replayed by tests/unit/test_label_studio_ui_requests.py); otherwise the
last step checks that the stored fixtures still have the shape the UI sends. On a failure the step's
screenshot and page source are saved in its tmp_path (the error names the files).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from tests.conftest import ROOT, stack_env, start_backend, start_worker
from tests.helpers import IMAGE_CONFIG, LabelStudioAPI, free_port, png_bytes, wait_for

pytestmark = pytest.mark.e2e

N_IMAGES = 16
RETRAIN_EVERY = 3
USER, PASSWORD = "admin@example.com", "admin12345"  # tests/processes.py starts Label Studio with them
FIXTURES = ROOT / "tests" / "fixtures" / "label_studio_ui"
SECRET_KEYS = {"access_token", "password", "basic_auth_pass", "token", "task_data_password"}
PLACEHOLDER = "<redacted>"
NOT_A_BACKEND = "doesn't look like a valid ML backend"

#: what the steps captured, for the last step (fixture name -> request body)
captured: dict[str, dict[str, Any]] = {}


# ------------------------------------------------------------------------------------- recording proxy
class RecordingProxy:
    """A reverse proxy in front of the backend that keeps every request Label Studio sends it: method,
    path, status and both bodies. Label Studio is given the proxy's URL instead of the backend's."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.records: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        proxy = self

        class Forward(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # Label Studio keeps connections alive

            def forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in {"host", "content-length", "connection", "accept-encoding"}}
                try:
                    reply = requests.request(self.command, proxy.target + self.path, data=body, headers=headers,
                                             timeout=60)
                    status, content, kind = reply.status_code, reply.content, reply.headers.get("content-type")
                except requests.RequestException as exc:
                    status, content, kind = 502, str(exc).encode(), "text/plain"
                proxy.keep(self.command, self.path, status, body, content)
                self.send_response(status)
                self.send_header("Content-Type", kind or "application/json")
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def keep(self, method: str, path: str, status: int, body: bytes, reply: bytes) -> None:
        def parse(raw: bytes) -> Any:
            try:
                return json.loads(raw) if raw else None
            except ValueError:
                return raw.decode(errors="replace")

        record = {"at": time.time(), "method": method, "path": urlsplit(path).path, "status": status,
                  "body": parse(body), "reply": parse(reply)}
        with self._lock:
            self.records.append(record)

    def mark(self) -> int:
        """A position in the record, for `since`."""
        with self._lock:
            return len(self.records)

    def since(self, mark: int, method: str, path: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.records[mark:] if r["method"] == method and r["path"] == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ----------------------------------------------------------------------------------------------- stack
@pytest.fixture(scope="module")
def stack(label_studio, redis_url, tmp_path_factory):
    """The backend (rq mode) and one worker, behind the recording proxy."""
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    tmp = tmp_path_factory.mktemp("e2e-ls-ui")
    port = free_port()
    env = stack_env(label_studio, redis_url, tmp, RETRAIN_EVERY=str(RETRAIN_EVERY))
    backend = start_backend(tmp, port, **env)
    worker = start_worker(tmp, "worker", **env)
    proxy = RecordingProxy(f"http://127.0.0.1:{port}")
    try:
        yield {"ls": LabelStudioAPI(label_studio["url"], label_studio["token"]), "ls_url": label_studio["url"],
               "backend": f"http://127.0.0.1:{port}", "proxy": proxy, "backend_proc": backend, "worker": worker,
               "tmp": tmp}
    finally:
        (tmp / "proxy-records.json").write_text(json.dumps(proxy.records, indent=1, default=str))
        proxy.close()
        worker.stop()
        backend.stop()


@pytest.fixture(scope="module")
def project(stack) -> dict[str, Any]:
    """Set-up, not the path under test: a project with uploaded PNGs (even seeds red = dog, odd blue = cat)."""
    ls: LabelStudioAPI = stack["ls"]
    pid = ls.call("POST", "/api/projects", json={"title": "asvp ui path", "label_config": IMAGE_CONFIG})["id"]
    files = [(f"file{i}", (f"img_{i}.png", png_bytes(i), "image/png")) for i in range(N_IMAGES)]
    ls.call("POST", f"/api/projects/{pid}/import", files=files)
    truth = {t["id"]: true_label(t) for t in ls.tasks(pid)}
    assert len(truth) == N_IMAGES
    return {"id": pid, "truth": truth}


def true_label(task: dict[str, Any]) -> str:
    match = re.search(r"img_(\d+)\.png$", task["data"]["image"])
    assert match, task["data"]
    return "dog" if int(match.group(1)) % 2 == 0 else "cat"


def backend_get(stack, path: str, **params: Any) -> Any:
    response = requests.get(stack["backend"] + path, params=params, timeout=10)
    assert response.ok, f"GET {path}: {response.status_code} {response.text[:300]}"
    return response.json()


def jobs_of(stack, pid: int) -> list[dict[str, Any]]:
    return backend_get(stack, "/jobs", project=pid)["jobs"]


def logs_tail(stack) -> str:
    return (f"\n--- backend log ---\n{stack['backend_proc'].log()[-2000:]}"
            f"\n--- worker log ---\n{stack['worker'].log()[-3000:]}")


# --------------------------------------------------------------------------------------------- browser
@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1400,1000", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@contextlib.contextmanager
def evidence(driver, folder: Path, name: str) -> Iterator[None]:
    """On any failure inside, save a screenshot and the page source and name them in the error."""
    try:
        yield
    except BaseException as exc:
        with contextlib.suppress(Exception):
            folder.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(folder / f"{name}.png"))
            (folder / f"{name}.html").write_text(driver.page_source)
            exc.add_note(f"browser at {driver.current_url}; screenshot and page source: {folder / name}.png/.html")
        raise


def until(driver, condition: Callable[[Any], Any], timeout: float, message: str) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,)
                         ).until(condition, f"{message} (waited {timeout:.0f}s)")


def css(driver, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def visible(driver, selector: str) -> Any:
    found = [e for e in css(driver, selector) if e.is_displayed()]
    return found[0] if found else None


def clickable_text(driver, text: str, within: str = "") -> Any:
    """The visible element whose own text is `text` (a menu item, a button's label)."""
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.XPATH, f"{within}//*[normalize-space(text())='{text}']")
    found = [e for e in found if e.is_displayed()]
    return found[0] if found else None


def fetch_json(driver, path: str) -> Any:
    """GET a Label Studio API path from inside the page, with the browser's session (not the API token)."""
    return driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0], {credentials: 'same-origin'}).then(r => r.json()).then(done, e => done(String(e)));",
        path)


def login(driver, ls_url: str) -> None:
    driver.get(f"{ls_url}/user/login/")
    email = until(driver, lambda d: visible(d, "input[name='email']"), 30, "the login form")
    email.send_keys(USER)
    css(driver, "input[name='password']")[0].send_keys(PASSWORD)
    css(driver, "form button[type='submit'], form input[type='submit']")[0].click()
    until(driver, lambda d: "/user/login" not in d.current_url, 30, "Label Studio to accept the login")


@pytest.fixture(scope="module")
def logged_in(browser, stack, tmp_path_factory):
    with evidence(browser, tmp_path_factory.mktemp("ui-login"), "login"):
        login(browser, stack["ls_url"])
    return browser


def open_model_settings(driver, ls_url: str, pid: int) -> None:
    driver.get(f"{ls_url}/projects/{pid}/settings/ml")
    until(driver, lambda d: visible(d, ".lsf-backend-card") or
          visible(d, "button[aria-label='Add machine learning model']"), 30, "Settings › Model to load")


def card_state(driver) -> dict[str, str] | None:
    """What the model card shows: its status, title and URL."""
    return driver.execute_script(
        "const c = document.querySelector('.lsf-backend-card'); if (!c) return null;"
        "const t = s => (c.querySelector(s) || {}).textContent || '';"
        "return {status: t('.lsf-ml__status-label'), title: t('.lsf-backend-card__title'),"
        "        url: t('.lsf-backend-card__meta .lsf-backend-card__group')};")


def form_error(driver) -> str:
    """The ML form's error, when the page shows one."""
    text = driver.execute_script("return document.body.innerText")
    for line in text.splitlines():
        if NOT_A_BACKEND in line or "Failed to add new ML backend" in line or "Failed to save ML backend" in line:
            return line
    return ""


def submit_model_form(driver, stack, what: str) -> str:
    """Press "Validate and Save" and wait for the modal to close (or the form to show an error)."""
    css(driver, "button[aria-label='Save machine learning form']")[0].click()

    def done(d) -> str | None:
        error = form_error(d)
        if error:
            return "error: " + error
        return "saved" if not visible(d, "form input[name='url']") and card_state(d) else None

    outcome = until(driver, done, 30, f"the {what} form to close or show an error")
    assert outcome == "saved", f"{what}: the UI says {outcome!r}{logs_tail(stack)}"
    return outcome


def open_menu_item(driver, item: str) -> None:
    """The model card's "..." menu, then one of its items."""
    until(driver, lambda d: visible(d, "button[aria-label='Machine learning model options']"), 20,
          "the model card's options button").click()
    until(driver, lambda d: clickable_text(d, item), 10, f"the menu item {item!r}").click()


# --------------------------------------------------------------------------------------------- labelling
def current_task(driver) -> int | None:
    """The task id the labelling view shows (bottom left, above "n of m")."""
    text = driver.execute_script(
        "const e = document.querySelector('.lsf-current-task__task-id');"
        "return e && e.firstChild ? e.firstChild.textContent : null;")
    return int(text) if text and text.strip().isdigit() else None


def choices(driver) -> dict[str, bool]:
    """The choices shown (`label` elements whose text carries the hotkey hint, "cat[1]") and which is selected."""
    return driver.execute_script(
        "const out = {};"
        "for (const l of document.querySelectorAll('label')) {"
        "  const hint = l.querySelector('sup.lsf-hint'); const box = l.querySelector('input');"
        "  if (!hint || !box) continue;"
        "  out[l.textContent.replace(hint.textContent, '').trim()] = box.checked; }"
        "return out;") or {}


def wait_for_task(driver, other_than: int | None = None, timeout: float = 60) -> int:
    """The next task shown with its image and choices, other than `other_than`."""
    def shown(d) -> int | None:
        tid = current_task(d)
        loaded = d.execute_script("const i = document.querySelector('img[alt=\"image\"]');"
                                  "return !!(i && i.complete && i.naturalWidth > 0);")
        return tid if tid is not None and tid != other_than and loaded and len(choices(d)) == 2 else None

    return until(driver, shown, timeout, f"a task other than {other_than} with its image and choices")


def select(driver, label: str) -> None:
    """Click the choice unless it is already selected (a second click would clear a single choice)."""
    if not choices(driver).get(label):
        from selenium.webdriver.common.by import By

        boxes = driver.find_elements(By.XPATH, f"//label[.//sup[contains(@class, 'lsf-hint')]]"
                                               f"[starts-with(normalize-space(.), '{label}')]")
        assert boxes, f"no choice {label!r} among {choices(driver)}"
        boxes[0].click()
    until(driver, lambda d: choices(d).get(label), 10, f"the choice {label!r} to be selected")


def label_and_submit(driver, truth: dict[int, str]) -> tuple[int, int]:
    """Label the task shown with its true label, submit, and wait for the next one: (labelled, next)."""
    tid = wait_for_task(driver)
    select(driver, truth[tid])
    until(driver, lambda d: visible(d, "[data-testid='bottombar-submit-button']:not([disabled])"), 10,
          "an enabled Submit button").click()
    return tid, wait_for_task(driver, other_than=tid)


def label_all_tasks(driver, ls_url: str, pid: int) -> int:
    """Data Manager, then "Label All Tasks": the task it serves."""
    from selenium.webdriver.common.by import By

    driver.get(f"{ls_url}/projects/{pid}/data")
    button = until(driver, lambda d: [b for b in d.find_elements(
        By.XPATH, "//button[contains(normalize-space(.), 'Label All Tasks')]") if b.is_displayed()], 60,
        "the Data Manager's Label All Tasks button")[0]
    button.click()
    return wait_for_task(driver)


def ranked(stack, pid: int, labelled: int = 0, timeout: float = 150) -> dict[str, Any]:
    """The backend's newest round with at least `labelled` labels, once Label Studio serves its version."""
    ls: LabelStudioAPI = stack["ls"]

    def done() -> dict[str, Any] | None:
        failed = [j for j in jobs_of(stack, pid) if j["status"] == "failed"]
        assert not failed, f"failed jobs: {failed}{logs_tail(stack)}"
        state = backend_get(stack, f"/projects/{pid}")
        rounds = [r for r in state.get("rounds", []) if r["labelled"] >= labelled]
        if not rounds or rounds[-1]["version"] != state["model_version"]:
            return None
        return rounds[-1] if ls.call("GET", f"/api/projects/{pid}")["model_version"] == state["model_version"] else None

    try:
        return wait_for(done, timeout=timeout, interval=0.5, what=f"a round with {labelled}+ labels served by "
                                                                  "Label Studio")
    except AssertionError as exc:
        jobs = [(j["kind"], j["status"], j["reason"]) for j in jobs_of(stack, pid)]
        raise AssertionError(f"{exc}; backend jobs: {jobs}{logs_tail(stack)}") from None


def first_picks(stack, pid: int, version: str) -> tuple[set[int], dict[int, dict[str, Any]]]:
    """The tasks Label Studio's uncertainty sampling must serve next: the lowest score of the backend's queue
    (GET /projects/N/next, lowest first) among the tasks without an annotation in Label Studio. /next leaves
    out what its last sync saw labelled; a label submitted since is left out here from Label Studio's side.
    Several tasks only when they share that lowest score (Label Studio's order among equal scores is the
    database's)."""
    queue = backend_get(stack, f"/projects/{pid}/next", limit=50)
    assert queue["model_version"] == version, (queue["model_version"], version)
    labelled = {t["id"] for t in stack["ls"].tasks(pid) if t["annotations"]}
    open_tasks = [t for t in queue["tasks"] if t["id"] not in labelled]
    assert open_tasks, queue
    lowest = open_tasks[0]["score"]
    return {t["id"] for t in open_tasks if t["score"] == lowest}, {t["id"]: t for t in open_tasks}


# ---------------------------------------------------------------------------------------------- the path
def test_1_a_person_logs_in_through_the_login_form(logged_in, stack):
    driver = logged_in
    assert not css(driver, "input[name='password']"), "still on the login form"
    until(driver, lambda d: visible(d, "[data-testid='userpic']"), 30, "the user menu's avatar")
    me = fetch_json(driver, "/api/current-user/whoami")
    assert isinstance(me, dict) and me.get("email") == USER, me  # the session cookie is Label Studio's login
    assert any(c["name"] == "sessionid" for c in driver.get_cookies())


@pytest.fixture(scope="module")
def connected(logged_in, stack, project, tmp_path_factory) -> dict[str, Any]:
    """Settings › Model › Connect Model, with the proxy's URL."""
    driver, proxy, pid = logged_in, stack["proxy"], project["id"]
    with evidence(driver, tmp_path_factory.mktemp("ui-connect"), "connect"):
        open_model_settings(driver, stack["ls_url"], pid)
        until(driver, lambda d: visible(d, "button[aria-label='Add machine learning model']"), 30,
              "the Connect Model button (the project has no model yet)").click()
        until(driver, lambda d: visible(d, "form input[name='url']"), 10, "the Connect Model form")
        css(driver, "form input[name='title']")[0].send_keys("asvp")
        css(driver, "form input[name='url']")[0].send_keys(proxy.url)
        mark = proxy.mark()
        submit_model_form(driver, stack, "Connect Model")
        until(driver, lambda d: (card_state(d) or {}).get("status") == "Connected", 20, "the card to say Connected")
        return {"mark": mark, "card": card_state(driver)}


def test_2_connect_model_in_the_ui_connects_the_backend(connected, logged_in, stack, project):
    driver, proxy, pid = logged_in, stack["proxy"], project["id"]
    assert not form_error(driver)
    assert connected["card"] == {"status": "Connected", "title": "asvp", "url": proxy.url}
    backends = stack["ls"].call("GET", "/api/ml", params={"project": pid})
    assert [(b["state"], b["url"], b["title"]) for b in backends] == [("CO", proxy.url, "asvp")], backends
    setups = proxy.since(connected["mark"], "POST", "/setup")
    assert setups, "the Connect form reached no /setup"
    assert all(200 <= s["status"] < 300 for s in setups), [(s["status"], s["reply"]) for s in setups]
    body = setups[0]["body"]
    assert isinstance(body["extra_params"], str), body  # the form's shape: a text box, sent even when empty
    assert body["project"].split(".")[0] == str(pid) and body["schema"] == IMAGE_CONFIG
    captured["setup_connect"] = body
    assert backend_get(stack, f"/projects/{pid}")["project_id"] == pid


@pytest.fixture(scope="module")
def first_round(connected, stack, project) -> dict[str, Any]:
    """The cold-start ranking that Connect's /setup queues (sync, extract, round) before anything is labelled."""
    return ranked(stack, project["id"], labelled=0, timeout=120)


def test_3_label_all_tasks_serves_the_backends_first_pick(first_round, logged_in, stack, project, tmp_path):
    driver, pid = logged_in, project["id"]
    assert first_round["labelled"] == 0 and first_round["pool"] == N_IMAGES
    top, _ = first_picks(stack, pid, first_round["version"])
    with evidence(driver, tmp_path, "first-task"):
        served = label_all_tasks(driver, stack["ls_url"], pid)
    # nothing is labelled and no task was opened before: no lock, no skipped task, so exactly the first pick
    assert served in top, f"Label All Tasks served task {served}, the backend's first pick is {sorted(top)}"


def test_4_labelling_in_the_ui_reranks_and_preselects_the_proxys_label(first_round, logged_in, stack, project,
                                                                       tmp_path):
    """Label what is served. After each RETRAIN_EVERY-th label, Label Studio has already served (and locked)
    the next task before the round re-ranks, so that one is labelled without a check; the task served after
    it is checked against the new round: the backend's first pick, with the proxy's label selected."""
    driver, pid, truth, ls = logged_in, project["id"], project["truth"], stack["ls"]
    labelled: list[int] = []
    with evidence(driver, tmp_path, "labelling"):
        if current_task(driver) is None:  # this step alone: Label Studio serves the locked task again
            label_all_tasks(driver, stack["ls_url"], pid)
        checked = None
        while checked is None:
            assert len(labelled) < 3 * RETRAIN_EVERY, f"no round suggested labels after {labelled}"
            while len(labelled) % RETRAIN_EVERY or not labelled:
                labelled.append(label_and_submit(driver, truth)[0])
            record = ranked(stack, pid, labelled=len(labelled))
            reserved, served = label_and_submit(driver, truth)  # served before the round: not checked
            labelled.append(reserved)
            top, queue = first_picks(stack, pid, record["version"])
            assert served in top, (f"after the round {record['version']} on {record['labelled']} labels, Label "
                                   f"Studio served task {served}; the backend's first pick is {sorted(top)}")
            if record["pre_annotations"]["source"]:  # a round with two classes suggests labels
                checked = (record, served, queue[served]["label"])
        record, served, suggested = checked
        assert backend_get(stack, f"/projects/{pid}")["model_version"] == record["version"], "re-ranked meanwhile"
        assert suggested in {"cat", "dog"}
        shown = choices(driver)
        assert shown == {"cat": suggested == "cat", "dog": suggested == "dog"}, (
            f"task {served}: the UI selects {shown}, the backend suggests {suggested!r}")
        tasks = {t["id"]: t for t in ls.tasks(pid)}  # the list: GET /api/tasks/<id> would ask /predict itself
        current = [p for p in tasks[served]["predictions"] if p["model_version"] == record["version"]]
        assert len(current) == 1 and current[0]["result"][0]["value"]["choices"] == [suggested], current
    annotations = {tid: [a["result"][0]["value"]["choices"] for a in tasks[tid]["annotations"]] for tid in labelled}
    assert annotations == {tid: [[truth[tid]]] for tid in labelled}  # one annotation each, what was clicked
    assert len(labelled) <= 3 * RETRAIN_EVERY + 1


def test_5_start_training_from_the_model_menu_queues_a_train_job(connected, logged_in, stack, project, tmp_path):
    driver, proxy, pid = logged_in, stack["proxy"], project["id"]
    before = {j["id"] for j in jobs_of(stack, pid)}
    with evidence(driver, tmp_path, "start-training"):
        open_model_settings(driver, stack["ls_url"], pid)
        open_menu_item(driver, "Start Training")
        mark = proxy.mark()
        until(driver, lambda d: [b for b in css(d, "button") if b.is_displayed() and b.text.strip() ==
                                 "Start Training"], 10, "the modal's Start Training button")[0].click()
        until(driver, lambda d: clickable_text(d, "Request Sent!"), 30, 'the UI to say "Request Sent!"')
        shown = driver.execute_script("return document.body.innerText")
    webhooks = [w for w in proxy.since(mark, "POST", "/webhook") if w["body"].get("action") == "START_TRAINING"]
    assert len(webhooks) == 1 and 200 <= webhooks[0]["status"] < 300, webhooks
    captured["webhook_start_training"] = webhooks[0]["body"]
    job = webhooks[0]["reply"]["job"]
    assert "Response: {}" in shown  # Label Studio's own (empty) reply, not the backend's
    new = wait_for(lambda: [j for j in jobs_of(stack, pid) if j["id"] not in before and j["kind"] == "train"],
                   timeout=30, what="the train job Start Training queued")
    assert [j["id"] for j in new] == [job] and new[0]["reason"] == "Start Training pressed"


def test_6_editing_the_models_url_keeps_it_connected(connected, logged_in, stack, project, tmp_path):
    from selenium.webdriver.common.keys import Keys

    driver, proxy, pid = logged_in, stack["proxy"], project["id"]
    new_url = f"http://localhost:{proxy.port}"
    with evidence(driver, tmp_path, "edit"):
        open_model_settings(driver, stack["ls_url"], pid)
        open_menu_item(driver, "Edit")
        url_box = until(driver, lambda d: visible(d, "form input[name='url']"), 10, "the Edit Model form")
        assert url_box.get_attribute("value") == proxy.url
        url_box.send_keys(Keys.CONTROL, "a")
        url_box.send_keys(Keys.DELETE)
        url_box.send_keys(new_url)
        mark = proxy.mark()
        submit_model_form(driver, stack, "Edit Model")
        until(driver, lambda d: card_state(d) == {"status": "Connected", "title": "asvp", "url": new_url}, 20,
              "the card to show the new URL, connected")
    backends = stack["ls"].call("GET", "/api/ml", params={"project": pid})
    assert [(b["state"], b["url"]) for b in backends] == [("CO", new_url)], backends
    setups = proxy.since(mark, "POST", "/setup")
    assert setups and all(200 <= s["status"] < 300 for s in setups), [(s["status"], s["reply"]) for s in setups]
    assert isinstance(setups[0]["body"]["extra_params"], str), setups[0]["body"]
    captured["setup_edit"] = setups[0]["body"]
    # Label Studio creates the model's webhook only when the model is added: Edit leaves it at the old URL
    hooks = stack["ls"].call("GET", "/api/webhooks", params={"project": pid})
    assert [h["url"] for h in hooks] == [f"{proxy.url}/webhook"], hooks


def test_7_opening_a_task_no_round_has_seen_asks_predict(connected, logged_in, stack, project, tmp_path):
    """A task imported after the last round has no prediction: opening it makes Label Studio call /predict.
    The project's webhook is paused meanwhile, or its TASKS_CREATED sync could rank the task first."""
    driver, proxy, pid, ls = logged_in, stack["proxy"], project["id"], stack["ls"]
    hooks = [h for h in ls.call("GET", "/api/webhooks", params={"project": pid}) if h["is_active"]]
    assert len(hooks) == 1 and hooks[0]["url"].endswith("/webhook"), hooks  # Connect created it
    ls.call("PATCH", f"/api/webhooks/{hooks[0]['id']}", json={"is_active": False})
    try:
        ls.call("POST", f"/api/projects/{pid}/import",
                files=[("file0", (f"img_{N_IMAGES}.png", png_bytes(N_IMAGES), "image/png"))])
        newest = max(ls.tasks(pid), key=lambda t: t["id"])  # not GET /api/tasks/<id>: it would ask /predict
        new = newest["id"]
        assert not newest["predictions"], newest
        mark = proxy.mark()
        with evidence(driver, tmp_path, "predict-on-open"):
            driver.get(f"{stack['ls_url']}/projects/{pid}/data?task={new}")
            assert wait_for_task(driver) == new
            predicts = until(driver, lambda d: proxy.since(mark, "POST", "/predict"), 30,
                             f"a /predict for task {new}")
    finally:
        ls.call("PATCH", f"/api/webhooks/{hooks[0]['id']}", json={"is_active": True})
    call = predicts[0]
    assert call["status"] == 200 and [t["id"] for t in call["body"]["tasks"]] == [new], call
    assert len(call["reply"]["results"]) == 1, call["reply"]
    captured["predict_task_open"] = call["body"]
    assert not any(choices(driver).values())  # nothing suggested for a task the backend has not seen yet
    # Label Studio stored the reply; under the project's model_version its null score would sort first in
    # uncertainty sampling and serve this unranked task ahead of the backend's top pick
    current = ls.call("GET", f"/api/projects/{pid}")["model_version"]
    stored = until(driver, lambda d: ls.call("GET", f"/api/tasks/{new}")["predictions"], 30, "the stored reply")
    assert [p["model_version"] for p in stored] == [f"{current}-unranked"], stored


# ------------------------------------------------------------------------------------------------ fixtures
def sanitised(body: Any, ls_url: str) -> Any:
    """A captured body as a fixture: secrets replaced by a placeholder, Label Studio's random test port by
    its default; project ids as they were."""
    if isinstance(body, dict):
        return {k: PLACEHOLDER if k in SECRET_KEYS and isinstance(v, str) and v else sanitised(v, ls_url)
                for k, v in body.items()}
    if isinstance(body, list):
        return [sanitised(v, ls_url) for v in body]
    if isinstance(body, str):
        port = urlsplit(ls_url).port
        return re.sub(rf"(localhost|127\.0\.0\.1):{port}\b", "localhost:8080", body)
    return body


def test_8_the_stored_fixtures_have_the_shape_the_ui_sends(stack, tmp_path):
    names = ["setup_connect", "setup_edit", "webhook_start_training", "predict_task_open"]
    missing = [n for n in names if n not in captured]
    assert not missing, f"earlier steps captured no {missing}"
    bodies = {n: sanitised(captured[n], stack["ls_url"]) for n in names}
    for name, body in bodies.items():
        assert stack["ls"].session.headers["Authorization"].split()[-1] not in json.dumps(body), name
        (tmp_path / f"{name}.json").write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    if os.environ.get("ASVP_UPDATE_UI_FIXTURES") == "1":
        FIXTURES.mkdir(parents=True, exist_ok=True)
        for name, body in bodies.items():
            (FIXTURES / f"{name}.json").write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    for name, body in bodies.items():
        stored = json.loads((FIXTURES / f"{name}.json").read_text())
        assert sorted(stored) == sorted(body), f"{name}: the UI now sends {sorted(body)}, the fixture has " \
                                               f"{sorted(stored)} (ASVP_UPDATE_UI_FIXTURES=1 rewrites it)"
        for key in ("extra_params", "action"):
            if key in body:
                assert type(stored[key]) is type(body[key]) and (key != "action" or stored[key] == body[key])
