"""Shared test helpers: label configs, small PNGs, free ports, waiting."""

from __future__ import annotations

import io
import socket
import time
from collections.abc import Callable

import numpy as np
import requests
from PIL import Image

IMAGE_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="label" toName="image" choice="single">
    <Choice value="cat"/>
    <Choice value="dog"/>
  </Choices>
</View>"""


def png_bytes(seed: int, size: int = 32) -> bytes:
    """A small, distinct RGB PNG (class-dependent colour plus noise)."""
    rng = np.random.default_rng(seed)
    base = np.array([200, 40, 40] if seed % 2 == 0 else [40, 40, 200], dtype=np.float32)
    pixels = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout: float = 30.0, interval: float = 0.2, what: str = ""):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")


class LabelStudioAPI:
    """A thin client for the tests' own calls to Label Studio (the backend has its own client)."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {token}"

    def call(self, method: str, path: str, **kwargs):
        response = self.session.request(method, self.url + path, timeout=120, **kwargs)
        assert response.status_code < 400, f"{method} {path}: {response.status_code} {response.text[:500]}"
        return response.json() if response.content else None

    def tasks(self, project: int) -> list[dict]:
        body = self.call("GET", "/api/tasks", params={"project": project, "page_size": 100, "fields": "all"})
        return body["tasks"]
