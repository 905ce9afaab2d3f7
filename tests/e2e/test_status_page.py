"""The status page in a real headless browser (Debian's chromium through selenium) against the real stack:
Label Studio 1.23.2, the backend with basic auth on, an rq worker. Labels a few tasks (the later ones as
Label Studio's editor does when the labeller starts from the pre-annotation), waits for rounds, then checks
what a person sees: the project's title and classes, the learning curve with its interval band, the
pre-annotations accepted as-is or corrected, the stopping signal, a live progress bar, a queued fine-tune
next to the deliverable, jobs folded by kind, a failed job retried from the page, a label-config change,
next-task links into Label Studio (also in the embedded default, where only /setup says where Label Studio
is); and saves the screenshots the README shows."""

from __future__ import annotations

import json
import time
from urllib.parse import urlsplit

import pytest
import requests

from tests.conftest import FAST_STACK, ROOT, stack_env, start_backend, start_worker
from tests.e2e.test_label_studio import annotate
from tests.helpers import IMAGE_CONFIG, LabelStudioAPI, free_port, png_bytes, wait_for

pytestmark = pytest.mark.e2e

N_TASKS = 12
USER, PASSWORD = "ops", "page-pass-123"
DOCS = ROOT / "docs"


TITLE = "asvp status page"


def label_of(index: int) -> str:
    return "dog" if index % 2 == 0 else "cat"  # png_bytes: even seeds are red, odd ones blue


def choice(label: str) -> list[dict]:
    return [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]


def annotate_from_prediction(ls: LabelStudioAPI, pid: int, task_id: int, label: str) -> dict:
    """What Label Studio's editor sends when the labeller starts from the pre-annotation it shows (the
    prediction of the project's model_version): the annotation names it as its parent_prediction."""
    version = ls.call("GET", f"/api/projects/{pid}")["model_version"]
    task = next(t for t in ls.tasks(pid) if t["id"] == task_id)
    prediction = next(p for p in task["predictions"] if p["model_version"] == version)
    ls.call("POST", f"/api/tasks/{task_id}/annotations",
            json={"result": choice(label), "parent_prediction": prediction["id"]})
    return prediction


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
    pid = connect(stack, TITLE, images)
    tasks = sorted(stack["ls"].tasks(pid), key=lambda t: t["id"])
    ids = [t["id"] for t in tasks]
    served = []  # (task index, the prediction its annotation started from)
    for upto in (4, 6, 8):
        for i in range(upto - 2 if upto > 4 else 0, upto):
            if upto > 4:  # a round has pre-annotated the rest: label as the editor does, from the suggestion
                served.append((i, annotate_from_prediction(stack["ls"], pid, ids[i], label_of(i))))
            else:
                annotate(stack["ls"], ids[i], label_of(i))
        complete_round(stack, pid, upto)
    return {"id": pid, "task_ids": ids, "broken": ids[-1], "served": served}


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
    assert rows[0].startswith(f"project {project['id']}{TITLE}asvp-g0-r3")


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

    assert all(r["cv_n"] == r["labelled"] and r["cv_interval"][0] <= r["cv_accuracy"] <= r["cv_interval"][1]
               for r in rounds if r["cv_accuracy"] is not None)

    open_page(stack, browser, f"/ui/projects/{pid}")
    wait_for(lambda: read(browser, "#curve circle.cv-point"), timeout=10, what="the curve")
    assert attr(browser, "#curve circle.cv-point", "data-id") == measured
    assert len(read(browser, "#curve polygon.cv-band")) == 1  # the 95% interval as a band
    assert len(read(browser, "#curve line.cv-whisker")) == len(measured)
    latest = [r for r in rounds if r["cv_accuracy"] is not None][-1]
    assert read(browser, "#summary .measured-on")[0] == (
        f" — cross-validated on the {latest['labelled']} labelled tasks, which active learning chose "
        "(not a random sample: a biased estimate)")
    assert len(read(browser, "#stop circle.kappa-point")) == len(compared)
    assert read(browser, "#stop .verdict")[0] in {"keep labelling", "labelling can stop"}
    assert read(browser, "#stop .reason") == [state["stopping"]["reason"]]
    assert len(read(browser, "#alignment tr.decision")) == len(state["alignment"]["decisions"])
    skipped = wait_for(lambda: read(browser, "#next tr.skipped"), timeout=10, what="the skipped images")
    assert len(skipped) == 1 and f"task {project['broken']}" in skipped[0]
    screenshot_page(stack, browser, pid)


