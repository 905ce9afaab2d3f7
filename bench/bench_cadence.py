"""What a round and its push cost per project size, against a real Label Studio 1.23.2: the figures behind
the default cadence (RETRAIN_EVERY=auto, docs/decisions.md "How often a round runs").

For each project size N (and each PUSH_TOP_K variant) the script makes a Label Studio project of N tasks
(image URLs that are never fetched), labels a few, writes synthetic cached features (1,280-d float16, two
Gaussian classes, as Lite0 would) straight into the feature store, so that extraction is not measured, and
runs the backend's own jobs in this process: a sync, then a round (`run_round`, the FAST_STACK settings of
tests/conftest.py: logistic proxy, CPU; `--proxy mlp` for the default proxy). Then, `--labels` times, it
labels the task Label Studio serves next (checking that it is the previous round's top pick), and times the
sync and the round that follow. Every Label Studio call of the round goes through a timing wrapper, which
splits the round into:

- sync: reading every task and label (the job a label's webhook queues first);
- train+rank: load the features, fit the proxy, score and rank the pool, write the round's artefacts;
- import: the new version's predictions (with the delete of a half-written new version before it);
- PATCH/view: the project's model_version and sampling, and the "label next" tab;
- label->live: the sum of the above, from the label's sync until Label Studio serves the new ranking;
- delete-old: deleting the version two rounds back (after the switch, but the round still holds its lease);
- cv+align: the cross-validated accuracy and the LogME-PED alignment check after the round;
- round: the whole round job (what bounds how often rounds can follow each other);
- auto: the labels between rounds that RETRAIN_EVERY=auto gives for that cost (sync + round, 3 s a label).

    python bench/bench_cadence.py --sizes 100,500,2000,10000 --labels 6 --push-top-k 2000,100 \
        --out bench/results/cadence_cpu.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from asvp_backend.config import Settings  # noqa: E402
from asvp_backend.features import FeatureStore  # noqa: E402
from asvp_backend.features.store import GenerationInfo  # noqa: E402
from asvp_backend.jobs.context import JobContext  # noqa: E402
from asvp_backend.jobs.inprocess import InProcessJobQueue  # noqa: E402
from asvp_backend.jobs.rounds import labels_between_rounds, run_round  # noqa: E402
from asvp_backend.jobs.sync import sync  # noqa: E402
from asvp_backend.labelstudio.client import LabelStudioClient  # noqa: E402
from asvp_backend.labelstudio.label_config import parse_label_config  # noqa: E402
from asvp_backend.layout import ProjectLayout  # noqa: E402
from asvp_backend.runtime import Runtime  # noqa: E402
from asvp_backend.state import FileStateStore, ProjectState  # noqa: E402
from tests.helpers import IMAGE_CONFIG, next_task  # noqa: E402
from tests.processes import start_label_studio  # noqa: E402

DIM = 1280
CLASSES = ("cat", "dog")
COLUMNS = ("sync", "train+rank", "import", "PATCH/view", "label->live", "delete-old", "cv+align", "round")


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class TimedClient:
    """The real client, with every call's duration recorded as (method, first argument after the project,
    seconds); `calls` is cleared by the caller before each job."""

    def __init__(self, client: LabelStudioClient) -> None:
        self._client = client
        self.calls: list[tuple[str, Any, float]] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        if not callable(method):
            return method

        def timed(*args: Any, **kwargs: Any) -> Any:
            clock = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.calls.append((name, args[1] if len(args) > 1 else None, time.perf_counter() - clock))

        return timed

    def spent(self, *names: str) -> float:
        return sum(seconds for name, _, seconds in self.calls if name in names)


def true_class(tid: int, first_id: int) -> str:
    return CLASSES[(tid - first_id) % 2]


def synthetic_features(ids: list[int], first_id: int, seed: int) -> np.ndarray:
    """Two overlapping Gaussian classes in 1,280-d: margins spread over (0, 1) as real features' do."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=DIM)
    direction /= np.linalg.norm(direction)
    sign = np.array([1.0 if true_class(t, first_id) == "cat" else -1.0 for t in ids])
    vectors = rng.normal(size=(len(ids), DIM)) + np.outer(sign * 1.5, direction)
    return vectors.astype(np.float16)


