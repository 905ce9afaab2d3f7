"""The status page in a real headless browser (Debian's chromium through selenium) against the real stack:
Label Studio 1.23.2, the backend with basic auth on, an rq worker. Labels a few tasks, waits for rounds,
then checks what a person sees: the learning curve, the stopping signal, a live progress bar, a failed
job retried from the page, next-task links into Label Studio; and saves the screenshots the README shows."""

from __future__ import annotations

import time

import pytest
import requests

from tests.conftest import ROOT, stack_env, start_backend, start_worker
from tests.e2e.test_label_studio import annotate
from tests.helpers import IMAGE_CONFIG, LabelStudioAPI, free_port, png_bytes, wait_for

pytestmark = pytest.mark.e2e

N_TASKS = 12
USER, PASSWORD = "ops", "page-pass-123"
DOCS = ROOT / "docs"


def label_of(index: int) -> str:
    return "dog" if index % 2 == 0 else "cat"  # png_bytes: even seeds are red, odd ones blue


@pytest.fixture(scope="module")
def stack(label_studio, redis_url, tmp_path_factory):
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    tmp = tmp_path_factory.mktemp("e2e-ui")
    port = free_port()
    env = stack_env(label_studio, redis_url, tmp, BASIC_AUTH_USER=USER, BASIC_AUTH_PASS=PASSWORD, RETRAIN_EVERY="2")
    backend = start_backend(tmp, port, **env)
    worker = start_worker(tmp, "worker", **env)
    api = requests.Session()
    api.auth = (USER, PASSWORD)
    try:
        yield {"ls": LabelStudioAPI(label_studio["url"], label_studio["token"]), "ls_url": label_studio["url"],
               "backend": f"http://127.0.0.1:{port}", "port": port, "api": api, "worker": worker,
               "redis_url": redis_url}
    finally:
        worker.stop()
        backend.stop()


def connect(stack, title: str, images: list[tuple[str, bytes]]) -> int:
    """A Label Studio project with these images, connected to the backend with its basic-auth credentials."""
    ls: LabelStudioAPI = stack["ls"]
    pid = ls.call("POST", "/api/projects", json={"title": title, "label_config": IMAGE_CONFIG})["id"]
    files = [(f"file{i}", (name, data, "image/png")) for i, (name, data) in enumerate(images)]
    ls.call("POST", f"/api/projects/{pid}/import", files=files)
    ls.call("POST", "/api/ml", json={"url": stack["backend"], "project": pid, "title": "asvp",
                                     "auth_method": "BASIC_AUTH", "basic_auth_user": USER,
                                     "basic_auth_pass": PASSWORD})
    return pid


def state_of(stack, pid: int) -> dict:
    response = stack["api"].get(f"{stack['backend']}/projects/{pid}", timeout=5)
    assert response.ok, response.text
    return response.json()


def jobs_of(stack, pid: int) -> list[dict]:
    return stack["api"].get(f"{stack['backend']}/jobs", params={"project": pid}, timeout=5).json()["jobs"]


def complete_round(stack, pid: int, labelled: int) -> dict:
    """The round with at least `labelled` labels once its last step (the alignment decision) is recorded."""
    def done():
        failed = [j for j in jobs_of(stack, pid) if j["status"] == "failed"]
        assert not failed, f"failed jobs: {failed}\n{stack['worker'].log()[-4000:]}"
        return next((r for r in state_of(stack, pid)["rounds"] if r["labelled"] >= labelled and r["alignment"]), None)

    return wait_for(done, timeout=180, interval=0.5, what=f"a complete round with {labelled} labels")


@pytest.fixture(scope="module")
def project(stack):
    """Twelve images and one that cannot be decoded; three rounds on 4, 6 and 8 labels."""
    images = [(f"img_{i}.png", png_bytes(i)) for i in range(N_TASKS)] + [("broken.png", b"not a png at all")]
    pid = connect(stack, "asvp status page", images)
    tasks = sorted(stack["ls"].tasks(pid), key=lambda t: t["id"])
    ids = [t["id"] for t in tasks]
    for upto in (4, 6, 8):
        for i in range(upto - 2 if upto > 4 else 0, upto):
            annotate(stack["ls"], ids[i], label_of(i))
        complete_round(stack, pid, upto)
    return {"id": pid, "task_ids": ids, "broken": ids[-1]}


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def open_page(stack, driver, path: str) -> None:
    """Navigate with the credentials in the URL (the page's own requests then reuse them)."""
    from selenium.webdriver.common.by import By

    driver.get(f"http://{USER}:{PASSWORD}@127.0.0.1:{stack['port']}{path}")
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#updated") and
             driver.find_element(By.CSS_SELECTOR, "#updated").text, timeout=20, what="the page's first refresh")


