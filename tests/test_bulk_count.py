"""The tracker's count of a long stretch of its log in numpy (planner/bulk_count.py) equals
its entry-by-entry loop: every total, peak, phase and part peak and the entry of each."""

from __future__ import annotations

import random

import pytest

from qplan.planner import live_tensors
from qplan.planner.live_tensors import LiveStorage, LiveTensorTracker

STATE = ("current", "current_allocated", "peak", "peak_allocated", "_peak_event",
         "_peak_phase", "phase", "segment", "phase_peaks", "_phase_peak_events", "_events",
         "_parts")


def _stretch(rng: random.Random, length: int, first_serial: int
             ) -> tuple[list[LiveStorage], list[tuple[str, ...] | None]]:
    """A log stretch of storages made and released: sizes around the allocator's
    rounding, empty storages, releases of the stretch's own storages and of older ones,
    phases and parts that change in runs, equal values in distinct objects."""
    phases = ["forward", "backward", "".join(["for", "ward"]), "optimizer"]
    segments = [(), ("layer.0",), ("layer.0", "attn"), ("layer.1",), tuple(["layer.", "0"][:1])]
    entries: list[LiveStorage] = []
    parts: list[tuple[str, ...] | None] = []
    live: list[tuple[int, int]] = [(-k - 1, rng.choice([512, 700, 3])) for k in range(20)]
    serial = first_serial
    phase, segment = phases[0], segments[0]
    for _ in range(length):
        if rng.random() < 0.01:
            phase = rng.choice(phases)
        if rng.random() < 0.02:
            segment = rng.choice(segments)
        if live and rng.random() < 0.45:
            made, nbytes = live.pop(rng.randrange(len(live)))
            entries.append(LiveStorage(made, -nbytes, phase, None))
            parts.append(None)
            continue
        nbytes = rng.choice([0, 1, 511, 512, 513, 4096, rng.randrange(1, 1 << 20)])
        tag = rng.choice([None, None, "logits"])
        entries.append(LiveStorage(serial, nbytes, phase, tag))
        parts.append(segment)
        live.append((serial, nbytes))
        serial += 1
    return entries, parts


def _counted(entries, parts, bulk: bool, before: LiveTensorTracker | None,
             monkeypatch) -> LiveTensorTracker:
    monkeypatch.setattr(live_tensors, "BULK_ENTRIES", 1 if bulk else 1 << 60)
    tracker = LiveTensorTracker()
    if before is not None:
        for name in STATE:
            value = getattr(before, name)
            setattr(tracker, name, type(value)(value) if isinstance(value, (dict, list))
                    else value)
    tracker.count_entries(list(entries), list(parts))
    return tracker


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("length", [1, 7, 3000])
def test_a_stretch_counted_in_numpy_equals_the_loop(seed, length, monkeypatch):
    rng = random.Random(seed * 1000 + length)
    # A tracker that has counted something already (its peaks are what a stretch must
    # beat), and one that starts empty.
    warm_entries, warm_parts = _stretch(rng, 500, 0)
    warm = _counted(warm_entries, warm_parts, False, None, monkeypatch)
    warm._parts = list(warm._parts or [])
    for before in (None, warm):
        entries, parts = _stretch(rng, length, 10_000)
        loop = _counted(entries, parts, False, before, monkeypatch)
        bulk = _counted(entries, parts, True, before, monkeypatch)
        for name in STATE:
            assert getattr(bulk, name) == getattr(loop, name), name
        assert all(type(v) is int for v in bulk.phase_peaks.values())
        assert type(bulk.peak) is int and type(bulk.current) is int


def test_only_releases_keep_the_peaks_and_segment(monkeypatch):
    tracker = LiveTensorTracker()
    tracker.count_entries([LiveStorage(0, 4096, "forward", None)], [("a",)])
    releases = [LiveStorage(0, -4096, "backward", None)]
    monkeypatch.setattr(live_tensors, "BULK_ENTRIES", 1)
    tracker.count_entries(releases, [None])
    assert (tracker.current, tracker.current_allocated, tracker.peak) == (0, 0, 4096)
    assert (tracker.phase, tracker.segment) == ("backward", ("a",))
    assert tracker.phase_peaks == {"forward": 4096, "forward:a": 4096}


def _replayed_entry_by_entry(log: list[LiveStorage], stops: list[int]) -> dict:
    """The live set at each stop, walking the log one entry at a time (what the tracker's
    replay did before it walked stretches in C)."""
    live: dict[int, LiveStorage] = {}
    found = {}
    for index, entry in enumerate(log):
        if entry[1] >= 0:
            live[entry[0]] = entry
        else:
            live.pop(entry[0], None)
        if index in stops:
            snapshot = tuple(live.values())
            found[index] = (snapshot, sum(-(-e[1] // 512) * 512 for e in snapshot if e[1] > 0))
    return found


@pytest.mark.parametrize("seed", range(8))
def test_a_replay_in_stretches_finds_the_live_sets_of_the_walk(seed):
    rng = random.Random(seed)
    entries, _ = _stretch(rng, 4000, 0)
    # Empty storages released: logged again with 0 bytes, keeping their place.
    empties = [e for e in entries if e[1] == 0]
    for entry in rng.sample(empties, min(5, len(empties))):
        entries.insert(rng.randrange(entries.index(entry) + 1, len(entries) + 1),
                       LiveStorage(entry[0], 0, "backward", None))
    tracker = LiveTensorTracker()
    tracker._events = entries
    stops = sorted(set(rng.sample(range(len(entries)), 40)) | {0, len(entries) - 1})
    assert tracker._replay({*stops, -1, len(entries) + 5}) == {
        **_replayed_entry_by_entry(entries, stops), -1: ((), 0)}


def test_a_scans_counted_tokens_come_with_the_columns_their_entries_have():
    # tokens_log hands its columns to the count instead of having them read off its
    # entries: they must be the ones read off.
    import numpy as np

    from qplan.planner.bulk_count import columns_of
    from qplan.planner.recurrent_scan_graph import LogEvent, tokens_log

    events = (LogEvent(True, 4096, "backward", None, ("own", 0)),
              LogEvent(True, 700, "backward", "logits", ("own", 1)),
              LogEvent(False, 4096, "backward", None, ("own", 0)),
              LogEvent(False, 700, "backward", None, ("prev", 1)),
              LogEvent(True, 0, "backward", None, ("own", 2)))

    def earlier(ref, tokens):
        column = 100 + (tokens - 1) * 3 + ref[1]
        column[0] = 7
        return column

    entries, parts, columns, released = tokens_log(events, 5, 100, earlier, "backward",
                                                   ("layer.0",))
    read = columns_of(entries, parts)
    assert np.array_equal(columns.nbytes, read.nbytes)
    assert np.array_equal(columns.made, read.made)
    assert np.array_equal(columns.runs, read.runs)
    assert [e[0] for e in entries[:5]] == [100, 101, 100, 7, 102]
    assert [e[0] for e in entries[5:10]] == [103, 104, 103, 101, 105]
    assert released[("prev", 1)][0].tolist() == [7, 101, 104, 107, 110]
    assert parts[:5] == [("layer.0",), ("layer.0",), None, None, ("layer.0",)]
