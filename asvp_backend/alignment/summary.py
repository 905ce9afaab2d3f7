"""What a person reads about a project's alignment and models: shared by `GET /projects/N`, `GET
/projects/N/model` and `asvp-backend status`, so the three never disagree. No torch here (the API uses it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from asvp_backend.alignment.integrity import checkpoint_problem
from asvp_backend.alignment.policy import AlignmentPolicy
from asvp_backend.layout import ProjectLayout
from asvp_backend.learning import audit_accuracy, refresh_verdicts
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
        "next_training_method": next_training_method(policy, state.generation),
        "feature_model": alignment.feature_model,
        "gate": {"ALIGN_GATE": settings.align_gate, "GATE_Z": settings.gate_z,
                 "AUDIT_FRACTION": settings.audit_fraction, "AUDIT_EARLY_FRACTION": settings.audit_early_fraction,
                 "AUDIT_MIN_LABELS": settings.audit_min_labels},
        "refreshes": refresh_verdicts(state),
        "audit": audit_accuracy(state)["latest"],
    }


def next_training_method(policy: AlignmentPolicy, generation: int) -> str:
    """What Start Training trains now: "lpft", "ft", or "lpft, ft" (both, the audit labels choose)."""
    return ", ".join(policy.deliverable_methods(generation))


def damaged_models(layout: ProjectLayout, state: ProjectState) -> dict[str, str]:
    """{model id: what is wrong} for every listed model whose checkpoint folder is not whole (cheap checks:
    sizes and headers). Such a model is never current, never the deliverable and never exported."""
    damaged = {}
    for model in state.alignment.models:
        problem = checkpoint_problem(layout.checkpoint_dir(model["id"]))
        if problem:
            damaged[model["id"]] = problem
    return damaged


def model_summary(state: ProjectState, settings: Any) -> dict[str, Any]:
    """Which fine-tuned model is the deliverable, how it scored against the proxy, and what pre-annotates the
    tasks now. `current` never names a model that lost to the proxy (AlignmentState.current_model) or whose
    checkpoint is damaged (`damaged`, by id); `deliverable` says which of the two is the better model, with
    both figures."""
    damaged = damaged_models(ProjectLayout(settings.model_dir, state.project_id), state)
    current = state.alignment.current_model(damaged)
    last_round = state.rounds[-1] if state.rounds else {}
    return {
        "project": state.project_id,
        "model_version": str(state.version),
        "current": current,
        "deliverable": deliverable(state, damaged),
        "damaged": damaged,
        "pre_annotations": last_round.get("pre_annotations"),
        "proxy": {"name": last_round.get("proxy"), "cv_accuracy": last_round.get("cv_accuracy"),
                  "labelled": last_round.get("labelled"), "version": last_round.get("version")} if last_round else None,
        "models": state.alignment.models,
        "next_training_method": next_training_method(AlignmentPolicy.from_settings(settings), state.generation),
        "export": f"asvp-backend export --project {state.project_id} --out DIR" if current else None,
    }


def deliverable(state: ProjectState, damaged: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What a person should ship: `source` "model" (the fine-tuned model beat the proxy, or was not compared
    with it), "proxy" (the newest fine-tuned model lost to the proxy on the same audit or held-out labels) or None (no
    fine-tuned model yet); `reason` says why, with both accuracies and their n when they were compared.
    Models in `damaged` (id: problem) are passed over."""
    damaged = damaged or {}
    newest = state.alignment.newest_model(damaged)
    if newest is None:
        if damaged:
            return {"source": None, "model": None,
                    "reason": "no whole fine-tuned model: " + "; ".join(damaged.values())[:300]}
        return {"source": None, "model": None, "reason": "no fine-tuned model yet (Start Training fine-tunes one)"}
    comparison = dict(newest.get("comparison") or {})
    figures = {k: comparison.get(k) for k in ("model_accuracy", "proxy_accuracy", "n", "proxy")}
    verdict = newest.get("verdict")
    if verdict == "proxy":
        return {"source": "proxy", "model": newest["id"], **figures,
                "reason": f"{comparison.get('reason')}; `asvp-backend export` refuses it without --even-if-worse"}
    reason = comparison.get("reason") or "not compared with the proxy (trained before models were judged)"
    return {"source": "model", "model": newest["id"], **figures, "reason": reason}


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
