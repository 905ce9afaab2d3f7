"""One read model of a project: what `asvp-backend status`, `GET /projects`, `GET /projects/N` and `GET
/projects/N/learning` say about it.

Every view is cut from the same ProjectSummary, whose parts (the stop signal, the file problems, the
alignment and model summaries, the learning summary) are each computed by one function, so the CLI, the
JSON routes and the status page never disagree about a project, and a part several views share is computed
once per summary. The views' field names are a contract (the status page, scripts and status_table.py
read them by name): a view may gain fields, never lose or rename one. No torch and no web framework here:
the CLI and the light API image both import it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

from asvp_backend.alignment.summary import alignment_summary, damaged_models, deliverable, model_summary
from asvp_backend.config import Settings
from asvp_backend.layout import ProjectLayout
from asvp_backend.learning import (
    acceptance_summary,
    audit_accuracy,
    measured_on,
    refresh_verdicts,
    round_accuracy,
    training_now,
)
from asvp_backend.problems import project_problems
from asvp_backend.state import ProjectState
from asvp_backend.stopping import StopRule, StopSignal


def learning_summary(state: Any, jobs: Sequence[Mapping[str, Any]] = (),
                     damaged: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What `GET /projects/N/learning` returns: title and classes, the accuracy curve with intervals (`audit`: the
    unbiased one on the audit sample; `refreshes`: the gate's verdicts), the
    pre-annotations accepted per round and overall, the label-config changes (newest last) and the
    deliverable model with any fine-tune in progress (`jobs`: the project's jobs as /jobs lists them) and
    why it is the one, or why there is none (`damaged`: models whose checkpoint is not whole, by id)."""
    curve = [round_accuracy(r) for r in state.rounds if r.get("cv_accuracy") is not None]
    latest = curve[-1] if curve else None
    acceptance = state.acceptance
    return {
        "project": state.project_id,
        "title": state.title,
        "classes": list(state.spec.labels),
        "model_version": str(state.version),
        "accuracy": {"latest": latest, "measured_on": measured_on(latest) if latest else None, "curve": curve},
        "audit": audit_accuracy(state),
        "refreshes": refresh_verdicts(state),
        "pre_annotations": acceptance_summary(acceptance.by_version, acceptance.accepted, acceptance.corrected),
        "config_changes": list(state.config_changes),
        "deliverable": {"model": state.alignment.current_model(damaged or ()), "training": training_now(jobs),
                        "reason": deliverable(state, damaged)["reason"]},
    }


class ProjectSummary:
    """A project's state as people and scripts read it; each view is a fresh dict."""

    def __init__(self, settings: Settings, state: ProjectState) -> None:
        self.settings, self.state = settings, state
        self.layout = ProjectLayout(settings.model_dir, state.project_id)

    @cached_property
    def stopping(self) -> StopSignal:
        return StopRule.from_settings(self.settings).evaluate(self.state.rounds)

    @cached_property
    def problems(self) -> list[str]:
        return project_problems(self.layout, self.state)

    @cached_property
    def alignment(self) -> dict[str, Any]:
        return alignment_summary(self.state, self.settings)

    @cached_property
    def model(self) -> dict[str, Any]:
        """`GET /projects/N/model`."""
        return model_summary(self.state, self.settings)

    def learning(self, jobs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """`GET /projects/N/learning` (`jobs`: the project's newest jobs, as /jobs lists them)."""
        return learning_summary(self.state, jobs, damaged_models(self.layout, self.state))

    def row(self) -> dict[str, Any]:
        """The project's line in `GET /projects` (the status page's project list)."""
        state = self.state
        accuracy = round_accuracy(state.rounds[-1]) if state.rounds else {}
        accepted = acceptance_summary({}, state.acceptance.accepted, state.acceptance.corrected)["overall"]
        return {"project": state.project_id, "title": state.title, "model_version": str(state.version),
                "labels": list(state.spec.labels), "rounds": len(state.rounds), "last_sync": state.last_sync,
                "cv_accuracy": accuracy.get("cv_accuracy"), "cv_n": accuracy.get("cv_n"),
                "cv_interval": accuracy.get("cv_interval"), "pre_annotations_accepted": accepted,
                "can_stop": self.stopping.can_stop}

    def detail(self) -> dict[str, Any]:
        """`GET /projects/N`: the whole state but its label config, with what is wrong and where it stands."""
        data: dict[str, Any] = json.loads(self.state.to_json())
        data.pop("label_config", None)
        data["model_version"] = str(self.state.version)
        data["problems"] = self.problems
        data["alignment_summary"] = self.alignment
        data["stopping"] = self.stopping.to_dict()
        return data

    def status(self, jobs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The project in `asvp-backend status` (status_table.py prints it; --json prints it whole)."""
        state = self.state
        return {
            "project": state.project_id,
            "model_version": str(state.version),
            "labels": list(state.spec.labels),
            "last_sync": state.last_sync,
            "rounds": len(state.rounds),
            "alignment": self.alignment,
            "model": self.model["current"],
            "pre_annotations": self.model["pre_annotations"],
            "stopping": self.stopping.to_dict(),
            "problems": self.problems,
            "learning": self.learning(jobs),
        }
