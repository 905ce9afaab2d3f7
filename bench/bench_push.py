"""Time to push a round's ranking into a local Label Studio 1.23.2: import N predictions, switch the
project's model_version and sampling, keep the ranking view, delete an old version, read the order back.

Starts Label Studio from LS_VENV (like the tests) unless --url and --token name a running one.

    python bench/bench_push.py --predictions 2000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from asvp_backend.labelstudio.client import LabelStudioClient  # noqa: E402
from asvp_backend.labelstudio.label_config import parse_label_config  # noqa: E402
from tests.helpers import IMAGE_CONFIG, next_task, ordered_task_ids  # noqa: E402
from tests.processes import start_label_studio  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", type=int, default=2000)
    parser.add_argument("--url", default=None)
    parser.add_argument("--token", default=None)
    args = parser.parse_args()

    server = None
    if args.url is None:
        server = start_label_studio(Path(tempfile.mkdtemp(prefix="asvp-bench-ls-")))
        args.url, args.token = server.info["url"], server.info["token"]
    try:
        client = LabelStudioClient(args.url, args.token)
        spec = parse_label_config(IMAGE_CONFIG)
        pid = client.request("POST", "/api/projects", json={"title": "push bench", "label_config": IMAGE_CONFIG})["id"]
        tasks = [{"image": f"https://example.com/{i}.png"} for i in range(args.predictions)]
        started = time.perf_counter()
        client.request("POST", f"/api/projects/{pid}/import", json=tasks, timeout=600)
        import_tasks_s = time.perf_counter() - started
        ids = [t["id"] for t in client.iter_tasks(pid, page_size=1000)]

        def predictions(version: str) -> list[dict]:
            return [{"task": tid, "result": [spec.result("cat")], "score": i / len(ids), "model_version": version}
                    for i, tid in enumerate(ids)]

        timings: dict[str, float] = {}
        for version in ("asvp-g0-r1", "asvp-g0-r2"):
            clock = time.perf_counter()
            client.delete_model_version(pid, version)
            client.import_predictions(pid, predictions(version))
            timings[f"import {len(ids)} predictions ({version})"] = time.perf_counter() - clock
            clock = time.perf_counter()
            client.update_project(pid, model_version=version, sampling="Uncertainty sampling")
            view = client.ensure_ranking_view(pid)
            timings[f"model_version + sampling + view ({version})"] = time.perf_counter() - clock
        clock = time.perf_counter()
        client.delete_model_version(pid, "asvp-g0-r1")
        timings[f"delete {len(ids)} old predictions"] = time.perf_counter() - clock
        clock = time.perf_counter()
        order = ordered_task_ids(client, pid, view)
        timings["read the first 1,000 of the ranking back"] = time.perf_counter() - clock
        assert order[:5] == ids[:5], "Label Studio's order differs from the pushed scores"
        clock = time.perf_counter()
        nxt = next_task(client, pid)
        timings["GET next task"] = time.perf_counter() - clock
        assert nxt["id"] == ids[0]

        print(f"### Pushing a ranking into Label Studio 1.23.2 ({len(ids)} tasks; tasks imported in "
              f"{import_tasks_s:.1f} s)\n")
        print("| step | seconds |\n|---|---|")
        for name, seconds in timings.items():
            print(f"| {name} | {seconds:.2f} |")
    finally:
        if server is not None:
            server.process.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
