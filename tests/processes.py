"""Real processes for tests and benchmarks: a child-process wrapper and a headless Label Studio 1.23.2."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from tests.helpers import free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
LS_VERSION = "1.23.2"


class Process:
    """A child process with its output in a log file, stopped by PID at teardown."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path, cwd: Path = ROOT):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(
            args, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


@dataclass
class LabelStudioServer:
    process: Process
    info: dict[str, str]  # url, token, docroot, log


def start_label_studio(tmp: Path, venv: Path | None = None) -> LabelStudioServer:
    """Start Label Studio headless with the settings a local ML backend needs (reference doc, section 5)."""
    venv = Path(venv or os.environ.get("LS_VENV", Path.home() / f".cache/asvp-backend/label-studio-{LS_VERSION}"))
    binary = venv / "bin" / "label-studio"
    if not binary.exists():
        raise RuntimeError(f"Label Studio {LS_VERSION} is not installed at {venv}; run `make ls-venv`")
    docroot = tmp / "docroot"
    (docroot / "images").mkdir(parents=True)
    port = free_port()
    token = secrets.token_hex(20)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO", "DJANGO"))}
    env.update(
        {
            "LABEL_STUDIO_BASE_DATA_DIR": str(tmp / "data"),
            "LABEL_STUDIO_USERNAME": "admin@example.com",
            "LABEL_STUDIO_PASSWORD": "admin12345",
            "LABEL_STUDIO_USER_TOKEN": token,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
            "LOCAL_FILES_SERVING_ENABLED": "true",
            "LOCAL_FILES_DOCUMENT_ROOT": str(docroot),
            "ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false",
            "COLLECT_ANALYTICS": "false",
            "LATEST_VERSION_CHECK": "false",
        }
    )
    args = [str(binary), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)]
    process = Process("label-studio", args, env, tmp, cwd=tmp)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if not process.alive():
            raise AssertionError("Label Studio exited:\n" + process.log()[-5000:])
        try:
            return requests.get(f"{url}/health", timeout=2).ok
        except requests.RequestException:
            return False

    started = time.time()
    wait_for(up, timeout=300, interval=1, what="Label Studio's /health")
    print(f"Label Studio {LS_VERSION} up in {time.time() - started:.0f}s at {url}")
    info = {"url": url, "token": token, "docroot": str(docroot), "log": str(process.log_path)}
    return LabelStudioServer(process, info)
