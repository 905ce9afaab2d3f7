"""The status page's routes against the app (embedded queue, never started): auth, the page's security headers,
the queue order it shows and its task links, the job it queues, the "is it learning?" summary, and the CLI's
status table folding jobs the same way. The page itself runs in a browser in tests/e2e."""

import base64
import re
import time

from asvp_backend.state import FileStateStore, SyncedTask, TaskSnapshot
from asvp_backend.status_table import fold_jobs, format_status
from tests.helpers import IMAGE_CONFIG
from tests.unit.test_server import make_client, setup_project, write_ranking

AUTH = {"Authorization": "Basic " + base64.b64encode(b"ls:s3cret-pass").decode()}


def test_the_page_is_behind_basic_auth_and_allows_only_its_own_script(tmp_path):
    client, _ = make_client(tmp_path, BASIC_AUTH_USER="ls", BASIC_AUTH_PASS="s3cret-pass")
    for path in ("/ui/", "/ui/projects/3", "/projects", "/projects/3/next"):
        assert client.get(path).status_code == 401, path
    page = client.get("/ui/projects/3", headers=AUTH)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "unsafe-inline" not in policy
    assert len(re.findall(r"'sha256-[A-Za-z0-9+/=]+'", policy)) == 2  # the one script and the one style
    assert not re.search(r"""(src|href)=["']?(https?:)?//|@import|url\(""", page.text)  # no asset from elsewhere
    assert client.get("/ui", headers=AUTH, follow_redirects=False).headers["location"] == "/ui/"


