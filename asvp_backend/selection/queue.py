"""One active-learning step, shared by the round job and `simulate`: train the proxy on the labelled set, let the
strategy rank the pool, and place the audit picks in that ranking; the batch labelled next is its top.

Invariant: a pure function of its inputs. The arrays come in task-id order (`RoundInputs.from_arrays` sorts
them), every seed comes from `QueueSettings.seed` and the round number, and nothing here reads or writes a
file. So the backend's queue and the simulator's batch are the same computation, which
tests/unit/test_core_identity.py checks by feeding both the same inputs: `simulate` measures what the backend
does, not a re-implementation of it. The round job adds only I/O around it (jobs/rounds.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from asvp_backend.alignment.gate import AuditEstimate, cross_fitted_right
from asvp_backend.selection.audit import AuditPolicy, interleave
from asvp_backend.selection.scoring import check_scores


@dataclass(frozen=True)
class QueueSettings:
    """PROXY, STRATEGY, COLD_START_STRATEGY, EPSILON, SEED, PUSH_TOP_K and the audit policy: what ranks the pool."""

    proxy: str = "mlp"
    strategy: str = "margin"
    cold_start_strategy: str = "typiclust"
    epsilon: float = 0.0
    seed: int = 0
    push_top_k: int = 2000
    audit: AuditPolicy = field(default_factory=AuditPolicy)

    @classmethod
    def from_settings(cls, settings: Any) -> QueueSettings:
        return cls(settings.proxy, settings.strategy, settings.cold_start_strategy, settings.epsilon, settings.seed,
                   settings.push_top_k, AuditPolicy.from_settings(settings))


@dataclass
class RoundInputs:
    """The current generation's features, split into the labelled set and the unlabelled pool (task-id order)."""

    x_lab: np.ndarray  # (m, d) float32
    y_lab: np.ndarray  # (m,) labels (class names in the backend)
    lab_ids: np.ndarray  # (m,) task ids of the labelled rows
    pool_ids: np.ndarray  # (n,) task ids
    x_pool: np.ndarray  # (n, d) float16, the store's type (2.5 GB at 1M x 1,280); the proxy converts per batch
    labelled_total: int  # every labelled task, with features or not (what round_due compares against)

    @classmethod
    def from_arrays(cls, lab_ids: np.ndarray, x_lab: np.ndarray, y_lab: np.ndarray, pool_ids: np.ndarray,
                    x_pool: np.ndarray, labelled_total: int | None = None) -> RoundInputs:
        """Inputs in task-id order: the proxy's fit depends on the order of its rows."""
        lab_order = np.argsort(np.asarray(lab_ids, dtype=np.int64), kind="stable")
        pool_order = np.argsort(np.asarray(pool_ids, dtype=np.int64), kind="stable")
        dim = x_pool.shape[1] if x_pool.ndim == 2 else x_lab.shape[1]
        return cls(
            x_lab=np.asarray(x_lab, dtype=np.float32).reshape(-1, dim)[lab_order],
            y_lab=np.asarray(y_lab, dtype=object)[lab_order],
            lab_ids=np.asarray(lab_ids, dtype=np.int64)[lab_order],
            pool_ids=np.asarray(pool_ids, dtype=np.int64)[pool_order],
            x_pool=x_pool[pool_order].reshape(-1, dim),
            labelled_total=len(lab_ids) if labelled_total is None else labelled_total,
        )


@dataclass
class RoundRanking:
    strategy: str
    proxy: Any  # None at cold start
    scores: np.ndarray  # (n,) lower = label first
    labels: np.ndarray  # (n,) the suggested label per pool task, "" at cold start
    audit_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # pool rows of the picks


def rank_pool(inputs: RoundInputs, queue: QueueSettings, round_no: int, device: str, batch: int) -> RoundRanking:
    """Train the proxy (from two labelled classes on) and let the strategy score every pool task.

    Set-based strategies pick the batch labelled before the next round (`batch`), not the whole pushed top:
    TypiClust then makes one cluster per pick, and the rest is ranked by the proxy's uncertainty."""
    from asvp_backend.selection import SelectionInput, create_proxy, create_strategy

    n = len(inputs.pool_ids)
    proxy, probs, labels = None, None, np.full(n, "")
    if len(set(inputs.y_lab.tolist())) >= 2:
        proxy = create_proxy(queue.proxy, device=device, seed=queue.seed).fit(inputs.x_lab, inputs.y_lab)
        if n:
            probs = proxy.predict_proba(inputs.x_pool)
            # label names, not indices: a label config edited later must not turn "cat" into another class
            labels = np.asarray(proxy.classes_).astype(str)[probs.argmax(axis=1)]
        strategy_name = queue.strategy
    else:  # nothing (or one class) labelled: a cold-start strategy ranks on features alone
        strategy_name = queue.cold_start_strategy
    strategy = create_strategy(strategy_name, seed=queue.seed + round_no, epsilon=queue.epsilon, device=device)
    scores: np.ndarray = np.zeros(0)
    if n:
        pool = SelectionInput(inputs.x_pool, probs, inputs.x_lab, proxy)
        scores = np.asarray(strategy.rank(pool, min(n, batch)).scores, dtype=np.float64)
    return RoundRanking(strategy_name, proxy, scores, labels)


def place_audit(ranking: RoundRanking, inputs: RoundInputs, queue: QueueSettings, labels_since_start: int,
                audit_labels: int) -> np.ndarray:
    """Interleave the audit picks into the ranking (selection/audit.py) at the positions that the labels given
    since the audit started call for, among the pushed top. Returns the picks' pool rows (also kept on the
    ranking)."""
    horizon = min(len(inputs.pool_ids), queue.push_top_k)
    positions = queue.audit.positions(max(0, labels_since_start), audit_labels, horizon)
    placed = interleave(ranking.scores, inputs.pool_ids, queue.seed, positions)
    check_scores(placed.scores)  # Label Studio drops a prediction scored outside [0, 1] without a word
    ranking.scores = placed.scores
    ranking.audit_rows = placed.audit_rows
    return placed.audit_rows


def next_batch(ranking: RoundRanking, budget: int) -> np.ndarray:
    """The pool rows an annotator labels next when they take `budget` tasks from the top of the queue."""
    return np.argsort(ranking.scores, kind="stable")[: max(0, budget)].astype(np.int64)


def audit_estimate(inputs: RoundInputs, audit_ids: Any, queue: QueueSettings, device: str) -> dict[str, Any] | None:
    """The proxy's accuracy on the pool, estimated on the audit labels (`audit_ids` among the labelled), each
    predicted by a proxy that did not train on it (alignment/gate.py); None without audit labels."""
    from asvp_backend.selection import create_proxy

    is_audit = np.isin(inputs.lab_ids, np.asarray(audit_ids, dtype=np.int64))
    if not is_audit.any():
        return None
    right = cross_fitted_right(lambda: create_proxy(queue.proxy, device=device, seed=queue.seed),
                               inputs.x_lab[~is_audit], inputs.y_lab[~is_audit], inputs.x_lab[is_audit],
                               inputs.y_lab[is_audit], seed=queue.seed)
    return None if right is None else AuditEstimate.from_right(right).to_dict()
