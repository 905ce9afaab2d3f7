"""A new user's first hour, timed: connect, first ranking, re-rank after labels, Start Training.

Starts Label Studio 1.23.2 (from LS_VENV, like the tests) and the backend as `make run` does: the embedded
mode (no Redis), default settings, no LABEL_STUDIO_URL (the backend reads the project with what /setup
sends). Makes a project of real images (scikit-learn's 8x8 digits 0-3, upscaled to 64 px PNGs, uploaded in
batches of at most 100 as Label Studio requires), connects the model the way the UI does (POST /api/ml
with `extra_params: ""`), then labels the task Label Studio serves next, with its true class, and times:

- connect: POST /api/ml until Label Studio answers (it calls /health and /setup on the way);
- first ranking: connect until Label Studio holds predictions of the backend's first round;
- re-rank: the label that makes a round due until Label Studio's project shows the new version;
- served = top pick: how often the task Label Studio served was the backend's current first choice;
- pre-annotations: how often the served task's prediction was the true class (accepted as-is);
- Start Training (--train): until the fine-tune ends, and whether it beat the proxy.

    python bench/bench_first_hour.py --images 120 --labels 30 --train --out bench/results/first_hour_cpu.md
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import start_backend  # noqa: E402
from tests.helpers import LabelStudioAPI, free_port, wait_for  # noqa: E402
from tests.processes import start_label_studio  # noqa: E402

CLASSES = ["zero", "one", "two", "three"]
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="label" toName="image" choice="single" showInline="true">
    <Choice value="zero"/><Choice value="one"/><Choice value="two"/><Choice value="three"/>
  </Choices>
</View>"""


