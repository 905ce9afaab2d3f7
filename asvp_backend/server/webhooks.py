"""Which Label Studio events start which job. A webhook is a trigger only: its payload is never trusted
as data, the job re-reads Label Studio."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Trigger:
    job: str
    reason: str
    joins: frozenset[str] = frozenset()  # an event while a job of these kinds is queued or running joins it


TRAINING_JOBS = frozenset({"train", "finetune"})


def joined_message(kind: str, status: str, progress: dict | None) -> str:
    """What Label Studio shows after Start Training ("Request Sent! Response: ...") when the press joined a
    training already under way."""
    doing = "queued"
    if status == "started":
        doing = "running"
        if progress and progress.get("total"):
            doing += f" ({progress.get('stage') or kind} {progress.get('done')}/{progress.get('total')})"
    return (f"Start Training is already {doing}; this press joins it. Labels added since it started go into the "
            "next Start Training.")


# PROJECT_UPDATED is deliberately absent: our own model_version PATCH emits it, and training on it would
# loop (retrain -> new version -> PATCH -> retrain), as label-studio-ml 1.0.9 does.
EVENT_TRIGGERS: dict[str, Trigger] = {
    "ANNOTATION_CREATED": Trigger("sync", "annotation created"),
    "ANNOTATION_UPDATED": Trigger("sync", "annotation updated"),
    "ANNOTATIONS_CREATED": Trigger("sync", "annotations created"),
    "ANNOTATIONS_DELETED": Trigger("sync", "annotations deleted"),
    "TASKS_CREATED": Trigger("sync", "tasks created"),
    "TASKS_DELETED": Trigger("sync", "tasks deleted"),
    "START_TRAINING": Trigger("train", "Start Training pressed", joins=TRAINING_JOBS),
}

IGNORED_EVENTS = {"PROJECT_UPDATED", "PROJECT_CREATED", "PROJECT_DELETED", "LABEL_LINK_CREATED",
                  "LABEL_LINK_UPDATED", "LABEL_LINK_DELETED"}  # fmt: skip
