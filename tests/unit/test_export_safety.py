"""`asvp-backend export` replaces nothing but an earlier export, and a damaged checkpoint is never current,
never exported and named in `problems`. The CLI runs as a user runs it: a subprocess in a folder of theirs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from asvp_backend.alignment.integrity import CHECKPOINT_META, CHECKPOINT_WEIGHTS
from asvp_backend.alignment.summary import model_summary
from asvp_backend.config import Settings
from asvp_backend.labelstudio.label_config import parse_label_config
from asvp_backend.layout import ProjectLayout
from asvp_backend.problems import project_problems
from asvp_backend.state import FileStateStore, ProjectState
from tests.helpers import IMAGE_CONFIG, write_checkpoint

ROOT = Path(__file__).resolve().parents[2]
PROJECT = 3


@pytest.fixture
def models(tmp_path) -> Path:
    """MODEL_DIR with project 3 and two whole fine-tuned models, m40 (older) and m50 (newest)."""
    model_dir = tmp_path / "models"
    state = ProjectState.new(PROJECT, IMAGE_CONFIG, parse_label_config(IMAGE_CONFIG))
    for n in (40, 50):
        model = {"id": f"m{n}", "labelled": n, "at": float(n), "method": "ft", "holdout_accuracy": 0.9}
        state.alignment.record_model(model)
        write_checkpoint(ProjectLayout(model_dir, PROJECT).checkpoint_dir(f"m{n}"), model)
    FileStateStore(model_dir).update(PROJECT, lambda _: state)
    return model_dir


def export(model_dir: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "LABEL_STUDIO_URL"}}
    environ.update(PYTHONPATH=str(ROOT), MODEL_DIR=str(model_dir))
    return subprocess.run([sys.executable, "-m", "asvp_backend", "export", "--project", str(PROJECT), *args],
                          env=environ, cwd=cwd, capture_output=True, text=True, timeout=120)


def user_folder(tmp_path: Path) -> Path:
    """A person's working folder: files export must never delete, in it and in its parent."""
    parent = tmp_path / "home"
    work = parent / "work"
    work.mkdir(parents=True)
    (work / "thesis.tex").write_text("years of work")
    (parent / "photos.txt").write_text("more")
    return work


def test_force_never_replaces_the_working_folder_its_parent_or_a_foreign_folder(models, tmp_path):
    work = user_folder(tmp_path)
    foreign = work / "results"
    foreign.mkdir()
    (foreign / "table.csv").write_text("a,b")
    for out in (".", "..", str(work), "results", "/"):
        refused = export(models, work, "--out", out, "--force")
        assert refused.returncode == 2, (out, refused.stdout, refused.stderr)
        assert "Traceback" not in refused.stderr and refused.stderr.strip(), out
    assert (work / "thesis.tex").read_text() == "years of work"
    assert (work.parent / "photos.txt").read_text() == "more"
    assert (foreign / "table.csv").read_text() == "a,b"
    assert "not an earlier export" in export(models, work, "--out", "results", "--force").stderr


def test_force_refuses_a_symlink_and_replaces_an_earlier_export(models, tmp_path):
    work = user_folder(tmp_path)
    first = export(models, work, "--out", "model")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["model"] == "m50" and (work / "model" / ".asvp-export").is_file()
    assert export(models, work, "--out", "model").returncode == 2  # not empty, no --force
    again = export(models, work, "--out", "model", "--force")
    assert again.returncode == 0, again.stderr
    (work / "link").symlink_to(work / "model")
    through_link = export(models, work, "--out", "link", "--force")
    assert through_link.returncode == 2 and "symbolic link" in through_link.stderr
    assert "Traceback" not in through_link.stderr and (work / "link").is_symlink()
    assert sorted(p.name for p in (work / "model").iterdir()) == [".asvp-export", "labels.txt", CHECKPOINT_META,
                                                                 CHECKPOINT_WEIGHTS]


def test_a_half_written_checkpoint_is_a_problem_is_not_current_and_is_not_exported(models, tmp_path):
    layout = ProjectLayout(models, PROJECT)
    weights = layout.checkpoint_dir("m50") / CHECKPOINT_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:40])  # a crash or a full disk mid-copy
    state = FileStateStore(models).get(PROJECT)
    assert state is not None
    problems = project_problems(layout, state)
    assert any("model m50" in p and "model.safetensors has 40 bytes" in p for p in problems), problems
    summary = model_summary(state, Settings(model_dir=models))
    assert summary["current"]["id"] == "m40"  # the newest whole model
    assert "m50" in summary["damaged"] and summary["deliverable"]["model"] == "m40"
    work = user_folder(tmp_path)
    named = export(models, work, "--out", "m50", "--model", "m50")
    assert named.returncode == 2 and "damaged checkpoint" in named.stderr and not (work / "m50").exists()
    newest_whole = export(models, work, "--out", "best")
    assert newest_whole.returncode == 0 and json.loads(newest_whole.stdout)["model"] == "m40"


def test_a_checkpoint_changed_after_writing_is_caught_by_its_hash_on_export(models, tmp_path):
    weights = ProjectLayout(models, PROJECT).checkpoint_dir("m50") / CHECKPOINT_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # same size, valid header: only the recorded SHA-256 tells
    weights.write_bytes(bytes(data))
    work = user_folder(tmp_path)
    refused = export(models, work, "--out", "model", "--model", "m50")
    assert refused.returncode == 2 and "SHA-256" in refused.stderr and not (work / "model").exists()