def annotate(client: LabelStudioClient, tid: int, label: str) -> None:
    result = [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]
    client.request("POST", f"/api/tasks/{tid}/annotations", json={"result": result})


def measure(client: LabelStudioClient, url: str, token: str, tmp: Path, size: int, top_k: int,
            labels: int, initial: int, seed: int, proxy: str) -> dict[str, Any]:
    """One project of `size` tasks: the first round, then `labels` label-sync-round steps."""
    title = f"cadence {size} top{top_k} {proxy}"
    pid = int(client.request("POST", "/api/projects", json={"title": title, "label_config": IMAGE_CONFIG})["id"])
    clock = time.perf_counter()
    for start in range(0, size, 5000):
        batch = [{"image": f"https://images.invalid/{i}.png"} for i in range(start, min(size, start + 5000))]
        client.request("POST", f"/api/projects/{pid}/import", json=batch, timeout=600)
    ids = sorted(int(t["id"]) for t in client.iter_tasks(pid, page_size=1000))
    first_id = ids[0]
    say(f"{title}: project {pid}, {len(ids)} tasks imported in {time.perf_counter() - clock:.1f} s")
    for tid in ids[:initial]:
        annotate(client, tid, true_class(tid, first_id))

    model_dir = tmp / f"models-{pid}"
    settings = Settings.from_env({"MODEL_DIR": str(model_dir), "LABEL_STUDIO_URL": url, "LABEL_STUDIO_API_KEY": token,
                                  "DEVICE": "cpu", "PROXY": proxy, "PUSH_TOP_K": str(top_k), "SEED": str(seed)})
    timed = TimedClient(client)
    runtime = Runtime(settings=settings, store=FileStateStore(model_dir), queue=InProcessJobQueue(),
                      _label_studio=timed)
    spec = parse_label_config(IMAGE_CONFIG)
    runtime.store.update(pid, lambda _: ProjectState.new(pid, IMAGE_CONFIG, spec))
    store = FeatureStore(ProjectLayout(model_dir, pid).features_dir)
    generation = store.create_generation(GenerationInfo(0, "synthetic", "none", {}, DIM))
    generation.append(ids, synthetic_features(ids, first_id, seed))
    store.activate(0)

    def ctx(kind: str) -> JobContext:
        return JobContext(kind, pid, f"{kind}-bench", {"force_round": True} if kind == "round" else {}, runtime)

    rows: list[dict[str, float]] = []
    top_picks, record = 0, None
    for step in range(labels + 1):
        if record is not None:  # label what Label Studio serves, as an annotator would
            served = next_task(client, pid)
            assert served, "Label Studio served nothing"
            top_picks += int(served["id"]) == record["top_tasks"][0]
            annotate(client, int(served["id"]), true_class(int(served["id"]), first_id))
        timed.calls.clear()
        clock = time.perf_counter()
        sync(ctx("sync"))
        sync_s = time.perf_counter() - clock
        timed.calls.clear()
        clock = time.perf_counter()
        record = run_round(ctx("round"))
        round_s = time.perf_counter() - clock
        version = record["version"]
        t = record["timings"]
        import_s = sum(s for name, arg, s in timed.calls
                       if name == "import_predictions" or (name == "delete_model_version" and arg == version))
        delete_old = sum(s for name, arg, s in timed.calls
                         if name == "model_versions" or (name == "delete_model_version" and arg != version))
        patch_s = timed.spent("update_project", "ensure_ranking_view")
        train_s = t.get("load_features", 0) + t.get("train_and_rank", 0) + t.get("save", 0)
        row = {"sync": sync_s, "train+rank": train_s, "import": import_s, "PATCH/view": patch_s,
               "label->live": sync_s + train_s + t.get("push", 0), "delete-old": delete_old,
               "cv+align": t.get("cross_validate", 0) + t.get("alignment", 0), "round": round_s,
               "auto": labels_between_rounds("auto", sync_s + sum(t.values())),
               "deleted": len(record.get("deleted_versions") or []), "pushed": record["pushed"],
               "pool": record["pool"]}
        rows.append(row)
        say(f"{title} {'first round' if step == 0 else f'label {step}'} ({version}, pushed {record['pushed']}): "
            + ", ".join(f"{c} {row[c]:.2f}" for c in COLUMNS))
    steps = rows[1:]  # the first round is the cold start: reported apart
    summary: dict[str, Any] = {c: statistics.median(r[c] for r in steps) for c in COLUMNS}
    with_delete = [r["delete-old"] for r in steps if r["deleted"]]
    summary["delete-old"] = statistics.median(with_delete) if with_delete else 0.0
    summary.update(auto=statistics.median(r["auto"] for r in steps))
    summary.update(size=size, top_k=top_k, proxy=proxy, load=os.getloadavg()[0], pool=steps[-1]["pool"],
                   pushed=steps[-1]["pushed"],
                   first_round=rows[0]["round"], first_live=rows[0]["label->live"], top_picks=top_picks,
                   steps=len(steps), max_live=max(r["label->live"] for r in steps),
                   max_round=max(r["round"] for r in steps))
    client.request("DELETE", f"/api/projects/{pid}/")
    return summary


