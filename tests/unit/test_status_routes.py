"""The status page's routes against the app (embedded queue, never started): auth, the page's security headers,
the queue order it shows and the job it queues. The page itself runs in a browser in tests/e2e."""

import base64
import re

from asvp_backend.state import SyncedTask, TaskSnapshot
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
    assert listed == [{"project": 3, "model_version": "asvp-g0-r0", "labels": ["cat", "dog"], "rounds": 0,
                       "last_sync": None, "cv_accuracy": None, "can_stop": False}]
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
