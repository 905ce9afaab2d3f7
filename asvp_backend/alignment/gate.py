"""Judging on the audit labels: the proxy's estimated accuracy, and the gate a refreshed feature generation
must pass before it serves (and a fine-tuned model before it is the deliverable).

Invariant: every audit label that judges a proxy is predicted by a proxy that did not train on it
(cross-fitting: the audit labels are split into folds, and each fold is predicted by a proxy fitted on every
other label), so the estimate is unbiased for the pool the audit was drawn from; labels chosen by the
strategy are never the judges (fitted to exactly those labels, a refresh looked better in 8 of 8 cases where
it was worse). The gate compares two generations on the same audit labels (a paired test), which cancels
the labels' own difficulty: the standard error of the difference is about sqrt(discordant share / n), not
the much larger one of two separate accuracies (docs/method.md, *The audit sample and the refresh gate*).

Pure: the job layer and `simulate` call the same functions on the same arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from asvp_backend.learning import wilson_interval

AUDIT_FOLDS = 5
ADOPT, REJECT, WAIT = "adopt", "reject", "wait"


class Verdict(StrEnum):
    """A fine-tuned model against the proxy on the same labels (stored as its text in the model's record)."""

    MODEL = "model"  # the model is the more accurate: it is the deliverable and may pre-annotate
    PROXY = "proxy"  # the proxy is at least as accurate: export refuses the model without --even-if-worse
    UNJUDGED = "unjudged"  # nothing to compare on


def cross_fitted_right(make_proxy: Callable[[], Any], x_other: np.ndarray, y_other: np.ndarray,
                       x_audit: np.ndarray, y_audit: np.ndarray, *, folds: int = AUDIT_FOLDS,
                       seed: int = 0) -> np.ndarray | None:
    """Whether each audit label is predicted right by a proxy that never saw it: fold k of the audit labels
    is predicted by a proxy fitted on the other labels (`x_other`, the strategy's) and the other folds.
    None when there is no audit label or a fold's training labels hold fewer than two classes."""
    n = len(y_audit)
    if n == 0:
        return None
    y_audit = np.asarray(y_audit, dtype=object)
    y_other = np.asarray(y_other, dtype=object)
    fold_of = np.random.default_rng(seed).permutation(n) % max(1, min(folds, n))
    right = np.zeros(n, dtype=bool)
    for fold in np.unique(fold_of):
        test = fold_of == fold
        x_train = np.concatenate([np.asarray(x_other, dtype=np.float32).reshape(-1, x_audit.shape[1]),
                                  np.asarray(x_audit[~test], dtype=np.float32)])
        y_train = np.concatenate([y_other, y_audit[~test]])
        if len(set(y_train.tolist())) < 2:
            return None
        proxy = make_proxy().fit(x_train, y_train)
        right[test] = np.asarray(proxy.predict(np.asarray(x_audit[test], dtype=np.float32)), dtype=object) == \
            y_audit[test]
    return right


@dataclass(frozen=True)
class AuditEstimate:
    """A model's accuracy on the pool, estimated on `n` audit labels, with its 95% Wilson interval."""

    n: int
    accuracy: float
    low: float
    high: float

    @classmethod
    def from_right(cls, right: np.ndarray) -> AuditEstimate:
        n, hits = len(right), int(np.sum(right))
        low, high = wilson_interval(hits, n) or (0.0, 1.0)
        return cls(n, round(hits / n, 4), round(low, 4), round(high, 4))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GateDecision:
    """Whether a challenger (refreshed features, a fine-tuned model) replaces the incumbent, and why."""

    decision: str  # "adopt" | "reject" | "wait"
    reason: str
    n: int
    challenger_accuracy: float | None = None
    incumbent_accuracy: float | None = None
    difference: float | None = None
    standard_error: float | None = None
    z: float | None = None
    min_labels: int | None = None

    @property
    def adopts(self) -> bool:
        return self.decision == ADOPT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Gate:
    """GATE_Z and AUDIT_MIN_LABELS: adopt when the challenger is right more often on the same audit labels
    and the mean paired difference is at least `z` standard errors; below `min_labels` audit labels, wait."""

    z: float = 1.0
    min_labels: int = 60

    @classmethod
    def from_settings(cls, settings: Any) -> Gate:
        return cls(settings.gate_z, settings.audit_min_labels)

    def judge(self, challenger_right: np.ndarray | None, incumbent_right: np.ndarray | None,
              what: str = "the refreshed features") -> GateDecision:
        if challenger_right is None or incumbent_right is None:
            return GateDecision(WAIT, f"{what} wait: no audit label can judge them yet", 0, min_labels=self.min_labels)
        n = len(challenger_right)
        if n < self.min_labels:
            return GateDecision(WAIT, f"{what} wait: {n} audit labels, AUDIT_MIN_LABELS={self.min_labels}", n,
                                min_labels=self.min_labels)
        diff = challenger_right.astype(float) - incumbent_right.astype(float)
        mean = float(diff.mean())
        se = float(math.sqrt(diff.var(ddof=1) / n)) if n > 1 else 0.0
        challenger, incumbent = float(challenger_right.mean()), float(incumbent_right.mean())
        both = (f"{challenger:.3f} vs {incumbent:.3f} on the same {n} audit labels (difference {mean:+.3f}, "
                f"standard error {se:.3f})")
        if mean > 0 and mean >= self.z * se:
            decision, reason = ADOPT, f"{what} are better: {both}"
        elif mean <= 0:
            decision, reason = REJECT, f"{what} are not better: {both}"
        else:
            decision, reason = REJECT, f"{what} are not better beyond noise (GATE_Z={self.z:g}): {both}"
        return GateDecision(decision, reason, n, round(challenger, 4), round(incumbent, 4), round(mean, 4),
                            round(se, 4), self.z, self.min_labels)


def judge_features(gate: Gate, make_proxy: Callable[[], Any], x_challenger: np.ndarray, x_incumbent: np.ndarray,
                   y: np.ndarray, is_audit: np.ndarray, *, seed: int = 0,
                   what: str = "the refreshed features") -> GateDecision:
    """The gate on two feature sets of the same labelled tasks (rows aligned, `is_audit` marks the audit
    labels): each side cross-fitted with the same folds, so the test is paired. The round job and `simulate`
    both judge a refresh through this."""
    y = np.asarray(y, dtype=object)
    is_audit = np.asarray(is_audit, dtype=bool)

    def right(x: np.ndarray) -> np.ndarray | None:
        x = np.asarray(x, dtype=np.float32)
        return cross_fitted_right(make_proxy, x[~is_audit], y[~is_audit], x[is_audit], y[is_audit], seed=seed)

    return gate.judge(right(x_challenger), right(x_incumbent), what=what)


def judge_model(gate: Gate, make_proxy: Callable[[], Any], model_right: np.ndarray, x_other: np.ndarray,
                y_other: np.ndarray, x_audit: np.ndarray, y_audit: np.ndarray, *,
                seed: int = 0) -> dict[str, Any] | None:
    """A fine-tuned model against the proxy on the same audit labels (the gate's paired test): `model_right` is
    whether the model, which never trained on them, labels each right; the proxy's are cross-fitted on the
    other labels (`x_other`). The comparison a model's record carries (`deliverable_rank` reads its verdict);
    None when the proxy cannot be cross-fitted. The finetune job and `simulate` both judge through this."""
    model_right = np.asarray(model_right, dtype=bool)
    proxy_right = cross_fitted_right(make_proxy, x_other, y_other, x_audit, y_audit, seed=seed)
    if proxy_right is None:
        return None
    decision = gate.judge(model_right, proxy_right, what="the fine-tuned model's labels")
    return {"verdict": Verdict.MODEL if decision.adopts else Verdict.PROXY, "judged_on": "audit",
            "n": int(len(model_right)), "model_accuracy": float(model_right.mean()),
            "proxy_accuracy": float(proxy_right.mean()), "model_only": int((model_right & ~proxy_right).sum()),
            "proxy_only": int((proxy_right & ~model_right).sum()), "gate": decision.to_dict()}
