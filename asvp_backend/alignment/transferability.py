"""Transferability scores of the labelled set's features: LogME and LogME-PED (docs/method.md, *LogME*, *PED*).

Invariants, and why:

- **Pure NumPy, float64 inside.** The feature store holds float16; the evidence sums ``log`` terms over up to
  1,280 singular values and ``N`` samples, and the trigger (docs/method.md, *The alignment policy*) compares
  *differences* of scores between rounds, so half or single precision would drown the signal. No torch: the API
  and scoring code can import this without loading it.
- **The published fixed-point LogME** (``thuml/LogME``, ``_fit_fixed_point``), term for term, except one:
  by default the evidence uses the exact log-determinant of ``alpha I_D + beta F^T F``. The published formula
  sums ``log(alpha + beta * sigma)`` over the kept singular values only, so below full rank (N < D) it is
  higher by ``(D - rank)/2 * log(alpha)``, and that term makes the score *fall* as labels grow (10 synthetic
  classes, D = 1,280: 59.4 at 100 labels, 3.8 at 800, 0.6 at 1,600, then 0.7 at 3,200; exact: 0.03, 0.52,
  0.63, 0.73). The alignment trigger compares consecutive rounds, and a backend's labelled set is below
  1,280 labels for most of a project's life, so a falling published score would fire it every round.
  With N > D at full rank the two are identical; ``evidence="published"`` gives the published numbers.
- **Labels are remapped to ``0..k-1``** before anything is indexed by them: the published code loops over
  ``0..max(y)``, so an absent class would enter the mean as an all-zero target, and PED's per-class arrays
  are indexed by the raw label. Labels may be any hashable values (class names).
- **The decomposition is computed once** and reused for every class (the hot path: ``F^T F`` for ``N > D``).
- Inputs are never mutated; ``ped`` returns a new array.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.intp]
Labels = Sequence[Hashable] | np.ndarray

#: LogME fixed point (published values): iterations, relative tolerance on alpha/beta, denominator epsilon,
#: and the singular values kept when going through F^T F
_MAX_ITERATIONS = 11
_TOLERANCE = 1e-3
_EPSILON = 1e-5
_MIN_SINGULAR_VALUE = 1e-10

#: elements of the (rows, classes, D) block of class-mean differences PED builds at a time (~32 MiB)
_PED_BLOCK = 1 << 22


def _check_features(features: ArrayLike, name: str, min_rows: int) -> FloatArray:
    x = np.asarray(features, dtype=np.float64)  # a copy unless already float64; never written to
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-d (n, D) array, got shape {x.shape}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {x.shape[0]}")
    if x.shape[1] < 1:
        raise ValueError(f"{name} must have at least one feature column")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return x


def _encode_labels(labels: Labels, n: int) -> tuple[IntArray, int]:
    """Labels -> codes in ``0..k-1`` and ``k``.

    A non-object 1-d array goes through ``np.unique``; any other sequence through a dict, which keeps Python
    equality (``np.asarray([1, "1"])`` would turn both into the same string).
    """
    if isinstance(labels, np.ndarray) and labels.dtype != object:
        if labels.ndim != 1:
            raise ValueError(f"labels must be 1-d, got shape {labels.shape}")
        codes = np.unique(labels, return_inverse=True)[1].astype(np.intp).reshape(-1)
    else:
        index: dict[Hashable, int] = {}
        codes = np.fromiter((index.setdefault(v, len(index)) for v in labels), dtype=np.intp)
    if codes.shape[0] != n:
        raise ValueError(f"got {codes.shape[0]} labels for {n} feature rows")
    return codes, int(codes.max()) + 1


def _groups(codes: IntArray, k: int) -> list[IntArray]:
    """Row indices of each class ``0..k-1``."""
    order = np.argsort(codes, kind="stable")
    return np.split(order, np.cumsum(np.bincount(codes, minlength=k))[:-1])


EVIDENCE = ("exact", "published")


def _class_evidence(x2: FloatArray, res_x2: float, sigma: FloatArray, n: int, d: int, exact: bool) -> float:
    """One class's evidence per sample: the published fixed point on ``x = U^T t`` (docs/method.md, *LogME*);
    ``exact`` adds the ``D - rank`` zero eigenvalues of ``F^T F`` to the log-determinant (module docstring)."""
    alpha = beta = 1.0
    m2 = r2 = 0.0
    for _ in range(_MAX_ITERATIONS):
        lam = alpha / beta
        gamma = float(np.sum(sigma / (sigma + lam)))
        m2 = float(np.sum(sigma * x2 / (lam + sigma) ** 2))  # m^T m
        r2 = float(np.sum(x2 / (1.0 + sigma / lam) ** 2)) + res_x2  # ||F m - t||^2
        alpha = gamma / (m2 + _EPSILON)
        beta = (n - gamma) / (r2 + _EPSILON)
        if abs(alpha / beta - lam) / lam <= _TOLERANCE:
            break
    # the last alpha, beta with the m2, r2 of that same iteration, as published
    evidence = (
        d / 2.0 * np.log(alpha)
        + n / 2.0 * np.log(beta)
        - 0.5 * np.sum(np.log(alpha + beta * sigma))
        - beta / 2.0 * r2
        - alpha / 2.0 * m2
        - n / 2.0 * np.log(2.0 * np.pi)
    )
    if exact:
        evidence -= (d - sigma.size) / 2.0 * np.log(alpha)  # log(alpha + beta * 0) for each missing eigenvalue
    return float(evidence) / n


def logme(features: ArrayLike, labels: Labels, *, evidence: str = "exact") -> float:
    """Mean over the labelled classes of the LogME evidence per sample; higher = the features fit the labels.

    ``features``: (N, D), any float dtype. ``labels``: N hashable values; only the classes present count.
    A single class is allowed (its evidence). ``evidence``: "exact" or "published" (module docstring).
    Raises ``ValueError`` for bad input.
    """
    if evidence not in EVIDENCE:
        raise ValueError(f"evidence must be one of {EVIDENCE}, got {evidence!r}")
    f = _check_features(features, "features", min_rows=2)
    n, d = f.shape
    codes, k = _encode_labels(labels, n)
    groups = _groups(codes, k)
    if n > d:
        # published: decompose F^T F (D x D) instead of F. For a symmetric PSD matrix the SVD is the
        # eigendecomposition (singular values = |eigenvalues|), and eigh is cheaper. U = F V / s is never
        # formed: x = U^T t = V^T (F^T t) / s, and F^T t is the class's row sum.
        eigenvalues, v = np.linalg.eigh(f.T @ f)
        sigma = np.abs(eigenvalues)  # s^2
        keep = np.sqrt(sigma) > _MIN_SINGULAR_VALUE
        sigma, v = sigma[keep], v[:, keep]
        class_sums = np.stack([f[g].sum(axis=0) for g in groups])  # (k, D)
        x = (class_sums @ v) / np.sqrt(sigma)  # (k, rank)
    else:
        # published: thin SVD of F, not truncated. Its U and s^2 are the eigenvectors and |eigenvalues| of
        # F F^T (N x N), which eigh finds ~3x faster than the SVD (1k x 1,280: 0.8 s instead of 2.4 s); the
        # small singular values lose relative precision, but they enter the evidence only next to alpha/beta.
        eigenvalues, u = np.linalg.eigh(f @ f.T)
        sigma = np.abs(eigenvalues)
        x = np.stack([u[g].sum(axis=0) for g in groups])  # (k, N): U^T t
    if not np.any(sigma > 0):
        raise ValueError("features are all (numerically) zero: LogME is undefined")
    x2 = x**2
    counts = np.bincount(codes, minlength=k)  # ||t||^2 of a one-hot target
    exact = evidence == "exact"
    evidences = [_class_evidence(x2[c], float(counts[c] - x2[c].sum()), sigma, n, d, exact) for c in range(k)]
    return float(np.mean(evidences))


def _ped_move(means: FloatArray, reach: FloatArray, time_step: float, k: float) -> FloatArray:
    """One PED step's displacement of every class mean (docs/method.md, *PED*, steps 3-4), in the rescaled space.

    Differences are taken exactly (not through a Gram matrix) so identical means give ``d = 0`` exactly:
    no direction, so no push (the published code divides by zero there).
    """
    c, d = means.shape
    move = np.empty_like(means)
    rows = max(1, _PED_BLOCK // (c * d))
    for start in range(0, c, rows):
        diff = means[start : start + rows, None, :] - means[None, :, :]  # (b, c, D): mu_i - mu_j
        dist = np.sqrt(np.einsum("ijd,ijd->ij", diff, diff))
        overlap = np.maximum(reach[start : start + rows, None] + reach[None, :] - dist, 0.0)
        disp = np.minimum(0.5 * time_step**2 * k * overlap, overlap)
        weight = np.divide(disp, dist, out=np.zeros_like(dist), where=dist > 0)  # also drops i == j
        move[start : start + rows] = np.einsum("ij,ijd->id", weight, diff)
    return move


def ped(
    features: ArrayLike,
    labels: Labels,
    reference: ArrayLike,
    *,
    time_step: float = 0.1,
    nsigma: float = 0.6,
    exit_ratio: float = 0.5,
    k: float = 1.0,
    max_steps: int = 6,
    eps: float = 1e-3,
) -> FloatArray:
    """Features after PED's "potential energy decline": overlapping classes pushed apart rigidly.

    ``reference`` (any number of rows, same D) only sets the per-dimension rescaling. Returns a new float64
    (N, D) array; classes that overlap no other class are returned bit-for-bit unchanged.

    Semantics of ``lixiaotong97/PED`` ``PED_Score``: step 0's change is the reference; a step is applied
    while ``change / change_0 > exit_ratio``, and the first step that fails the ratio is computed but *not*
    applied (the loop breaks before assigning it). Nothing overlapping (``change_0 == 0``, where the
    published code would divide by zero) returns the features unchanged.

    Moves are rigid per class, so class variances and radii never change and a step only moves the means:
    iterating on the means and shifting the samples once at the end equals re-running the published
    one-step function on the moved samples (up to rounding), at O(classes^2 D) per step instead of O(N D).
    """
    x = _check_features(np.array(features, dtype=np.float64), "features", min_rows=2)  # our own copy: the output
    ref = _check_features(reference, "reference", min_rows=1)
    if ref.shape[1] != x.shape[1]:
        raise ValueError(f"reference has {ref.shape[1]} feature columns, features have {x.shape[1]}")
    codes, n_classes = _encode_labels(labels, x.shape[0])

    centre = ref.mean(axis=0)
    scale = np.maximum(ref.std(axis=0), eps)
    means = np.empty((n_classes, x.shape[1]))
    radius = np.empty(n_classes)
    for c, rows in enumerate(_groups(codes, n_classes)):  # statistics of the rescaled class (x - centre) / scale
        members = x[rows]
        means[c] = (members.mean(axis=0) - centre) / scale
        radius[c] = np.sqrt((members.var(axis=0) / scale**2).sum())  # one sample: 0
    reach = abs(nsigma) * radius

    shift = np.zeros_like(means)
    change_0 = 0.0
    for step in range(max_steps):
        move = _ped_move(means + shift, reach, time_step, k)
        change = float(np.abs(move).sum())
        if step == 0:
            change_0 = change
        if change_0 == 0.0 or change / change_0 <= exit_ratio:
            break
        shift += move
    class_moved: NDArray[np.bool_] = np.asarray(shift.any(axis=1))
    moving = class_moved[codes]  # samples of classes that moved; the others stay bit-for-bit
    x[moving] += (shift * scale)[codes[moving]]  # undo the rescaling: a displacement only scales
    return x


def logme_ped(
    features: ArrayLike,
    labels: Labels,
    reference: ArrayLike,
    *,
    max_reference: int = 10_000,
    seed: int = 0,
    **ped_kwargs: Any,
) -> float:
    """LogME of the PED-moved features: the trigger statistic (docs/method.md, *The alignment policy*).

    ``reference``: the pool's current features (a memory map is fine); above ``max_reference`` rows a seeded
    random subsample (rows read in order) estimates the rescaling, which is all PED uses it for.
    ``ped_kwargs`` go to :func:`ped`.
    """
    ref = np.asarray(reference)
    if ref.ndim == 2 and ref.shape[0] > max_reference:
        rows = np.random.default_rng(seed).choice(ref.shape[0], size=max_reference, replace=False)
        ref = ref[np.sort(rows)]
    return logme(ped(features, labels, ref, **ped_kwargs), labels)


#: pool rows LogME-PED rescales by (docs/method.md, *PED*: the pool as the reference set)
REFERENCE_ROWS = 10_000
#: LogME's cost grows with the labels: a seeded sample of this many scores a larger labelled set
MAX_SCORED_LABELS = 50_000


def labelled_set_scores(x_lab: ArrayLike, y_lab: Labels, x_pool: np.ndarray,
                        seed: int) -> tuple[float | None, float | None]:
    """LogME and LogME-PED of the labelled set, the alignment trigger's inputs (None, None below two classes).

    The one place that decides what is scored: at most MAX_SCORED_LABELS labels (a seeded sample), and the
    reference set is a seeded sample of at most REFERENCE_ROWS pool rows plus the scored labels (at most
    REFERENCE_ROWS of them). The round job and `simulate` both call this, so the simulator measures what the
    backend decides on."""
    x, y = np.asarray(x_lab, dtype=np.float32), np.asarray(y_lab, dtype=object)
    if len(set(y.tolist())) < 2:
        return None, None
    rng = np.random.default_rng(seed)
    if len(y) > MAX_SCORED_LABELS:
        keep = np.sort(rng.choice(len(y), MAX_SCORED_LABELS, replace=False))
        x, y = x[keep], y[keep]
    pool_rows = min(len(x_pool), REFERENCE_ROWS)  # x_pool may be the store's memory map: read only the sample
    rows = np.sort(rng.choice(len(x_pool), pool_rows, replace=False)) if pool_rows else np.zeros(0, dtype=np.int64)
    reference = np.concatenate([np.asarray(x_pool[rows], dtype=np.float32).reshape(-1, x.shape[1]),
                                x[:REFERENCE_ROWS]])
    return float(logme(x, y)), float(logme_ped(x, y, reference, seed=seed))
