"""Accuracy under parallelism (AUP, as d3LLM defines it): one number for a decoder's accuracy at the parallelism it
reaches, so that a faster decoding setting cannot hide what it costs in quality. `benchmarks/speed_quality.py` reports
it for every decoding setting of `generate()`."""

import math
from typing import Optional, Sequence

__all__ = ["accuracy_under_parallelism", "parallelism_weight"]


def parallelism_weight(accuracy: float, best_accuracy: float, alpha: float = 3.0) -> float:
    """W(y) = min(exp(-alpha * (1 - y / y_max)), 1): 1 at the best accuracy of the comparison, falling off
    exponentially below it, so that parallelism bought with accuracy counts for less."""
    if best_accuracy == 0:  # every accuracy compared is 0: the weight multiplies zeros
        return 1.0
    return min(math.exp(-alpha * (1 - accuracy / best_accuracy)), 1.0)


def accuracy_under_parallelism(
    parallelism: Sequence[float], accuracy: Sequence[float], best_accuracy: Optional[float] = None,
    alpha: float = 3.0, max_drop: float = 5.0,
) -> float:
    """The weighted area under one decoder's accuracy-parallelism curve.

    Args:
        parallelism: each operating point's tokens per forward pass (rho, > 0).
        accuracy: each point's accuracy in percent (y, 0 to 100).
        best_accuracy: y_max, the best accuracy of everything compared on the task (default: this curve's best).
        alpha: how steeply accuracy below y_max is discounted.
        max_drop: points more than this many percentage points below the accuracy at the lowest parallelism are left
            out: speed bought with that much accuracy earns nothing.

    With the points sorted by parallelism, (rho_1, y_1) the least parallel and the points kept those with
    y >= y_1 - max_drop, AUP = rho_1 * y_1 + sum_i (rho_i - rho_(i-1)) * (y_i W(y_i) + y_(i-1) W(y_(i-1))) / 2:
    the first point's rectangle and trapezoids of the weighted accuracy beyond it. One point alone scores rho * y.
    """
    if len(parallelism) != len(accuracy) or not parallelism:
        raise ValueError(f"parallelism and accuracy must be non-empty and of one length, got {len(parallelism)} and "
                         f"{len(accuracy)} points")
    if any(not rho > 0 for rho in parallelism):
        raise ValueError(f"parallelism (tokens per forward pass) must be positive, got {list(parallelism)}")
    if any(not 0 <= y <= 100 for y in accuracy):
        raise ValueError(f"accuracy must be in percent (0 to 100), got {list(accuracy)}")
    best = max(accuracy) if best_accuracy is None else best_accuracy
    if best < max(accuracy):
        raise ValueError(f"best_accuracy ({best}) is below an accuracy of the curve ({max(accuracy)})")
    points = sorted(zip(parallelism, accuracy))
    lowest_kept = points[0][1] - max_drop
    points = [(rho, y) for rho, y in points if y >= lowest_kept]
    area = points[0][0] * points[0][1]
    for (rho_before, y_before), (rho, y) in zip(points, points[1:]):
        weighted = y * parallelism_weight(y, best, alpha) + y_before * parallelism_weight(y_before, best, alpha)
        area += (rho - rho_before) * weighted / 2
    return area
