"""The `finetune` and `align` jobs: fine-tune the backbone on the labelled tasks (never on audit labels), save the
checkpoint complete before it is named, and judge the model against the proxy on labels it did not train on.

`finetune` (Start Training) makes the deliverable model; `align` (the alignment trigger) then re-extracts every
feature with it into a new generation, which serves only once the gate adopts it (jobs/alignment.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from asvp_backend.alignment.policy import AlignmentPolicy, deliverable_rank
from asvp_backend.jobs.alignment import JUDGING, UNJUDGED, finish_pending, judge_against_proxy, judge_on_audit
from asvp_backend.jobs.context import JobContext, JobTimeout
from asvp_backend.state import PendingStage, ProjectState

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)


def run_finetune(ctx: JobContext) -> dict[str, Any]:
    """Fine-tune the backbone on the labelled tasks but the audit ones, judge it against the proxy on the audit
    labels (on its held-out slice while they are too few), save the checkpoint, record the model with the
    verdict; for a feature update, hand its backbone to the extract job (whatever the verdict: the update is
    about the features, not the deliverable). The deliverable may be trained with several methods
    (`AlignmentPolicy.deliverable_methods`), one after the other: each is recorded as soon as it is saved, and
    `deliverable_rank` names the deliverable among them. Returns the best-ranked model's record."""
    runtime, pid, project = ctx.runtime, ctx.project_id, ctx.project
    settings = runtime.settings
    purpose = "align" if ctx.kind == "align" else "deliverable"  # two kinds, so one never swallows the other
    state = project.state()
    policy = AlignmentPolicy.from_settings(settings)
    if ctx.params.get("methods"):
        methods = [str(m) for m in ctx.params["methods"]]
    elif ctx.params.get("method"):  # a feature update (the decision's method), or a job queued before `methods`
        methods = [str(ctx.params["method"])]
    else:
        methods = list(policy.deliverable_methods(state.generation))
    tasks = project.tasks()
    audit = set(state.audit.labelled(tasks))  # the labels that judge models are never trained on
    items = [(tid, str(t.image), str(t.label)) for tid, t in sorted(tasks.items())
             if t.label and t.image and tid not in audit]
    if len({label for _, _, label in items}) < 2:
        reason = "fine-tuning needs labelled images of at least two classes"
        finish_pending(runtime, pid, purpose, None, failed=reason)
        return {"status": "skipped", "reason": reason}
    images = TaskImages(items, project.image_fetcher())
    audit_items = [(tid, str(t.image), str(t.label)) for tid, t in sorted(tasks.items())
                   if tid in audit and t.label and t.image]
    trained = [_train_one(ctx, purpose, method, state, items, audit_items, len(audit), images) for method in methods]
    best = max(trained, key=deliverable_rank)
    if len(trained) > 1:
        best = {**best, "candidates": [{k: m.get(k) for k in ("id", "method", "verdict", "comparison")}
                                       for m in trained]}
        log.info("project %s: the deliverable is %s (%s) among %s", pid, best["id"], best["method"],
                 ", ".join(m["id"] for m in trained))
    return best


