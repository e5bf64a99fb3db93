"""The largest batch or the longest sequence that fits, for one precision.

Each evaluation is a traced step, so the search is model-based rather than a bisection:
the peak grows linearly with the batch and at most quadratically with the sequence length
(attention scores, for eager attention); three traces fix the curve, the curve gives the
answer, and one or two more traces confirm it, stepping down while the guess does not fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from math import floor, sqrt

PROBES = {"batch": (1, 4, 16), "seq_len": (512, 2048, 8192)}
STEP_DOWN = 0.9
MAX_CONFIRMATIONS = 4


@dataclass(frozen=True)
class Solution:
    precision: str
    variable: str  # "batch" | "seq_len"
    value: int | None  # None: not even the smallest value fits
    needed_bytes: int | None  # total at that value
    evaluations: int
    # Every (value, total bytes) the search traced, by value: the curve a plot draws.
    points: tuple[tuple[int, int], ...] = ()


def _fit_quadratic(points: list[tuple[int, int]]) -> tuple[float, float, float]:
    """a + b*x + c*x^2 through three points (Lagrange form, exact)."""
    (x0, y0), (x1, y1), (x2, y2) = points
    d0 = (x0 - x1) * (x0 - x2)
    d1 = (x1 - x0) * (x1 - x2)
    d2 = (x2 - x0) * (x2 - x1)
    c = y0 / d0 + y1 / d1 + y2 / d2
    b = -(y0 * (x1 + x2) / d0 + y1 * (x0 + x2) / d1 + y2 * (x0 + x1) / d2)
    a = y0 * x1 * x2 / d0 + y1 * x0 * x2 / d1 + y2 * x0 * x1 / d2
    return a, b, max(c, 0.0)


def _largest_x(a: float, b: float, c: float, limit: float) -> float:
    if c < 1e-12:
        return (limit - a) / b if b > 0 else float("inf")
    disc = b * b - 4 * c * (a - limit)
    return (-b + sqrt(max(disc, 0.0))) / (2 * c)


def solve_for(
    precision: str,
    variable: str,
    needed: Callable[[int], int],
    limit: int,
    upper: int,
) -> Solution:
    """Largest value in [1, upper] whose ``needed(value)`` is at most ``limit``."""
    evaluations = 0
    traced: dict[int, int] = {}

    def total(x: int) -> int:
        nonlocal evaluations
        evaluations += 1
        traced[x] = needed(x)
        return traced[x]

    def solution(value: int | None, needed_bytes: int) -> Solution:
        return Solution(precision, variable, value, needed_bytes, evaluations,
                        tuple(sorted(traced.items())))

    probes = [min(p, upper) for p in PROBES[variable]]
    probes = sorted(set(probes))
    points = [(x, total(x)) for x in probes]
    if points[0][1] > limit:
        smallest = total(1) if probes[0] != 1 else points[0][1]
        if smallest > limit:
            return solution(None, smallest)
        points.insert(0, (1, smallest))
    fitting = [(x, y) for x, y in points if y <= limit]
    best = max(fitting) if fitting else (1, total(1))
    if len(points) >= 3:
        a, b, c = _fit_quadratic(points[-3:])
        guess = _largest_x(a, b, c, limit)
    else:
        (x0, y0), (x1, y1) = points[0], points[-1]
        slope = (y1 - y0) / (x1 - x0) if x1 != x0 else 0
        guess = x0 + (limit - y0) / slope if slope > 0 else float(upper)
    candidate = min(upper, max(best[0], floor(guess)))
    for _ in range(MAX_CONFIRMATIONS):
        if candidate <= best[0]:
            break
        value = total(candidate)
        if value <= limit:
            best = (candidate, value)
            break
        candidate = max(best[0], floor(candidate * STEP_DOWN))
    return solution(best[0], best[1])
