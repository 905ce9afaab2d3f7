"""What a person reads about a project's alignment and models: shared by `GET /projects/N`, `GET
/projects/N/model` and `asvp-backend status`, so the three never disagree. No torch here (the API uses it)."""

from __future__ import annotations

from typing import Any

from asvp_backend.alignment.policy import AlignmentPolicy
from asvp_backend.layout import ProjectLayout
from asvp_backend.state import ProjectState


def alignment_summary(state: ProjectState, settings: Any) -> dict[str, Any]:
    """The policy in force, the last decision with its inputs and reason, and any update in progress."""
    policy = AlignmentPolicy.from_settings(settings)
    alignment = state.alignment
    return {
        "enabled": policy.enabled,
        "policy": {"ALIGN_THRESHOLD": policy.threshold, "ALIGN_MIN_LABELS": policy.min_labels,
                   "ALIGN_MIN_NEW_LABELS": policy.min_new_labels, "ALIGN_MAX_UPDATES": policy.max_updates,
                   "TRAINING_METHOD": policy.training_method},
        "generation": state.generation,
        "updates": alignment.updates,
        "pending": alignment.pending,
        "last_decision": alignment.decisions[-1] if alignment.decisions else None,
        "decisions": len(alignment.decisions),
        "next_training_method": policy.method_for(state.generation),
        "feature_model": alignment.feature_model,
    }


def model_summary(state: ProjectState, settings: Any) -> dict[str, Any]:
    """Which fine-tuned model is the deliverable, how it scored, and what pre-annotates the tasks now."""
    current = state.alignment.current_model()
    last_round = state.rounds[-1] if state.rounds else {}
    return {
        "project": state.project_id,
        "model_version": str(state.version),
        "current": current,
        "pre_annotations": last_round.get("pre_annotations"),
        "proxy": {"name": last_round.get("proxy"), "cv_accuracy": last_round.get("cv_accuracy"),
                  "labelled": last_round.get("labelled"), "version": last_round.get("version")} if last_round else None,
        "models": state.alignment.models,
        "next_training_method": AlignmentPolicy.from_settings(settings).method_for(state.generation),
        "export": f"asvp-backend export --project {state.project_id} --out DIR" if current else None,
    }


def generations_of(layout: ProjectLayout, state: ProjectState) -> list[dict[str, Any]]:
    """Every feature generation on disk: its backbone and weights, whether it serves, the fine-tuned model
    that extracted it (None: the pre-trained weights) and the rounds ranked on it."""
    from asvp_backend.features import FeatureStore, FeatureStoreError

    store = FeatureStore(layout.features_dir)
    current = store.current_generation()
    out: list[dict[str, Any]] = []
    for g in store.generations():
        entry: dict[str, Any] = {"generation": g, "current": g == current,
                                 "model": state.alignment.generation_models.get(str(g)),
                                 "versions": [v for v in state.versions if v.startswith(f"asvp-g{g}-")]}
        try:
            generation = store.generation(g)
            entry.update(backbone=generation.info.backbone, weights_hash=generation.info.weights_hash[:12],
                         vectors=len(generation))
        except (FeatureStoreError, OSError, ValueError) as exc:  # a damaged generation is listed, not fatal
            entry["problem"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        out.append(entry)
    return out