def screenshot_page(stack, browser, pid: int) -> None:
    """The README's picture of the whole page. On a loaded machine /setup's 1-second connection check can time
    out and stay in `problems` until Label Studio calls /setup again; its model list makes it call."""
    for _ in range(3):
        if not state_of(stack, pid)["problems"]:
            break
        stack["ls"].call("GET", "/api/ml", params={"project": pid})
        time.sleep(3)
    open_page(stack, browser, f"/ui/projects/{pid}")
    wait_for(lambda: read(browser, "#next tr.skipped"), timeout=10, what="the page's last section")
    size = browser.get_window_size()
    height = browser.execute_script("return document.documentElement.scrollHeight")
    chrome = size["height"] - browser.execute_script("return window.innerHeight")  # the window's own bars
    browser.set_window_size(size["width"], height + chrome + 16)  # the whole page, down to the skipped images
    try:
        browser.save_screenshot(str(DOCS / "status-page.png"))
    finally:
        browser.set_window_size(size["width"], size["height"])


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


def get(stack, path: str) -> dict:
    response = stack["api"].get(stack["backend"] + path, timeout=5)
    assert response.ok, response.text
    return response.json()


def test_the_page_names_the_project_and_its_classes(stack, project, browser):
    pid = project["id"]
    learning = get(stack, f"/projects/{pid}/learning")
    assert learning["title"] == TITLE and learning["classes"] == ["cat", "dog"]
    assert state_of(stack, pid)["title"] == TITLE
    assert [p["title"] for p in get(stack, "/projects")["projects"] if p["project"] == pid] == [TITLE]
    open_page(stack, browser, f"/ui/projects/{pid}")
    wait_for(lambda: read(browser, "#summary h2"), timeout=10, what="the summary")
    assert read(browser, "#summary h2") == [f"Project {pid}: {TITLE}"]
    assert read(browser, "#title") == [f"asvp-backend · {TITLE} (project {pid})"]
    assert read(browser, "#summary .classes") == ["cat, dog"]


def test_pre_annotations_accepted_as_is_or_corrected_are_counted_per_round(stack, project, browser):
    pid = project["id"]
    expected: dict[str, dict[str, int]] = {}
    for i, prediction in project["served"]:
        suggested = prediction["result"][0]["value"]["choices"][0]
        counts = expected.setdefault(prediction["model_version"], {"accepted": 0, "corrected": 0})
        counts["accepted" if suggested == label_of(i) else "corrected"] += 1
    # Label Studio 1.23.2 returns the parent_prediction the sync reads, and clears it once that prediction's
    # version is deleted (each round deletes the versions before the previous one): which is why the sync
    # counts an annotation when it first sees it, not by re-reading every annotation
    parents = {a["parent_prediction"] for t in stack["ls"].tasks(pid) for a in t["annotations"]}
    assert {p["id"] for _, p in project["served"][-2:]} <= parents
    assert {p["id"] for _, p in project["served"][:2]}.isdisjoint(parents)
    state = state_of(stack, pid)
    assert state["acceptance"]["by_version"] == expected
    accepted = sum(c["accepted"] for c in expected.values())
    overall = get(stack, f"/projects/{pid}/learning")["pre_annotations"]["overall"]
    assert (overall["accepted"], overall["reviewed"]) == (accepted, len(project["served"]))

    open_page(stack, browser, f"/ui/projects/{pid}")
    rows = wait_for(lambda: attr(browser, "#acceptance tr.acceptance-round", "data-version"), timeout=10,
                    what="the acceptance per round")
    assert sorted(rows) == sorted(expected)
    assert f"({accepted} of {len(project['served'])})" in read(browser, "#summary .acceptance-rate")[0]


