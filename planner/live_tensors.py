"""Count the bytes of live tensor storages while PyTorch runs, and find the peak.

A ``TorchDispatchMode`` sees every op's outputs; each new storage is counted once (views
share it) and uncounted when its storage object is released (PyTorch preserves a storage's
Python object, so a ``weakref.finalize`` fires exactly when the memory is freed). Works
for real CPU tensors (the CPU measurement) and for meta tensors (the planner's trace).

Every allocation and free is logged, so the live set at the peak can be replayed after the
run and split into components by what each storage turned out to be (gradient, optimizer
state, KV cache, ...), without copying the live set at every new peak.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import operator
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from qplan.planner import meta_memo, reuse
from qplan.planner.bulk_count import BULK_ENTRIES, Columns, Counts, count_stretch
from qplan.planner.precision import ALLOC_ROUND


class LiveStorage(NamedTuple):
    """One entry of the tracker's log: a storage made (``nbytes``) in ``phase``, tagged
    (logits) or not; or released (``-nbytes``, no tag). A snapshot holds the entries of the
    storages live at its moment: the log's own entries, never copies."""

    serial: int
    nbytes: int
    phase: str
    tag: str | None


# A log entry made without LiveStorage's own constructor, which runs Python code: a trace
# logs millions (the counted Mamba tokens make theirs too, planner/recurrent_scan_graph.py).
new_entry = tuple.__new__


# The callbacks of the weak references a tracker keeps to the storages it counts hold the
# tracker weakly. Holding it strongly makes a cycle (tracker -> its live storages' weak
# references -> their callbacks -> tracker) that only the cyclic collector breaks: every
# finished trace then kept its whole log (a Mamba step's millions of entries) alive till
# the collector's next pass over it. falcon-mamba-7b's DPO plan: 9.6 million such objects
# found by 39 collections, 4.6 s of them, and 4.4 GB at its peak (1.1 GB without the cycle).
def _released(tracker: weakref.ref, key: int, serial: int, _storage: Any) -> None:
    found = tracker()
    if found is not None:
        found._release(key, serial)


def _released_group(tracker: weakref.ref, key: int, keys: range, _storage: Any) -> None:
    found = tracker()
    if found is not None:
        found._release_group(key, keys)


def _released_host(tracker: weakref.ref, key: int) -> None:
    found = tracker()
    if found is not None:
        found._release_host(key)


@dataclass(frozen=True)
class PeakSnapshot:
    """The live storages at the tensor-level peak."""

    peak_bytes: int  # raw storage bytes, as a CPU allocator sees them
    peak_allocated_bytes: int  # each storage rounded to 512 bytes, as CUDA counts them
    phase: str
    storages: tuple[LiveStorage, ...]


