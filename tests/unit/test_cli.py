"""The CLI as a user runs it: a subprocess, with --help, clear configuration errors and a progress bar."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import png_bytes, write_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "LABEL_STUDIO_URL"}}
    environ.update({"PYTHONPATH": str(ROOT), **env})
    return subprocess.run([sys.executable, "-m", "asvp_backend", *args], env=environ, capture_output=True,
                          text=True, timeout=300)


def test_help_names_every_command_and_variable():
    out = run_cli("--help")
    assert out.returncode == 0
    for word in ("serve", "worker", "status", "extract", "LABEL_STUDIO_URL", "REDIS_URL", "BACKBONE"):
        assert word in out.stdout


def test_a_bad_setting_is_a_clear_error_not_a_traceback():
    out = run_cli("status", DEVICE="gpu")
    assert out.returncode == 2
    assert "DEVICE must be one of auto, cpu, cuda" in out.stderr and "Traceback" not in out.stderr


def test_worker_without_redis_explains_itself():
    out = run_cli("worker")
    assert out.returncode == 2 and "REDIS_URL" in out.stderr


def test_extract_images_caches_real_features_and_skips_bad_files(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.png").write_bytes(png_bytes(i))
    (images / "broken.png").write_bytes(b"definitely not a png")
    out = run_cli("extract", "--images", str(images), MODEL_DIR=str(tmp_path / "models"), EXTRACT_WORKERS="0")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["extracted"] == 3 and report["files"] == 4
    assert list(report["skipped"]) == [str(images / "broken.png")]
    assert "img" in out.stderr  # the progress bar
    again = json.loads(run_cli("extract", "--images", str(images), MODEL_DIR=str(tmp_path / "models")).stdout)
    assert again["extracted"] == 0  # resumes: nothing left to do


def _project_with_rounds(model_dir: Path) -> None:
    from asvp_backend.labelstudio.label_config import parse_label_config
    from asvp_backend.state import FileStateStore, ProjectState
    from tests.helpers import IMAGE_CONFIG

    state = ProjectState.new(3, IMAGE_CONFIG, parse_label_config(IMAGE_CONFIG))
    for n, (kappa, accuracy) in enumerate([(None, 0.8), (0.9, 0.9), (0.995, 0.9), (1.0, 0.9), (1.0, 0.901)], start=1):
        state.advance_round()
        state.record_round({"version": str(state.version), "labelled": 10 * n, "cv_accuracy": accuracy,
                            "stop": {"kappa": kappa}})
    FileStateStore(model_dir).update(3, lambda _: state)


def test_status_is_a_readable_table_and_json_for_scripts(tmp_path):
    _project_with_rounds(tmp_path)
    out = run_cli("status", "--project", "3", MODEL_DIR=str(tmp_path))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "project 3"
    assert any(line.split() == ["asvp-g0-r5", "50", "0.901", "1.0000"] for line in lines)
    assert any(line.split()[:2] == ["stopping", "labelling"] and "can stop" in line for line in lines)
    assert "jobs: embedded mode" in out.stdout
    report = json.loads(run_cli("status", "--project", "3", "--json", MODEL_DIR=str(tmp_path)).stdout)
    stopping = report["projects"][0]["stopping"]
    assert stopping["can_stop"] and stopping["stable_rounds"] == 3
    assert [h["kappa"] for h in stopping["history"]] == [None, 0.9, 0.995, 1.0, 1.0]


def test_export_refuses_a_model_the_proxy_beat_unless_asked(tmp_path):
    from asvp_backend.labelstudio.label_config import parse_label_config
    from asvp_backend.layout import ProjectLayout
    from asvp_backend.state import FileStateStore, ProjectState
    from tests.helpers import IMAGE_CONFIG

    reason = ("the proxy is the better model: 0.600 for the fine-tuned model vs 0.900 for the proxy (mlp) on the "
              "same 10 held-out labels")
    comparison = {"verdict": "proxy", "model_accuracy": 0.6, "proxy_accuracy": 0.9, "n": 10, "proxy": "mlp",
                  "reason": reason}
    model = {"id": "m50", "labelled": 50, "at": 1.0, "method": "lpft", "holdout_accuracy": 0.6, "verdict": "proxy",
             "comparison": comparison}
    state = ProjectState.new(3, IMAGE_CONFIG, parse_label_config(IMAGE_CONFIG))
    state.alignment.record_model(model)
    FileStateStore(tmp_path).update(3, lambda _: state)
    write_checkpoint(ProjectLayout(tmp_path, 3).checkpoint_dir("m50"), model)
    out = tmp_path / "export"
    refused = run_cli("export", "--project", "3", "--out", str(out), MODEL_DIR=str(tmp_path))
    assert refused.returncode == 3 and "Traceback" not in refused.stderr
    assert f"not exporting m50: {reason}" in refused.stderr and "--even-if-worse" in refused.stderr
    assert not out.exists()
    named = run_cli("export", "--project", "3", "--out", str(out), "--model", "m50", MODEL_DIR=str(tmp_path))
    assert named.returncode == 3 and not out.exists()
    forced = run_cli("export", "--project", "3", "--out", str(out), "--even-if-worse", MODEL_DIR=str(tmp_path))
    assert forced.returncode == 0, forced.stderr
    report = json.loads(forced.stdout)
    assert report["verdict"] == "proxy" and report["even_if_worse"] is True
    assert (report["model_accuracy"], report["proxy_accuracy"], report["n"]) == (0.6, 0.9, 10)
    assert json.loads((out / "model.json").read_text())["exported_even_if_worse"] is True
