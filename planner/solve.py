"""The largest batch or the longest sequence that fits, for one precision.

Each evaluation is a traced step, so the search is model-based rather than a bisection:
the peak grows linearly with the batch and at most quadratically with the sequence length
(attention scores, for eager attention); three traces fix the curve, the curve gives the
answer, and one or two more traces confirm it, stepping down while the guess does not fit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Sequence
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


# What a search asks for next: the values whose totals it needs, together.
Request = tuple[int, ...]
# What it ends with: the answer, its total, the number of evaluations and every traced point.
Found = tuple["int | None", int, int, dict[int, int]]


def _search(variable: str, limit: int, upper: int) -> Generator[Request, list[int], Found]:
    """The search for the largest value in [1, upper] whose total is at most ``limit``: it
    yields the values it needs (each yield's values are independent of each other), is
    sent their totals in that order, and returns what it found."""
    evaluations = 0
    traced: dict[int, int] = {}

    def totals(*values: int) -> Generator[Request, list[int], list[int]]:
        nonlocal evaluations
        found = yield values
        evaluations += len(values)
        traced.update(zip(values, found, strict=True))
        return found

    probes = sorted({min(p, upper) for p in PROBES[variable]})
    points = list(zip(probes, (yield from totals(*probes)), strict=True))
    if points[0][1] > limit:
        smallest = (yield from totals(1))[0] if probes[0] != 1 else points[0][1]
        if smallest > limit:
            return None, smallest, evaluations, traced
        points.insert(0, (1, smallest))
    fitting = [(x, y) for x, y in points if y <= limit]
    best = max(fitting) if fitting else (1, (yield from totals(1))[0])
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
        value = (yield from totals(candidate))[0]
        if value <= limit:
            best = (candidate, value)
            break
        candidate = max(best[0], floor(candidate * STEP_DOWN))
    return best[0], best[1], evaluations, traced


def solve_for(
    precision: str,
    variable: str,
    needed: Callable[[int], int],
    limit: int,
    upper: int,
) -> Solution:
    """Largest value in [1, upper] whose ``needed(value)`` is at most ``limit``."""
    search = _search(variable, limit, upper)
    try:
        values = next(search)
        while True:
            values = search.send([needed(x) for x in values])
    except StopIteration as stop:
        value, needed_bytes, evaluations, traced = stop.value
    return Solution(precision, variable, value, needed_bytes, evaluations,
                    tuple(sorted(traced.items())))


def values_ahead(problems: Sequence[tuple[str, int, int]],
                 known: Callable[[int, int], int | None],
                 fetch: Callable[[list[tuple[int, int]]], None]) -> None:
    """Walk the searches of ``problems`` ((variable, limit, upper) each) side by side over
    the totals known so far (``known(problem, value)``, None where not known), and hand
    ``fetch`` each round's unknown values together, so that a caller able to compute
    several at once (qplan's plan workers) has them ready before ``solve_for`` asks one
    by one. A search stops where a value stays unknown (``fetch`` could not compute
    it: ``solve_for`` asks for it again and meets its error there)."""
    searches = [_search(*problem) for problem in problems]
    pending = {i: next(search) for i, search in enumerate(searches)}
    while pending:
        missing = list(dict.fromkeys((i, x) for i, values in pending.items() for x in values
                                     if known(i, x) is None))
        if missing:
            fetch(missing)
        asked, pending = pending, {}
        for i, values in asked.items():
            found = [known(i, x) for x in values]
            if any(total is None for total in found):
                continue
            with contextlib.suppress(StopIteration):
                pending[i] = searches[i].send(found)  # type: ignore[arg-type]
