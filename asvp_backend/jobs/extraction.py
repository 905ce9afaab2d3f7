"""The `extract` and `extract_part` jobs: cache one feature vector per task of the project in the current
generation.

Runs on the gpu queue (and on a CPU when that is all there is). Only tasks that lack a vector are sent
through the backbone, and vectors are appended shard by shard, so an interrupted run resumes where it
stopped. Deleted tasks are dropped from the index; images that cannot be read are recorded with a reason.

Several workers share a large extraction (EXTRACT_PARTS > 1): the `extract` job splits the missing tasks by
task id into `extract_part:<k>` jobs, which append to the same generation at once (the store takes one flock
per generation for each write). Only the `extract` job, under the project's one `gpu` lease, drops, compacts
and activates; each part queues it when its share is done, and the run that finds nothing missing makes the
generation current. So a generation becomes visible once, complete, whoever extracted its vectors.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from asvp_backend.features.store import FeatureGeneration, FeatureStore
from asvp_backend.jobs.alignment import serve_generation
from asvp_backend.jobs.chain import after_extraction
from asvp_backend.jobs.context import JobContext
from asvp_backend.jobs.registry import slot_of, slotted
from asvp_backend.jobs.resources import loader_workers
from asvp_backend.state import SyncedTask

log = logging.getLogger(__name__)

COMPACT_ABOVE_SHARDS = 16
EXTRACT_PART = "extract_part"  # the slotted job kind of one part of a split extraction
SPLIT_MIN_TASKS = 2000  # fewer missing tasks are extracted by one job (EXTRACT_PARTS > 1 or not)


def _target_generation(store: FeatureStore, backbone: Any) -> tuple[FeatureGeneration, bool]:
    """The generation to fill: the current one if the backbone still matches it; otherwise a newer one
    (resumed when an interrupted run left it behind) that becomes current only once it is complete, so
    the old generation keeps serving meanwhile."""
    from asvp_backend.features import generation_info, matches

    current = store.current()
    if current is not None and matches(current.info, backbone):
        return current, False
    floor = -1 if current is None else current.info.generation
    resumable = [g for g in store.generations() if g > floor and matches(store.generation(g).info, backbone)]
    if resumable:
        return store.generation(resumable[-1]), True
    return store.create_generation(generation_info(backbone, store.next_generation())), True


def extract_project(ctx: JobContext, retry_skipped: bool = False) -> dict[str, Any]:
    """Bring the project's current feature generation up to date with its synced tasks, for at most
    EXTRACT_SLICE_SECONDS (the summary's `remaining` says how many tasks are left for the next slice).
    A large extraction is split instead (`parts` in the summary): this job queues the part jobs and
    extracts nothing itself; the last part queues this job again, which activates the generation."""
    runtime, pid, project = ctx.runtime, ctx.project_id, ctx.project
    settings = runtime.settings
    tasks = project.tasks()  # StateCorrupt if unreadable: never "no tasks"
    store = project.features()
    repaired = store.repair()  # a corrupt CURRENT, manifest or shard: drop what is lost, re-extract it below
    backbone = project.backbone()

    generation, new_generation = _target_generation(store, backbone)
    ctx.check_fence()  # a job whose lease was lost writes nothing more (jobs/fencing.py)
    dropped = generation.drop([tid for tid in generation.task_ids().tolist() if tid not in tasks])
    if retry_skipped:
        generation.clear_skips()
    unusable = {tid: task.problem for tid, task in tasks.items() if task.problem and tid not in generation.skipped()}
    if unusable:
        generation.record_skips(unusable)  # a task whose image value is no URL is skipped with its reason
    missing = _missing(generation, tasks)
    summary: dict[str, Any] = {"generation": generation.info.generation, "backbone": backbone.name,
                               "weights": backbone.weights_source, "dropped": dropped,
                               "repaired": [str(p) for p in getattr(repaired, "problems", [])]}
    shares = _split(ctx, missing)
    if shares:
        for part, share in shares.items():
            runtime.queue.submit(slotted(EXTRACT_PART, part), pid, reason=f"{len(share)} of {len(missing)} tasks",
                                 parts=settings.extract_parts, generation=generation.info.generation,
                                 force_round=bool(ctx.params.get("force_round")))
        log.info("project %s: %s tasks to extract, split into parts %s", pid, len(missing), sorted(shares))
        return {**summary, "activated": False, "gate": None, "extracted": 0, "remaining": len(missing),
                "parts": {str(part): len(share) for part, share in shares.items()}, "cached": len(generation)}
    report = _extract(ctx, backbone, generation, tasks, missing, endless=bool(ctx.params.get("no_time_slice")))
    if generation.shard_count() > COMPACT_ABOVE_SHARDS:
        generation.compact()  # one shard reads back as a zero-copy memory map in every round
    activated, verdict = False, None
    if new_generation and not report.remaining:  # a new generation serves only once it is complete
        activated, verdict = serve_generation(ctx, store, generation)
    summary.update({
        "activated": activated,
        "gate": verdict.to_dict() if verdict is not None else None,
        "extracted": report.extracted,
        "remaining": report.remaining,
        "skipped": len(report.skipped) + len(unusable),
        "skip_reasons": {str(tid): why for tid, why in list({**unusable, **report.skipped}.items())[:20]},
        "cached": len(generation),
        "seconds": round(report.seconds, 3),
        "images_per_second": round(report.images_per_second, 1),
    })
    log.info("project %s: extracted %s, skipped %s, cached %s, %s left for the next slice", pid, report.extracted,
             summary["skipped"], len(generation), report.remaining)
    return summary


def extract_share(ctx: JobContext) -> dict[str, Any]:
    """One part of a split extraction (`extract_part:<k>`): the generation's missing tasks whose id is k modulo
    `parts`, for one time slice. It writes vectors only; the generation is compacted and activated by the
    `extract` job that follows the last part. A part whose generation is no longer the one the project's
    backbone fills (a fine-tune made another) stops at once."""
    pid, project = ctx.project_id, ctx.project
    part, parts, number = slot_of(ctx.kind), int(ctx.params["parts"]), int(ctx.params["generation"])
    store = project.features()
    backbone = project.backbone()
    if number not in store.generations() or not _matches(store.generation(number), backbone):
        log.info("project %s: part %s of generation %s is stale; nothing to do", pid, part, number)
        return {"generation": number, "part": part, "stale": True, "extracted": 0, "remaining": 0}
    generation = store.generation(number)
    tasks = project.tasks()
    share = [tid for tid in _missing(generation, tasks) if tid % parts == part]
    ctx.check_fence()
    report = _extract(ctx, backbone, generation, tasks, share, endless=False)
    log.info("project %s: part %s/%s extracted %s, %s left", pid, part, parts, report.extracted, report.remaining)
    return {"generation": number, "part": part, "parts": parts, "extracted": report.extracted,
            "remaining": report.remaining, "skipped": len(report.skipped), "seconds": round(report.seconds, 3),
            "images_per_second": round(report.images_per_second, 1)}


def _missing(generation: FeatureGeneration, tasks: dict[int, SyncedTask]) -> list[int]:
    """Tasks with an image and neither a vector nor a recorded reason why they have none."""
    skipped = generation.skipped()
    with_image = [tid for tid, task in tasks.items() if task.image]
    return [tid for tid in generation.missing(with_image) if tid not in skipped]


def _split(ctx: JobContext, missing: list[int]) -> dict[int, list[int]]:
    """The parts' shares (task id modulo EXTRACT_PARTS) of a large extraction; none for a small one, which
    one job finishes before a second worker would have loaded its backbone. While parts of this project are
    queued or running, the missing tasks are theirs: splitting again (each part keeps at most one waiting
    job) is what keeps this job from extracting the same tasks beside them. Empty shares get no job."""
    parts = ctx.runtime.settings.extract_parts
    if parts <= 1 or not missing:
        return {}
    running = ctx.runtime.queue.active(ctx.project_id, frozenset(slotted(EXTRACT_PART, k) for k in range(parts)))
    if len(missing) < SPLIT_MIN_TASKS and running is None:
        return {}
    shares: dict[int, list[int]] = {}
    for tid in missing:
        shares.setdefault(tid % parts, []).append(tid)
    return dict(sorted(shares.items()))


def _matches(generation: FeatureGeneration, backbone: Any) -> bool:
    from asvp_backend.features import matches

    return bool(matches(generation.info, backbone))


def _extract(ctx: JobContext, backbone: Any, generation: FeatureGeneration, tasks: dict[int, SyncedTask],
             task_ids: list[int], endless: bool) -> Any:
    """Embed `task_ids` into `generation` until done or EXTRACT_SLICE_SECONDS (or the job's time) runs out."""
    from asvp_backend.features import extract_to_store

    settings = ctx.runtime.settings
    items = [(tid, str(tasks[tid].image)) for tid in task_ids]
    ctx.progress(0, len(items), stage="extracting", force=True)
    slice_end = time.monotonic() + settings.extract_slice_seconds
    report = extract_to_store(
        backbone,
        items,
        ctx.project.image_fetcher(),
        generation,
        batch_size=settings.extract_batch_size,
        num_workers=loader_workers(settings, backbone),
        progress=lambda done, total: ctx.progress(done, total, stage="extracting"),
        fetch_concurrency=settings.fetch_concurrency,
        should_stop=lambda: not endless and (time.monotonic() > slice_end or ctx.time_left() < 60),
    )
    ctx.progress(len(items), len(items), stage="done", force=True)
    return report


def extract(ctx: JobContext) -> dict[str, Any]:
    """Cache features for the project's tasks that lack them (and drop deleted tasks), one time slice."""
    runtime, pid = ctx.runtime, ctx.project_id
    force = bool(ctx.params.get("force_round"))
    # skipped images are retried once per request, not again in every slice or part that follows it
    summary = extract_project(ctx, retry_skipped=force and not ctx.params.get("continued"))
    if summary.get("parts"):
        summary["next"] = EXTRACT_PART  # the last part queues this job again
        return summary
    if summary.get("remaining"):
        # the slice ended: continue behind the other projects' jobs instead of holding the queue
        runtime.queue.submit("extract", pid, reason="continuing extraction", force_round=force, continued=True)
        summary["next"] = "extract"
        return summary
    summary["next"] = after_extraction(ctx, activated=bool(summary.get("activated")), force=force)
    return summary


def extract_part(ctx: JobContext) -> dict[str, Any]:
    """One part of a split extraction (EXTRACT_PARTS), one time slice; the last part queues `extract`."""
    summary = extract_share(ctx)
    if summary["remaining"]:
        ctx.runtime.queue.submit(ctx.kind, ctx.project_id, reason="continuing its share", **ctx.params)
        summary["next"] = ctx.kind
    else:
        ctx.runtime.queue.submit("extract", ctx.project_id, reason=f"{ctx.kind} is done", continued=True,
                                 force_round=bool(ctx.params.get("force_round")))
        summary["next"] = "extract"
    return summary
