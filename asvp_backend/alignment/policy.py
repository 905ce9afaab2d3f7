"""The ASVP policy: the one place for both alignment rules (docs/method.md, *The alignment policy*).

Feature alignment: after each round the labelled set's LogME-PED is measured on the current feature
generation. When its gain over the previous round of the same generation falls below ALIGN_THRESHOLD (the
features no longer separate the labelled classes better as labels grow), the backbone is fine-tuned and
every cached feature re-extracted. Minimum label counts keep a fine-tune from running on too little data,
and a cap bounds the GPU spent.

Training alignment: the training method follows the feature state. LP-FT while the proxy still runs on
the pre-trained features (generation 0), FT from the first update on; the FT model is also the one that
re-extracts the features.

Pure and deterministic: the backend's round job and `simulate` make the same decision from the same
inputs, and every decision carries its inputs and its reason so that a person can check it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

TRAINING_METHODS = ("auto", "ft", "lpft")
UPDATE, WAIT, OFF = "update", "wait", "off"


@dataclass(frozen=True)
class Decision:
    """One feature-alignment decision and everything it was based on."""

    decision: str  # "update" | "wait" | "off"
    reason: str
    generation: int
    labelled: int
    logme: float | None = None
    logme_ped: float | None = None
    previous: float | None = None  # LogME-PED of the previous round of this generation
    gain: float | None = None
    threshold: float | None = None
    method: str | None = None  # how the update fine-tunes (only for "update")

    @property
    def fires(self) -> bool:
        return self.decision == UPDATE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AlignmentPolicy:
    """ALIGN, ALIGN_THRESHOLD, ALIGN_MIN_LABELS, ALIGN_MIN_NEW_LABELS, ALIGN_MAX_UPDATES, TRAINING_METHOD."""

    enabled: bool = True
    threshold: float = 0.0
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
        return cls(settings.align, settings.align_threshold, settings.align_min_labels,
                   settings.align_min_new_labels, settings.align_max_updates, settings.training_method)

    def method_for(self, generation: int) -> str:
        """Training alignment: the method of a model trained for feature generation `generation`. A feature
        update trains for the generation it creates, so under `auto` it is always FT."""
        if self.training_method != "auto":
            return self.training_method
        return "lpft" if generation == 0 else "ft"

    def decide(
        self,
        *,
        generation: int,
        labelled: int,
        logme: float | None,
        logme_ped: float | None,
        previous: float | None,
        updates: int,
        labels_at_last_update: int,
        previous_labelled: int | None = None,
    ) -> Decision:
        """Fire a feature update when the LogME-PED gain over the previous round of this generation is
        below the threshold, once the label minimums are met and while the cap allows. `previous_labelled`:
        the labels of that previous round (an unchanged labelled set says nothing about a stall)."""
        def decision(kind: str, reason: str, gain: float | None = None, method: str | None = None) -> Decision:
            return Decision(kind, reason, generation, labelled, logme, logme_ped, previous, gain, self.threshold,
                            method)

        if not self.enabled:
            return decision(OFF, "ALIGN=off: plain SVPp, features are never refreshed")
        if logme_ped is None:
            return decision(WAIT, "no transferability score (fewer than two labelled classes)")
        if previous is None:
            return decision(WAIT, f"first score on generation {generation}: nothing to compare with yet")
        if previous_labelled == labelled:  # a forced round (Start Training) on the same labels: no new evidence
            return decision(WAIT, f"the labelled set did not grow since the last scored round ({labelled} labels)")
        gain = logme_ped - previous
        if gain >= self.threshold:
            return decision(WAIT, f"LogME-PED gain {gain:+.4f} >= threshold {self.threshold:g}: the features "
                            "still separate the labels better as they grow", gain)
        stalled = f"LogME-PED gain {gain:+.4f} < threshold {self.threshold:g}"
        if updates >= self.max_updates:
            return decision(WAIT, f"{stalled}, but ALIGN_MAX_UPDATES={self.max_updates} updates were made", gain)
        if labelled < self.min_labels:
            return decision(WAIT, f"{stalled}, but only {labelled} labels (ALIGN_MIN_LABELS={self.min_labels})",
                            gain)
        new = labelled - labels_at_last_update
        if new < self.min_new_labels:
            return decision(WAIT, f"{stalled}, but only {new} new labels since the last update "
                            f"(ALIGN_MIN_NEW_LABELS={self.min_new_labels})", gain)
        method = self.method_for(generation + 1)
        return decision(UPDATE, f"{stalled}: the features stalled; fine-tune ({method}) and re-extract", gain,
                        method)