def digit_images(count: int) -> list[tuple[str, bytes, str]]:
    """`count` real handwritten digits of the classes 0-3 as 64 px PNGs: (file name, bytes, true class)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    picked: list[tuple[str, bytes, str]] = []
    per_class = count // len(CLASSES)
    for label, name in enumerate(CLASSES):
        rows = np.flatnonzero(digits.target == label)[:per_class]
        for row in rows:
            pixels = (255 - digits.images[row] * 16).clip(0, 255).astype("uint8")
            image = Image.fromarray(pixels).resize((64, 64), Image.Resampling.BICUBIC).convert("RGB")
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            picked.append((f"{name}_{row}.png", buffer.getvalue(), name))
    return picked


def annotate(ls: LabelStudioAPI, task_id: int, label: str) -> None:
    result = [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]
    ls.call("POST", f"/api/tasks/{task_id}/annotations", json={"result": result})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--labels", type=int, default=30, help="labels given one by one, as an annotator would")
    parser.add_argument("--train", action="store_true", help="press Start Training at the end and wait for it")
    parser.add_argument("--out", type=Path, default=None, help="write the results as markdown here")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="asvp-first-hour-"))
    server = start_label_studio(tmp / "ls")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k.startswith(("RETRAIN_EVERY", "DEVICE"))}
    backend = start_backend(tmp, port, MODEL_DIR=str(tmp / "models"), **env)
    url = f"http://127.0.0.1:{port}"
    rows: list[tuple[str, str]] = []
    try:
        ls = LabelStudioAPI(server.info["url"], server.info["token"])
        pid = ls.call("POST", "/api/projects", json={"title": "first hour", "label_config": CONFIG})["id"]
        images = digit_images(args.images)
        truth: dict[str, str] = {}
        for start in range(0, len(images), 100):  # Label Studio takes at most 100 files per upload
            batch = images[start:start + 100]
            files = [(f"file{i}", (name, data, "image/png")) for i, (name, data, _) in enumerate(batch)]
            ls.call("POST", f"/api/projects/{pid}/import", files=files)
            truth.update({name: label for name, _, label in batch})
        tasks = ls.call("GET", "/api/tasks", params={"project": pid, "page_size": 1000})["tasks"]
        label_of = {t["id"]: next(v for k, v in truth.items() if t["data"]["image"].endswith(k)) for t in tasks}
        print(f"project {pid}: {len(tasks)} tasks")

        clock = time.perf_counter()
        ml = ls.call("POST", "/api/ml", json={"url": url, "project": pid, "title": "asvp", "extra_params": ""})
        connect_s = time.perf_counter() - clock
        assert ls.call("GET", f"/api/ml/{ml['id']}")["state"] == "CO", "the model did not connect"
        rows.append(("connect (POST /api/ml: /health + /setup)", f"{connect_s:.2f} s"))

        def version() -> str:
            return str(ls.call("GET", f"/api/projects/{pid}").get("model_version") or "")

        wait_for(lambda: version().startswith("asvp-g"), timeout=1800, interval=0.5, what="the first ranking")
        first_s = time.perf_counter() - clock
        rows.append(("first ranking in Label Studio after connecting", f"{first_s:.1f} s ({version()})"))
        print(f"connect {connect_s:.2f} s, first ranking {first_s:.1f} s")

        top_picks = correct = suggested = 0
        reranks: list[float] = []
        for step in range(args.labels):
            before = version()
            served = ls.call("GET", f"/api/projects/{pid}/next")
            nxt = requests.get(f"{url}/projects/{pid}/next", params={"limit": 1}, timeout=10).json()["tasks"]
            top_picks += bool(nxt) and nxt[0]["id"] == served["id"]
            predicted = [p for p in served.get("predictions") or [] if p.get("model_version") == before]
            choice = predicted[0]["result"][0]["value"]["choices"][0] if predicted and predicted[0]["result"] else None
            suggested += choice is not None
            correct += choice == label_of[served["id"]]
            labelled_at = time.perf_counter()
            annotate(ls, served["id"], label_of[served["id"]])
            state = requests.get(f"{url}/projects/{pid}", timeout=10).json()
            due = len(state.get("rounds") or [])
            try:  # a round follows when this label made one due: time it
                wait_for(lambda d=due, b=before: len(requests.get(f"{url}/projects/{pid}", timeout=10).json()["rounds"])
                         > d and version() != b, timeout=8, interval=0.2)
                reranks.append(time.perf_counter() - labelled_at)
                print(f"label {step + 1}: re-ranked in {reranks[-1]:.1f} s ({version()})")
            except AssertionError:
                pass
        rows.append(("labels given", str(args.labels)))
        rows.append(("served task was the backend's top pick", f"{top_picks} of {args.labels}"))
        rows.append(("served tasks with a pre-annotation (none at cold start)", f"{suggested} of {args.labels}"))
        rows.append(("... of which the true class (accepted as-is)", f"{correct} of {suggested}"))
        ranked = requests.get(f"{url}/projects/{pid}/next", params={"limit": 200}, timeout=10).json()["tasks"]
        right = sum(1 for t in ranked if t["label"] == label_of[t["id"]])
        rows.append(("the proxy's label on every unlabelled task, right", f"{right} of {len(ranked)}"))
        if reranks:
            ordered = sorted(reranks)
            rows.append(("re-rank after the label that made a round due",
                         f"median {ordered[len(ordered) // 2]:.1f} s, max {ordered[-1]:.1f} s ({len(reranks)} rounds)"))

        if args.train:
            clock = time.perf_counter()
            ls.call("POST", f"/api/ml/{ml['id']}/train", json={})

            def fine_tune_ended() -> Any:
                jobs = requests.get(f"{url}/jobs", params={"project": pid}, timeout=10).json()["jobs"]
                return [j for j in jobs if j["kind"] == "finetune" and j["status"] in {"finished", "failed"}]

            wait_for(fine_tune_ended, timeout=3600, interval=2, what="the Start Training fine-tune")
            rows.append(("Start Training until the fine-tune ended", f"{time.perf_counter() - clock:.0f} s"))
            model = requests.get(f"{url}/projects/{pid}/model", timeout=10).json()
            verdict = model.get("deliverable") or {}

            def figure(key: str) -> str:
                value = verdict.get(key)
                return "-" if value is None else f"{value:.3f}"

            rows.append(("Start Training's model vs the proxy, on the same held-out labels",
                         f"deliverable: {verdict.get('source')} (fine-tuned {figure('model_accuracy')}, proxy "
                         f"{figure('proxy_accuracy')}, n = {verdict.get('n')})"))
    finally:
        backend.stop()
        server.process.stop()

    text = "\n".join([
        f"# A new user's first hour ({args.images} digit images of 4 classes, embedded mode, default settings)",
        "",
        f"Command: `python bench/bench_first_hour.py --images {args.images} --labels {args.labels}"
        f"{' --train' if args.train else ''}`. Machine: {platform.machine()}, {os.cpu_count()} cores, no GPU.",
        "",
        "| measure | value |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in rows],
        "",
    ])
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
