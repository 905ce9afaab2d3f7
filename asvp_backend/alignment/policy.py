"""The ASVP policy: the one place for both alignment rules (docs/method.md, *The alignment policy*).

Feature alignment: after each round the labelled set's LogME-PED is measured on the current feature
generation. When its trend over the last ALIGN_WINDOW labels of that generation (the least-squares slope,
as a gain per 100 labels) falls below ALIGN_THRESHOLD (the features no longer separate the labelled classes
better as labels grow), the backbone is fine-tuned and every cached feature re-extracted. A trend, not the
gain between two consecutive rounds: under random selection 12-19% of those gains are negative while the
trend still rises, and the trend over 200 labels never was (bench/results/trigger_cpu.md). Minimum label
counts keep a fine-tune from running on too little data, and a cap bounds the GPU spent.

Training alignment: the training method follows the feature state. LP-FT while the proxy still runs on
the pre-trained features (generation 0), FT for a feature update (the FT model re-extracts the features).
The deliverable follows the same rule; `TRAINING_METHOD=audit` instead trains it both ways after a refresh and
lets the audit labels choose (`deliverable_methods`, `deliverable_rank`). Not the default: with about 67 audit
labels it picked the better of the two in 2 of 5 measured cases (bench/results/deliverable_cpu.md).

Pure and deterministic: the backend's round job and `simulate` make the same decision from the same
inputs, and every decision carries its inputs and its reason so that a person can check it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

import numpy as np

TRAINING_METHODS = ("auto", "ft", "lpft", "audit")


class Action(StrEnum):
    """What a decision says (stored as its text in the round's record)."""

    UPDATE = "update"  # refresh the features: fine-tune, re-extract, gate
    WAIT = "wait"  # keep the serving features
    OFF = "off"  # ALIGN=off


UPDATE, WAIT, OFF = Action.UPDATE, Action.WAIT, Action.OFF


@dataclass(frozen=True)
class Decision:
    """One feature-alignment decision and everything it was based on."""

    decision: Action
    reason: str
    generation: int
    labelled: int
    logme: float | None = None
    logme_ped: float | None = None
    previous: float | None = None  # LogME-PED of the previous scored round of this generation
    gain: float | None = None  # the trend: LogME-PED gain per 100 labels over the window
    threshold: float | None = None
    method: str | None = None  # how the update fine-tunes (only for "update")
    window: int | None = None  # labels the trend spans (>= ALIGN_WINDOW once it is measured)
    points: int | None = None  # scored rounds in the trend

    @property
    def fires(self) -> bool:
        return self.decision == UPDATE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AlignmentPolicy:
    """ALIGN, ALIGN_THRESHOLD, ALIGN_WINDOW, ALIGN_MIN_LABELS, ALIGN_MIN_NEW_LABELS, ALIGN_MAX_UPDATES,
    TRAINING_METHOD."""

    enabled: bool = True
    threshold: float = 0.0
    window: int = 200  # no false fire in 620 rounds on noise (bench/results/trigger_cpu.md)
    min_labels: int = 500
    min_new_labels: int = 250
    max_updates: int = 3
    training_method: str = "auto"

    def __post_init__(self) -> None:
        if self.training_method not in TRAINING_METHODS:
            raise ValueError(f"training method must be one of {', '.join(TRAINING_METHODS)}, got "
                             f"{self.training_method!r}")

    @classmethod
    def from_settings(cls, settings: Any) -> AlignmentPolicy:
        return cls(enabled=settings.align, threshold=settings.align_threshold, window=settings.align_window,
                   min_labels=settings.align_min_labels, min_new_labels=settings.align_min_new_labels,
                   max_updates=settings.align_max_updates, training_method=settings.training_method)

    def method_for(self, generation: int) -> str:
        """Training alignment: the method of a model trained for feature generation `generation`. A feature
        update trains for the generation it creates, so under `auto` (and `audit`) it is always FT."""
        if self.training_method in ("ft", "lpft"):
            return self.training_method
        return "lpft" if generation == 0 else "ft"

    def deliverable_methods(self, generation: int) -> tuple[str, ...]:
        """The methods Start Training trains the deliverable with, in training order. Under `audit` after a
        refresh both, LP-FT first, and `deliverable_rank` keeps the one the audit labels prefer (on a full tie
        the later one, FT: the paper's training alignment). Otherwise the one `method_for` names."""
        if self.training_method == "audit" and generation > 0:
            return ("lpft", "ft")
        return (self.method_for(generation),)

    def decide(
        self,
        *,
        generation: int,
        labelled: int,
        logme: float | None,
        logme_ped: float | None,
        history: Sequence[tuple[int, float]],
        updates: int,
        labels_at_last_update: int,
    ) -> Decision:
        """Fire a feature update when the LogME-PED trend on this generation is below the threshold, once the
        label minimums are met and while the cap allows. `history`: (labels, LogME-PED) of this generation's
        earlier scored rounds, oldest first (an unchanged labelled set says nothing about a stall)."""
        previous = history[-1][1] if history else None

        def decision(kind: Action, reason: str, fitted: Trend | None = None, method: str | None = None) -> Decision:
            return Decision(kind, reason, generation, labelled, logme, logme_ped, previous,
                            None if fitted is None else fitted.per_100, self.threshold, method,
                            None if fitted is None else fitted.span, None if fitted is None else fitted.points)

        if not self.enabled:
            return decision(OFF, "ALIGN=off: plain SVPp, features are never refreshed")
        if logme_ped is None:
            return decision(WAIT, "no transferability score (fewer than two labelled classes)")
        if history and history[-1][0] == labelled:  # a forced round (Start Training) on the same labels
            return decision(WAIT, f"the labelled set did not grow since the last scored round ({labelled} labels)")
        fitted = trend([*history, (labelled, logme_ped)], self.window)
        if fitted is None:
            first = history[0][0] if history else labelled
            return decision(WAIT, f"the trend needs LogME-PED over ALIGN_WINDOW={self.window} labels on generation "
                            f"{generation}; its scores span {labelled - first} so far")
        shown = f"LogME-PED trend {fitted.per_100:+.4f} per 100 labels over the last {fitted.span} labels"
        if fitted.per_100 >= self.threshold:
            return decision(WAIT, f"{shown} >= threshold {self.threshold:g}: the features still separate the "
                            "labels better as they grow", fitted)
        stalled = f"{shown} < threshold {self.threshold:g}"
        if updates >= self.max_updates:
            return decision(WAIT, f"{stalled}, but ALIGN_MAX_UPDATES={self.max_updates} updates were made", fitted)
        if labelled < self.min_labels:
            return decision(WAIT, f"{stalled}, but only {labelled} labels (ALIGN_MIN_LABELS={self.min_labels})",
                            fitted)
        new = labelled - labels_at_last_update
        if new < self.min_new_labels:
            return decision(WAIT, f"{stalled}, but only {new} new labels since the last update "
                            f"(ALIGN_MIN_NEW_LABELS={self.min_new_labels})", fitted)
        method = self.method_for(generation + 1)
        return decision(UPDATE, f"{stalled}: the features stalled; fine-tune ({method}) and re-extract", fitted,
                        method)


@dataclass(frozen=True)
class Trend:
    """The least-squares slope of LogME-PED over labels, per 100 labels, on `points` scores over `span` labels."""

    per_100: float
    span: int
    points: int


def trend(scores: Sequence[tuple[int, float]], window: int) -> Trend | None:
    """The trend of the newest scores (labels, LogME-PED), oldest first: fitted from the newest score at least
    `window` labels before the last one, so it spans at least `window` labels; None while the scores span
    fewer."""
    last = scores[-1][0] if scores else 0
    starts = [i for i, (labels, _) in enumerate(scores) if labels <= last - window]
    if not starts:
        return None
    used = scores[starts[-1]:]
    x = np.array([labels for labels, _ in used], dtype=np.float64)
    y = np.array([score for _, score in used], dtype=np.float64)
    slope = float(np.polyfit(x, y, 1)[0])
    return Trend(round(slope * 100, 6), int(x[-1] - x[0]), len(used))


def deliverable_rank(model: Mapping[str, Any]) -> tuple[Any, ...]:
    """How fine-tuned models rank as the deliverable (the highest wins), from a model record: more labels
    first (models trained on different label sets are not compared by accuracy); then one the proxy did not
    beat; then the accuracy on the audit labels (models judged there, on labels neither trained on nor chose);
    then on the fine-tune's held-out slice; then the later-trained."""
    comparison = model.get("comparison") or {}
    audit = comparison.get("model_accuracy") if comparison.get("judged_on") == "audit" else None
    return (model.get("labelled", 0), model.get("verdict") != "proxy", -1.0 if audit is None else float(audit),
            model.get("holdout_accuracy") or 0.0, model.get("at", 0.0))