class LiveTensorTracker(TorchDispatchMode):
    """Track live storages; ``phase`` and ``tagger`` label new ones as they appear."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # TorchDispatchMode otherwise wraps ``__torch_dispatch__`` in ``torch._disable_dynamo``
        # (so that torch.compile does not trace into it): two Python frames and a dynamo
        # stance check per op, a tenth of a Mamba trace's CPU time. Nothing is compiled
        # under the tracker (meta tensors, eager steps), and the ops it sees are the same.
        return False

    def __init__(self, tagger: Callable[[torch.Tensor], str | None] | None = None) -> None:
        super().__init__()
        self.phase = "setup"
        # The part of the phase running now (the backward of the top decoder layer, ...),
        # under one or more names: each one's peak is kept too, as "phase:name"
        # (planner/steps.py sets them).
        self.segment: tuple[str, ...] = ()
        self.tagger = tagger
        self._serials = itertools.count()
        # What the storages' weak-reference callbacks reach the tracker through (``_released``).
        self._self_ref = weakref.ref(self)
        # id(storage) -> (serial, nbytes, weak reference whose callback uncounts it)
        self._live: dict[int, tuple[int, int, Any]] = {}
        # Groups of storages one tensor stands for (``attach_group``): the weak reference
        # to that tensor's storage, by its id; each storage's key, counted down from -1.
        self._groups: dict[int, Any] = {}
        self._group_keys = -1
        self._events: list[LiveStorage] = []  # (serial, ±nbytes, phase, tag)
        self.current = 0
        self.current_allocated = 0
        self.peak = 0
        self.peak_allocated = 0
        self._peak_event = -1
        self._peak_phase = "setup"
        self.phase_peaks: dict[str, int] = {}
        self._phase_peak_events: dict[str, int] = {}
        # Host memory (activation offloading's pinned copies, planner/offload.py): counted
        # apart, never in the device's peak. ``on_host`` is set while they are made.
        self.on_host = False
        self._host_live: dict[int, int] = {}  # id(storage) -> nbytes
        self.host_current = 0
        self.host_peak = 0
        self._untracked = 0
        self._memo: bool | None = None
        # (phase, segment) -> the phase_peaks keys a new storage updates.
        self._peak_keys: dict[tuple[str, tuple[str, ...]], tuple[str, ...]] = {}
        # Once ``record_parts`` is called: for each event from then on, the part of the
        # phase a new storage was made in, None for a release (the log a derived or
        # repeated step is counted from: planner/derived_traces.py, repeated_steps.py).
        self._parts: list[tuple[str, ...] | None] | None = None
        self._parts_from = 0
        # Where set (a recording of a step, planner/derived_double_quant.py): for each
        # later optimizer step counted from the first's log (planner/repeated_steps.py),
        # the index where its copy starts and, per entry copied, the entry's index.
        self.repeats: list[tuple[int, Any]] | None = None

    # -- counting ---------------------------------------------------------------------
    def add(self, tensor: torch.Tensor) -> int | None:
        """Count ``tensor``'s storage if it is new; returns its serial."""
        if not isinstance(tensor, torch.Tensor):
            return None
        storage = tensor.untyped_storage()
        key = id(storage)
        known = self._live.get(key)
        if known is not None:
            return known[0]
        if key in self._host_live:
            return None
        nbytes = storage.nbytes()
        if self.on_host:
            self._add_host(storage, key, nbytes)
            return None
        serial = next(self._serials)
        # A weak reference held here (what weakref.finalize does, without its registry):
        # its callback runs exactly when the storage's memory is freed.
        ref = weakref.ref(storage, functools.partial(_released, self._self_ref, key, serial))
        self._live[key] = (serial, nbytes, ref)
        tag = self.tagger(tensor) if self.tagger is not None else None
        self._count(serial, nbytes, tag)
        return serial

    def _count(self, serial: int, nbytes: int, tag: str | None) -> None:
        """Log a new storage in the current phase and part, and update every peak. What
        ``count_log`` does for each storage of a log, one at a time."""
        events = self._events
        phase = self.phase
        events.append(new_entry(LiveStorage, (serial, nbytes, phase, tag)))
        if self._parts is not None:
            self._parts.append(self.segment)
        current = self.current = self.current + nbytes
        if nbytes > 0:
            allocated = self.current_allocated = (self.current_allocated
                                                  - (-nbytes // ALLOC_ROUND) * ALLOC_ROUND)
            if allocated > self.peak_allocated:
                self.peak_allocated = allocated
        index = len(events) - 1
        if current > self.peak:
            self.peak = current
            self._peak_event = index
            self._peak_phase = phase
        # The phase's peak, then each named part's ("phase:name"): the keys are made once
        # per (phase, segment), not at every storage (a Mamba scan makes one per token).
        peaks = self.phase_peaks
        for name in self._keys(phase, self.segment):
            if current > peaks.get(name, 0):
                peaks[name] = current
                self._phase_peak_events[name] = index

    def _keys(self, phase: str, segment: tuple[str, ...]) -> tuple[str, ...]:
        """The ``phase_peaks`` keys a storage made in ``phase`` and ``segment`` updates."""
        names = (phase, segment)
        keys = self._peak_keys.get(names)
        if keys is None:
            keys = self._peak_keys[names] = (phase, *(f"{phase}:{name}" for name in segment))
        return keys

    def _add_host(self, storage: Any, key: int, nbytes: int) -> None:
        self._host_live[key] = nbytes
        self.host_current += nbytes
        self.host_peak = max(self.host_peak, self.host_current)
        weakref.finalize(storage, _released_host, self._self_ref, key)

    def _release_host(self, key: int) -> None:
        nbytes = self._host_live.pop(key, None)
        if nbytes is not None:
            self.host_current -= nbytes

    def add_all(self, tensors: Iterable[torch.Tensor]) -> None:
        for tensor in tensors:
            self.add(tensor)

    def attach(self, tensor: torch.Tensor, serial: int) -> None:
        """Own ``tensor``'s storage as ``serial``, a storage the log already counted (a
        repeated section's gradient, planner/repeated_steps.py): its release is logged as
        that serial's, and nothing is counted now."""
        self.attach_storage(tensor.untyped_storage(), serial)

    def attach_storage(self, storage: Any, serial: int) -> None:
        """``attach`` for a storage whose tensor the caller does not hold (a gradient sum
        autograd's engine holds, planner/recurrent_scan_graph.py)."""
        key = id(storage)
        ref = weakref.ref(storage, functools.partial(_released, self._self_ref, key, serial))
        self._live[key] = (serial, storage.nbytes(), ref)

    def attach_group(self, owner: torch.Tensor, serials: list[int],
                     sizes: list[int]) -> range:
        """Own many storages the log already counted (``serials``, of ``sizes`` bytes) with
        one tensor: each is tracked under a key of its own (returned), which a caller may
        let go of as ``attach``'s (planner/recurrent_scan_graph.py: ``_Releaser``); when
        ``owner``'s storage is freed, those still tracked are released, the last first.

        A Mamba scan's counted tokens leave thousands of storages that outlive them, which
        a real loop holds in a list (its outputs, or what its graph saved): when the list
        goes, its items go from the last. One tensor standing for them all, where the list
        held it, ends them at the same point of the log, in that order, without a tensor
        and a weak reference each."""
        first = self._group_keys
        keys = range(first, first - len(serials), -1)  # below every id(): never a storage's
        self._group_keys = first - len(serials)
        if len(serials) != len(sizes):
            raise ValueError("a group's serials and sizes differ in length")
        self._live.update(zip(keys, zip(serials, sizes, itertools.repeat(None),
                                        strict=False), strict=True))
        storage = owner.untyped_storage()
        key = id(storage)
        self._groups[key] = weakref.ref(
            storage, functools.partial(_released_group, self._self_ref, key, keys))
        return keys

    def _release_group(self, key: int, keys: range) -> None:
        del self._groups[key]
        pop = self._live.pop
        entries = [new_entry(LiveStorage, (known[0], -known[1], self.phase, None))
                   for known in map(pop, reversed(keys), itertools.repeat(None))
                   if known is not None]
        self.count_entries(entries, [None] * len(entries))

    def group_tracked(self, keys: range) -> bool:
        """Whether any storage of a group is still tracked."""
        return any(map(self._live.__contains__, keys))

    def let_go(self, tensor: torch.Tensor) -> None:
        """Stop tracking ``tensor``'s storage: the caller logged its release, and its end
        logs nothing."""
        self._live.pop(id(tensor.untyped_storage()), None)

    def live_serials(self) -> set[int]:
        return {known[0] for known in self._live.values()}

    def record_parts(self) -> int:
        """Keep, from now on, the part each new storage is made in; returns the index of
        the next event (``log(index)`` starts there)."""
        if self._parts is None:
            self._parts, self._parts_from = [], len(self._events)
        return len(self._events)

    def parts(self, start: int) -> list[tuple[str, ...] | None]:
        """The part of each event from ``start`` on (at least where ``record_parts``
        began): None for a release."""
        offset = start - self._parts_from
        assert self._parts is not None and offset >= 0
        assert len(self._parts) - offset == len(self._events) - start
        return self._parts[offset:]

    def log(self, start: int = 0) -> list[tuple[int, int, str, str | None,
                                                 tuple[str, ...] | None]]:
        """The events from ``start`` on (at least where ``record_parts`` began), each with
        its part: None for a release."""
        offset = start - self._parts_from
        assert self._parts is not None and offset >= 0
        events, parts = self._events[start:], self._parts[offset:]
        assert len(events) == len(parts)
        # Each entry with its part appended, in C: a training step's log is millions long.
        return list(map(tuple.__add__, events, zip(parts)))

    def count_log(self, log: Iterable[tuple[int, int, str, str | None,
                                            tuple[str, ...] | None]]) -> None:
        """Count a log of that form again, in its phases and parts, as a traced step counts
        (a derived or repeated step peaks exactly as a traced one): a storage where the
        part is set, a release (``-nbytes``) where it is None."""
        log = log if isinstance(log, (list, tuple)) else list(log)
        # In C: a derived training step's log is hundreds of thousands long.
        parts = list(map(operator.itemgetter(4), log))
        entries = list(map(new_entry, itertools.repeat(LiveStorage),
                           map(operator.itemgetter(0, 1, 2, 3), log)))
        released = list(map(operator.is_, parts, itertools.repeat(None)))
        if any(map(operator.is_not, map(operator.itemgetter(3), itertools.compress(
                entries, released)), itertools.repeat(None))):
            # A release is logged without a tag.
            entries = [new_entry(LiveStorage, (e[0], e[1], e[2], None)) if gone else e
                       for e, gone in zip(entries, released, strict=True)]
        self.count_entries(entries, parts)

    def count_entries(self, entries: list[LiveStorage],
                      parts: list[tuple[str, ...] | None],
                      columns: Columns | None = None) -> None:
        """Count ``entries``, already in the log's own form, each a storage made in its
        part ``parts[i]`` or, where that is None, a release (``-nbytes``): ``_count`` and
        ``_uncount`` for each, in one loop over local state. A repeated training step or a
        Mamba scan's counted tokens (planner/repeated_steps.py, recurrent_scan_graph.py)
        count millions of entries, and each call's attribute traffic cost more than the
        counting. A long stretch is counted in numpy, from its ``columns`` where the caller
        has them (planner/bulk_count.py)."""
        events = self._events
        index = len(events) - 1
        events.extend(entries)
        if self._parts is not None:
            self._parts.extend(parts)
        if len(entries) >= BULK_ENTRIES:
            self._count_stretch(entries, parts, index + 1, columns)
            return
        phase, segment = self.phase, self.segment
        current, allocated = self.current, self.current_allocated
        peak, peak_allocated = self.peak, self.peak_allocated
        peak_event, peak_phase = self._peak_event, self._peak_phase
        peaks, peak_events = self.phase_peaks, self._phase_peak_events
        last: tuple[Any, Any] = (None, None)
        keys: tuple[str, ...] = ()
        lowest = 0  # the lowest peak among ``keys``
        try:
            for (_, nbytes, phase, _), part in zip(entries, parts, strict=True):
                index += 1
                current += nbytes
                if part is None:
                    if nbytes < 0:
                        allocated += (nbytes // ALLOC_ROUND) * ALLOC_ROUND
                    continue
                segment = part
                if nbytes > 0:
                    allocated -= (-nbytes // ALLOC_ROUND) * ALLOC_ROUND
                    if allocated > peak_allocated:
                        peak_allocated = allocated
                if current > peak:
                    peak, peak_event, peak_phase = current, index, phase
                if last[0] is not phase or last[1] is not part:
                    keys, last = self._keys(phase, part), (phase, part)
                    lowest = min([peaks.get(name, 0) for name in keys])
                # Most storages raise none of their keys' peaks: one test for all of them.
                if current > lowest:
                    for name in keys:
                        if current > peaks.get(name, 0):
                            peaks[name] = current
                            peak_events[name] = index
                    lowest = min([peaks.get(name, 0) for name in keys])
        finally:
            self.phase, self.segment = phase, segment
            self.current, self.current_allocated = current, allocated
            self.peak, self.peak_allocated = peak, peak_allocated
            self._peak_event, self._peak_phase = peak_event, peak_phase

    def _count_stretch(self, entries: list[LiveStorage],
                       parts: list[tuple[str, ...] | None], first_index: int,
                       columns: Columns | None) -> None:
        """``count_entries`` of a long stretch, already in the log: the same counting, in
        numpy (planner/bulk_count.py)."""
        counts = Counts(self.current, self.current_allocated, self.peak, self.peak_allocated,
                        self._peak_event, self._peak_phase, self.phase, self.segment)
        counts = count_stretch(entries, parts, first_index, counts, self.phase_peaks,
                               self._phase_peak_events, self._keys, columns)
        self.current, self.current_allocated = counts.current, counts.allocated
        self.peak, self.peak_allocated = counts.peak, counts.peak_allocated
        self._peak_event, self._peak_phase = counts.peak_event, counts.peak_phase
        self.phase, self.segment = counts.phase, counts.segment

    def serial_of(self, tensor: torch.Tensor) -> int | None:
        known = self._live.get(id(tensor.untyped_storage()))
        return known[0] if known is not None else None

    def _release(self, key: int, serial: int) -> None:
        known = self._live.get(key)
        if known is None or known[0] != serial:
            return
        del self._live[key]
        self._uncount(serial, known[1])

    def _uncount(self, serial: int, nbytes: int) -> None:
        """Log the release of a storage (``_release``; a replayed log)."""
        self.current -= nbytes
        if nbytes > 0:
            self.current_allocated += (-nbytes // ALLOC_ROUND) * ALLOC_ROUND
        self._events.append(new_entry(LiveStorage, (serial, -nbytes, self.phase, None)))
        if self._parts is not None:
            self._parts.append(None)

    @contextlib.contextmanager
    def untracked(self) -> Iterator[None]:
        """Ops inside make storages nobody counts: the caller counts, with ``add``, those
        it keeps (GRPO's generation makes a long KV cache this way, then counts it)."""
        self._untracked += 1
        try:
            yield
        finally:
            self._untracked -= 1

    def __enter__(self) -> LiveTensorTracker:
        # Whether the meta-op memo answers this run's ops: read once, not at every op.
        self._memo = reuse.enabled()
        return super().__enter__()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        out = meta_memo.call(func, args, kwargs or {}, self._memo)
        if self._untracked:
            return out
        if isinstance(out, torch.Tensor):
            self.add(out)
        else:
            tree_map_only(torch.Tensor, self.add, out)
        return out

    # -- results ----------------------------------------------------------------------
    def peak_snapshot(self) -> PeakSnapshot:
        """The storages live at the peak."""
        return self.snapshots(phases=False)[0]

    def phase_snapshots(self) -> dict[str, PeakSnapshot]:
        """The live storages at the peak of every key of ``phase_peaks``."""
        return self.snapshots(phases=True)[1]

    def snapshots(self, phases: bool) -> tuple[PeakSnapshot, dict[str, PeakSnapshot]]:
        """The live storages at the peak and, with ``phases``, at the peak of every key of
        ``phase_peaks``: one replay of the log for all of them."""
        wanted = {self._peak_event}
        if phases:
            wanted.update(self._phase_peak_events.values())
        at = self._replay(wanted)
        peak = PeakSnapshot(self.peak, self.peak_allocated, self._peak_phase,
                            at[self._peak_event][0])
        found = {}
        if phases:
            for key, event in self._phase_peak_events.items():
                live, allocated = at[event]
                found[key] = PeakSnapshot(self.phase_peaks[key], allocated, key, live)
        return peak, found

    def _replay(self, events: set[int]) -> dict[int, tuple[tuple[LiveStorage, ...], int]]:
        """The storages live at each of ``events`` (indices into the log), and their bytes
        rounded as CUDA allocates them.

        A training step's phases and parts peak at a hundred events or more, each over
        thousands of live storages (the weights among them): a snapshot is the log's own
        entries, taken in one C-level copy, not a new object per storage and snapshot."""
        live: dict[int, LiveStorage] = {}
        found: dict[int, tuple[tuple[LiveStorage, ...], int]] = {}
        log = self._events
        pop = live.pop
        start = 0
        # The log walked in stretches from one wanted event to the next, each in C: its
        # storages made (and logged again) put in the live set in the log's order, then its
        # releases taken out. That is the entry-by-entry walk's live set: a serial released
        # is never made again, and one logged again keeps its place.
        stops = sorted(e for e in events if 0 <= e < len(log))
        made = (np.fromiter(map(operator.itemgetter(1), log), dtype=np.int64,
                            count=len(log)) >= 0).tolist() if stops else []
        for stop in stops:
            stretch, kinds = log[start:stop + 1], made[start:stop + 1]
            live.update(zip(map(operator.itemgetter(0), itertools.compress(stretch, kinds)),
                            itertools.compress(stretch, kinds), strict=True))
            collections.deque(map(pop, map(operator.itemgetter(0), itertools.compress(
                stretch, map(operator.not_, kinds))), itertools.repeat(None)), maxlen=0)
            snapshot = tuple(live.values())
            found[stop] = (snapshot, sum([-(-entry[1] // ALLOC_ROUND) * ALLOC_ROUND
                                          for entry in snapshot if entry[1] > 0]))
            start = stop + 1
        if -1 in events:
            found[-1] = ((), 0)
        return found
