"""Learning-curve metrics: labels to reach an accuracy, the sample saving ratio, the overall cost.

Definitions (docs/method.md, *Measuring the savings*; the paper's own formulas could not be read, these are our
defaults):

- A curve is a list of ``(labels, accuracy)`` points; it is sorted by labels before use.
- ``labels_to_reach(curve, a)``: the labels at the FIRST point where the curve reaches ``a``, linearly
  interpolated between the last point below ``a`` and that point. A curve that already starts at or above
  ``a`` needs its first point's labels; one that never reaches it gives None. Why the first crossing: it is
  the number of labels after which a team watching the curve would have had the accuracy; for a noisy,
  non-monotone curve it is the optimistic reading (a later dip below ``a`` is ignored), and the same rule
  applies to the reference, so the ratio compares like with like.
- ``sample_saving_ratio = (n_ref - n_method) / n_ref``: the fraction of the reference's labels the method
  saves (negative when it needs more). None when either curve never reaches the target: the report says so
  rather than inventing a number.
- ``overall_cost = labels * label_price + gpu_hours * gpu_price + cpu_hours * cpu_price`` ($3 per GPU-hour by
  default, read off the authors' teaser figure; $0.10 per CPU-hour, our assumption for a small cloud VM of 2-4
  cores, so that a CPU run's cost is not the labels' alone).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

Curve = Sequence[Sequence[float]]  # [(labels, accuracy), ...]
DEFAULT_GPU_PRICE = 3.0
DEFAULT_LABEL_PRICE = 0.1  # dollars per label: an assumption, the paper's price could not be read
DEFAULT_CPU_PRICE = 0.1  # dollars per CPU-hour (wall hours of the machine): an assumption, a small cloud VM


def _points(curve: Curve) -> list[tuple[float, float]]:
    points = sorted((float(n), float(a)) for n, a in curve)
    for n, a in points:
        if not (math.isfinite(n) and math.isfinite(a)) or n < 0:
            raise ValueError(f"curve points must be finite with labels >= 0, got ({n}, {a})")
    return points


def labels_to_reach(curve: Curve, target: float) -> float | None:
    """Labels at the first crossing of ``target`` (linear interpolation); None if the curve never reaches it."""
    points = _points(curve)
    if not points:
        return None
    if points[0][1] >= target:
        return points[0][0]
    for (n0, a0), (n1, a1) in zip(points, points[1:], strict=False):
        if a0 < target <= a1:
            return n0 + (target - a0) / (a1 - a0) * (n1 - n0)
    return None


def sample_saving_ratio(reference_curve: Curve, method_curve: Curve, target_accuracy: float) -> float | None:
    """``(n_ref - n_method) / n_ref`` at ``target_accuracy``; None when a curve never reaches it (or the
    reference reaches it with zero labels, where no saving is defined)."""
    n_ref = labels_to_reach(reference_curve, target_accuracy)
    n_method = labels_to_reach(method_curve, target_accuracy)
    if n_ref is None or n_method is None or n_ref <= 0:
        return None
    return (n_ref - n_method) / n_ref


def overall_cost(labels: float, gpu_hours: float, label_price: float, gpu_price: float = DEFAULT_GPU_PRICE,
                 cpu_hours: float = 0.0, cpu_price: float = 0.0) -> float:
    """Labelling plus compute: ``labels * label_price + gpu_hours * gpu_price + cpu_hours * cpu_price``."""
    if min(labels, gpu_hours, label_price, gpu_price, cpu_hours, cpu_price) < 0:
        raise ValueError("labels, hours and prices must be >= 0")
    return labels * label_price + gpu_hours * gpu_price + cpu_hours * cpu_price


class Spread(NamedTuple):
    """Mean and sample standard deviation over the values that exist (``n`` of ``total``)."""

    mean: float | None
    std: float | None
    n: int
    total: int

    def to_dict(self) -> dict[str, float | int | None]:
        return self._asdict()


def mean_and_spread(values: Iterable[float | None]) -> Spread:
    """Mean and spread over seeds, ignoring None (a seed that never reached a target). The spread is the
    sample standard deviation (ddof=1), 0.0 for a single value, None for none."""
    items = list(values)
    present = [float(v) for v in items if v is not None]
    if not present:
        return Spread(None, None, 0, len(items))
    mean = sum(present) / len(present)
    if len(present) == 1:
        return Spread(mean, 0.0, 1, len(items))
    var = sum((v - mean) ** 2 for v in present) / (len(present) - 1)
    return Spread(mean, math.sqrt(var), len(present), len(items))


def mean_curve(curves: Sequence[Curve]) -> list[tuple[float, float]]:
    """Point-wise mean over seeds at each label count (seeds share the label axis: the same initial set size
    and budget); a label count reached by only some seeds averages those."""
    by_labels: dict[float, list[float]] = {}
    for curve in curves:
        for n, a in _points(curve):
            by_labels.setdefault(n, []).append(a)
    return [(n, sum(v) / len(v)) for n, v in sorted(by_labels.items())]
