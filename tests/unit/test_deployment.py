"""What the Docker deployment promises, checked without a Docker engine: the compose files validate (Debian's
docker-compose, installed by scripts/ensure-test-tools.sh), every setting is documented where a user looks,
the images run the commands the README shows, the API's requirements serve without torch, and WORKERS."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from asvp_backend.cli import build_parser, main
from asvp_backend.config import env_names
from tests.helpers import IMAGE_CONFIG

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.cpu.yml", "docker-compose.workers.yml"]
FIXED_IN_IMAGES = {"HOST", "PORT"}  # the images bind 0.0.0.0:9090; the compose files publish that port
STACK_SECRETS = {"LABEL_STUDIO_PASSWORD": "ls-pass-1", "REDIS_PASSWORD": "redispass1"}
WORKER_HOST = {"REDIS_URL": "redis://:redispass1@main.example:6379/0", "LABEL_STUDIO_URL": "http://main.example:8080"}


def compose_config(name: str, **env: str) -> subprocess.CompletedProcess:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is missing: run scripts/ensure-test-tools.sh (make test does)"
    environ = {k: v for k, v in os.environ.items() if k not in {*STACK_SECRETS, *WORKER_HOST}}
    environ.update(env)
    return subprocess.run([binary, "--env-file", str(DOCKER / ".env.example"), "-f", str(DOCKER / name), "config"],
                          env=environ, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def configs() -> dict[str, dict]:
    """Each compose file as docker-compose resolves it, with docker/.env.example and the required secrets."""
    out = {}
    for name in COMPOSE_FILES:
        result = compose_config(name, **STACK_SECRETS, **WORKER_HOST)
        assert result.returncode == 0, f"{name}: {result.stderr}"
        out[name] = yaml.safe_load(result.stdout)
    return out


@pytest.mark.parametrize(("name", "required"), [("docker-compose.yml", "PASSWORD"),
                                                ("docker-compose.cpu.yml", "PASSWORD"),
                                                ("docker-compose.workers.yml", "REDIS_URL")])
def test_compose_refuses_to_start_without_the_values_it_cannot_guess(name, required):
    result = compose_config(name)
    assert result.returncode != 0 and required in result.stderr, result.stderr


def test_the_stack_has_label_studio_redis_api_workers_and_a_shared_model_dir(configs):
    services = configs["docker-compose.yml"]["services"]
    assert set(services) == {"label-studio", "redis", "api", "worker-cpu", "worker-gpu", "rq-dashboard"}
    ls = services["label-studio"]
    assert ls["image"] == "heartexlabs/label-studio:1.23.2"
    assert ls["environment"]["ML_BLOCK_LOCAL_IP"] == "false" and ls["environment"]["SSRF_PROTECTION_ENABLED"] == "false"
    assert ls["environment"]["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    assert any(v.endswith(":/label-studio/data") or v.endswith(":/label-studio/data:rw") for v in ls["volumes"])
    redis_command = services["redis"]["command"]
    assert redis_command[redis_command.index("--appendonly") + 1] == "yes"
    assert any(str(v).startswith("redis-data:/data") for v in services["redis"]["volumes"])
    assert services["api"]["ports"][0]["target"] == 9090
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert services["worker-gpu"]["environment"]["DEVICE"] == "cuda"
    assert services["worker-cpu"]["environment"]["DEVICE"] == "cpu"


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_every_backend_service_gets_every_setting_and_the_shared_volume(configs, name):
    services = configs[name]["services"]
    backend = [s for s in services.values() if s.get("command", [""])[0] == "asvp-backend"]
    assert backend
    for service in backend:
        env = service["environment"]
        missing = [n for n in env_names() if n not in env and n not in FIXED_IN_IMAGES]
        assert not missing, f"{name}: {service['image']} lacks {missing}"
        assert env["MODEL_DIR"] == "/data/models" and env["REDIS_URL"].startswith("redis://")
        assert "models:/data/models:rw" in service["volumes"]
    assert configs[name]["volumes"]["models"]["name"] == "asvp-models"  # the same volume on every machine


def test_the_cpu_variant_has_no_gpu_and_takes_both_queues(configs):
    services = configs["docker-compose.cpu.yml"]["services"]
    assert "worker-gpu" not in services and "deploy" not in services["worker-cpu"]
    assert services["worker-cpu"]["command"][-1] == "cpu,gpu"


# ---------------------------------------------------------------------------------------- documentation
def readme_configuration_names() -> set[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Configuration"):]
    section = section[: section.index("\n## ", 1)]
    names: set[str] = set()
    for row in section.splitlines():
        if row.startswith("| `"):
            names.update(re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split("|")[1]))
    return names


@pytest.mark.parametrize("document", [".env.example", "docker/.env.example", "README.md"])
def test_every_setting_is_documented(document):
    if document == "README.md":
        documented = readme_configuration_names()
        missing = [name for name in env_names() if name not in documented]
    else:
        text = (ROOT / document).read_text()
        missing = [name for name in env_names() if not re.search(rf"^#? ?.*\b{name}\b", text, re.MULTILINE)]
    assert not missing, f"{document} does not document {missing}"


def dockerfile_stages() -> dict[str, list[str]]:
    """Each stage's instructions, by stage name."""
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line)
        if match:
            current = stages.setdefault(match.group(1), [])
        elif line.strip() and not line.startswith("#"):
            current.append(line.strip())
    return stages


