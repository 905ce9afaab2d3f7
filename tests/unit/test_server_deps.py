"""deps.py is the one place that answers "unknown project N": every route about one project says it alike."""

import pytest

from tests.unit.test_server import make_client, setup_project

ONE_PROJECT = [("GET", "/projects/{}"), ("GET", "/projects/{}/model"), ("GET", "/projects/{}/learning"),
               ("GET", "/projects/{}/next"), ("POST", "/projects/{}/align"), ("POST", "/projects/{}/jobs"),
               ("GET", "/versions?project={}")]


@pytest.fixture
def client(tmp_path):
    client, _ = make_client(tmp_path)
    assert setup_project(client).status_code == 200  # project 3 is served, 4 is not
    return client


@pytest.mark.parametrize(("method", "path"), ONE_PROJECT)
def test_an_unknown_project_is_the_same_404_on_every_route(client, method, path):
    for project in ("4", "4.1700000000"):
        response = client.request(method, path.format(project), json={"kind": "sync"})
        assert (response.status_code, response.json()) == (404, {"detail": "unknown project 4"}), path
    assert client.request(method, path.format("3"), json={"kind": "sync"}).status_code < 300


@pytest.mark.parametrize(("method", "path"), ONE_PROJECT)
def test_a_project_that_is_no_id_is_a_400_before_any_lookup(client, method, path):
    response = client.request(method, path.format("x"), json={"kind": "sync"})
    assert response.status_code == 400 and response.json()["detail"].startswith("project must be")


def test_predict_says_how_to_connect_an_unknown_project(client):
    response = client.post("/predict", json={"project": "4.1", "tasks": [{"id": 1, "data": {}}]})
    assert response.status_code == 404
    assert response.json() == {"detail": "unknown project 4: connect the backend to it first (/setup)"}