def test_a_browser_asking_for_the_root_is_sent_to_the_page_and_scripts_get_json(tmp_path):
    client, _ = make_client(tmp_path)
    browser = client.get("/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}, follow_redirects=False)
    assert browser.status_code == 303 and browser.headers["location"] == "/ui/"
    assert client.get("/").json()["status"] == "UP"
    assert client.get("/health", headers={"Accept": "text/html"}).json()["status"] == "UP"


def test_next_tasks_follow_the_ranking_without_tasks_labelled_since(tmp_path):
    client, _ = make_client(tmp_path, LABEL_STUDIO_URL="http://ls.example:8080/", LABEL_STUDIO_API_KEY="t")
    setup_project(client)
    write_ranking(tmp_path, 3, [5, 2, 9, 7], [0.4, 0.1, 0.3, 0.2], ["dog", "cat", "<b>x</b>", "cat"])
    TaskSnapshot(tmp_path, 3).save({5: SyncedTask("a", None), 2: SyncedTask("b", None),
                                    9: SyncedTask("c", None), 7: SyncedTask("d", "cat")})
    body = client.get("/projects/3/next", params={"limit": 2}).json()
    assert body["model_version"] == "asvp-g0-r1" and body["skipped"] == [] and body["problem"] is None
    assert [(t["id"], t["score"], t["label"]) for t in body["tasks"]] == [(2, 0.1, "cat"), (9, 0.3, "<b>x</b>")]
    assert body["tasks"][0]["url"] == "http://ls.example:8080/projects/3/data?task=2"
    assert client.get("/projects/4/next").status_code == 404


def test_the_project_list_and_the_stopping_signal(tmp_path):
    client, _ = make_client(tmp_path)
    setup_project(client)
    listed = client.get("/projects").json()["projects"]
    nothing_reviewed = {"accepted": 0, "corrected": 0, "reviewed": 0, "rate": None, "interval": None}
    assert listed == [{"project": 3, "title": None, "model_version": "asvp-g0-r0", "labels": ["cat", "dog"],
                       "rounds": 0, "last_sync": None, "cv_accuracy": None, "cv_n": None, "cv_interval": None,
                       "pre_annotations_accepted": nothing_reviewed, "can_stop": False}]
    stopping = client.get("/projects/3").json()["stopping"]
    assert stopping["can_stop"] is False and stopping["rule"]["STOP_KAPPA"] == 0.99 and stopping["history"] == []


def test_retry_queues_a_job_of_the_same_kind_and_refuses_anything_else(tmp_path):
    client, runtime = make_client(tmp_path)
    setup_project(client)
    assert client.post("/projects/3/jobs", content='{"kind": "sync"}',
                       headers={"content-type": "text/plain"}).status_code == 415  # what a cross-site form sends
    assert client.post("/projects/3/jobs", json={"kind": "rm -rf"}).status_code == 400
    assert client.post("/projects/4/jobs", json={"kind": "sync"}).status_code == 404
    reply = client.post("/projects/3/jobs", json={"kind": "sync", "retry_of": "sync-p3-abc"})
    assert reply.status_code == 202
    queued = runtime.queue.jobs(3)
    assert [(j.id, j.kind, j.status.value) for j in queued] == [(reply.json()["job"], "sync", "queued")]
    assert queued[0].reason == "queued again from the status page (retry of sync-p3-abc)"


def test_without_label_studio_url_task_links_go_where_setup_said_label_studio_lives(tmp_path):
    client, _ = make_client(tmp_path)  # the embedded default: no LABEL_STUDIO_URL
    setup_project(client)  # /setup's hostname: http://127.0.0.1:9
    write_ranking(tmp_path, 3, [5, 2], [0.4, 0.1], ["dog", "cat"])
    TaskSnapshot(tmp_path, 3).save({5: SyncedTask("a", None), 2: SyncedTask("b", None)})
    tasks = client.get("/projects/3/next").json()["tasks"]
    assert [t["url"] for t in tasks] == ["http://127.0.0.1:9/projects/3/data?task=2",
                                         "http://127.0.0.1:9/projects/3/data?task=5"]
    client.post("/setup", json={"project": 3, "schema": IMAGE_CONFIG, "hostname": "javascript:alert(1)//",
                                "access_token": "tok"})
    assert client.get("/projects/3/next").json()["tasks"][0]["url"] is None  # never a link that is not http(s)


def test_the_learning_summary_answers_is_it_learning(tmp_path):
    client, runtime = make_client(tmp_path)
    assert client.get("/projects/3/learning").status_code == 404
    setup_project(client)

    def learned(state):
        state.title = "Pets"
        state.advance_round()
        state.record_round({"version": str(state.version), "generation": 0, "labelled": 30, "cv_accuracy": 1.0})
        state.advance_round()  # a round of this version records n and its interval itself
        state.record_round({"version": str(state.version), "generation": 0, "labelled": 40, "cv_accuracy": 0.85,
                            "cv_n": 40, "cv_interval": [0.7093, 0.9294]})
        state.acceptance.record([(1, "asvp-g0-r1", True), (2, "asvp-g0-r2", True), (3, "asvp-g0-r2", False)])
        return state

    FileStateStore(tmp_path).update(3, learned)
    runtime.queue.submit("finetune", 3, reason="Start Training")  # never started here: it waits
    body = client.get("/projects/3/learning").json()
    assert body["title"] == "Pets" and body["classes"] == ["cat", "dog"] and body["model_version"] == "asvp-g0-r2"
    curve = body["accuracy"]["curve"]
    assert [(p["labelled"], p["cv_n"], p["cv_interval"]) for p in curve] == [(30, 30, [0.8865, 1.0]),
                                                                              (40, 40, [0.7093, 0.9294])]
    assert body["accuracy"]["latest"] == curve[-1]
    assert body["accuracy"]["measured_on"] == \
        "cross-validated on the 40 labelled tasks, which active learning chose (not a random sample: a biased estimate)"
    pre = body["pre_annotations"]
    assert (pre["overall"]["accepted"], pre["overall"]["corrected"], pre["overall"]["rate"]) == (2, 1, 0.6667)
    assert [(r["version"], r["rate"]) for r in pre["rounds"]] == [("asvp-g0-r1", 1.0), ("asvp-g0-r2", 0.5)]
    assert "parent_prediction" in pre["definition"]
    assert body["deliverable"]["model"] is None
    assert body["deliverable"]["training"]["text"] == "fine-tune queued"
    assert body["config_changes"] == []
    listed = client.get("/projects").json()["projects"][0]
    assert listed["title"] == "Pets" and listed["cv_interval"] == [0.7093, 0.9294]
    assert listed["pre_annotations_accepted"]["reviewed"] == 3
    # GET /projects/N carries the same stored fields
    state = client.get("/projects/3").json()
    assert state["title"] == "Pets" and state["acceptance"]["accepted"] == 2 and state["config_changes"] == []


def test_jobs_fold_one_row_per_kind_and_failures_stay_visible():
    now = time.time()
    jobs = [{"id": f"sync-{i}", "kind": "sync", "status": "finished", "enqueued_at": now - 100 + i} for i in range(40)]
    jobs += [{"id": "sync-bad", "kind": "sync", "status": "failed", "enqueued_at": now - 200, "error": "HTTP 404"},
             {"id": "round-1", "kind": "round", "status": "finished", "enqueued_at": now - 80},
             {"id": "finetune-1", "kind": "finetune", "status": "started", "enqueued_at": now - 300,
              "progress": {"done": 22, "total": 250, "stage": "ft"}}]
    folded = [(job["id"], count, head) for job, count, head in fold_jobs(jobs)]
    assert folded == [("sync-39", 41, True), ("sync-bad", 1, False), ("round-1", 1, True), ("finetune-1", 1, True)]
    report = {"projects": [{
        "project": 3, "model_version": "asvp-g0-r2", "rounds": 2, "labels": ["cat", "dog"], "last_sync": None,
        "learning": {"title": "Pets", "accuracy": {"latest": {"cv_accuracy": 0.85, "cv_interval": [0.7093, 0.9294]},
                                                   "measured_on": "cross-validated on the 40 labelled tasks, which "
                                                                  "active learning chose (not a random sample: a "
                                                                  "biased estimate)"},
                     "pre_annotations": {"overall": {"accepted": 2, "corrected": 1, "reviewed": 3, "rate": 0.6667}},
                     "config_changes": [{"at": now, "added": ["bird"], "removed": []}],
                     "audit": {"latest": {"accuracy": 0.8, "interval": [0.61, 0.91], "n": 20},
                               "measured_on": "20 audit labels: ... (an unbiased estimate)"},
                     "refreshes": [{"decision": "rejected", "generation": 1,
                                    "reason": "the refreshed features are not better: 0.700 vs 0.800 ..."}],
                     "deliverable": {"model": None, "training": {"kind": "finetune", "text": "fine-tuning 22/250"}}},
    }], "jobs": jobs}
    text = format_status(report)
    assert "audit accuracy   0.800 (95% interval 0.61-0.91), 20 audit labels" in text
    assert "last refresh     generation 1 rejected: the refreshed features are not better" in text
    lines = text.splitlines()
    assert lines[0] == "project 3: Pets"
    assert "0.850 (95% interval 0.71-0.93), cross-validated on the 40 labelled tasks" in text
    assert "67% (2 of 3; 1 corrected)" in text and "added bird, removed -" in text
    assert "none yet; fine-tuning 22/250 (finetune job)" in text
    job_rows = [line.split() for line in lines if line.strip().startswith(("sync", "round", "finetune", "(older)"))]
    assert [row[:3] for row in job_rows] == [["sync", "x41", "sync-39"], ["(older)", "sync-bad", "failed"],
                                             ["round", "x1", "round-1"], ["finetune", "x1", "finetune-1"]]
