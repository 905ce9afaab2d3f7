"""Which Label Studio and token a project is read with, where /setup's token is kept, and what /setup says
about it (the real Label Studio is in tests/e2e/test_setup_credentials.py)."""

from __future__ import annotations

import json
import logging
import stat

import pytest

from asvp_backend.config import ConfigError, Settings
from asvp_backend.labelstudio import credentials
from asvp_backend.layout import ProjectLayout
from asvp_backend.logs import SecretFilter, install_secret_filter
from tests.helpers import IMAGE_CONFIG
from tests.unit.test_server import make_client

TOKEN = "setup-token-0123456789"
CLOSED = "http://127.0.0.1:9"  # nothing listens: a check fails at once, offline


def settings(**env: str) -> Settings:
    return Settings.from_env(env)


def test_the_environment_wins_and_its_token_never_goes_to_setups_hostname():
    record = {"hostname": "http://attacker.invalid", "access_token": TOKEN}
    both = credentials.connection(settings(LABEL_STUDIO_URL="http://ls:8080", LABEL_STUDIO_API_KEY="env-key"),
                                  record, 1)
    assert (both.url, both.token, both.source) == ("http://ls:8080", "env-key", "environment")
    url_only = credentials.connection(settings(LABEL_STUDIO_URL="http://ls:8080"), record, 1)
    assert (url_only.url, url_only.token) == ("http://ls:8080", TOKEN)
    setup_only = credentials.connection(settings(), record, 1)
    assert (setup_only.url, setup_only.token, setup_only.source) == ("http://attacker.invalid", TOKEN, "setup")
    with pytest.raises(ConfigError, match="LABEL_STUDIO_URL is required"):
        settings(LABEL_STUDIO_API_KEY="env-key")  # a key alone would have to go to /setup's hostname


@pytest.mark.parametrize(
    ("record", "message"),
    [({}, "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY, or connect"),
     ({"hostname": "localhost:8080", "access_token": TOKEN}, "no http"),
     ({"hostname": "http://ls:8080", "access_token": ""}, "no Label Studio address and token")],
)
def test_missing_or_unusable_setup_credentials_say_what_to_do(record, message):
    with pytest.raises(ConfigError, match=message):
        credentials.connection(settings(), record, 1)


def test_setup_keeps_the_token_private_and_reports_what_failed(tmp_path, caplog):
    client, runtime = make_client(tmp_path)
    install_secret_filter([])
    with caplog.at_level(logging.INFO):
        reply = client.post("/setup", json={"project": "5.1", "schema": IMAGE_CONFIG, "hostname": CLOSED,
                                            "access_token": TOKEN})
    assert reply.status_code == 200  # reported, never refused: Label Studio would only show "400 Client Error"
    body = reply.json()
    assert body["label_studio"] == {"url": CLOSED, "credentials": "setup", "tasks_readable": False}
    assert "did not answer" in body["warning"] and TOKEN not in reply.text

    layout = ProjectLayout(tmp_path, 5)
    assert stat.S_IMODE(layout.label_studio_file.stat().st_mode) == 0o600
    assert json.loads(layout.label_studio_file.read_text())["access_token"] == TOKEN
    assert TOKEN not in layout.state_file.read_text()
    project = client.get("/projects/5").json()
    assert TOKEN not in json.dumps(project)
    assert any("cannot read the project's tasks" in p for p in project["problems"])
    assert runtime.has_label_studio(5) and runtime.label_studio(5).url == CLOSED
    assert any("did not answer" in r.getMessage() for r in caplog.records)


def test_a_token_learnt_at_setup_is_masked_in_every_log_line(tmp_path):
    secret_filter = install_secret_filter([])
    credentials.remember_setup(ProjectLayout(tmp_path, 1), "http://ls:8080", TOKEN)
    assert isinstance(secret_filter, SecretFilter) and TOKEN in secret_filter.secrets
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "token %s", (TOKEN,), None)
    secret_filter.filter(record)
    assert TOKEN not in record.getMessage()
    assert TOKEN in install_secret_filter([]).secrets  # a later install keeps it


def test_without_any_credentials_setup_still_connects_with_a_warning(tmp_path):
    client, _ = make_client(tmp_path)
    reply = client.post("/setup", json={"project": "6.1", "schema": IMAGE_CONFIG})
    assert reply.status_code == 200 and reply.json()["model_version"] == "asvp-g0-r0"
    assert "connect the project in Label Studio" in reply.json()["warning"]
