"""Which Label Studio events start which job. A webhook is a trigger only: its payload is never trusted
as data, the job re-reads Label Studio."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Trigger:
    job: str
    reason: str


# PROJECT_UPDATED is deliberately absent: our own model_version PATCH emits it, and training on it would
# loop (retrain -> new version -> PATCH -> retrain), as label-studio-ml 1.0.9 does.
EVENT_TRIGGERS: dict[str, Trigger] = {
    "ANNOTATION_CREATED": Trigger("sync", "annotation created"),
    "ANNOTATION_UPDATED": Trigger("sync", "annotation updated"),
    "ANNOTATIONS_CREATED": Trigger("sync", "annotations created"),
    "ANNOTATIONS_DELETED": Trigger("sync", "annotations deleted"),
    "TASKS_CREATED": Trigger("sync", "tasks created"),
    "TASKS_DELETED": Trigger("sync", "tasks deleted"),
    "START_TRAINING": Trigger("train", "Start Training pressed"),
}

IGNORED_EVENTS = {"PROJECT_UPDATED", "PROJECT_CREATED", "PROJECT_DELETED", "LABEL_LINK_CREATED",
                  "LABEL_LINK_UPDATED", "LABEL_LINK_DELETED"}  # fmt: skip
