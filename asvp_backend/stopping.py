"""When labelling can stop: the stabilising-predictions criterion (Bloodgood and Vijay-Shanker, "A Method for
Stopping Active Learning Based on Stabilizing Predictions and the Need for User-Adjustable Stopping", CoNLL
2009).

Each round predicts a fixed "stop set" of tasks (drawn once, unlabelled when drawn, never re-drawn) with
its proxy, and measures Cohen's kappa between these predictions and the previous round's. Predictions that
no longer change mean new labels no longer change the model: more labelling buys little. The paper stops
at the first kappa >= 0.99 averaged over a window of three rounds; we ask for more, because a person acts
on this and a false "stop" costs them accuracy:

    labelling can stop when
      (1) kappa >= STOP_KAPPA in each of the last STOP_ROUNDS rounds (a round without a kappa, such as the
          first one or a cold-start round, breaks the run), and
      (2) the proxy's accuracy stopped rising: its best of those last STOP_ROUNDS rounds is at most MIN_GAIN
          (0.005) above its best of every round before them (and at least one earlier round has one to
          compare with). The accuracy is the audit estimate (alignment/gate.py) once the newest round has
          AUDIT_MIN_LABELS audit labels (only rounds with as many count), else the cross-validated accuracy on
          the chosen labels, which flatters but is there from the first round.

(2) guards against a proxy that is stable but still learning a rare class the stop set barely holds.

Only rounds that trained on more labels than the round before them count. A round on an unchanged labelled set
(Start Training pressed again, a refreshed ranking) predicts the stop set as its predecessor did, so its kappa of
1.0 says nothing about what new labels change; counted, three presses of Start Training made "stable" advice.
It is advice only: nothing stops, the page, `GET /projects/N` and `asvp-backend status` say so with the evidence.
This module is pure (no torch, no I/O): the API evaluates it on every status request.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

AUDIT, CROSS_VALIDATED = "audit", "cross-validated"
MIN_GAIN = 0.005  # accuracy gains at or below this (half a point) count as "not rising"
STOP_SET_SIZE = 2000  # the paper's stop sets are a few thousand; kappa's error at 2,000 is about +-0.005


def cohen_kappa(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Cohen's kappa between two label sequences of the same tasks: (p_o - p_e) / (1 - p_e).

    When both sequences are one and the same single class, p_e = 1 and the formula is 0/0; we define it as
    1.0 (the predictions did not change, which is what the stop rule asks). One class on each side but
    different classes gives p_o = p_e = 0, so 0.0."""
    if len(a) != len(b):
        raise ValueError(f"kappa needs two label sequences of the same length ({len(a)} != {len(b)})")
    if not a:
        raise ValueError("kappa of no tasks is undefined")
    n = len(a)
    observed = sum(1 for x, y in zip(a, b, strict=True) if x == y) / n
    counts_a, counts_b = Counter(a), Counter(b)
    expected = sum(counts_a[c] * counts_b[c] for c in counts_a) / (n * n)
    if expected >= 1.0:
        return 1.0
    return (observed - expected) / (1.0 - expected)


@dataclass(frozen=True)
class StopSignal:
    """The decision, its reason, and the evidence it was made on (one entry per round, oldest first)."""

    can_stop: bool
    reason: str
    stable_rounds: int  # consecutive latest rounds with kappa >= the threshold
    recent_best_accuracy: float | None
    earlier_best_accuracy: float | None
    rule: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    accuracy_source: str = CROSS_VALIDATED  # which accuracy (2) compared: "audit" or "cross-validated"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rounds_with_new_labels(history: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rounds that trained on more labelled tasks than the last round kept before them (the first round
    always counts; a round without a `labelled` count is kept, as older states have none)."""
    kept: list[Mapping[str, Any]] = []
    for record in history:
        labelled, previous = record.get("labelled"), kept[-1].get("labelled") if kept else None
        if labelled is None or previous is None or labelled > previous:
            kept.append(record)
    return kept


@dataclass(frozen=True)
class StopRule:
    kappa: float = 0.99
    rounds: int = 3
    min_gain: float = MIN_GAIN
    min_audit: int = 60  # AUDIT_MIN_LABELS: audit estimates on fewer labels are not used

    @classmethod
    def from_settings(cls, settings: Any) -> StopRule:
        return cls(kappa=settings.stop_kappa, rounds=settings.stop_rounds, min_audit=settings.audit_min_labels)

    def _audit_accuracy(self, record: Mapping[str, Any]) -> float | None:
        audit = record.get("audit") or {}
        return audit.get("accuracy") if (audit.get("n") or 0) >= self.min_audit else None

    def evaluate(self, history: Sequence[Mapping[str, Any]]) -> StopSignal:
        """`history`: the project's round records, oldest first (each may carry `stop.kappa` and
        `cv_accuracy`)."""
        evidence = [
            {"version": r.get("version"), "labelled": r.get("labelled"), "kappa": (r.get("stop") or {}).get("kappa"),
             "cv_accuracy": r.get("cv_accuracy"), "audit_accuracy": self._audit_accuracy(r)}
            for r in rounds_with_new_labels(history)
        ]
        source = AUDIT if evidence and evidence[-1]["audit_accuracy"] is not None else CROSS_VALIDATED
        key = "audit_accuracy" if source == AUDIT else "cv_accuracy"
        named = "audit accuracy" if source == AUDIT else "cross-validated accuracy"
        stable = 0
        for entry in reversed(evidence):
            if entry["kappa"] is None or entry["kappa"] < self.kappa:
                break
            stable += 1
        series: list[float | None] = [e[key] for e in evidence]
        recent = [a for a in series[-self.rounds:] if a is not None]
        earlier = [a for a in series[:-self.rounds] if a is not None]
        recent_best = max(recent) if recent else None
        earlier_best = max(earlier) if earlier else None
        rule = {"STOP_KAPPA": self.kappa, "STOP_ROUNDS": self.rounds, "min_accuracy_gain": self.min_gain,
                "AUDIT_MIN_LABELS": self.min_audit}

        def signal(can_stop: bool, reason: str) -> StopSignal:
            return StopSignal(can_stop, reason, stable, recent_best, earlier_best, rule, evidence, source)

        if stable < self.rounds:
            last = evidence[-1]["kappa"] if evidence else None
            shown = "none yet" if last is None else f"{last:.3f}"
            return signal(False, f"keep labelling: predictions on the stop set are stable (kappa >= {self.kappa}) "
                                 f"in {stable} of the last {self.rounds} rounds required (last kappa: {shown})")
        if recent_best is None or earlier_best is None:
            return signal(False, f"keep labelling: predictions are stable for {stable} rounds, but there is no "
                                 f"earlier {named} to tell whether it still rises")
        gain = recent_best - earlier_best
        if gain > self.min_gain + 1e-9:  # 0.805 - 0.800 is 0.0050000000000001 in floats
            return signal(False, f"keep labelling: predictions are stable for {stable} rounds, but the "
                                 f"{named} still rises ({earlier_best:.3f} -> {recent_best:.3f})")
        return signal(True, f"labelling can stop: predictions on the stop set are stable (kappa >= {self.kappa}) "
                            f"for {stable} rounds and the {named} stopped rising "
                            f"(best {recent_best:.3f} in the last {self.rounds} rounds, {earlier_best:.3f} before)")
