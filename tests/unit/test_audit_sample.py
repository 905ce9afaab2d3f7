"""The audit sample (selection/audit.py): keys fixed by (seed, id) and uniform, the quota of positions, and the
interleaved ranking that serves the picks at those positions and the strategy's order around them."""

from __future__ import annotations

import numpy as np
import pytest

from asvp_backend.selection.audit import AuditPolicy, audit_keys, audit_order, interleave


def test_keys_depend_only_on_seed_and_id_and_are_uniform() -> None:
    ids = np.arange(1, 20_001)
    keys = audit_keys(ids, seed=7)
    assert np.array_equal(keys, audit_keys(ids, seed=7))
    assert np.array_equal(keys[100:200], audit_keys(ids[100:200], seed=7))  # a task's key ignores its neighbours
    assert not np.array_equal(keys, audit_keys(ids, seed=8))
    assert keys.min() >= 0.0 and keys.max() < 1.0
    counts, _ = np.histogram(keys, bins=10, range=(0.0, 1.0))
    chi2 = float(((counts - 2_000) ** 2 / 2_000).sum())
    assert chi2 < 27.9  # chi-square, 9 degrees of freedom, p = 0.001
    assert abs(np.corrcoef(ids, keys)[0, 1]) < 0.03  # consecutive ids give unrelated keys


def test_picks_are_the_smallest_keys_whatever_the_order_of_the_pool() -> None:
    ids = np.array([50, 3, 17, 8, 99, 23])
    keys = audit_keys(ids, seed=1)
    rows = audit_order(ids, keys, 3)
    assert sorted(keys[rows].tolist()) == sorted(keys.tolist())[:3]
    shuffled = ids[::-1].copy()
    assert set(ids[rows].tolist()) == set(shuffled[audit_order(shuffled, audit_keys(shuffled, 1), 3)].tolist())
    assert len(audit_order(ids, keys, 0)) == 0 and len(audit_order(ids, keys, 99)) == len(ids)


def test_owed_follows_the_early_share_then_the_share() -> None:
    policy = AuditPolicy(fraction=0.05, early_fraction=0.2, min_labels=60)
    assert [policy.owed(n) for n in (0, 4, 5, 10, 300)] == [0, 0, 1, 2, 60]
    assert policy.owed(300 + 100) == 65 and policy.owed(300 + 1_000) == 110
    assert policy.share(0) == 0.2 and policy.share(60) == 0.05
    off = AuditPolicy(fraction=0.0)
    assert not off.enabled and off.owed(1_000) == 0 and off.positions(0, 0, 100) == []


@pytest.mark.parametrize("start,given", [(0, 0), (37, 7), (400, 60), (1_000, 80)])
def test_positions_keep_the_quota_over_the_queue(start: int, given: int) -> None:
    policy = AuditPolicy(fraction=0.05, early_fraction=0.2, min_labels=60)
    positions = policy.positions(start, given, 200)
    owed = policy.owed(start + 200)
    assert given + len(positions) == max(given, owed)  # the debt is paid by the end of the horizon
    for i, p in enumerate(positions):  # never more than owed at any point of the queue
        assert given + i + 1 <= max(given + 1, policy.owed(start + p + 1))
    assert positions == sorted(set(positions))


def test_a_debt_is_paid_back_every_other_position_not_in_a_run() -> None:
    policy = AuditPolicy(fraction=0.05, early_fraction=0.2, min_labels=60)
    positions = policy.positions(200, 0, 100)  # 40 audit labels owed already, none given
    assert positions[:5] == [0, 2, 4, 6, 8]
    assert all(b - a >= 2 for a, b in zip(positions, positions[1:], strict=False))


def test_interleave_serves_the_picks_at_their_positions_and_the_ranking_around_them() -> None:
    rng = np.random.default_rng(0)
    ids = np.arange(100, 400)
    scores = rng.random(len(ids))
    positions = [0, 5, 10]
    placed = interleave(scores, ids, seed=3, positions=positions)
    served = np.argsort(placed.scores, kind="stable")
    assert served[positions].tolist() == placed.audit_rows.tolist()
    assert set(placed.audit_rows.tolist()) == set(audit_order(ids, audit_keys(ids, 3), 3).tolist())
    rest = [r for r in served.tolist() if r not in set(placed.audit_rows.tolist())]
    assert rest == [r for r in np.argsort(scores, kind="stable").tolist() if r not in set(placed.audit_rows.tolist())]
    assert np.allclose(np.sort(placed.scores)[12:], np.sort(scores)[12:])  # the same scores, reassigned
    assert len(np.unique(placed.scores[served[:12]])) == 12  # no tie near the top for Label Studio to break


def test_interleave_breaks_ties_at_the_top_and_ignores_positions_past_the_pool() -> None:
    ids = np.arange(1, 11)
    scores = np.zeros(10)  # a cold start ranks every task alike
    placed = interleave(scores, ids, seed=0, positions=[1, 3, 50])
    served = np.argsort(placed.scores, kind="stable")
    assert placed.positions == [1, 3]
    assert served[[1, 3]].tolist() == placed.audit_rows.tolist()
    assert np.all(np.diff(placed.scores[served][:5]) > 0)
    unchanged = interleave(scores, ids, seed=0, positions=[])
    assert unchanged.audit_rows.size == 0 and np.array_equal(unchanged.scores, scores)


@pytest.mark.parametrize("value", [0.0, 1.0, 0.5])
def test_ties_are_broken_inside_label_studios_score_range(value: float) -> None:
    """Label Studio drops a prediction whose score is outside [0, 1]: a queue of certain tasks (margin 1.0 for
    all, as on easy images) or of a cold start (0.0) must stay inside it after the picks are placed."""
    from asvp_backend.selection.scoring import check_scores

    ids = np.arange(1, 41)
    scores = np.full(40, value)
    placed = interleave(scores, ids, seed=0, positions=[0, 5, 10])
    check_scores(placed.scores)
    served = np.argsort(placed.scores, kind="stable")
    assert served[[0, 5, 10]].tolist() == placed.audit_rows.tolist()
    assert np.all(np.diff(placed.scores[served][:12]) > 0)
    mixed = interleave(np.array([0.0, 0.0, 1.0, 1.0, 1.0]), np.arange(5), seed=1, positions=[0, 2])
    check_scores(mixed.scores)
    assert np.all(np.diff(np.sort(mixed.scores)[:4]) > 0)  # strict up to the slot after the last pick