def css(driver, selector: str) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def read(driver, selector: str, what: str = "textContent") -> list:
    """A property of every element matching `selector`, read in one script: the page redraws a section when
    its data changes, so element handles kept across calls may go stale."""
    return driver.execute_script("return [...document.querySelectorAll(arguments[0])].map(e => e[arguments[1]])",
                                 selector, what)


def attr(driver, selector: str, name: str) -> list:
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(e => e.getAttribute(arguments[1]))", selector, name)


def test_without_credentials_the_page_is_refused_and_with_them_it_loads(stack, project, browser):
    for path in ("/ui/", "/ui/projects/1", "/projects"):
        assert requests.get(stack["backend"] + path, timeout=5).status_code == 401
    assert stack["api"].get(stack["backend"] + "/ui/", timeout=5).status_code == 200
    browser_root = requests.get(stack["backend"] + "/", headers={"Accept": "text/html"}, allow_redirects=False,
                                timeout=5)
    assert browser_root.status_code == 303 and browser_root.headers["location"] == "/ui/"
    open_page(stack, browser, "/ui/")
    assert "Projects served" in browser.page_source and read(browser, "#error") == [""]
    rows = wait_for(lambda: read(browser, "#projects tr.project"), timeout=10, what="the project list")
    assert rows[0].startswith(f"project {project['id']}asvp-g0-r3")


def test_the_learning_curve_has_one_point_per_round_and_the_stopping_signal_its_evidence(stack, project, browser):
    pid = project["id"]
    state = state_of(stack, pid)
    rounds = state["rounds"]
    measured = [r["version"] for r in rounds if r["cv_accuracy"] is not None]
    assert len(measured) >= 3 and all(r["cv_accuracy"] is not None for r in rounds if r["labelled"] >= 4)
    compared = [r for r in rounds if r["stop"]["kappa"] is not None]
    assert len(compared) >= 2  # the rounds on 6 and 8 labels compare their stop-set predictions with the last
    for r in compared:
        previous = rounds[rounds.index(r) - 1]["version"]
        assert r["stop"]["compared_with"] == previous and r["stop"]["compared"] == r["stop"]["stop_set"] > 0
    assert [h["kappa"] for h in state["stopping"]["history"]] == [r["stop"]["kappa"] for r in rounds]

    open_page(stack, browser, f"/ui/projects/{pid}")
    wait_for(lambda: read(browser, "#curve circle.cv-point"), timeout=10, what="the curve")
    assert attr(browser, "#curve circle.cv-point", "data-id") == measured
    assert len(read(browser, "#stop circle.kappa-point")) == len(compared)
    assert read(browser, "#stop .verdict")[0] in {"keep labelling", "labelling can stop"}
    assert read(browser, "#stop .reason") == [state["stopping"]["reason"]]
    assert len(read(browser, "#alignment tr.decision")) == len(state["alignment"]["decisions"])
    skipped = wait_for(lambda: read(browser, "#next tr.skipped"), timeout=10, what="the skipped images")
    assert len(skipped) == 1 and f"task {project['broken']}" in skipped[0]
    browser.save_screenshot(str(DOCS / "status-page.png"))


def test_next_task_links_point_at_the_ranked_label_studio_tasks(stack, project, browser):
    pid = project["id"]
    record = state_of(stack, pid)["rounds"][-1]
    open_page(stack, browser, f"/ui/projects/{pid}")
    wait_for(lambda: read(browser, "#next a.task-link"), timeout=10, what="the next tasks")
    ids = [int(t) for t in attr(browser, "#next a.task-link", "data-task")]
    hrefs = attr(browser, "#next a.task-link", "href")
    assert hrefs == [f"{stack['ls_url']}/projects/{pid}/data?task={t}" for t in ids]
    assert ids[: len(record["top_tasks"])] == record["top_tasks"]  # the order the round pushed
    shown = dict(zip(ids, [float(x) for x in read(browser, "#next tr.next-task td:nth-child(3)")], strict=True))
    in_label_studio = {t["id"]: t for t in stack["ls"].tasks(pid)}
    for tid, score in shown.items():  # each link is an open task whose current prediction has the shown score
        task = in_label_studio[tid]
        assert not task["annotations"]
        current = [p for p in task["predictions"] if p["model_version"] == record["version"]]
        assert current and current[0]["score"] == pytest.approx(score, abs=1e-4)


