"""Load and scale of the whole stack: a real Label Studio 1.23.2, `asvp-backend serve` on Redis and a real
rq worker, all as processes.

`load`: /predict for 100 tasks from N concurrent clients for a fixed time while the worker runs
extraction and rounds (a feeder imports new tasks with labels into Label Studio every few seconds, so its
webhooks keep sync -> extract -> round going); /health is polled beside it. Reports the error rate,
latency percentiles, requests/s and which jobs ran during the window.

`parts`: one N-task project's first extraction with 1 worker, then with 2 workers and EXTRACT_PARTS=2 (the
extraction split into two jobs that the workers run at once); the wall time from the first extract job's
start to the last extraction job's end, and the ratio.

`scale`: an N-task project end to end: import into Label Studio, sync, extract, round (with the push of
PUSH_TOP_K predictions); the time of each step and the peak RSS of each process tree (Label Studio, API,
worker and its forked work-horses), sampled from /proc.

Images are tiny PNGs on disk, served to the backend through LOCAL_FILES_DOCUMENT_ROOT (the
/data/local-files/ URLs Label Studio's local storage uses), and extracted at IMAGE_SIZE (default 32 px):
the flow and the bookkeeping are measured, not the backbone at full size (see bench_extract.py for that).

    python bench/bench_load.py load --duration 60 --clients 20
    python bench/bench_load.py scale --tasks 100000
    python bench/bench_load.py parts --tasks 20000
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_api import percentile  # noqa: E402

from tests.conftest import backend_env, start_backend, start_worker  # noqa: E402
from tests.helpers import IMAGE_CONFIG, LabelStudioAPI, free_port, png_bytes, wait_for  # noqa: E402
from tests.processes import Process, start_label_studio  # noqa: E402

LABELS = ("cat", "dog")


# ------------------------------------------------------------------------------------------- memory
def _tree(pid: int) -> list[int]:
    """pid and every descendant (from /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo.extend(int(c) for c in (task / "children").read_text().split())
    return out


def _hwm_kib(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return int(status.split("VmHWM:")[1].split()[0]) if "VmHWM:" in status else 0


class PeakRSS(threading.Thread):
    """Samples the peak RSS (VmHWM) of every process in each named tree every `interval` seconds. The peak
    of a tree is its largest single process (the rq work-horse is forked per job, so its own VmHWM counts
    while it lives; the last `interval` of a work-horse's life can be missed)."""

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.roots: dict[str, int] = {}
        self.peaks: dict[str, int] = {}
        self.interval = interval
        self._halt = threading.Event()

    def watch(self, name: str, pid: int) -> None:
        self.roots[name] = pid

    def sample(self) -> None:
        for name, root in list(self.roots.items()):
            peak = max((_hwm_kib(p) for p in _tree(root)), default=0)
            self.peaks[name] = max(self.peaks.get(name, 0), peak)

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def stop(self) -> dict[str, float]:
        self._halt.set()
        self.sample()
        return {name: kib / 1024 for name, kib in self.peaks.items()}


# -------------------------------------------------------------------------------------------- stack
class Stack:
    """Label Studio + API + one rq worker, each its own process, in a temporary directory."""

    def __init__(self, redis_url: str, image_size: int, extra_env: dict[str, str]) -> None:
        import redis

        self.tmp = Path(tempfile.mkdtemp(prefix="asvp-bench-load-"))
        self.redis_url = redis_url
        redis.Redis.from_url(redis_url).flushdb()  # our own db only (never FLUSHALL)
        self.memory = PeakRSS()
        self.ls_server = start_label_studio(self.tmp / "ls")
        info = self.ls_server.info
        self.docroot = Path(info["docroot"])
        self.ls = LabelStudioAPI(info["url"], info["token"])
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {
            "REDIS_URL": redis_url,
            "MODEL_DIR": str(self.tmp / "models"),
            "LABEL_STUDIO_URL": info["url"],
            "LABEL_STUDIO_API_KEY": info["token"],
            "LOCAL_FILES_DOCUMENT_ROOT": str(self.docroot),
            "IMAGE_SIZE": str(image_size),
            "EXTRACT_WORKERS": "0",
            "DEVICE": "cpu",
            "LOG_LEVEL": "warning",
            **extra_env,
        }
        self.backend: Process | None = None
        self.workers: list[Process] = []
        self.memory.watch("Label Studio", self.ls_server.process.proc.pid)
        self.memory.start()

    def start_backend(self, split_queues: bool = False, workers: int = 1) -> None:
        """The API and `workers` workers on both queues, or (split_queues) one worker per queue, so that a round
        (cpu) and an extraction (gpu) can run at the same time."""
        (self.tmp / "backend").mkdir(exist_ok=True)
        self.backend = start_backend(self.tmp / "backend", self.port, **self.env)
        self.memory.watch("API (asvp-backend serve)", self.backend.proc.pid)
        for number, queues in enumerate(["cpu", "gpu"] if split_queues else ["cpu,gpu"] * workers):
            name = f"worker-{queues.replace(',', '-')}" + (f"-{number}" if workers > 1 else "")
            if split_queues:
                args = [sys.executable, "-m", "asvp_backend", "worker", "--queues", queues]
                worker = Process(name, args, backend_env(**self.env), self.tmp / "backend")
            else:
                worker = start_worker(self.tmp / "backend", name, **self.env)
            self.workers.append(worker)
            self.memory.watch(f"{name} (rq, with its work-horses)", worker.proc.pid)

    def stop(self) -> None:
        for proc in (*self.workers, self.backend, self.ls_server.process):
            if proc is not None:
                proc.stop()

    def jobs(self, pid: int) -> list[dict]:
        return requests.get(f"{self.base}/jobs", params={"project": pid}, timeout=30).json()["jobs"]

    def state(self, pid: int) -> dict:
        return requests.get(f"{self.base}/projects/{pid}", timeout=30).json()

    def worker_log(self) -> str:
        return "\n".join(worker.log()[-3000:] for worker in self.workers)


def write_images(docroot: Path, start: int, count: int, size: int = 32) -> None:
    """`count` PNG files images/<i>.png, drawn from 64 distinct class-coloured images (even: red, odd: blue)."""
    pool = [png_bytes(seed, size) for seed in range(64)]
    folder = docroot / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        (folder / f"{i}.png").write_bytes(pool[i % 64])


def task_json(i: int, labelled: bool) -> dict:
    task: dict = {"data": {"image": f"/data/local-files/?d=images/{i}.png"}}
    if labelled:
        label = LABELS[i % 2]
        task["annotations"] = [{"result": [{"from_name": "label", "to_name": "image", "type": "choices",
                                            "value": {"choices": [label]}}]}]
    return task


def import_tasks(ls: LabelStudioAPI, pid: int, start: int, count: int, labelled: int, chunk: int = 10_000) -> None:
    """Tasks start..start+count; the first `labelled` of them with an annotation (imported with the task)."""
    for offset in range(0, count, chunk):
        batch = [task_json(start + offset + j, offset + j < labelled) for j in range(min(chunk, count - offset))]
        ls.call("POST", f"/api/projects/{pid}/import", json=batch)


def connect(stack: Stack, title: str) -> int:
    pid = stack.ls.call("POST", "/api/projects", json={"title": title, "label_config": IMAGE_CONFIG})["id"]
    return pid


def attach_backend(stack: Stack, pid: int) -> None:
    stack.ls.call("POST", "/api/ml", json={"url": stack.base, "project": pid, "title": "asvp"})


def queue_job(stack: Stack, pid: int, kind: str) -> None:
    response = requests.post(f"{stack.base}/projects/{pid}/jobs", json={"kind": kind}, timeout=30)
    response.raise_for_status()


def wait_idle(stack: Stack, pid: int, timeout: float, need_round: int = 1, fail_fast: bool = True) -> list[dict]:
    """Until no job of the project waits or runs and at least `need_round` rounds exist; fails on a failed job
    (unless not fail_fast: /jobs can report a running job as failed while its lease lapses under CPU starvation,
    and then as finished)."""

    def idle():
        jobs = stack.jobs(pid)
        failed = [j for j in jobs if j["status"] == "failed"]
        if failed and fail_fast:
            raise AssertionError(f"failed jobs: {failed}\n{stack.worker_log()}")
        busy = [j for j in jobs if j["status"] in {"queued", "deferred", "scheduled", "started"}
                or (j["status"] == "failed" and not j["ended_at"])]
        rounds = len(stack.state(pid).get("rounds", []))
        return jobs if not busy and rounds >= need_round else None

    return wait_for(idle, timeout=timeout, interval=2, what="the project's jobs to finish")


def host_line() -> str:
    load = os.getloadavg()
    return (f"{platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}, load average at start "
            f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def lat_row(name: str, samples: list[float], errors: int, seconds: float) -> str:
    if not samples:
        return f"| {name} | 0 | {errors} | - | - | - | - | - | - |"
    total = len(samples) + errors
    return (f"| {name} | {total} | {errors} ({errors / total:.2%}) | {statistics.median(samples):.1f} "
            f"| {percentile(samples, 90):.1f} | {percentile(samples, 99):.1f} | {max(samples):.1f} "
            f"| {len(samples) / seconds:.1f} |")


# -------------------------------------------------------------------------------------------- parts
def _activated(stack: Stack, pid: int) -> bool:
    return any(j["kind"] == "extract" and (j["result"] or {}).get("activated") for j in stack.jobs(pid))


def run_parts(args: argparse.Namespace) -> int:
    """The same project extracted by each configuration in turn, each in a fresh stack."""
    header = host_line()
    configs = [("1 worker, EXTRACT_PARTS=1", 1, {}),
               ("2 workers, EXTRACT_PARTS=2", 2, {"EXTRACT_PARTS": "2"}),
               ("2 workers, EXTRACT_PARTS=2, OMP_NUM_THREADS=1 each", 2,
                {"EXTRACT_PARTS": "2", "OMP_NUM_THREADS": "1"})]
    rows = []
    for name, workers, env in configs:
        stack = Stack(args.redis_url, args.image_size, {"EXTRACT_BATCH_SIZE": str(args.batch_size), **env})
        try:
            write_images(stack.docroot, 0, args.tasks)
            pid = connect(stack, f"parts bench, {workers} workers")
            import_tasks(stack.ls, pid, 0, args.tasks, labelled=0)
            stack.start_backend(workers=workers)
            attach_backend(stack, pid)
            wait_for(functools.partial(_activated, stack, pid), timeout=args.timeout, interval=2,
                     what="the extraction")
            jobs = wait_idle(stack, pid, timeout=args.timeout, need_round=0)
            extraction = [j for j in jobs if j["kind"].partition(":")[0] in {"extract", "extract_part"}
                          and j["status"] == "finished"]
            wall = max(j["ended_at"] for j in extraction) - min(j["started_at"] for j in extraction)
            extracted = sum((j["result"] or {}).get("extracted", 0) for j in extraction)
            cached = max((j["result"] or {}).get("cached", 0) for j in extraction if j["kind"] == "extract")
            rows.append((name, wall, extracted, cached, len(extraction)))
            print(f"{name}: {wall:.1f} s, {extracted} extracted, {cached} cached", file=sys.stderr)
            start = min(j["started_at"] for j in extraction)
            for job in sorted(extraction, key=lambda j: j["started_at"]):  # the timeline, for the reader
                took = job["ended_at"] - job["started_at"]
                print(f"  {job['kind']:16} +{job['started_at'] - start:6.1f} s  {took:6.1f} s  "
                      f"extracted {(job['result'] or {}).get('extracted')}", file=sys.stderr)
        finally:
            stack.stop()
    print(f"### One project's first extraction, {args.tasks} tasks ({header})\n")
    print(f"Tiny 32x32 PNG files read through LOCAL_FILES_DOCUMENT_ROOT, IMAGE_SIZE={args.image_size}, "
          f"EXTRACT_BATCH_SIZE={args.batch_size}, EXTRACT_WORKERS=0, tf_efficientnet_lite0 on the CPU; each "
          "configuration in a fresh stack (Label Studio, API, workers), one after the other.\n")
    print("| configuration | extraction wall s | images/s | ratio to 1 worker | jobs | vectors |")
    print("|---|---|---|---|---|---|")
    base = rows[0][1]
    for name, wall, extracted, cached, count in rows:
        print(f"| {name} | {wall:.1f} | {extracted / wall:.0f} | {base / wall:.2f} | {count} | {cached} |")
    return 0


# --------------------------------------------------------------------------------------------- load
def run_load(args: argparse.Namespace) -> int:
    header = host_line()
    stack = Stack(args.redis_url, args.image_size, {"RETRAIN_EVERY": str(args.retrain_every),
                                                    "EXTRACT_SLICE_SECONDS": "10"})
    try:
        pid = connect(stack, "load bench")
        write_images(stack.docroot, 0, args.tasks + args.feeds * args.feed_tasks)
        import_tasks(stack.ls, pid, 0, args.tasks, labelled=args.labels)
        stack.start_backend(split_queues=True)
        attach_backend(stack, pid)
        queue_job(stack, pid, "sync")
        wait_idle(stack, pid, timeout=900)
        task_ids = sorted(t["id"] for t in stack.ls.call(
            "GET", "/api/tasks", params={"project": pid, "page_size": 100, "fields": "task_only"})["tasks"])
        tasks = [{"id": tid, "data": {"image": "x"}, "annotations": [], "predictions": []} for tid in task_ids[:100]]
        body = {"tasks": tasks, "project": f"{pid}.1700000000", "label_config": IMAGE_CONFIG, "params": {}}

        stop = threading.Event()
        predict_ms: list[float] = []
        health_ms: list[float] = []
        errors = {"predict": 0, "health": 0}
        error_samples: list[str] = []
        lock = threading.Lock()

        def client() -> None:
            session = requests.Session()
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    response = session.post(f"{stack.base}/predict", json=body, timeout=30)
                    ok = response.status_code == 200 and len(response.json()["results"]) == len(tasks)
                    problem = f"{response.status_code} {response.text[:200]}"
                except requests.RequestException as exc:
                    ok, problem = False, repr(exc)
                elapsed = (time.perf_counter() - started) * 1000
                with lock:
                    if ok:
                        predict_ms.append(elapsed)
                    else:
                        errors["predict"] += 1
                        error_samples.append(problem)

        def health() -> None:
            session = requests.Session()
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    ok = session.get(f"{stack.base}/health", timeout=30).ok
                except requests.RequestException:
                    ok = False
                if ok:
                    health_ms.append((time.perf_counter() - started) * 1000)
                else:
                    errors["health"] += 1
                time.sleep(0.1)

        fed: list[float] = []

        def feeder() -> None:
            """New tasks with labels every feed_every seconds (sync -> extract on the gpu worker) and a round on
            the cpu worker behind the sync (deduplicated with a waiting one), so both run in the window."""
            start = args.tasks
            for _ in range(args.feeds):
                if stop.wait(0 if not fed else args.feed_every):
                    return
                import_tasks(stack.ls, pid, start, args.feed_tasks, labelled=args.feed_labels)
                queue_job(stack, pid, "sync")  # as the webhook would; deduplicated with a waiting one
                queue_job(stack, pid, "round")  # behind that sync on the cpu queue: due once it saw the labels
                fed.append(time.time())
                start += args.feed_tasks

        window_start = time.time()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        threads += [threading.Thread(target=health), threading.Thread(target=feeder)]
        for thread in threads:
            thread.start()
        time.sleep(args.duration)
        stop.set()
        for thread in threads:
            thread.join()
        window_end = time.time()
        seconds = window_end - window_start
        jobs = stack.jobs(pid)
        during = [j for j in jobs if j["started_at"] and j["started_at"] < window_end
                  and (j["ended_at"] or window_end) > window_start]
        drain = time.perf_counter()
        print(f"(window over; {len(predict_ms)} /predict ok, {errors['predict']} errors)", flush=True)
        wait_idle(stack, pid, timeout=args.drain_timeout, fail_fast=False)
        drain_s = time.perf_counter() - drain
        state = stack.state(pid)
        memory = stack.memory.stop()

        print(f"### /predict under load while extraction and rounds run ({header})\n")
        print(f"{args.clients} clients, each sending /predict for the same 100 tasks back to back for "
              f"{seconds:.0f} s; /health polled every 100 ms by one more client. Meanwhile {len(fed)} imports of "
              f"{args.feed_tasks} tasks ({args.feed_labels} labelled) every {args.feed_every:.0f} s into a project "
              f"of {args.tasks} tasks, and a round queued with each import; one rq worker on the cpu queue (sync, "
              f"round) and one on the gpu queue (extract); RETRAIN_EVERY={args.retrain_every}, "
              f"IMAGE_SIZE={args.image_size}.\n")
        print("| request | n | errors | p50 ms | p90 ms | p99 ms | max ms | req/s |\n|---|---|---|---|---|---|---|---|")
        print(lat_row(f"POST /predict (100 tasks, {args.clients} clients)", predict_ms, errors["predict"], seconds))
        print(lat_row("GET /health (beside it)", health_ms, errors["health"], seconds))
        kinds: dict[str, int] = {}
        busy: dict[str, float] = {}
        for job in during:
            kinds[job["kind"]] = kinds.get(job["kind"], 0) + 1
            overlap = min(job["ended_at"] or window_end, window_end) - max(job["started_at"], window_start)
            busy[job["kind"]] = busy.get(job["kind"], 0.0) + overlap
        print("\n| job kind | jobs running in the window | seconds of the window spent in it |\n|---|---|---|")
        for kind in sorted(kinds):
            print(f"| {kind} | {kinds[kind]} | {busy[kind]:.0f} |")
        jobs = stack.jobs(pid)
        failed = [j for j in jobs if j["status"] == "failed"]
        rounds = state.get("rounds", [])
        print(f"\nAfter the window: {len(rounds)} rounds, last one on {rounds[-1]['labelled'] if rounds else 0} labels "
              f"(expected {args.labels + len(fed) * args.feed_labels}); failed jobs: {len(failed)}; the queued work "
              f"drained {drain_s:.0f} s after the window.")
        print("Peak RSS (MiB): " + ", ".join(f"{name} {mib:.0f}" for name, mib in memory.items()) + ".")
        if error_samples:
            print("\nFirst errors: " + "; ".join(error_samples[:5]))
        return 1 if errors["predict"] or errors["health"] or failed else 0
    finally:
        stack.stop()


# -------------------------------------------------------------------------------------------- scale
def run_scale(args: argparse.Namespace) -> int:
    header = host_line()
    stack = Stack(args.redis_url, args.image_size, {"PUSH_TOP_K": str(args.push_top_k),
                                                    "EXTRACT_BATCH_SIZE": str(args.batch_size),
                                                    "RETRAIN_EVERY": str(args.retrain_every)})
    steps: dict[str, float] = {}
    try:
        clock = time.perf_counter()
        write_images(stack.docroot, 0, args.tasks)
        steps["write the PNG files (bench set-up, not the system)"] = time.perf_counter() - clock
        pid = connect(stack, "scale bench")
        clock = time.perf_counter()
        import_tasks(stack.ls, pid, 0, args.tasks, labelled=args.labels)
        steps[f"import {args.tasks} tasks ({args.labels} with a label) into Label Studio"] = time.perf_counter() - clock
        stack.start_backend()
        attach_backend(stack, pid)
        clock = time.perf_counter()
        queue_job(stack, pid, "sync")
        jobs = wait_idle(stack, pid, timeout=args.timeout)
        steps["whole chain: sync -> extract -> round (wall)"] = time.perf_counter() - clock
        memory = stack.memory.stop()
        state = stack.state(pid)

        def span(kind: str) -> tuple[float, int]:
            chosen = [j for j in jobs if j["kind"] == kind and j["status"] == "finished"]
            return sum(j["ended_at"] - j["started_at"] for j in chosen), len(chosen)

        print(f"### {args.tasks}-task project end to end against Label Studio 1.23.2 ({header})\n")
        print(f"Tiny {32}x{32} PNG files read through LOCAL_FILES_DOCUMENT_ROOT, IMAGE_SIZE={args.image_size}, "
              f"EXTRACT_BATCH_SIZE={args.batch_size}, EXTRACT_WORKERS=0, PUSH_TOP_K={args.push_top_k}, "
              f"tf_efficientnet_lite0 on the CPU; Label Studio on SQLite.\n")
        print("| step | seconds | jobs |\n|---|---|---|")
        for name, seconds in steps.items():
            if name.startswith("whole"):
                continue
            print(f"| {name} | {seconds:.1f} | |")
        for kind in ("sync", "extract", "round", "rescore"):
            seconds, count = span(kind)
            if count:
                print(f"| {kind} (job time, summed over its jobs) | {seconds:.1f} | {count} |")
        for name, seconds in steps.items():
            if name.startswith("whole"):
                print(f"| {name} | {seconds:.1f} | |")
        rounds = state.get("rounds", [])
        last = rounds[-1] if rounds else {}
        timings = ", ".join(f"{k} {v:.1f} s" for k, v in (last.get("timings") or {}).items()
                            if isinstance(v, int | float))
        print(f"\nRound: {last.get('version')} on {last.get('labelled')} labels, pool {last.get('pool')}, "
              f"{last.get('pushed')} predictions pushed; its own timings: {timings or '-'}.")
        print("\n| process | peak RSS MiB |\n|---|---|")
        for name, mib in memory.items():
            print(f"| {name} | {mib:.0f} |")
        if args.annotate or args.burst:
            annotation_latency(stack, pid, args)
        return 0
    finally:
        stack.stop()


def annotation_latency(stack: Stack, pid: int, args: argparse.Namespace) -> None:
    """Annotations made through Label Studio's API after the chain: the time until the backend's state records
    each (its webhook, the sync's targeted read), a burst from several annotators, and a full reconcile."""
    page = stack.ls.call("GET", "/api/tasks", params={"project": pid, "page": 2, "page_size": args.labels,
                                                      "fields": "task_only"})
    free = [int(t["id"]) for t in (page.get("tasks", []) if isinstance(page, dict) else page)]
    assert len(free) >= args.annotate + args.burst, "not enough unlabelled tasks on the second page"
    stack.memory = PeakRSS()
    for name, proc in (("API (asvp-backend serve)", stack.backend.proc), *(
            (f"{w.name} (rq, with its work-horses)", w.proc) for w in stack.workers)):
        stack.memory.watch(name, proc.pid)
    stack.memory.start()

    def labelled() -> int:
        return int((stack.state(pid).get("last_sync") or {}).get("labelled") or 0)

    def annotate(tid: int) -> None:
        result = [{"from_name": "label", "to_name": "image", "type": "choices",
                   "value": {"choices": [LABELS[tid % 2]]}}]
        stack.ls.call("POST", f"/api/tasks/{tid}/annotations", json={"result": result})

    def until(count: int, started: float) -> float:
        wait_for(lambda: labelled() >= count, timeout=args.timeout, interval=0.05, what=f"{count} labels")
        return time.perf_counter() - started

    singles, phases = [], []
    for tid in free[: args.annotate]:
        before = labelled()
        started, wall = time.perf_counter(), time.time()
        annotate(tid)
        posted = time.time()
        singles.append(until(before + 1, started))
        phases.append(_phases(stack, pid, wall, posted, wall + singles[-1]))
    burst_tasks = free[args.annotate : args.annotate + args.burst]
    before = labelled()
    started = time.perf_counter()
    annotators = 5
    threads = [threading.Thread(target=lambda part=burst_tasks[k::annotators]: [annotate(t) for t in part])
               for k in range(annotators)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    submitted = time.perf_counter() - started
    burst_all = until(before + len(burst_tasks), started)
    wait_idle(stack, pid, timeout=args.timeout, fail_fast=False)
    syncs = [j for j in stack.jobs(pid) if j["kind"] == "sync" and j["status"] == "finished"]
    targeted = [j for j in syncs if (j.get("result") or {}).get("read") == "targeted"]
    queued_at = time.time()
    queue_job(stack, pid, "sync")  # from the status page: a reconcile, in slices (one sync job each)
    clock = time.perf_counter()
    jobs = wait_idle(stack, pid, timeout=args.timeout, fail_fast=False)
    slices = [j for j in jobs if j["kind"] == "sync" and (j.get("started_at") or 0) >= queued_at
              and (j.get("result") or {}).get("read") in ("reconcile", "full")]
    reconcile = sum(j["ended_at"] - j["started_at"] for j in slices) if slices else float("nan")
    reconcile_wall = time.perf_counter() - clock
    memory = stack.memory.stop()
    print(f"\n### An annotation to the backend's state, {args.tasks}-task project (targeted sync)\n")
    print("Each annotation is made through Label Studio's API; its webhook reaches `/webhook`, the sync re-reads "
          "the task it names, and the time runs until `GET /projects/N` shows the new label count (polled every "
          f"50 ms). RETRAIN_EVERY={args.retrain_every}, so no round runs in between (with one worker a round of a "
          "project this size holds the queue for about a minute; see the chain above).\n")
    print("| measure | seconds |\n|---|---|")
    print(f"| one annotation to the state: median of {len(singles)} | {statistics.median(singles):.2f} |")
    print(f"| one annotation to the state: max of {len(singles)} | {max(singles):.2f} |")
    print(f"| a burst of {len(burst_tasks)} annotations from {annotators} annotators: all sent | {submitted:.2f} |")
    print(f"| the same burst: all {len(burst_tasks)} in the state | {burst_all:.2f} |")
    print(f"| reconcile: every task read again, job time summed over its {len(slices)} slices | {reconcile:.1f} |")
    print(f"| reconcile (wall, queued from the status page) | {reconcile_wall:.1f} |")
    known = [p for p in phases if p is not None]
    if known:
        print(f"\nWhere one annotation's time goes (medians of the {len(known)} single annotations whose sync job "
              "was found; clocks of one machine):\n")
        print("| phase | seconds |\n|---|---|")
        for name in PHASES:
            print(f"| {name} | {statistics.median(p[name] for p in known):.2f} |")
    print(f"\nSync jobs that served the {len(singles) + len(burst_tasks)} annotations: {len(targeted)} targeted "
          f"reads of {sum((j.get('result') or {}).get('tasks_read', 0) for j in targeted)} tasks in all.")
    print("Peak RSS during these (MiB): " + ", ".join(f"{name} {mib:.0f}" for name, mib in memory.items()) + ".")


PHASES = ("Label Studio's annotation request (POST, until it answers)",
          "its answer to the sync job queued (the webhook's hop)",
          "queued to started (the queue, rq's work-horse)",
          "the sync job: read the task, save the snapshot and the state",
          "the sync job: queue what follows (features, rounds, rescore)",
          "the sync job: the rest (lease, fencing, rq's bookkeeping)",
          "the job's end to the state seen (polled every 50 ms)")


def _phases(stack: Stack, pid: int, sent: float, answered: float, seen: float) -> dict[str, float] | None:
    """The annotation's time in phases, from the first sync job queued after it was sent (None: not found)."""
    syncs = sorted((j for j in stack.jobs(pid) if j["kind"] == "sync" and (j.get("enqueued_at") or 0) >= sent
                    and j.get("started_at") and j.get("ended_at")), key=lambda j: j["enqueued_at"])
    if not syncs:
        return None
    job = syncs[0]
    timings = (job.get("result") or {}).get("timings") or {}
    read, follow = float(timings.get("read_and_save", 0.0)), float(timings.get("follow_up", 0.0))
    points = (sent, answered, job["enqueued_at"], job["started_at"], job["started_at"] + read,
              job["started_at"] + read + follow, job["ended_at"], seen)
    return {name: points[k + 1] - points[k] for k, name in enumerate(PHASES)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12", help="a Redis db of its own (flushed)")
    parser.add_argument("--image-size", type=int, default=32, help="IMAGE_SIZE of the backbone")
    modes = parser.add_subparsers(dest="mode", required=True)
    load = modes.add_parser("load", help="/predict under concurrent clients while extraction and rounds run")
    load.add_argument("--tasks", type=int, default=2000, help="tasks in the project before the window")
    load.add_argument("--labels", type=int, default=40, help="labelled tasks among them")
    load.add_argument("--clients", type=int, default=20)
    load.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    load.add_argument("--feeds", type=int, default=6, help="imports of new tasks during the window")
    load.add_argument("--feed-every", type=float, default=10.0, help="seconds between imports")
    load.add_argument("--feed-tasks", type=int, default=500, help="tasks per import")
    load.add_argument("--feed-labels", type=int, default=20, help="labelled tasks per import")
    load.add_argument("--retrain-every", type=int, default=10)
    load.add_argument("--drain-timeout", type=float, default=1200, help="seconds to wait for the jobs after it")
    scale = modes.add_parser("scale", help="an N-task project synced, extracted and ranked end to end")
    scale.add_argument("--tasks", type=int, default=100_000)
    scale.add_argument("--labels", type=int, default=200)
    scale.add_argument("--push-top-k", type=int, default=2000)
    scale.add_argument("--batch-size", type=int, default=256, help="EXTRACT_BATCH_SIZE")
    scale.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the chain")
    scale.add_argument("--annotate", type=int, default=20, help="single annotations timed after the chain")
    scale.add_argument("--burst", type=int, default=100, help="annotations in the burst (5 annotators)")
    scale.add_argument("--retrain-every", type=int, default=100_000,
                       help="RETRAIN_EVERY (high: the annotations are timed without rounds in between)")
    parts = modes.add_parser("parts", help="one project's extraction by 1 worker, then by 2 (EXTRACT_PARTS=2)")
    parts.add_argument("--tasks", type=int, default=20_000)
    parts.add_argument("--batch-size", type=int, default=64, help="EXTRACT_BATCH_SIZE")
    parts.add_argument("--timeout", type=float, default=1800, help="seconds to wait for each extraction")
    args = parser.parse_args()
    return {"load": run_load, "scale": run_scale, "parts": run_parts}[args.mode](args)


if __name__ == "__main__":
    raise SystemExit(main())
