"""Counting a long stretch of the tracker's log at once, in numpy.

``LiveTensorTracker.count_entries`` counts a stretch of storages made and released, one
entry after another, as ``_count`` and ``_uncount`` would. A repeated training step or a
Mamba scan's counted tokens hand it millions of entries (planner/repeated_steps.py,
planner/recurrent_scan_graph.py), and a Python loop over them took a tenth of a Mamba
plan. What it computes is sums and running maxima: the bytes live after each entry
(a cumulative sum), the peak (the first entry where the largest of them is reached, among
storages made), and each phase and part's peak. Those are computed here over arrays of
the entries' fields, which C code reads off the entries, and give the loop's result
exactly: the same peaks, the same entry for each, in Python ints
(tests/test_bulk_count.py compares the two on logs of every shape).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from qplan.planner.precision import ALLOC_ROUND

# Below this many entries the loop is as fast (numpy's fixed cost per call).
BULK_ENTRIES = 2048


@dataclass(frozen=True)
class Counts:
    """The tracker's running totals: before a stretch, and after it (``count_stretch``)."""

    current: int
    allocated: int
    peak: int
    peak_allocated: int
    peak_event: int
    peak_phase: str
    phase: str
    segment: tuple[str, ...]


@dataclass(frozen=True)
class Columns:
    """What the count reads of a stretch's entries, as arrays: each entry's signed bytes,
    whether it is a storage made, and where, among the storages made, a run of storages
    made in one phase and part begins. A caller that built the stretch from arrays (a
    Mamba scan's tokens) or counts it again (a repeated step) hands them over instead of
    having them read off the entries again."""

    nbytes: np.ndarray
    made: np.ndarray
    runs: np.ndarray


def columns_of(entries: Sequence[Any], parts: Sequence[tuple[str, ...] | None]) -> Columns:
    """The columns of a stretch, read off its entries by C code."""
    n = len(entries)
    if n != len(parts):
        raise ValueError("entries and parts differ in length")
    nbytes = np.fromiter(map(operator.itemgetter(1), entries), dtype=np.int64, count=n)
    made = np.fromiter(map(operator.is_not, parts, itertools.repeat(None)), dtype=bool,
                       count=n)
    # Runs told apart by identity: two equal objects only split a run, and give the same
    # keys.
    made_parts = list(itertools.compress(parts, made.tolist()))
    made_phases = list(itertools.compress(map(operator.itemgetter(2), entries),
                                          made.tolist()))
    m = len(made_parts)
    change = np.empty(m, dtype=bool)
    if m:
        change[0] = True
        change[1:] = (np.fromiter(map(operator.is_not, made_parts[1:], made_parts[:-1]),
                                  dtype=bool, count=m - 1)
                      | np.fromiter(map(operator.is_not, made_phases[1:], made_phases[:-1]),
                                    dtype=bool, count=m - 1))
    return Columns(nbytes, made, np.flatnonzero(change))


def count_stretch(entries: Sequence[Any], parts: Sequence[tuple[str, ...] | None],
                  first_index: int, counts: Counts, peaks: dict[str, int],
                  peak_events: dict[str, int],
                  keys_of: Callable[[str, tuple[str, ...]], tuple[str, ...]],
                  columns: Columns | None = None) -> Counts:
    """Count ``entries`` (the log's (serial, ±nbytes, phase, tag)), the first of which is
    the log's entry ``first_index``: a storage made in part ``parts[i]``, or a release
    where that is None. Returns the totals after them, and updates ``peaks`` and
    ``peak_events`` (the peak of each of ``keys_of(phase, part)``), as the loop would.
    ``columns``: the stretch's columns, where the caller has them."""
    if not entries:
        return counts
    if columns is None:
        columns = columns_of(entries, parts)
    nbytes, made, starts = columns.nbytes, columns.made, columns.runs
    if not (len(nbytes) == len(made) == len(entries) == len(parts)):
        raise ValueError("a stretch's columns do not match its entries")
    current = np.cumsum(nbytes)
    current += counts.current
    grows = made & (nbytes > 0)
    # CUDA's allocator rounds each block up: a storage made adds its rounded size, a
    # release takes it away (floor division of the negative size rounds it the same way).
    steps = np.where(grows, -((-nbytes) // ALLOC_ROUND) * ALLOC_ROUND,
                     np.where(~made & (nbytes < 0), (nbytes // ALLOC_ROUND) * ALLOC_ROUND, 0))
    allocated = np.cumsum(steps)
    allocated += counts.allocated
    peak_allocated = counts.peak_allocated
    if grows.any():
        peak_allocated = max(peak_allocated, int(allocated[grows].max()))
    counts = replace(counts, current=int(current[-1]), allocated=int(allocated[-1]),
                     peak_allocated=peak_allocated, phase=entries[-1][2])
    made_at = np.flatnonzero(made)
    if not len(made_at):
        return counts
    counts = replace(counts, segment=parts[made_at[-1]])
    live = current[made_at]
    top = int(np.argmax(live))  # the first entry where the largest is reached
    if int(live[top]) > counts.peak:
        at = int(made_at[top])
        counts = replace(counts, peak=int(live[top]), peak_event=first_index + at,
                         peak_phase=entries[at][2])
    highest = np.maximum.reduceat(live, starts)
    ends = [*starts[1:].tolist(), len(made_at)]
    for start, end, high in zip(starts.tolist(), ends, highest.tolist(), strict=True):
        at = int(made_at[start])
        keys = keys_of(entries[at][2], parts[at])  # type: ignore[arg-type]
        if high <= min([peaks.get(name, 0) for name in keys]):
            continue
        # Each key's peak moves to the first entry of the run where its highest is
        # reached: where the loop's last strict rise was.
        where = first_index + int(made_at[start + int(np.argmax(live[start:end]))])
        for name in keys:
            if high > peaks.get(name, 0):
                peaks[name] = high
                peak_events[name] = where
    return counts
