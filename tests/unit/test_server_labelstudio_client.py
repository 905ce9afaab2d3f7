"""The Label Studio client's errors, against a tiny real HTTP server: what came back instead of JSON, and the
HTTP status as an attribute."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from asvp_backend.labelstudio.client import LabelStudioClient, LabelStudioError
from tests.helpers import free_port

TOKEN = "legacy-token-0123456789abcdef"
LOGIN_PAGE = (
    "<!DOCTYPE html><html><head><title>Sign in to the proxy</title></head><body>token "
    + TOKEN
    + " "
    + "x" * 500
    + "END-OF-PAGE</body></html>"
)


class FakeLabelStudio(BaseHTTPRequestHandler):
    """/api/projects/1/: an HTML page with 200 (a login proxy); /api/tasks: one full page, then 404."""

    def do_GET(self) -> None:  # noqa: N802  (http.server's name)
        if self.path.startswith("/api/projects/1/"):
            self._send(200, "text/html; charset=utf-8", LOGIN_PAGE.encode())
        elif self.path.startswith("/api/tasks") and "page=1&" in self.path:
            tasks = [{"id": i, "data": {}} for i in (1, 2)]
            self._send(200, "application/json", json.dumps({"tasks": tasks}).encode())
        else:
            self._send(404, "application/json", b'{"detail": "Invalid page."}')

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def label_studio_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeLabelStudio)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_reply_that_is_not_json_says_what_came_back(label_studio_url):
    client = LabelStudioClient(label_studio_url, TOKEN)
    with pytest.raises(LabelStudioError) as caught:
        client.get_project(1)
    message = str(caught.value)
    assert message.startswith("GET /api/projects/1/: HTTP 200 answered 'text/html; charset=utf-8', not JSON")
    assert "<!DOCTYPE html><html><head><title>Sign in to the proxy" in message
    assert "END-OF-PAGE" not in message  # only the first bytes
    assert TOKEN not in message and "token ***" in message
    assert caught.value.status == 200


def test_errors_carry_the_http_status(label_studio_url):
    client = LabelStudioClient(label_studio_url, TOKEN)
    with pytest.raises(LabelStudioError) as caught:
        client.get_project(2)
    assert caught.value.status == 404 and "HTTP 404" in str(caught.value)
    with pytest.raises(LabelStudioError) as unreachable:
        LabelStudioClient(f"http://127.0.0.1:{free_port()}", TOKEN, timeout=2).get_project(1)
    assert unreachable.value.status is None and "ConnectionError" in str(unreachable.value)


def test_iter_tasks_stops_at_the_404_past_the_last_page(label_studio_url):
    client = LabelStudioClient(label_studio_url, TOKEN)
    assert [t["id"] for t in client.iter_tasks(1, page_size=2)] == [1, 2]
