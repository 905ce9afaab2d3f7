"""LogME and LogME-PED (docs/method.md, *LogME*, *PED*): against a direct evaluation, their invariances, PED's moves."""

from __future__ import annotations

import numpy as np
import pytest

from asvp_backend.alignment.transferability import logme, logme_ped, ped


def gaussian_classes(n: int, d: int, classes: int, spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) features around ``classes`` random centres of scale ``spread`` with unit noise; every class present."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, d)) * spread
    y = np.arange(n) % classes
    rng.shuffle(y)
    return centres[y] + rng.standard_normal((n, d)), y


def direct_logme(f: np.ndarray, y: np.ndarray, published: bool = False) -> float:
    """Slow LogME with explicit matrices: m by a linear solve, r2 and m2 from m, log det by slogdet.

    The exact log evidence subtracts ``1/2 log det(alpha I_D + beta F^T F)``. The published fixed-point
    formula (docs/method.md, *LogME*) subtracts ``1/2 sum_i log(alpha + beta sigma_i)`` over the singular values
    it keeps (``rank = min(N, D)`` for full-rank data), missing the ``D - rank`` zero eigenvalues' ``log
    alpha``: published = exact + ``(D - rank)/2 log alpha``, zero when N > D, not when N < D.
    """
    n, d = f.shape
    gram = f.T @ f
    sigma = np.clip(np.linalg.eigvalsh(gram), 0.0, None)
    rank = min(n, d)
    evidences = []
    for c in np.unique(y):
        t = (y == c).astype(np.float64)
        alpha = beta = 1.0
        for _ in range(11):
            lam = alpha / beta
            gamma = np.sum(beta * sigma / (alpha + beta * sigma))
            m = beta * np.linalg.solve(alpha * np.eye(d) + beta * gram, f.T @ t)
            m2 = m @ m
            r2 = np.sum((f @ m - t) ** 2)
            alpha, beta = gamma / (m2 + 1e-5), (n - gamma) / (r2 + 1e-5)
            if abs(alpha / beta - lam) / lam <= 1e-3:
                break
        logdet = np.linalg.slogdet(alpha * np.eye(d) + beta * gram)[1]
        exact = (
            d / 2 * np.log(alpha)
            + n / 2 * np.log(beta)
            - logdet / 2
            - beta / 2 * r2
            - alpha / 2 * m2
            - n / 2 * np.log(2 * np.pi)
        )
        evidences.append((exact + (published * (d - rank)) / 2 * np.log(alpha)) / n)
    return float(np.mean(evidences))


# ---------------------------------------------------------------------------------------------- LogME


@pytest.mark.parametrize(("n", "d"), [(60, 10), (200, 25), (15, 40), (30, 30)], ids=["N>D", "N>>D", "N<D", "N=D"])
@pytest.mark.parametrize("seed", [0, 1])
def test_logme_matches_direct_evaluation(n: int, d: int, seed: int) -> None:
    f, y = gaussian_classes(n, d, classes=3, spread=0.8, seed=seed)
    assert logme(f, y) == pytest.approx(direct_logme(f, y), rel=1e-6)
    published = logme(f, y, evidence="published")
    assert published == pytest.approx(direct_logme(f, y, published=True), rel=1e-6)
    assert (published == pytest.approx(logme(f, y), rel=1e-12)) == (n >= d)  # equal at full rank D


def test_exact_logme_rises_with_labels_where_the_published_one_falls() -> None:
    # N < D, the backend's usual regime (1,280-d features, a few hundred labels)
    pool, y = gaussian_classes(1200, 200, classes=5, spread=0.5, seed=3)
    sizes = [50, 100, 200]
    exact = [logme(pool[:n], y[:n]) for n in sizes]
    published = [logme(pool[:n], y[:n], evidence="published") for n in sizes]
    assert exact[0] < exact[1] < exact[2]
    assert published[0] > published[1] > published[2]
    with pytest.raises(ValueError, match="evidence"):
        logme(pool[:10], y[:10], evidence="icml")


def test_logme_is_higher_for_separable_classes() -> None:
    separable = logme(*gaussian_classes(400, 16, classes=4, spread=3.0))
    overlapping = logme(*gaussian_classes(400, 16, classes=4, spread=0.2))
    assert separable > overlapping + 0.1


def test_logme_does_not_depend_on_label_names() -> None:
    f, y = gaussian_classes(300, 20, classes=3, spread=1.0)
    names = np.array(["a", "b", "c"])[y]
    renamed = np.array(["z", "b", "c"])[y]  # "a" -> "z" moves the class from first to last after sorting
    reference = logme(f, y)
    assert logme(f, names) == pytest.approx(reference, rel=1e-12)
    assert logme(f, renamed) == pytest.approx(reference, rel=1e-12)
    assert logme(f, list(names)) == pytest.approx(reference, rel=1e-12)  # a plain list of strings
    assert logme(f, [int(v) for v in y]) == pytest.approx(reference, rel=1e-12)


