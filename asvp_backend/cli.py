"""`asvp-backend`: serve the API, run workers, show status, cache features, force a feature update, export a
fine-tuned model and classify images with it, and replay active learning offline (`simulate`)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from asvp_backend import __version__
from asvp_backend.config import ConfigError, Settings, env_names
from asvp_backend.evaluation.command import add_simulate_parser
from asvp_backend.logs import configure_logging

log = logging.getLogger("asvp_backend")


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from asvp_backend.server.factory import APP_FACTORY

    if settings.workers > 1 and settings.embedded:
        print(f"WORKERS={settings.workers} needs REDIS_URL: without it each process would run its own job queue "
              "on the same files; use WORKERS=1, or set REDIS_URL and run `asvp-backend worker`", file=sys.stderr)
        return 2
    if settings.embedded and importlib.util.find_spec("torch") is None:  # the light `api` Docker image
        print("without REDIS_URL the API runs the jobs itself and needs torch, which this installation lacks: set "
              "REDIS_URL and run `asvp-backend worker` where torch is, or install requirements.txt", file=sys.stderr)
        return 2
    log.info(
        "serving on %s:%s with %s worker process(es) (%s)",
        args.host or settings.host,
        args.port or settings.port,
        settings.workers,
        "rq on Redis" if settings.redis_url else "embedded: in-process worker, state in MODEL_DIR",
    )
    uvicorn.run(
        APP_FACTORY,  # each worker process builds its own runtime (server/factory.py)
        factory=True,
        workers=settings.workers,
        host=args.host or settings.host,
        port=args.port or settings.port,
        log_level=settings.log_level,
        access_log=args.access_log,
        log_config=None,  # keep our handlers (and their secret filter) on uvicorn's loggers
    )
    return 0


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    if not settings.redis_url:
        print(
            "asvp-backend worker needs REDIS_URL (without it, `serve` runs jobs in-process)", file=sys.stderr
        )
        return 2
    from asvp_backend.bootstrap import build_runtime
    from asvp_backend.jobs.registry import QUEUES, preload
    from asvp_backend.jobs.worker import run_worker

    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    unknown = set(queues) - set(QUEUES)
    if unknown:
        print(f"unknown queue(s): {', '.join(sorted(unknown))}; use cpu and/or gpu", file=sys.stderr)
        return 2
    missing = preload()  # import the job code and its libraries once, before forking work-horses
    if missing:
        print(f"worker: not preloaded (each job imports them itself): {', '.join(missing)}", file=sys.stderr)
    run_worker(build_runtime(settings), queues, name=args.name, burst=args.burst, in_process=args.in_process)
    return 0


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from asvp_backend.bootstrap import build_runtime
    from asvp_backend.project_summary import ProjectSummary
    from asvp_backend.status_table import format_status

    runtime = build_runtime(settings, start_jobs=False)

    def project_jobs(project_id: int) -> list[dict[str, Any]]:  # embedded: they live in the serving process
        return [j.to_dict() for j in runtime.queue.jobs(project_id, limit=50)] if settings.redis_url else []

    try:
        states, corrupt = runtime.store.readable()
        projects: list[dict[str, Any]] = [
            ProjectSummary(settings, state).status(project_jobs(state.project_id)) for state in states
        ]
        projects += [{"project": pid, "problems": [problem]} for pid, problem in sorted(corrupt.items())]
        if settings.redis_url:
            jobs: Any = [j.to_dict() for j in runtime.queue.jobs(args.project, limit=args.jobs)]
        else:
            jobs = "embedded mode: jobs live in the serving process; see its GET /jobs"
        if args.project is not None:
            projects = [p for p in projects if p["project"] == args.project]
        report = {"settings": settings.redacted(), "projects": projects, "jobs": jobs}
        print(json.dumps(report, indent=2, default=str) if args.json else format_status(report))
    finally:
        runtime.close()
    return 0


class _ProgressBar:
    """A tqdm bar fed by a job's progress(done, total, stage) reports."""

    def __init__(self, description: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(desc=description, unit="img", dynamic_ncols=True)

    def __call__(self, progress: dict) -> None:
        self.bar.total = progress["total"]
        self.bar.n = progress["done"]
        self.bar.set_postfix_str(progress.get("stage", ""), refresh=True)

    def close(self) -> None:
        self.bar.close()


def cmd_extract(settings: Settings, args: argparse.Namespace) -> int:
    if (args.project is None) == (args.images is None):
        print("give exactly one of --project N or --images DIR", file=sys.stderr)
        return 2
    if args.images is not None:
        return _extract_images(settings, args)

    from asvp_backend.bootstrap import build_runtime
    from asvp_backend.jobs.context import JobContext
    from asvp_backend.jobs.extraction import extract_project
    from asvp_backend.jobs.sync import sync_tasks

    runtime = build_runtime(settings, start_jobs=False)
    try:
        if runtime.store.get(args.project) is None:
            print(f"project {args.project} is not set up: connect the backend to it in Label Studio first",
                  file=sys.stderr)
            return 2
        if not runtime.has_label_studio(args.project):
            print("extract --project needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY, or the token Label Studio "
                  "sends when it connects the project", file=sys.stderr)
            return 2
        bar = _ProgressBar(f"project {args.project}")
        ctx = JobContext("extract", args.project, "cli", {"no_time_slice": True, "whole": True,
                                                          "full_reason": "asvp-backend extract"}, runtime, reporter=bar)
        sync_summary = None
        if not args.no_sync:
            with _wait_for_lease(runtime, args.project, "sync"):
                sync_summary = sync_tasks(ctx)[0]
        with _wait_for_lease(runtime, args.project, "gpu"):  # never beside a worker's extraction or fine-tune
            summary = extract_project(ctx, retry_skipped=args.retry_skipped)
        bar.close()
        if settings.redis_url:  # workers rank with the new features; embedded: the serving process will
            summary["next"] = runtime.queue.submit("round", args.project, reason="extract from the CLI").job_id
        print(json.dumps({"sync": sync_summary, "extract": summary}, indent=2, default=str))
    finally:
        runtime.close()
    return 0


def _wait_for_lease(runtime: Any, project_id: int, kind: str) -> Any:
    """The job lease `kind` of the project (see JobKind.lease), waiting (with a message) while a worker's job
    holds it."""
    import time

    lease = runtime.lease(project_id, kind, f"cli-{kind}")
    told = False
    while not lease.acquire():
        if not told:
            print(f"waiting for the running {kind} job of project {project_id}...", file=sys.stderr)
            told = True
        time.sleep(1.0)
    return lease


def _extract_images(settings: Settings, args: argparse.Namespace) -> int:
    from pathlib import Path

    from asvp_backend.features import FeatureStore, extract_dir, generation_info
    from asvp_backend.jobs.resources import backbone_for, loader_workers
    from asvp_backend.layout import image_folder_store

    directory = Path(args.images)
    if not directory.is_dir():
        print(f"not a directory: {directory}", file=sys.stderr)
        return 2
    store = FeatureStore(Path(args.store) if args.store else image_folder_store(settings.model_dir, directory))
    backbone = backbone_for(settings)
    generation = store.current() or store.create_generation(generation_info(backbone, 0))
    from tqdm import tqdm

    bar = tqdm(desc=str(directory), unit="img", dynamic_ncols=True)

    def progress(done: int, total: int) -> None:
        bar.total, bar.n = total, done
        bar.refresh()

    report, files = extract_dir(backbone, directory, generation, batch_size=settings.extract_batch_size,
                                num_workers=loader_workers(settings, backbone), progress=progress)
    bar.close()
    if store.current_generation() is None:
        store.activate(generation.info.generation)
    print(json.dumps({"store": str(store.root), "files": len(files), "extracted": report.extracted,
                      "skipped": {str(files[i]): why for i, why in report.skipped.items()},
                      "images_per_second": round(report.images_per_second, 1)}, indent=2))
    return 0


def cmd_align(settings: Settings, args: argparse.Namespace) -> int:
    from asvp_backend.bootstrap import build_runtime
    from asvp_backend.jobs.alignment import force_update

    if not settings.redis_url:
        print("embedded mode: the serving process runs the jobs; ask it with curl -X POST -H "
              f"'Content-Type: application/json' http://localhost:9090/projects/{args.project}/align", file=sys.stderr)
        return 2
    runtime = build_runtime(settings, start_jobs=False)
    try:
        if runtime.store.get(args.project) is None:
            print(f"project {args.project} is not set up", file=sys.stderr)
            return 2
        print(json.dumps(force_update(runtime, args.project), indent=2, default=str))
    finally:
        runtime.close()
    return 0


EXPORT_WORSE = 3  # `export`'s exit status when the model lost to the proxy (and --even-if-worse was not given)


def cmd_export(settings: Settings, args: argparse.Namespace) -> int:
    from pathlib import Path

    from asvp_backend.alignment.export import WorseThanProxy, export_model
    from asvp_backend.alignment.summary import damaged_models
    from asvp_backend.bootstrap import build_runtime
    from asvp_backend.layout import ProjectLayout

    runtime = build_runtime(settings, start_jobs=False)
    try:
        state = runtime.store.get(args.project)
    finally:
        runtime.close()
    if state is None:
        print(f"project {args.project} is not set up", file=sys.stderr)
        return 2
    models = {m["id"]: m for m in state.alignment.models}
    alignment = state.alignment
    layout = ProjectLayout(settings.model_dir, args.project)
    damaged = damaged_models(layout, state)
    chosen = models.get(args.model) if args.model else alignment.newest_model(damaged)
    if chosen is None:
        whole = "whole " if damaged and not args.model else ""
        print(f"project {args.project} has no {whole}fine-tuned model{' ' + args.model if args.model else ''}: "
              "press Start Training in Label Studio (or wait for a feature update) first", file=sys.stderr)
        return 2
    source = layout.checkpoint_dir(chosen["id"])
    try:
        if chosen.get("verdict") == "proxy" and not args.even_if_worse:  # also checked on the checkpoint itself
            reason = (chosen.get("comparison") or {}).get("reason", "the proxy is the better model")
            raise WorseThanProxy(f"not exporting {chosen['id']}: {reason}. Label more and press Start Training "
                                 "again, or pass --even-if-worse to write it anyway")
        out = export_model(source, Path(args.out), {"project": args.project, "model_version": str(state.version)},
                           overwrite=args.force, even_if_worse=args.even_if_worse)
    except WorseThanProxy as exc:
        print(str(exc), file=sys.stderr)
        return EXPORT_WORSE
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        print(str(exc), file=sys.stderr)
        return 2
    comparison = chosen.get("comparison") or {}
    print(json.dumps({"model": chosen["id"], "out": str(out), "holdout_accuracy": chosen.get("holdout_accuracy"),
                      "method": chosen.get("method"), "labelled": chosen.get("labelled"),
                      "verdict": chosen.get("verdict"), "model_accuracy": comparison.get("model_accuracy"),
                      "proxy_accuracy": comparison.get("proxy_accuracy"), "n": comparison.get("n"),
                      "even_if_worse": chosen.get("verdict") == "proxy"}, indent=2))
    return 0


def cmd_predict(settings: Settings, args: argparse.Namespace) -> int:
    from pathlib import Path

    from asvp_backend.alignment.checkpoint import CheckpointError, classify_folder

    images, model = Path(args.images), Path(args.model)
    if not images.is_dir():
        print(f"not a directory: {images}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    bar = tqdm(desc=str(images), unit="img", dynamic_ncols=True)

    def progress(done: int, total: int) -> None:
        bar.total, bar.n = total, done
        bar.refresh()

    out = Path(args.out) if args.out else images / "predictions.csv"
    try:
        summary = classify_folder(model, images, out, batch_size=args.batch_size, device=args.device or settings.device,
                                  progress=progress)
    except CheckpointError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    finally:
        bar.close()
    print(json.dumps({"out": str(out), **summary}, indent=2, default=str))
    return 0


def cmd_simulate(settings: Settings, args: argparse.Namespace) -> int:
    from asvp_backend.evaluation.command import cmd_simulate as simulate

    return simulate(args)


COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    "align": cmd_align,
    "simulate": cmd_simulate,
    "export": cmd_export,
    "predict": cmd_predict,
    "extract": cmd_extract,
    "serve": cmd_serve,
    "worker": cmd_worker,
    "status": cmd_status,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asvp-backend",
        description="Label Studio ML backend that ranks the labelling queue by active learning (ASVP).",
        epilog="Configuration comes from environment variables: " + ", ".join(env_names()),
    )
    parser.add_argument("--version", action="version", version=f"asvp-backend {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP API Label Studio connects to")
    serve.add_argument("--host", default=None, help="bind address (default: HOST or 0.0.0.0)")
    serve.add_argument("--port", type=int, default=None, help="port (default: PORT or 9090)")
    serve.add_argument("--access-log", action="store_true", help="log every request")

    worker = sub.add_parser("worker", help="run an rq worker for the cpu and/or gpu queue (needs REDIS_URL)")
    worker.add_argument("--queues", default="cpu,gpu", help="comma-separated queues, in priority order")
    worker.add_argument("--name", default=None, help="worker name (default: rq's)")
    worker.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    worker.add_argument(
        "--in-process",
        action="store_true",
        help="run jobs in the worker process (keeps models loaded; use on GPU machines) instead of forking",
    )

    extract = sub.add_parser("extract", help="cache features now, with a progress bar (instead of waiting for a job)")
    extract.add_argument("--project", type=int, default=None, help="a Label Studio project this backend serves")
    extract.add_argument("--images", default=None, help="a folder of image files (ids = sorted file order)")
    extract.add_argument("--store", default=None, help="with --images: where to write (default MODEL_DIR/images/..)")
    extract.add_argument("--no-sync", action="store_true", help="with --project: use the last synced task list")
    extract.add_argument("--retry-skipped", action="store_true", help="try images that failed before again")

    align = sub.add_parser("align", help="fine-tune the backbone and refresh the project's features now (needs "
                           "REDIS_URL; embedded: POST /projects/N/align)")
    align.add_argument("--project", type=int, required=True, help="a Label Studio project this backend serves")

    export = sub.add_parser("export", help="write a project's fine-tuned model (safetensors, labels, preprocessing, "
                            "metrics) to a folder")
    export.add_argument("--project", type=int, required=True, help="a Label Studio project this backend serves")
    export.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    export.add_argument("--model", default=None, help="a model id from GET /projects/N/model (default: current)")
    export.add_argument("--force", action="store_true",
                        help="replace an earlier export in --out (never any other folder)")
    export.add_argument("--even-if-worse", action="store_true", help="write a model that lost to the proxy on the "
                        "same audit labels (held-out ones while they are too few; refused otherwise, exit status 3)")

    predict = sub.add_parser("predict", help="classify a folder of images with an exported model (CSV out)")
    predict.add_argument("--model", required=True, help="a folder written by `asvp-backend export`")
    predict.add_argument("--images", required=True, help="a folder of image files (searched recursively)")
    predict.add_argument("--out", default=None, help="CSV to write (default: IMAGES/predictions.csv)")
    predict.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    predict.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="default: DEVICE")

    add_simulate_parser(sub)

    status = sub.add_parser("status", help="show projects, learning curve, stopping signal and recent jobs")
    status.add_argument("--project", type=int, default=None, help="only this project")
    status.add_argument("--jobs", type=int, default=20, help="how many recent jobs to show")
    status.add_argument("--json", action="store_true", help="print the full report as JSON (for scripts)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    return COMMANDS[args.command](settings, args)


if __name__ == "__main__":
    raise SystemExit(main())