def test_a_running_jobs_progress_bar_moves(stack, project, browser):
    import redis

    from asvp_backend.jobs.rq_queue import RqJobQueue

    pid = project["id"]
    open_page(stack, browser, f"/ui/projects/{pid}")
    job = RqJobQueue(redis.Redis.from_url(stack["redis_url"])).submit("ping", pid, reason="watch me", seconds=8).job_id
    bar = f'#jobs tr.job[data-id="{job}"] .bar > span'

    def width() -> float:
        return float(browser.execute_script(
            "const e = document.querySelector(arguments[0]); return e ? e.getBoundingClientRect().width : 0", bar))

    first = wait_for(lambda: width() or None, timeout=20, interval=0.2, what="the ping job's progress bar")
    row = read(browser, f'#jobs tr.job[data-id="{job}"]')[0]
    assert "ping" in row and "started" in row and "ping" in row.split("started")[1]  # the stage
    later = wait_for(lambda: width() > first + 1 and width(), timeout=10, interval=0.2, what="the bar to move")
    assert later > first


def test_a_failed_job_is_queued_again_by_its_retry_button(stack, browser):
    ls: LabelStudioAPI = stack["ls"]
    pid = connect(stack, "asvp doomed", [("img_0.png", png_bytes(0))])
    wait_for(lambda: stack["api"].get(f"{stack['backend']}/projects/{pid}", timeout=5).ok, timeout=30,
             what="the backend to know the project")
    ls.call("DELETE", f"/api/projects/{pid}")  # its jobs can no longer read it from Label Studio
    queued = stack["api"].post(f"{stack['backend']}/projects/{pid}/jobs", json={"kind": "sync"}, timeout=5)
    assert queued.status_code == 202, queued.text
    failed = wait_for(lambda: [j for j in jobs_of(stack, pid) if j["status"] == "failed"], timeout=60,
                      what="the sync of a deleted project to fail")[0]
    assert failed["error"]

    open_page(stack, browser, f"/ui/projects/{pid}")
    row = f'#jobs tr.job[data-id="{failed["id"]}"]'
    wait_for(lambda: read(browser, f"{row} button.retry"), timeout=10, what="the Retry button")
    assert failed["error"] in read(browser, row)[0]
    before = {j["id"] for j in jobs_of(stack, pid)}
    css(browser, f"{row} button.retry")[0].click()  # a real click: the section is redrawn only when jobs change
    notice = wait_for(lambda: "".join(read(browser, "#notice")).startswith("queued") and read(browser, "#notice")[0],
                      timeout=10, what="the page to say the job was queued")
    new = [j for j in jobs_of(stack, pid) if j["id"] not in before]
    assert len(new) == 1 and new[0]["kind"] == "sync" and new[0]["id"] in notice
    assert new[0]["reason"] == f"queued again from the status page (retry of {failed['id']})"


def test_label_studio_serves_the_backend_ranking_in_its_data_manager(stack, project, browser):
    """Screenshot of the "ASVP: label next" tab, logged in through Label Studio's own login page."""
    from selenium.webdriver.common.by import By

    pid = project["id"]
    record = state_of(stack, pid)["rounds"][-1]
    browser.get(f"{stack['ls_url']}/user/login/")
    browser.find_element(By.NAME, "email").send_keys("admin@example.com")
    browser.find_element(By.NAME, "password").send_keys("admin12345")
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit], form input[type=submit]").click()
    wait_for(lambda: "/user/login" not in browser.current_url, timeout=30, what="Label Studio's login")
    browser.get(f"{stack['ls_url']}/projects/{pid}/data?tab={record['view_id']}")
    wait_for(lambda: "ASVP: label next" in browser.page_source and str(record["top_tasks"][0]) in browser.page_source,
             timeout=60, interval=0.5, what="the Data Manager's ranking tab")
    time.sleep(2)  # let the table settle (images, column widths) before the screenshot
    browser.save_screenshot(str(DOCS / "data-manager-ranking.png"))
