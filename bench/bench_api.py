"""HTTP latency of the API as Label Studio sees it: a webhook burst, /predict (alone and under concurrent
clients), /setup, /health (alone and while a large /predict is being handled).

Starts `asvp-backend serve` as a real process (rq mode on a Redis server, or the embedded mode) and
measures with a real HTTP client over loopback. Figures go to stdout as a Markdown table.

    python bench/bench_api.py --mode redis --redis-url redis://127.0.0.1:6379/12
    python bench/bench_api.py --mode embedded
    python bench/bench_api.py --mode redis --concurrency 16 --predict-clients 20 --big-mb 60   # the full set
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import IMAGE_CONFIG, free_port, wait_for  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def timed(session: requests.Session, method: str, url: str, **kwargs) -> float:
    kwargs.setdefault("timeout", 30)
    started = time.perf_counter()
    response = session.request(method, url, **kwargs)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed * 1000


def row(name: str, samples: list[float]) -> str:
    return (
        f"| {name} | {len(samples)} | {statistics.median(samples):.2f} | {percentile(samples, 99):.2f} "
        f"| {max(samples):.2f} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=["redis", "embedded"], default="redis")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--burst", type=int, default=500, help="webhook requests in the burst")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent connections during the burst")
    parser.add_argument("--repeat", type=int, default=50, help="samples for /predict, /setup, /health")
    parser.add_argument("--predict-clients", type=int, default=20, help="concurrent clients sending /predict")
    parser.add_argument("--predict-per-client", type=int, default=25, help="/predict calls of each client")
    parser.add_argument("--big-mb", type=int, default=60, help="size of the large /predict (0: skip)")
    parser.add_argument("--big-repeat", type=int, default=3, help="large /predict requests, one after another")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="asvp-bench-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "LABEL_STUDIO_URL"}}
    env.update({"MODEL_DIR": str(tmp), "PYTHONPATH": str(ROOT), "LOG_LEVEL": "warning"})
    if args.mode == "redis":
        import redis

        redis.Redis.from_url(args.redis_url).flushdb()
        env["REDIS_URL"] = args.redis_url
    server = subprocess.Popen(
        [sys.executable, "-m", "asvp_backend", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(base), timeout=60, what="server")
        session = requests.Session()
        setup = {
            "project": "1.1700000000",
            "schema": IMAGE_CONFIG,
            "hostname": "http://ls",
            "access_token": "x",
        }
        setup_ms = [timed(session, "POST", f"{base}/setup", json=setup) for _ in range(args.repeat)]
        health_ms = [timed(session, "GET", f"{base}/health") for _ in range(args.repeat)]
        predict_ms_empty = _predict_samples(session, base, args.repeat)
        _fake_round(tmp, args.redis_url if args.mode == "redis" else None, pool=100_000)
        predict_ms = _predict_samples(session, base, args.repeat)
        predict_concurrent_ms = _concurrent_predict(base, args.predict_clients, args.predict_per_client)
        big = _health_beside_big_predict(base, args.big_mb, args.big_repeat) if args.big_mb else None

        event = {
            "action": "ANNOTATION_CREATED",
            "project": {"id": 1},
            "annotation": {"id": 1},
            "task": {"id": 1},
        }
        sessions = [requests.Session() for _ in range(args.concurrency)]

        def send(i: int) -> float:
            return timed(sessions[i % args.concurrency], "POST", f"{base}/webhook", json=event)

        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            webhook_ms = list(pool.map(send, range(args.burst)))
        burst_s = time.perf_counter() - started
        jobs = session.get(f"{base}/jobs", params={"project": 1}).json()["jobs"]
        with ThreadPoolExecutor(args.concurrency) as pool:  # the same burst again, connections now open
            webhook_warm_ms = list(pool.map(send, range(args.burst)))

        print(
            f"### API latency, mode={args.mode} ({platform.node()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()})\n"
        )
        print("| request | n | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|")
        print(row(f"POST /webhook (first burst, {args.concurrency} concurrent)", webhook_ms))
        print(row(f"POST /webhook (second burst, {args.concurrency} concurrent)", webhook_warm_ms))
        print(row("POST /predict (100 tasks, before any round)", predict_ms_empty))
        print(row("POST /predict (100 tasks, ranked by a 100k-task round)", predict_ms))
        print(row(f"POST /predict (100 tasks, ranked, {args.predict_clients} concurrent clients)",
                  predict_concurrent_ms))
        print(row("POST /setup", setup_ms))
        print(row("GET /health", health_ms))
        if big is not None:
            health_busy_ms, big_s, big_bytes = big
            print(row(f"GET /health while a {big_bytes / 1e6:.0f} MB /predict is handled", health_busy_ms))
        peak_kb = _peak_rss_kb(server.pid)
        print(
            f"\nThe first burst of {args.burst} webhooks took {burst_s:.2f} s ({args.burst / burst_s:.0f} req/s) "
            f"and made {len(jobs)} job(s). Its slowest requests are the first ones, which open the client's "
            f"connections while the first job is enqueued."
        )
        if big is not None:
            print(
                f"Each {big_bytes / 1e6:.0f} MB /predict ({len(big_s)} in a row) took "
                f"{', '.join(f'{s:.1f}' for s in big_s)} s; /health was polled every 10 ms meanwhile."
            )
        if peak_kb:
            print(f"Peak RSS of the server process over the whole run: {peak_kb / 1024:.0f} MiB.")
    finally:
        server.terminate()
        server.wait(timeout=10)
    return 0


def _predict_samples(session: requests.Session, base: str, repeat: int) -> list[float]:
    tasks = [{"id": i * 997 % 100_000 + 1, "data": {"image": f"/data/upload/1/{i}.png"}, "annotations": [],
              "predictions": []} for i in range(100)]
    body = {"tasks": tasks, "project": "1.1700000000", "label_config": IMAGE_CONFIG, "params": {}}
    return [timed(session, "POST", f"{base}/predict", json=body) for _ in range(repeat)]


def _concurrent_predict(base: str, clients: int, per_client: int) -> list[float]:
    """/predict for 100 tasks from `clients` threads at once, each on its own connection."""
    tasks = [{"id": i * 997 % 100_000 + 1, "data": {"image": f"/data/upload/1/{i}.png"}, "annotations": [],
              "predictions": []} for i in range(100)]
    raw = json.dumps({"tasks": tasks, "project": "1.1700000000", "label_config": IMAGE_CONFIG, "params": {}})
    sessions = [requests.Session() for _ in range(clients)]
    headers = {"content-type": "application/json"}

    def client(i: int) -> list[float]:
        return [timed(sessions[i], "POST", f"{base}/predict", data=raw, headers=headers) for _ in range(per_client)]

    with ThreadPoolExecutor(clients) as pool:
        return [ms for samples in pool.map(client, range(clients)) for ms in samples]


def _health_beside_big_predict(base: str, megabytes: int, repeat: int) -> tuple[list[float], list[float], int]:
    """Poll /health every 10 ms while /predict requests of about `megabytes` MB are sent and handled, one
    after another. The body is shaped like Label Studio's (10,000 tasks with their annotations), the
    expensive kind to parse."""
    region = {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": ["cat"]}}
    annotation = {"id": 1, "result": [region], "completed_by": 1, "was_cancelled": False}
    per_task = max(1, round(megabytes * 1e6 / 10_000 / (len(json.dumps(annotation)) + 2)))
    tasks = [{"id": i, "data": {"image": f"/data/upload/1/{i}.png"}, "annotations": [annotation] * per_task,
              "predictions": []} for i in range(1, 10_001)]
    raw = json.dumps({"tasks": tasks, "project": "1.1700000000", "params": {}}).encode()
    health_ms: list[float] = []
    durations: list[float] = []
    with requests.Session() as poller, requests.Session() as big_client:
        for _ in range(repeat):
            sender = threading.Thread(
                target=lambda: durations.append(timed(big_client, "POST", f"{base}/predict", data=raw, timeout=300,
                                                      headers={"content-type": "application/json"}) / 1000)
            )
            sender.start()
            while sender.is_alive():
                health_ms.append(timed(poller, "GET", f"{base}/health"))
                time.sleep(0.01)
    if len(durations) != repeat:
        raise RuntimeError("a large /predict failed; see the server's output")
    return health_ms, durations, len(raw)


def _peak_rss_kb(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return int(status.split("VmHWM:")[1].split()[0]) if "VmHWM:" in status else None


def _fake_round(model_dir: Path, redis_url: str | None, pool: int) -> None:
    """Round artefacts as the round job writes them, so /predict serves labels and scores."""
    import numpy as np

    from asvp_backend.artefacts import RankingArtefact, write_round
    from asvp_backend.bootstrap import connect_redis
    from asvp_backend.layout import ProjectLayout
    from asvp_backend.state import create_state_store
    from asvp_backend.versioning import ModelVersion

    rng = np.random.default_rng(0)
    ranking = RankingArtefact(np.arange(pool), rng.random(pool), np.array(["cat", "dog"])[rng.integers(0, 2, pool)])
    write_round(ProjectLayout(model_dir, 1), ModelVersion(0, 1), ranking, None)
    store = create_state_store(model_dir, connect_redis(redis_url) if redis_url else None)
    store.update(1, lambda s: (s.advance_round(), s)[1])


def _up(base: str) -> bool:
    try:
        return requests.get(f"{base}/health", timeout=1).ok
    except requests.RequestException:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
