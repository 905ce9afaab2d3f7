"""Shared test helpers: label configs, small PNGs, free ports, waiting."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


class TcpProxy:
    """A TCP forwarder in front of a server (Label Studio), for faults: `stop()` refuses and cuts every
    connection (the server is unreachable), `start()` listens again on the same port, and `hold` (a
    predicate on the bytes a client sends, e.g. an HTTP request line) keeps matching requests waiting
    until it no longer matches: a job stalled at a known point, to be killed there."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        import threading

        self.target = (target_host, target_port)
        self.port = free_port()
        self.hold: Callable[[bytes], bool] | None = None
        self.held = 0  # chunks waiting right now
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        import threading

        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            # close() alone does not wake a thread blocked in accept() on Linux: the socket keeps
            # listening until the next client arrives, so start() could not bind the port again.
            # shutdown() stops the listening at once and makes that accept() fail.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:  # stop() swaps the sockets under this lock: a pair accepted meanwhile is refused
                stopped = self._listener is not listener
                if not stopped:
                    self._sockets.update((client, upstream))
            if stopped:
                client.close()
                upstream.close()
                return
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_client and self.hold is not None and self.hold(data):
                    self.held += 1
                    try:
                        while (hold := self.hold) is not None and hold(data) and source.fileno() != -1:
                            time.sleep(0.05)
                    finally:
                        self.held -= 1
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            with self._lock:
                self._sockets.difference_update((source, sink))


def write_checkpoint(directory: Path, model: dict) -> None:
    """A real safetensors file (a tiny head) and a model.json as save_checkpoint writes them."""
    from safetensors.numpy import save_file

    from asvp_backend.alignment.integrity import CHECKPOINT_META, CHECKPOINT_WEIGHTS, weights_record

    directory.mkdir(parents=True)
    weights = directory / CHECKPOINT_WEIGHTS
    save_file({"head.weight": np.ones((2, 4), dtype=np.float32), "head.bias": np.zeros(2, dtype=np.float32)},
              str(weights))
    meta = {"format": "asvp-model", "format_version": 1, "backbone": "tiny", "classes": ["cat", "dog"],
            "preprocessing": {}, **model, "weights": weights_record(weights)}
    (directory / CHECKPOINT_META).write_text(json.dumps(meta))


def next_task(client: Any, project_id: int) -> dict | None:
    """The task Label Studio serves an annotator next (`GET /api/projects/N/next`), read through the backend's
    client: what the benchmarks check the ranking against."""
    return client.request("GET", f"/api/projects/{int(project_id)}/next")


def ordered_task_ids(client: Any, project_id: int, view_id: int) -> list[int]:
    """Task ids in the order of a Data Manager view (the backend's ranking view: lowest score first)."""
    body = client.request("GET", "/api/tasks", params={"project": int(project_id), "page_size": 1000,
                                                       "fields": "task_only", "view": view_id})
    return [int(t["id"]) for t in body.get("tasks", [])]