def image_commands() -> list[list[str]]:
    stages = dockerfile_stages()
    commands = [json.loads(line[len("CMD"):]) for lines in stages.values() for line in lines if line.startswith("CMD")]
    for name in COMPOSE_FILES:
        raw = yaml.safe_load((DOCKER / name).read_text())
        commands += [s["command"] for s in raw["services"].values() if "command" in s]
    return [c for c in commands if c[0] == "asvp-backend"]


def test_the_images_run_the_commands_the_readme_shows_and_the_cli_knows():
    readme = (ROOT / "README.md").read_text()
    commands = image_commands()
    assert {c[1] for c in commands} == {"serve", "worker"}
    for command in commands:
        build_parser().parse_args(command[1:])  # exits (SystemExit) on an unknown option
        assert " ".join(command) in readme, f"the README never shows {' '.join(command)!r}"


def test_the_images_are_light_non_root_and_checked():
    stages = dockerfile_stages()
    assert {"api", "worker", "worker-cpu", "rq-dashboard"} <= set(stages)
    for name in ("api", "worker", "worker-cpu", "rq-dashboard"):
        users = [line for line in stages[name] if line.startswith("USER")]
        assert users and users[-1] == "USER asvp", name
    assert any(line.startswith("HEALTHCHECK") and "/health" in line for line in stages["api"])
    assert not any("requirements.txt" in line for line in stages["api"])  # no torch in the API image
    base = " ".join(stages["base"])
    assert "PYTHONUNBUFFERED=1" in base and "MODEL_DIR=/data/models" in base and "PORT=9090" in base
    assert "EXPOSE 9090" in stages["api"]
    for name in COMPOSE_FILES:
        raw = yaml.safe_load((DOCKER / name).read_text())
        targets = {s["build"]["target"] for s in raw["services"].values() if "build" in s}
        assert targets <= set(stages), f"{name} builds unknown targets {targets - set(stages)}"


def test_the_api_serves_with_its_own_requirements_and_never_imports_torch(tmp_path):
    """What the `api` image holds (requirements-api.txt) is enough to answer Label Studio, torch never loads.
    (Embedded here, with no Label Studio to reach, so that no job starts: in the image, jobs run on workers.)"""
    script = f"""
import json, sys
from importlib.metadata import packages_distributions
from fastapi.testclient import TestClient
from asvp_backend.server.factory import create_app_from_env
import asvp_backend.cli
asvp_backend.cli.build_parser()
with TestClient(create_app_from_env()) as client:
    assert client.get("/health").json()["status"] == "UP"
    setup = client.post("/setup", json={{"project": "1.1", "schema": {json.dumps(IMAGE_CONFIG)}}})
    assert setup.status_code == 200, setup.text
    predict = client.post("/predict", json={{"project": "1.1", "tasks": [{{"id": 1, "data": {{"image": "x"}}}}]}})
    assert predict.status_code == 200, predict.text
top = {{name.split(".")[0] for name in sys.modules}}
dists = packages_distributions()
print(json.dumps(sorted({{d for name in top for d in dists.get(name, [])}})))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO", "REDIS_URL"))}
    env.update({"PYTHONPATH": str(ROOT), "MODEL_DIR": str(tmp_path)})
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    imported = {canonical(d) for d in json.loads(out.stdout.splitlines()[-1])}
    assert "torch" not in imported and "torchvision" not in imported and "timm" not in imported
    allowed = requirement_closure(ROOT / "requirements-api.txt") | HARNESS | IMPORTED_WHEN_PRESENT
    assert imported <= allowed, f"the API imports what requirements-api.txt does not bring: {imported - allowed}"


HARNESS = {"asvp-backend", "pytest", "httpx", "httpx2"}  # this test's own: the package, pytest, TestClient
IMPORTED_WHEN_PRESENT = {"setuptools", "pysocks", "sniffio"}  # optional imports (a .pth hook, urllib3, anyio)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_closure(path: Path) -> set[str]:
    """The distributions a requirements file installs: its lines and, recursively, their dependencies."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    todo = [Requirement(line).name for line in path.read_text().splitlines()
            if line.strip() and not line.startswith(("#", "-"))]
    seen: set[str] = set()
    while todo:
        name = canonical(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            needs = requires(name) or []
        except PackageNotFoundError:
            continue
        for spec in needs:
            requirement = Requirement(spec)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


# ---------------------------------------------------------------------------------------------- WORKERS
def test_more_than_one_api_worker_needs_redis(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("WORKERS", "2")
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert main(["serve"]) == 2
    assert "WORKERS=2 needs REDIS_URL" in capsys.readouterr().err


def test_workers_start_uvicorn_with_the_factory(monkeypatch, tmp_path):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("WORKERS", "3")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/13")
    assert main(["serve", "--port", "9191"]) == 0
    (app, kw), = calls
    assert app == "asvp_backend.server.factory:create_app_from_env" and kw["factory"] is True
    assert kw["workers"] == 3 and kw["port"] == 9191