def test_absent_classes_do_not_count() -> None:
    f, y = gaussian_classes(100, 8, classes=2, spread=1.0)
    assert logme(f, np.where(y == 0, 3, 7)) == logme(f, y)


def test_single_class_and_float16_input() -> None:
    f, _ = gaussian_classes(50, 8, classes=2, spread=1.0)
    assert np.isfinite(logme(f, np.zeros(50, dtype=int)))
    f16 = f.astype(np.float16)
    assert logme(f16, np.arange(50) % 2) == logme(f16.astype(np.float64), np.arange(50) % 2)


@pytest.mark.parametrize(
    ("features", "labels", "match"),
    [
        (np.zeros(5), [0, 1, 0, 1, 0], "2-d"),
        (np.ones((5, 3, 2)), [0, 1, 0, 1, 0], "2-d"),
        (np.ones((5, 3)), [0, 1, 0, 1], "labels"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), [0, 1], "NaN"),
        (np.array([[1.0, np.inf], [0.0, 1.0]]), [0, 1], "NaN"),
        (np.ones((1, 3)), [0], "at least 2"),
        (np.zeros((6, 3)), [0, 1, 0, 1, 0, 1], "zero"),
        (np.ones((4, 3)), np.zeros((4, 1)), "1-d"),
    ],
)
def test_bad_input_raises(features: np.ndarray, labels: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        logme(features, labels)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ PED

#: a reference with mean 0 and std 1 in each of 2 dimensions, so the rescaling is the identity
UNIT_REFERENCE = np.array([[-1.0, -1.0], [1.0, 1.0]])


def class_means(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.stack([x[y == c].mean(axis=0) for c in np.unique(y)])


def test_ped_step_matches_hand_computation() -> None:
    # class a: mean (0, 0), class b: mean (1, 0); variance 0.25 along x -> radius 0.5 each, distance 1.
    x = np.array([[-0.5, 0.0], [0.5, 0.0], [0.5, 0.0], [1.5, 0.0]])
    y = np.array([0, 0, 1, 1])
    # nsigma 2: overlap 2*0.5 + 2*0.5 - 1 = 1; displacement min(0.5 * 0.1^2 * 1 * 1, 1) = 0.005 each, apart
    out = ped(x, y, UNIT_REFERENCE, nsigma=2.0, max_steps=1)
    np.testing.assert_allclose(out - x, [[-0.005, 0]] * 2 + [[0.005, 0]] * 2, rtol=0, atol=1e-15)
    # step 1's overlap is 0.99, so its change ratio is 0.99: applied at exit_ratio 0.98, not at 0.995
    assert np.array_equal(ped(x, y, UNIT_REFERENCE, nsigma=2.0, exit_ratio=0.995), out)
    two_steps = ped(x, y, UNIT_REFERENCE, nsigma=2.0, exit_ratio=0.98, max_steps=2)
    np.testing.assert_allclose(two_steps[0] - x[0], [-0.005 - 0.00495, 0], atol=1e-12)
    # step 0's own ratio is 1: an exit ratio of 1 rejects even step 0, as in the published loop
    assert np.array_equal(ped(x, y, UNIT_REFERENCE, nsigma=2.0, exit_ratio=1.0), x)


def test_ped_rescales_by_the_reference() -> None:
    x = np.array([[-0.5, 0.0], [0.5, 0.0], [0.5, 0.0], [1.5, 0.0]])
    y = np.array([0, 0, 1, 1])
    wide = UNIT_REFERENCE * 10.0 + 3.0  # std 10, mean 3: the same move, 10x larger in feature units
    out = ped(x, y, wide, nsigma=2.0, max_steps=1)
    # rescaled: radius 0.05 each, distance 0.1, overlap 0.1, displacement 0.0005 -> 0.005 in feature units
    np.testing.assert_allclose(out[:, 0] - x[:, 0], [-0.005, -0.005, 0.005, 0.005], atol=1e-12)


def test_ped_pushes_overlapping_classes_apart() -> None:
    x, y = gaussian_classes(300, 6, classes=3, spread=0.3)
    reference = gaussian_classes(2000, 6, classes=3, spread=0.3, seed=1)[0]
    before = class_means(x, y)
    after = class_means(ped(x, y, reference), y)
    for i in range(3):
        for j in range(i + 1, 3):
            assert np.linalg.norm(after[i] - after[j]) > np.linalg.norm(before[i] - before[j])


def test_ped_leaves_separated_classes_unchanged() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((90, 4)) * 0.1
    y = np.repeat([0, 1, 2], 30)
    x[y == 1] += 50.0  # far from everything
    x[y == 2] += 0.05  # overlaps class 0
    reference = rng.standard_normal((500, 4))
    out = ped(x, y, reference)
    assert np.array_equal(out[y == 1], x[y == 1])  # bit-for-bit
    assert not np.array_equal(out[y == 0], x[y == 0])
    far = x.copy()
    far[y == 2] -= 50.0  # classes at 0, 50 and -50
    assert np.array_equal(ped(far, y, reference), far)  # nothing overlaps: change_0 == 0


def test_ped_identical_means_and_one_sample_classes() -> None:
    v = np.array([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    x = np.concatenate([v, v[::-1]])  # classes 0 and 1 have exactly the same mean
    y = np.array([0, 0, 1, 1])
    reference = np.random.default_rng(0).standard_normal((100, 3))
    out = ped(x, y, reference)
    assert np.array_equal(out, x)  # no direction to push along: nothing moves, no division by zero
    # add a third class near them: it is pushed, the identical pair stays finite
    x3 = np.concatenate([x, [[1.2, 1.0, 1.0]]])
    out3 = ped(x3, np.array([0, 0, 1, 1, 2]), reference)
    assert np.isfinite(out3).all()
    assert not np.array_equal(out3[4], x3[4])
    # one-sample classes only (radius 0): they overlap when closer than 0, i.e. never
    singles = np.random.default_rng(1).standard_normal((5, 3))
    assert np.array_equal(ped(singles, np.arange(5), reference), singles)


def test_ped_does_not_mutate_and_accepts_float16() -> None:
    x, y = gaussian_classes(120, 5, classes=3, spread=0.3)
    reference = gaussian_classes(500, 5, classes=3, spread=0.3, seed=1)[0]
    x_copy, y_copy, ref_copy = x.copy(), y.copy(), reference.copy()
    out = ped(x, y, reference)
    assert not np.shares_memory(out, x)
    assert np.array_equal(x, x_copy) and np.array_equal(y, y_copy) and np.array_equal(reference, ref_copy)
    out16 = ped(x.astype(np.float16), y, reference.astype(np.float16))
    assert out16.dtype == np.float64 and np.isfinite(out16).all()


def test_ped_bad_reference_raises() -> None:
    x, y = gaussian_classes(20, 5, classes=2, spread=1.0)
    with pytest.raises(ValueError, match="columns"):
        ped(x, y, np.ones((10, 4)))
    with pytest.raises(ValueError, match="NaN"):
        ped(x, y, np.full((10, 5), np.nan))


# ------------------------------------------------------------------------------------------ LogME-PED


def test_logme_ped_rises_and_saturates_on_synthetic_data() -> None:
    # the sanity check of docs/method.md, *PED*: 10 Gaussian classes, D = 64, random labelled subsets of a 20k
    # pool, the pool as reference. Here (centre scale 0.6), LogME: 0.020 0.082 0.147 0.202 0.241 0.263 and
    # LogME-PED: 0.059 0.139 0.213 0.270 0.311 0.335 for 100 ... 3,200 labels (docs/method.md, with its own
    # generator: 0.060 -> 0.333 and 0.082 -> 0.387).
    pool, y = gaussian_classes(20_000, 64, classes=10, spread=0.6)
    order = np.random.default_rng(1).permutation(len(pool))
    sizes = [100, 200, 400, 800, 1600, 3200]
    plain = np.array([logme(pool[order[:n]], y[order[:n]]) for n in sizes])
    aligned = np.array([logme_ped(pool[order[:n]], y[order[:n]], pool) for n in sizes])
    for curve in (plain, aligned):
        gains = np.diff(curve)
        assert (gains > 0).sum() >= len(gains) - 1  # mostly increasing
        assert curve[-1] > curve[0]
        assert gains[-1] < gains[0]  # saturating
    assert (aligned > plain).all()  # PED separates the overlapping classes


def test_logme_ped_reference_subsample() -> None:
    x, y = gaussian_classes(200, 8, classes=4, spread=0.3)
    pool = gaussian_classes(3000, 8, classes=4, spread=0.3, seed=1)[0]
    assert logme_ped(x, y, pool, max_reference=3000) == logme(ped(x, y, pool), y)
    sub = logme_ped(x, y, pool, max_reference=500, seed=0)
    assert sub == logme_ped(x, y, pool, max_reference=500, seed=0)  # seeded
    assert sub != logme_ped(x, y, pool, max_reference=500, seed=1)
    assert sub == pytest.approx(logme(ped(x, y, pool), y), rel=0.05)  # the subsample estimates the rescaling
    assert logme_ped(x, y, pool, nsigma=0.0) == logme(x, y)  # ped_kwargs reach ped: no reach, no move