def test_jobs_are_folded_one_row_per_kind_and_unfold_on_demand(stack, project, browser):
    pid = project["id"]
    jobs = get(stack, f"/jobs?project={pid}&limit=100")["jobs"]
    syncs = [j for j in jobs if j["kind"] == "sync"]
    assert len(syncs) >= 2 and not [j for j in jobs if j["status"] == "failed"]
    open_page(stack, browser, f"/ui/projects/{pid}")
    heads = wait_for(lambda: attr(browser, "#jobs tr.job.head", "data-kind"), timeout=10, what="the jobs")
    assert sorted(heads) == sorted({j["kind"] for j in jobs}) and not read(browser, "#jobs tr.job.older")
    assert f"sync ×{len(syncs)}" in read(browser, '#jobs tr.job.head[data-kind="sync"]')[0]
    css(browser, '#jobs button.expand[data-kind="sync"]')[0].click()
    older = wait_for(lambda: attr(browser, '#jobs tr.job.older[data-kind="sync"]', "data-id"), timeout=10,
                     what="the older syncs")
    assert older == [j["id"] for j in syncs[1:]]  # newest first


def test_a_queued_fine_tune_shows_next_to_the_deliverable_model(stack, project, browser):
    import redis
    from rq.job import Job

    from asvp_backend.jobs.rq_queue import RqJobQueue

    pid = project["id"]
    connection = redis.Redis.from_url(stack["redis_url"])
    queue = RqJobQueue(connection)
    hold = queue.submit("ping", pid, reason="keeps the one worker busy", seconds=25).job_id
    wait_for(lambda: any(j["id"] == hold and j["status"] == "started" for j in jobs_of(stack, pid)), timeout=20,
             interval=0.2, what="the worker to start the ping")
    waiting = queue.submit("finetune", pid, reason="waits behind the ping; cancelled").job_id
    try:
        training = get(stack, f"/projects/{pid}/learning")["deliverable"]["training"]
        assert (training["job"], training["status"], training["text"]) == (waiting, "queued", "fine-tune queued")
        open_page(stack, browser, f"/ui/projects/{pid}")
        line = wait_for(lambda: "".join(read(browser, "#summary .deliverable")), timeout=10, what="the deliverable")
        assert line.startswith("Deliverable model: none yet — fine-tune queued")
    finally:
        Job.fetch(waiting, connection=connection).cancel()


def test_a_label_config_change_is_recorded_and_shown(stack, browser):
    ls: LabelStudioAPI = stack["ls"]
    pid = connect(stack, "asvp config change", [("img_0.png", png_bytes(0)), ("img_1.png", png_bytes(1))])
    wait_for(lambda: stack["api"].get(f"{stack['backend']}/projects/{pid}", timeout=5).ok and
             state_of(stack, pid)["last_sync"], timeout=60, what="the first sync")
    bird = IMAGE_CONFIG.replace('<Choice value="dog"/>', '<Choice value="dog"/>\n    <Choice value="bird"/>')
    ls.call("PATCH", f"/api/projects/{pid}", json={"label_config": bird})
    stack["api"].post(f"{stack['backend']}/projects/{pid}/jobs", json={"kind": "sync"}, timeout=5)
    changes = wait_for(lambda: state_of(stack, pid)["config_changes"], timeout=60, what="the change recorded")
    assert [(c["added"], c["removed"], c["classes"]) for c in changes] == [(["bird"], [], ["cat", "dog", "bird"])]
    open_page(stack, browser, f"/ui/projects/{pid}")
    rows = wait_for(lambda: read(browser, "#config tr.config-change"), timeout=10, what="the change on the page")
    assert len(rows) == 1 and "bird" in read(browser, "#config tr.config-change td.added")[0]
    assert read(browser, "#summary .classes") == ["cat, dog, bird"]


