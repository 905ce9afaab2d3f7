"""Is it learning? The evidence the status page, `GET /projects/N/learning` and `asvp-backend status` show:
the proxy's accuracy with a 95% interval and what it is measured on, how labellers treated the served
pre-annotations, the label-config changes, and the deliverable model with any fine-tune in progress.

The definitions live here once, so the JSON, the page and the CLI can never disagree:

- **Accuracy interval**: the round's cross-validated accuracy is `correct / n` over `n` out-of-fold
  predictions (jobs/rounds.py `_cross_validate`, pooled over the folds). Its 95% interval is the Wilson score
  interval on those `n` predictions: unlike the normal approximation it stays inside [0, 1] and is not
  zero-width at 30 of 30 correct (0.89 to 1.00), which is the point: 1.00 at 30 labels and 0.85 at 40 are
  both estimates on a handful of tasks, and their bands show whether the drop means anything.
- **Accepted as-is / corrected**: a *served pre-annotation* is one of this backend's predictions (model
  version `asvp-g<g>-r<r>`, with a label) that Label Studio loaded into the annotation a labeller submitted;
  Label Studio records it as the annotation's `parent_prediction`. The annotation's label equal to the
  prediction's = accepted as-is, different = corrected. Annotations without such a parent (labelled from
  scratch, pre-labelling off, imported or created through the API without one, skipped) are not counted.
  Each annotation counts once, when a sync first sees it, for the round (model version) whose prediction it
  started from. It must be counted then: Label Studio 1.23.2 clears `parent_prediction` when the prediction
  is deleted, and each round deletes the versions before the previous one (tests/e2e/test_status_page.py).
- **Config change**: the classes added and removed when a sync or /setup sees a different label config
  (state.py `config_change`).

Pure (no torch, no I/O): the API evaluates it on every status request.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from asvp_backend.labelstudio.label_config import ClassificationSpec
from asvp_backend.versioning import ModelVersion

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval
# Rounds recorded before `cv_n` existed cross-validated min(labelled, 1000) tasks (jobs/rounds.py
# CV_MAX_LABELS at the time): their n is `labelled` up to that, unknown above it.
LEGACY_CV_MAX_LABELS = 1000
FINETUNE_KINDS = ("finetune", "align")
STAGE_WORDS = {"loading": "loading images", "lp": "training the head", "ft": "fine-tuning",
               "evaluating": "evaluating"}
ACCEPTANCE_DEFINITION = (
    "A served pre-annotation is one of this backend's predictions that Label Studio loaded into the annotation "
    "a labeller submitted (the annotation's parent_prediction). Same label as the prediction: accepted as-is; "
    "another label: corrected. Annotations made without one (pre-labelling off, from scratch, imported, skipped) "
    "are not counted. Each annotation counts once, for the round whose prediction it started from."
)


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion `successes / n` (95% by default); None when n is 0."""
    if n <= 0:
        return None
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be between 0 and n ({successes} of {n})")
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_fields(accuracy: float | None, n: int) -> dict[str, Any]:
    """What a round records beside `cv_accuracy`: `cv_n`, the number of cross-validated predictions, and
    `cv_interval`, [low, high] of the 95% Wilson interval (both None when there is no accuracy)."""
    if accuracy is None or n <= 0:
        return {"cv_n": None, "cv_interval": None}
    interval = wilson_interval(round(float(accuracy) * n), n)
    return {"cv_n": int(n), "cv_interval": [round(x, 4) for x in interval] if interval else None}


def round_accuracy(record: Mapping[str, Any]) -> dict[str, Any]:
    """A round's accuracy, its n and interval; computed from the stored n for rounds recorded before the
    interval was (see LEGACY_CV_MAX_LABELS)."""
    accuracy = record.get("cv_accuracy")
    n = record.get("cv_n")
    if n is None and accuracy is not None and 0 < int(record.get("labelled") or 0) <= LEGACY_CV_MAX_LABELS:
        n = int(record["labelled"])
    fields = accuracy_fields(accuracy, int(n or 0))
    return {"version": record.get("version"), "generation": record.get("generation"),
            "labelled": record.get("labelled"), "cv_accuracy": accuracy, **fields}


def measured_on(point: Mapping[str, Any]) -> str | None:
    """What the accuracy is measured on, in words (None without an accuracy)."""
    n, labelled = point.get("cv_n"), point.get("labelled")
    if point.get("cv_accuracy") is None:
        return None
    if n is None or n == labelled:
        how_many = f"the {labelled} labelled tasks"
    else:
        how_many = f"a random {n} of the {labelled} labelled tasks"
    return f"cross-validated on {how_many}, which active learning chose (not a random sample: a biased estimate)"