def _train_one(ctx: JobContext, purpose: str, method: str, state: ProjectState, items: list[tuple[int, str, str]],
               audit_items: list[tuple[int, str, str]], audit_size: int, images: TaskImages) -> dict[str, Any]:
    """One fine-tune with `method`: train, judge against the proxy, save the checkpoint, record the model."""
    from asvp_backend.alignment.checkpoint import save_checkpoint
    from asvp_backend.alignment.finetune import FinetuneInterrupted, finetune, recipe_for

    runtime, pid, project = ctx.runtime, ctx.project_id, ctx.project
    settings = runtime.settings
    # the step floor (alignment/finetune.py recipe_for) holds unless FINETUNE_EXACT_EPOCHS says otherwise
    insist = settings.finetune_exact_epochs
    recipe = recipe_for(method, len(items), epochs=settings.finetune_epochs,
                        batch_size=settings.finetune_batch_size, seed=settings.seed, insist=insist)
    if settings.finetune_epochs is not None and recipe.epochs > settings.finetune_epochs:
        log.info("project %s: FINETUNE_EPOCHS=%s raised to %s epochs by the step floor", pid,
                 settings.finetune_epochs, recipe.epochs)
    try:
        result = finetune(settings.backbone, settings.backbone_weights, images, recipe, device=settings.device,
                          image_size=settings.image_size, progress=_stage_progress(ctx),
                          should_stop=lambda: ctx.time_left() < 30)
    except FinetuneInterrupted as exc:
        finish_pending(runtime, pid, purpose, None, failed=f"time limit: {exc}")
        raise JobTimeout(f"finetune job for project {pid} ran past its time limit") from exc
    except Exception as exc:
        finish_pending(runtime, pid, purpose, None, failed=f"{type(exc).__name__}: {exc}")
        raise
    ctx.progress(0, 1, stage=JUDGING, force=True)
    try:
        serving = project.serving_generation()
        comparison = judge_on_audit(settings, serving, items, audit_items, result, images.fetcher) or \
            judge_against_proxy(settings, serving, items, result.holdout_indices, result.holdout_predictions)
    except Exception as exc:  # a missing or damaged feature store must not throw the fine-tune away
        log.warning("project %s: the fine-tuned model could not be compared with the proxy", pid, exc_info=True)
        comparison = {"verdict": UNJUDGED, "reason": f"no comparison with the proxy ({type(exc).__name__}: "
                                                    f"{str(exc)[:200]})"}
    ctx.progress(1, 1, stage=JUDGING, force=True)
    model_id = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{method}-{len(items)}"
    info = {"id": model_id, "purpose": purpose, "method": method, "labelled": len(items),
            "trained_on_version": str(state.version), "at": time.time(), **_model_metrics(result.metrics),
            "verdict": comparison["verdict"], "comparison": comparison}
    ctx.check_fence()  # a job whose lease was lost writes nothing more (jobs/fencing.py)
    save_checkpoint(result, project.layout.checkpoint_dir(model_id), extra={"project": pid, **info})

    def record(current: ProjectState | None) -> ProjectState | None:
        if current is None:
            return None
        current.alignment.record_model(info)
        if purpose == "align":
            current.alignment.feature_model = model_id
            current.alignment.updates += 1
            current.alignment.labels_at_last_update = len(items) + audit_size  # the policy counts every label
            current.alignment.pending = {**(current.alignment.pending or {}), "stage": PendingStage.EXTRACT,
                                         "model": model_id, "since": time.time()}
        current.record_job(ctx.job_id)
        return current

    project.update_state(record)
    if purpose == "align":
        info["next"] = runtime.queue.submit("extract", pid, reason="feature update", force_round=True).job_id
    log.info("project %s: fine-tuned %s (%s, %s labels): %s", pid, model_id, method, len(items),
             comparison["reason"])
    return info


def _model_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("holdout_accuracy", "holdout_size", "lp_holdout_accuracy", "train_size", "skipped", "seconds",
            "images_per_second", "device", "epochs", "ft_steps")
    return {k: metrics.get(k) for k in keys}


def _stage_progress(ctx: JobContext) -> Any:
    """finetune's progress as the job's: every step of every stage ("ft" 22/250), throttled by the context
    except the first report of a stage, so a page sees each stage begin."""
    last = {"stage": ""}

    def report(done: int, total: int, stage: str) -> None:
        ctx.progress(done, total, stage=stage, force=stage != last["stage"])
        last["stage"] = stage

    return report


def finetune(ctx: JobContext) -> dict[str, Any]:
    """Fine-tune the deliverable model on the labelled tasks with the policy's methods (Start Training)."""
    return run_finetune(ctx)


def align(ctx: JobContext) -> dict[str, Any]:
    """Feature update: fine-tune (FT) on the labelled tasks, then re-extract every feature with it."""
    return run_finetune(ctx)


class TaskImages:
    """The labelled tasks as the fine-tuning sees them (alignment.finetune.LabelledImages): each image is
    fetched from Label Studio through the same guarded fetcher as extraction, once."""

    def __init__(self, items: Sequence[tuple[int, str, str]], fetcher: Any) -> None:
        self.items = list(items)  # (task id, image URL, label)
        self.fetcher = fetcher

    def __len__(self) -> int:
        return len(self.items)

    def label(self, index: int) -> str:
        return self.items[index][2]

    def load(self, index: int) -> Image.Image:
        task_id, url, _ = self.items[index]
        return self.fetcher.load(url, task_id)