def table(results: list[dict[str, Any]]) -> str:
    head = ("| tasks | PUSH_TOP_K | proxy | pool | pushed | " + " | ".join(COLUMNS)
            + " | max label->live | max round | auto: labels per round | served = top pick | first round | load |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        lines.append(f"| {r['size']:,} | {r['top_k']:,} | {r['proxy']} | {r['pool']:,} | {r['pushed']:,} | "
                     + " | ".join(f"{r[c]:.2f}" for c in COLUMNS)
                     + f" | {r['max_live']:.2f} | {r['max_round']:.2f} | {r['auto']:g} "
                     f"| {r['top_picks']} of {r['steps']} | {r['first_round']:.2f} | {r['load']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,500,2000,10000", help="project sizes in tasks, comma-separated")
    parser.add_argument("--push-top-k", default="2000", help="PUSH_TOP_K values to compare, comma-separated")
    parser.add_argument("--labels", type=int, default=6, help="labels (each followed by a sync and a round) per "
                        "project; rounds from the third on delete an old version")
    parser.add_argument("--initial", type=int, default=10, help="tasks labelled before the first round")
    parser.add_argument("--proxy", default="logistic", help="PROXY values to compare, comma-separated "
                        "(logistic: the e2e tests' FAST_STACK; mlp: the default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--url", default=None, help="a running Label Studio (default: start one from LS_VENV)")
    parser.add_argument("--token", default=None)
    parser.add_argument("--out", type=Path, default=None, help="append the markdown table to this file")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    top_ks = [int(k) for k in args.push_top_k.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="asvp-bench-cadence-"))
    server = None
    if args.url is None:
        say("starting Label Studio 1.23.2 (SQLite)")
        server = start_label_studio(tmp / "ls")
        args.url, args.token = server.info["url"], server.info["token"]
    results = []
    try:
        client = LabelStudioClient(args.url, args.token, timeout=600)
        for size in sizes:
            pushes: set[int] = set()
            for top_k in top_ks:
                if min(top_k, size) in pushes:
                    continue  # the same push as an earlier variant (every task)
                pushes.add(min(top_k, size))
                for proxy in args.proxy.split(","):
                    results.append(measure(client, args.url, args.token, tmp, size, top_k, args.labels,
                                           args.initial, args.seed, proxy))
                    print(table(results[-1:]).splitlines()[-1], flush=True)
    finally:
        if server is not None:
            server.process.stop()

    command = " ".join(["python bench/bench_cadence.py", *sys.argv[1:]])
    text = "\n".join([
        f"## Rounds against Label Studio 1.23.2 (SQLite): {args.sizes} tasks, PUSH_TOP_K {args.push_top_k}, "
        f"proxy {args.proxy}",
        "",
        f"Command: `{command}`. Machine: {platform.machine()}, {os.cpu_count()} cores shared with other "
        "jobs (load: the 1-minute load average when the row ended), no GPU. Seconds, medians over the labels "
        "(delete-old: over the rounds that deleted a version); "
        f"{args.initial} tasks labelled before the first round, then {args.labels} labels, each followed by a "
        "sync and a round; synthetic 1,280-d features in the store, ALIGN on, default settings otherwise.",
        "",
        table(results),
        "",
    ])
    print(text)
    if args.out:
        with args.out.open("a") as out:
            out.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