def audit_accuracy(state: Any) -> dict[str, Any]:
    """The proxy's accuracy on the audit sample per round (jobs/rounds.py records it; alignment/gate.py
    estimates it): the unbiased estimate, beside the cross-validated one on actively chosen labels."""
    curve = [{"version": r.get("version"), "generation": r.get("generation"), "labelled": r.get("labelled"),
              "n": r["audit"]["n"], "accuracy": r["audit"]["accuracy"],
              "interval": [r["audit"]["low"], r["audit"]["high"]]}
             for r in state.rounds if isinstance(r.get("audit"), Mapping) and r["audit"].get("n")]
    latest = curve[-1] if curve else None
    measured_on = (f"{latest['n']} audit label{'' if latest['n'] == 1 else 's'}: tasks drawn uniformly at random "
                   "from the pool and labelled in "
                   "the queue, each predicted by a proxy that did not train on it (an unbiased estimate)"
                   if latest else None)  # fmt: skip
    return {"latest": latest, "measured_on": measured_on, "curve": curve,
            "audit_labels": len(state.audit.tasks) if latest is None else latest["n"]}


REFRESH_OUTCOMES = ("adopted", "rejected", "waiting")


def refresh_verdicts(state: Any) -> list[dict[str, Any]]:
    """Every refreshed feature generation the gate judged (newest last): adopted, rejected (kept on disk) or
    waiting for audit labels, with both accuracies and the audit size."""
    out = []
    for d in state.alignment.decisions:
        if d.get("decision") not in REFRESH_OUTCOMES:
            continue
        gate = d.get("gate") or {}
        out.append({"decision": d["decision"], "generation": d.get("generation"), "model": d.get("model"),
                    "at": d.get("at"), "reason": d.get("reason"), "n": gate.get("n"),
                    "refreshed_accuracy": gate.get("challenger_accuracy"),
                    "serving_accuracy": gate.get("incumbent_accuracy"), "difference": gate.get("difference"),
                    "standard_error": gate.get("standard_error")})
    return out


# ------------------------------------------------------------------ served pre-annotations
def _label_of_result(spec: ClassificationSpec, result: Any) -> str | None:
    return spec.label_of({"annotations": [{"result": result if isinstance(result, list) else []}]})


def reviewed_pre_annotations(task: Mapping[str, Any], spec: ClassificationSpec) -> list[tuple[int, str, bool]]:
    """(annotation id, model version, accepted as-is) for each of the task's annotations that started from one
    of this backend's labelled predictions (see the module's definition); [] for every other task."""
    annotations = task.get("annotations") or []
    if not annotations:
        return []
    predictions = {p.get("id"): p for p in task.get("predictions") or [] if isinstance(p, dict)}
    reviews = []
    for annotation in annotations:
        if not isinstance(annotation, dict) or annotation.get("was_cancelled"):
            continue
        parent = predictions.get(annotation.get("parent_prediction"))
        annotation_id = annotation.get("id")
        if parent is None or not isinstance(annotation_id, int) or isinstance(annotation_id, bool):
            continue
        try:
            version = str(ModelVersion.parse(str(parent.get("model_version") or "")))
        except ValueError:
            continue  # another model's prediction
        suggested = _label_of_result(spec, parent.get("result"))
        label = _label_of_result(spec, annotation.get("result"))
        if suggested is None or label is None:
            continue  # no suggestion (a cold-start prediction), or no label we can read
        reviews.append((annotation_id, version, label == suggested))
    return reviews


def _rate(accepted: int, corrected: int) -> dict[str, Any]:
    reviewed = accepted + corrected
    interval = wilson_interval(accepted, reviewed)
    return {"accepted": accepted, "corrected": corrected, "reviewed": reviewed,
            "rate": round(accepted / reviewed, 4) if reviewed else None,
            "interval": [round(x, 4) for x in interval] if interval else None}


def acceptance_summary(by_version: Mapping[str, Mapping[str, int]], accepted: int, corrected: int) -> dict[str, Any]:
    """Per round (oldest first) and overall: accepted, corrected, reviewed, the rate accepted / reviewed and
    its 95% Wilson interval."""
    def order(version: str) -> tuple[int, int]:
        try:
            v = ModelVersion.parse(version)
        except ValueError:
            return (-1, -1)
        return (v.generation, v.round)

    rounds = [{"version": v, **_rate(int(c.get("accepted", 0)), int(c.get("corrected", 0)))}
              for v, c in sorted(by_version.items(), key=lambda item: order(item[0]))]
    return {"definition": ACCEPTANCE_DEFINITION, "overall": _rate(accepted, corrected), "rounds": rounds}


# ------------------------------------------------------------------ the deliverable and its fine-tune
def training_now(jobs: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The newest fine-tune (Start Training's `finetune`, or a feature update's `align`) that is running or
    waiting, with its progress and a line to show ("fine-tuning 22/250"); None when there is none."""
    for job in jobs:
        if job.get("kind") not in FINETUNE_KINDS or job.get("status") not in {"started", "queued", "scheduled",
                                                                              "deferred"}:
            continue
        progress = job.get("progress") or {}
        stage = str(progress.get("stage") or "")
        words = STAGE_WORDS.get(stage, stage or "fine-tuning")
        if job.get("status") != "started":
            text = "fine-tune queued" if job.get("kind") == "finetune" else "feature update queued"
        elif progress.get("total"):
            text = f"{words} {progress.get('done')}/{progress.get('total')}"
        else:
            text = "fine-tuning, starting"
        return {"job": job.get("id"), "kind": job.get("kind"), "status": job.get("status"),
                "done": progress.get("done"), "total": progress.get("total"), "stage": stage or None, "text": text}
    return None