def test_in_the_embedded_default_task_links_open_label_studio_where_setup_said(label_studio, browser, tmp_path):
    """No Redis, no LABEL_STUDIO_URL or LABEL_STUDIO_API_KEY (`make run`): the links go to the hostname
    Label Studio sent to /setup."""
    port = free_port()
    backend = start_backend(tmp_path, port, MODEL_DIR=str(tmp_path / "models"), **FAST_STACK)
    url = f"http://127.0.0.1:{port}"
    try:
        ls = LabelStudioAPI(label_studio["url"], label_studio["token"])
        pid = ls.call("POST", "/api/projects", json={"title": "embedded links", "label_config": IMAGE_CONFIG})["id"]
        files = [(f"file{i}", (f"img_{i}.png", png_bytes(i), "image/png")) for i in range(3)]
        ls.call("POST", f"/api/projects/{pid}/import", files=files)
        ls.call("POST", "/api/ml", json={"url": url, "project": pid, "title": "asvp"})
        record = tmp_path / "models" / "projects" / str(pid) / "label-studio.json"
        hostname = json.loads(record.read_text())["hostname"]
        assert urlsplit(hostname).port == urlsplit(label_studio["url"]).port  # Label Studio's own idea of itself

        def ranked():
            body = requests.get(f"{url}/projects/{pid}/next", timeout=5).json()
            return body["tasks"] or None

        tasks = wait_for(ranked, timeout=180, interval=1, what="the first (cold-start) ranking")
        assert [t["url"] for t in tasks] == [f"{hostname}/projects/{pid}/data?task={t['id']}" for t in tasks]
        opened = requests.get(tasks[0]["url"], timeout=10)  # no session: Label Studio asks to log in, then goes there
        assert opened.ok and urlsplit(opened.url).port == urlsplit(label_studio["url"]).port
        assert f"/projects/{pid}/data" in requests.utils.unquote(opened.url)

        browser.get(f"{url}/ui/projects/{pid}")
        links = wait_for(lambda: attr(browser, "#next a.task-link", "href"), timeout=20, what="the links on the page")
        assert links == [t["url"] for t in tasks]
    finally:
        backend.stop()


def test_audit_labels_give_the_unbiased_line_on_the_curve(stack, project, browser):
    """Label the tasks the last round placed as audit picks (as an annotator following the queue would), and
    the page shows the proxy's accuracy on the audit sample: a second line with its interval, and the figure
    in the summary with the number of audit labels."""
    pid = project["id"]
    state = state_of(stack, pid)
    done = {t["id"] for t in stack["ls"].tasks(pid) if t["annotations"]}
    picks = [t for t in state["audit"]["tasks"] if t != project["broken"] and t not in done]
    already = [t for t in state["audit"]["tasks"] if t in done]  # picks labelled out of the queue's order count too
    assert picks or already  # one label in five is owed to the audit (AUDIT_EARLY_FRACTION): 8 labels owe one
    index = {tid: i for i, tid in enumerate(project["task_ids"])}
    for tid in picks:
        annotate(stack["ls"], tid, label_of(index[tid]))
    if picks:
        # RETRAIN_EVERY=2: one audit label alone is not enough for a round, so the annotator goes on with the
        # queue (tasks outside the audit sample, which leave its size as it is) until a round is due
        labelled, last_round = len(done) + len(picks), state["labels_at_last_round"]
        rest = [t for t in project["task_ids"]
                if t not in done and t not in state["audit"]["tasks"] and t != project["broken"]]
        while labelled - last_round < 2 and rest:
            tid = rest.pop(0)
            annotate(stack["ls"], tid, label_of(index[tid]))
            labelled += 1
        complete_round(stack, pid, labelled)
    audit = wait_for(lambda: state_of(stack, pid)["alignment_summary"]["audit"], timeout=30, what="the estimate")
    n = len(picks) + len(already)
    assert audit["n"] == n and audit["interval"][0] <= audit["accuracy"] <= audit["interval"][1]
    open_page(stack, browser, f"/ui/projects/{pid}")
    wait_for(lambda: read(browser, "#curve circle.audit-point"), timeout=10, what="the audit line")
    text = read(browser, "#summary .audit-accuracy")[0]
    assert f"{audit['accuracy']:.3f}" in text and f"{n} audit label" in text
