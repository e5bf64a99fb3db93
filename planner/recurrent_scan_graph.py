"""The Mamba scan's per-token loop under autograd, its middle tokens counted from the log.

A training step runs transformers' recurrent selective scan (planner/recurrent_scan.py) with
an autograd graph: per token and layer a dozen ops forward, as many again when
checkpointing recomputes the layer, and two dozen backward, where every token's
``select_backward`` makes a gradient the size of the whole discretised sequence and adds it
to the one before. A falcon-mamba-7b trace runs that for 2,048 tokens in every layer it
keeps; the graph is what made its training plans take a minute.

Every middle token does the same as its neighbours, forward and backward: the same sizes
made and freed in the same order, what the token after it handed on (the state, its
gradient, the running sums of the inputs' gradients) released, the same tensors of its own
forward released when its nodes run. So the first ``FIRST`` tokens and the last ``LAST``
tokens run for real, and the ones between are one autograd node, ``_Counted``, that counts
their events from the real tokens' logs through the tracker's own counting
(``count_entries``): the same serials in the same order as the real loop makes them, so
the same log, peaks and snapshots (tests/test_recurrent_scan.py compares the logs event for
event). The counted tokens' log is built as arrays, a column per event of a token
(``tokens_log``), and counted in numpy (planner/bulk_count.py): no Python code runs per
token and event.

* Forward: the second-to-last and last of the first tokens must log the same iteration
  (sizes, phases, tags, which storage each release frees: one of its own or one the token
  before made). The counted tokens follow that log; what outlives a token (its output in
  the list ``torch.stack`` reads, what the graph saves) is owned by one meta tensor for
  all the counted tokens' outputs and one for what their nodes saved
  (``LiveTensorTracker.attach_group``), kept where the real loop and graph keep them. The
  last tokens must log it again.
* Backward: the engine runs a token's nodes one token after another, from the last; the
  counted node sits in the graph where the counted tokens' nodes would, so it runs after
  the last real tokens and before the first ones. It reads the logs of the third- and
  fourth-to-last tokens (node hooks mark where each starts), which must agree; each release
  is of a storage of the token's own, one the token after it handed on, or one of the
  forward of this token or the one before. It counts the counted tokens' backward from that
  log, and hands the running sums, still held by the engine, to the last counted token's
  serials (``LiveTensorTracker.attach_storage``), as the real loop hands them to token
  ``FIRST - 1``.

What the graph keeps of the counted tokens travels in one saved tensor (``_Kept`` on a
carrier), so activation checkpointing packs, drops and recomputes it as it does the real
nodes' saved tensors; kept detached, so that no recomputed graph lives longer than in the
real run. Whether the last counted state is kept by its own token's nodes too (float32:
the matmul saves the state itself; bf16 saves its cast) is read off its storage's
references. A check that fails raises ``ScanNotRepeating``, before the node is made as
after it (checkpointing's recomputation must make the nodes the first forward made), and
the trace is run again with every token (planner/components.py). Too few tokens, or inputs
that do not all need a gradient, run the real loop; so does ``QPLAN_REUSE=0`` (through
``_tracker`` in planner/recurrent_scan.py).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import _disable_current_modes

from qplan.planner.bulk_count import Columns
from qplan.planner.live_tensors import LiveStorage, LiveTensorTracker, new_entry

# Tokens run for real before the counted ones: the first differs (it reads the zero initial
# state), the last two must log the same iteration.
FIRST = 4
# Tokens run for real after the counted ones: backward, the last token is where the
# gradients start; the next three each receive what the one after hands on, and the last two
# of those must log the same iteration.
LAST = 4
# Fewer tokens than this run every one: too few to count.
MIN_TOKENS = FIRST + LAST + 2
# The carrier's attribute holding what the graph keeps of the counted tokens.
_KEPT = "_qplan_counted_scan"

_every_token: list[bool] = []


class ScanNotRepeating(Exception):
    """A counted scan found, after its counted node was made, that its tokens do not
    repeat: the step is traced again with every token run (``every_token``)."""


def enabled() -> bool:
    return not _every_token


@contextlib.contextmanager
def every_token() -> Iterator[None]:
    """Run every token of every scan with a graph during the block."""
    _every_token.append(True)
    try:
        yield
    finally:
        _every_token.pop()


# A reference of a release in a token's log: ("own", ordinal) a storage the token made;
# ("prev", ordinal) one the token before (forward) or after (backward) made and left;
# ("fwd", delta, ordinal) one the forward of token ``index - delta`` made.
Ref = tuple


@dataclass(frozen=True)
class LogEvent:
    """One event of a token's log: a new storage (``ref``: ("own", its place among the
    token's new storages)) or a release (``ref`` as above)."""

    alloc: bool
    nbytes: int
    phase: str
    tag: str | None
    ref: Ref


@dataclass(frozen=True)
class _Log:
    events: tuple[LogEvent, ...]
    serials: tuple[int, ...]  # the serial of each new storage, by ordinal

    def ordinals(self) -> dict[int, int]:
        return {serial: ordinal for ordinal, serial in enumerate(self.serials)}

    def survivors(self) -> list[int]:
        released = {e.ref[1] for e in self.events if not e.alloc and e.ref[0] == "own"}
        return [o for o in range(len(self.serials)) if o not in released]

    def sizes(self) -> list[int]:
        """The bytes of each new storage, by ordinal."""
        return [e.nbytes for e in self.events if e.alloc]

    def handed_on(self) -> set[int]:
        """Ordinals of the token before (after) that this token releases."""
        return {e.ref[1] for e in self.events if not e.alloc and e.ref[0] == "prev"}


def _read(tracker: LiveTensorTracker, start: int, end: int, prev: dict[int, int] | None,
          fwd: Callable[[int], Ref | None] | None = None) -> _Log | None:
    """The log of events ``start:end`` in the form above; None where a release is of
    something else or serials were taken by someone else in between."""
    ordinals: dict[int, int] = {}
    events = []
    for serial, nbytes, phase, tag in tracker._events[start:end]:
        if nbytes > 0:
            if serial in ordinals:
                return None
            ordinals[serial] = len(ordinals)
            events.append(LogEvent(True, nbytes, phase, tag, ("own", ordinals[serial])))
            continue
        if nbytes == 0:
            return None  # an empty storage: its release reads as a new one
        if serial in ordinals:
            ref: Ref | None = ("own", ordinals[serial])
        elif prev is not None and serial in prev:
            ref = ("prev", prev[serial])
        else:
            ref = fwd(serial) if fwd is not None else None
            if ref is None:
                return None
        events.append(LogEvent(False, -nbytes, phase, tag, ref))
    serials = tuple(ordinals)
    if serials and serials != tuple(range(serials[0], serials[0] + len(serials))):
        return None
    return _Log(tuple(events), serials)


def layout_spec(tensor: torch.Tensor) -> tuple | None:
    """(shape, stride, dtype) when ``empty_strided`` recreates ``tensor``'s storage exactly."""
    if (not tensor.is_meta or tensor.storage_offset() != 0 or tensor.layout != torch.strided
            or 0 in tensor.shape):
        return None
    shape, stride = tuple(tensor.shape), tensor.stride()
    needed = 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
    if tensor.untyped_storage().nbytes() != needed * tensor.element_size():
        return None
    return (shape, stride, tensor.dtype)


def _empty(spec: tuple) -> torch.Tensor:
    shape, stride, dtype = spec
    return torch.empty_strided(shape, stride, dtype=dtype, device="meta")


def standing_outputs(tracker: LiveTensorTracker, spec: tuple, serials: list[int],
                     nbytes: int) -> list[torch.Tensor]:
    """What the list ``torch.stack`` reads holds in the places of counted tokens' outputs
    (``serials``, ``nbytes`` each, already counted): one meta tensor of layout ``spec``
    stands for them all (``LiveTensorTracker.attach_group``), and each place holds a view
    of it, the token's output as the loop appends it (``scan_output[:, :, 0]``)."""
    if not serials:
        return []
    with _disable_current_modes():
        shared = _empty(spec)
        tracker.attach_group(shared, serials, [nbytes] * len(serials))
        return [shared[:, :, 0]] * len(serials)


@dataclass
class _Kept:
    """What the forward of the counted tokens leaves for their backward, on the carrier
    the graph saves: the storages the graph keeps alive, and whose serial is whose."""

    objects: list[torch.Tensor]  # what stands for the counted tokens' storages the graph keeps
    real: list[torch.Tensor]  # the real token's the counted ones keep
    first: int  # index of the first counted token
    count: int  # counted tokens
    base: int  # serial of the first counted token's first new storage
    per_token: int  # new storages per token
    group: range  # the keys of the storages the holder in ``objects`` stands for
    # serial -> ordinal, for the real tokens around the counted ones, by token index
    tokens: dict[int, dict[int, int]] = field(default_factory=dict)

    def token_of(self, serial: int) -> tuple[int, int] | None:
        """(token index, ordinal) of a storage a token's forward made."""
        offset = serial - self.base
        if 0 <= offset < self.count * self.per_token:
            return self.first + offset // self.per_token, offset % self.per_token
        for index, ordinals in self.tokens.items():
            if serial in ordinals:
                return index, ordinals[serial]
        return None

    def serial(self, index: int, ordinal: int) -> int | None:
        if self.first <= index < self.first + self.count:
            return self.base + (index - self.first) * self.per_token + ordinal
        for serial, found in self.tokens.get(index, {}).items():
            if found == ordinal:
                return serial
        return None


class _Releaser:
    """Releases a serial at the point the real loop releases it: the log's release is
    logged with the token's events (``tokens_log``), and where a storage still stands for
    the serial (a real tensor the engine or the graph holds a while longer), that storage
    is let go of by the tracker here, so its later end logs nothing; ``rebind`` gives such
    a storage a new serial."""

    def __init__(self, tracker: LiveTensorTracker, serials: set[int]) -> None:
        self.tracker = tracker
        self.keys = {entry[0]: key for key, entry in tracker._live.items()
                     if entry[0] in serials}
        self.let_go: dict[int, tuple[int, Any]] = {}  # serial -> (key, weak reference)

    def forget(self, serial: int, nbytes: int) -> None:
        """The tracker lets go of the storage standing for ``serial``, if one does; the
        caller logs the release itself (``tokens_log``)."""
        key = self.keys.pop(serial, None)
        if key is not None:
            entry = self.tracker._live.get(key)
            if entry is None or entry[0] != serial or entry[1] != nbytes:
                raise ScanNotRepeating
            del self.tracker._live[key]
            self.let_go[serial] = (key, entry[2])

    def rebind(self, old: int, new: int) -> None:
        """The storage that stood for ``old`` (released above) now stands for ``new``."""
        found = self.let_go.pop(old, None)
        storage = found[1]() if found is not None else None
        if storage is None:
            raise ScanNotRepeating
        self.tracker.attach_storage(storage, new)


def take_serials(counter: Iterator[int], count: int) -> None:
    """Take ``count`` serials from the tracker's counter at once (C code, not a ``next``
    per storage): those the counted tokens' storages get."""
    if count > 0:
        next(itertools.islice(counter, count - 1, None))


def tokens_log(events: tuple[LogEvent, ...], count: int, base: int,
                earlier: Callable[[Ref, np.ndarray], np.ndarray], phase: str,
                part: tuple[str, ...]) -> tuple[list[LiveStorage],
                                                list[tuple[str, ...] | None], Columns,
                                                dict[Ref, tuple[np.ndarray, int]]]:
    """The log of ``count`` tokens that each log ``events``, made in ``phase`` and
    ``part``: the entries in the log's own form and the part of each (None for a release),
    as ``count_entries`` counts them, with their columns. Token ``k``'s ``o``-th new
    storage has serial ``base + k * made + o`` (serials are handed out one by one); a
    release of a storage of an earlier token (``ref``) has ``earlier(ref, k)`` for every
    ``k``. Also returns those
    serials and their bytes, by reference, for the caller to let go of what stands for
    them.

    Built as arrays, a column per event of the token, and turned into entries by C code:
    a Python loop over the tokens' events took a fifth of a Mamba plan."""
    made = sum(1 for e in events if e.alloc)
    tokens = np.arange(count, dtype=np.int64)
    own = base + tokens * made
    columns = []
    released: dict[Ref, tuple[np.ndarray, int]] = {}
    for event in events:
        if event.alloc or event.ref[0] == "own":
            columns.append(own + event.ref[1])
        else:
            column = earlier(event.ref, tokens)
            released[event.ref] = (column, event.nbytes)
            columns.append(column)
    serials = np.stack(columns, axis=1).ravel().tolist() if columns else []
    sizes = [e.nbytes if e.alloc else -e.nbytes for e in events]
    tags = [e.tag if e.alloc else None for e in events]
    entries = list(map(new_entry, itertools.repeat(LiveStorage), zip(
        serials, itertools.cycle(sizes), itertools.repeat(phase), itertools.cycle(tags),
        strict=False)))
    parts = [part if e.alloc else None for e in events] * count
    # Every storage made in one phase and part: one run.
    made_here = np.tile(np.array([e.alloc for e in events], dtype=bool), count)
    counted = Columns(np.tile(np.array(sizes, dtype=np.int64), count), made_here,
                      np.zeros(1 if made_here.any() else 0, dtype=np.int64))
    return entries, parts, counted, released


def _count_tokens(tracker: LiveTensorTracker, entries: list[LiveStorage],
                  parts: list[tuple[str, ...] | None], start: int, columns: Columns) -> None:
    """Count the counted tokens' entries, made while the tracker logged nothing since event
    ``start`` (what the real loop would have logged in between would be out of order)."""
    if len(tracker._events) != start:
        raise ScanNotRepeating
    tracker.count_entries(entries, parts, columns)


@dataclass
class _Run:
    """One scan's counted tokens: what the forward found and the backward reads."""

    tracker: LiveTensorTracker
    template: _Log
    first: int  # index of the first counted token
    count: int  # counted tokens
    state_ordinal: int
    output_ordinal: int
    state_spec: tuple
    output_spec: tuple
    last_real: _Log  # the log of token first - 1
    own_nodes_keep_state: bool
    outputs: list[torch.Tensor] = field(default_factory=list)
    kept: _Kept | None = None
    # token index -> (event index, phase, segment) where its backward began
    marks: dict[int, tuple[int, str, tuple[str, ...]]] = field(default_factory=dict)

    # -- forward --------------------------------------------------------------------
    def forward(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Count the counted tokens' forward; returns the last one's state and the carrier
        of what the graph keeps."""
        tracker, template = self.tracker, self.template
        handed = template.handed_on()
        survivors = template.survivors()
        persist = [o for o in survivors if o not in handed]
        kept_ordinals = [o for o in persist if o != self.output_ordinal]
        per_token = len(template.serials)
        sizes = template.sizes()
        last_serials = dict(enumerate(self.last_real.serials))
        releaser = _Releaser(tracker, set(last_serials.values()))
        base = next(tracker._serials)
        take_serials(tracker._serials, self.count * per_token - 1)
        objects: list[torch.Tensor] = []
        real: list[torch.Tensor] = []

        def earlier(ref: Ref, tokens: np.ndarray) -> np.ndarray:
            # The token before's storage: the last real token's for the first one.
            column = base + (tokens - 1) * per_token + ref[1]
            column[0] = last_serials[ref[1]]
            return column

        with _disable_current_modes():
            # The real state the first counted token reads is kept by that token's nodes.
            # Kept detached, here and below: a tensor with a grad_fn would keep its graph
            # alive (checkpointing's recomputed graph, which the real run lets go of).
            if self.state_ordinal in kept_ordinals:
                real.append(state.detach())
            # The tokens' events are counted together once they are all logged.
            start, phase, part = len(tracker._events), tracker.phase, tracker.segment
            entries, parts, counted, released = tokens_log(
                template.events, self.count, base, earlier, phase, part)
            # The last real token's storages the first counted one releases.
            for column, nbytes in released.values():
                releaser.forget(int(column[0]), nbytes)
            # What outlives each token: its output, which the list ``torch.stack`` reads
            # holds, and what its nodes saved, which the graph holds. Each is one tensor
            # standing for all the counted tokens' (``attach_group``), held where the
            # real loop holds them.
            outputs: list[int] = []
            saved: list[int] = []
            saved_sizes: list[int] = []
            for token in range(self.count):
                first_serial = base + token * per_token
                for ordinal in persist:
                    if ordinal == self.output_ordinal:
                        outputs.append(first_serial + ordinal)
                    elif ordinal == self.state_ordinal and token == self.count - 1:
                        continue  # the state handed on, below
                    else:
                        saved.append(first_serial + ordinal)
                        saved_sizes.append(sizes[ordinal])
            self.outputs = standing_outputs(tracker, self.output_spec, outputs,
                                            sizes[self.output_ordinal])
            group = range(0)
            if saved:
                holder = torch.empty(0, dtype=torch.uint8, device="meta")
                group = tracker.attach_group(holder, saved, saved_sizes)
                objects.append(holder)
            previous = {o: base + (self.count - 1) * per_token + o for o in range(per_token)}
            _count_tokens(tracker, entries, parts, start, counted)
            # The last state: the next (real) token reads it, and releases it or keeps it
            # as the real loop does.
            new_state = _empty(self.state_spec)
            tracker.attach(new_state, previous[self.state_ordinal])
            if self.state_ordinal in kept_ordinals and self.own_nodes_keep_state:
                # The last counted token's own nodes keep it too (fp32: the matmul
                # saves the state itself, no cast), till that token's backward.
                objects.append(new_state.detach())
            carrier = torch.empty(0, device="meta")
        kept = _Kept(objects, real, self.first, self.count, base, per_token, group)
        kept.tokens[self.first - 1] = self.last_real.ordinals()
        setattr(carrier, _KEPT, kept)
        self.kept = kept
        return new_state, carrier

    # -- backward -------------------------------------------------------------------
    def backward(self, kept: _Kept, grad: torch.Tensor) -> torch.Tensor:
        """Count the counted tokens' backward from the last real tokens' logs; returns the
        gradient of the state the first counted token read."""
        tracker = self.tracker
        start = len(tracker._events)
        last = self.first + self.count + LAST - 1
        order = [last - k for k in range(LAST)]  # as the backward runs them
        marks = [self.marks.get(index) for index in order]
        if any(m is None for m in marks):
            raise ScanNotRepeating
        bounds = [m[0] for m in marks] + [start]  # type: ignore[index]
        where = {(m[1], m[2]) for m in marks[1:]} | {(tracker.phase, tracker.segment)}  # type: ignore[index]
        if bounds != sorted(bounds) or len(where) != 1:
            raise ScanNotRepeating

        def fwd_of(index: int) -> Callable[[int], Ref | None]:
            def ref(serial: int) -> Ref | None:
                found = kept.token_of(serial)
                if found is None or found[0] > index:
                    return None
                return ("fwd", index - found[0], found[1])
            return ref

        logs: list[_Log] = []
        prev: dict[int, int] | None = None
        for k, index in enumerate(order):
            log = _read(tracker, bounds[k], bounds[k + 1], prev, fwd_of(index))
            if log is None:
                raise ScanNotRepeating
            logs.append(log)
            prev = log.ordinals()
        template, before = logs[-1], logs[-2]
        phase = tracker.phase
        if (template.events != before.events or not template.serials
                or any(e.phase != phase for e in template.events)):
            raise ScanNotRepeating
        survivors = template.survivors()
        if set(survivors) != template.handed_on():
            raise ScanNotRepeating
        grad_serial = tracker.serial_of(grad)
        grad_ordinal = template.ordinals().get(grad_serial) if grad_serial is not None else None
        grad_spec = layout_spec(grad)
        if grad_ordinal is None or grad_ordinal not in survivors or grad_spec is None:
            raise ScanNotRepeating

        # Every storage a counted token's backward may release that a tensor stands for.
        fwd_refs = {(e.ref[1], e.ref[2]) for e in template.events
                    if not e.alloc and e.ref[0] == "fwd"}
        wanted = set(template.serials)
        for index in range(self.first - 1, self.first + self.count):
            for delta, ordinal in fwd_refs:
                serial = kept.serial(index - delta, ordinal) if index - delta >= 0 else None
                if serial is not None:
                    wanted.add(serial)
        releaser = _Releaser(tracker, wanted)

        following = list(template.serials)  # the real token after the counted ones
        made = len(template.serials)
        last = self.first + self.count - 1
        with _disable_current_modes():
            start, phase, part = len(tracker._events), tracker.phase, tracker.segment
            # The backward runs the counted tokens from the last: the k-th it runs is
            # token ``last - k``.
            base = next(tracker._serials)
            take_serials(tracker._serials, self.count * made - 1)

            def earlier(ref: Ref, tokens: np.ndarray) -> np.ndarray:
                if ref[0] == "prev":
                    # What the token after handed on: the real one's, for the first.
                    column = base + (tokens - 1) * made + ref[1]
                    column[0] = following[ref[1]]
                    return column
                # A storage of the forward of token ``source``.
                _, delta, ordinal = ref
                source = last - tokens - delta
                column = kept.base + (source - self.first) * kept.per_token + ordinal
                counted = (source >= self.first) & (source < self.first + self.count)
                for k in np.flatnonzero(~counted).tolist():
                    serial = kept.serial(int(source[k]), ordinal)
                    if serial is None:
                        raise ScanNotRepeating
                    column[k] = serial
                return column

            entries, parts, counted, released = tokens_log(
                template.events, self.count, base, earlier, phase, part)
            # A storage something still stands for is let go of; the rest (what this
            # backward made) only logs its release.
            forget, standing = releaser.forget, releaser.keys.__contains__
            for column, nbytes in released.values():
                for serial in filter(standing, column.tolist()):
                    forget(serial, nbytes)
            previous = [base + (self.count - 1) * made + o for o in range(made)]
            _count_tokens(tracker, entries, parts, start, counted)
            # What the last counted token hands on: its state's gradient, returned to the
            # engine; the running sums the engine holds, under their new serials.
            for ordinal in survivors:
                if ordinal != grad_ordinal:
                    releaser.rebind(template.serials[ordinal], previous[ordinal])
            out = _empty(grad_spec)
            tracker.attach(out, previous[grad_ordinal])
        # Whatever of the counted tokens' forward the graph still kept would end later than
        # in the real loop, where their nodes have run by now.
        if (any(tracker.serial_of(kept_object) is not None for kept_object in kept.objects)
                or tracker.group_tracked(kept.group)):
            raise ScanNotRepeating
        # Let go of what the counted tokens kept now, as their nodes would have: the carrier
        # itself may outlive this node (checkpointing's recomputed tensors).
        kept.objects.clear()
        kept.real.clear()
        return out


class _Counted(torch.autograd.Function):
    """The counted tokens as one autograd node (state in, state out)."""

    @staticmethod
    def forward(ctx: Any, state: torch.Tensor, run: _Run) -> torch.Tensor:  # type: ignore[override]
        new_state, carrier = run.forward(state)
        ctx.save_for_backward(carrier)
        ctx.run = run
        # No zeros made for a gradient that never came: the real loop makes none.
        ctx.set_materialize_grads(False)
        return new_state

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor | None) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (carrier,) = ctx.saved_tensors
        kept = getattr(carrier, _KEPT, None)
        if grad is None or not isinstance(kept, _Kept):
            raise ScanNotRepeating
        return ctx.run.backward(kept, grad), None


def _mark(run: _Run, index: int, _grads: Any) -> None:
    """Node hook: where token ``index``'s backward begins (its output's first node)."""
    tracker = run.tracker
    run.marks.setdefault(index, (len(tracker._events), tracker.phase, tracker.segment))


def _held_elsewhere(tensor: torch.Tensor) -> bool:
    """Whether something besides ``tensor`` holds its storage (a node that saved it, or a
    view of it): more references than a lone tensor's storage has."""
    with _disable_current_modes():
        lone = torch.empty(1, device="meta")
        alone = torch._C._storage_Use_Count(lone.untyped_storage()._cdata)
        return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata) > alone


def _new_serials(tracker: LiveTensorTracker, start: int) -> dict[int, int]:
    """serial -> ordinal of the storages made since event ``start``."""
    found: dict[int, int] = {}
    for serial, nbytes, _, _ in tracker._events[start:]:
        if nbytes > 0 and serial not in found:
            found[serial] = len(found)
    return found


def zero_state(batch_size: int, intermediate_size: int, state_size: int,
               input_dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """transformers' initial state of the recurrent iteration (both loops start from it)."""
    # "Initial hidden state" is not supported by the kernel path, so use
    # the same zero initialization as the kernel
    return torch.zeros(
        batch_size,
        intermediate_size,
        state_size,
        dtype=input_dtype,
        device=device,
    )


def counted_loop(discrete_A: torch.Tensor, deltaB_u: torch.Tensor, C: torch.Tensor,
                 batch_size: int, intermediate_size: int, state_size: int,
                 input_dtype: torch.dtype, device: torch.device, seq_len: int,
                 tracker: LiveTensorTracker,
                 ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]] | None:
    """transformers' recurrent iteration with a graph, its middle tokens one counted node
    (the final state, the last token's output and every token's output); None where it
    runs as it is (too few tokens, or inputs that do not all need a gradient)."""
    if (seq_len < MIN_TOKENS or not enabled()
            or not all(t.requires_grad for t in (discrete_A, deltaB_u, C))):
        return None
    ssm_state = zero_state(batch_size, intermediate_size, state_size, input_dtype, device)
    scan_outputs: list[torch.Tensor] = []

    def token(index: int) -> torch.Tensor:
        nonlocal ssm_state
        # State calculation
        ssm_state = discrete_A[:, :, index] * ssm_state + deltaB_u[:, :, index]

        # Subsequent output
        scan_output = torch.matmul(ssm_state.to(input_dtype), C[:, index, :].unsqueeze(-1))
        scan_outputs.append(scan_output[:, :, 0])
        return scan_output

    logs: list[_Log | None] = []
    previous: dict[int, int] = {}
    for index in range(FIRST):
        start = len(tracker._events)
        output = token(index)
        logs.append(_read(tracker, start, len(tracker._events), previous) if index else None)
        previous = _new_serials(tracker, start)
    template, before = logs[-1], logs[-2]
    if template is None or before is None or template.events != before.events:
        raise ScanNotRepeating
    ordinals = template.ordinals()
    state_ordinal = ordinals.get(tracker.serial_of(ssm_state))  # type: ignore[arg-type]
    output_ordinal = ordinals.get(tracker.serial_of(output))  # type: ignore[arg-type]
    survivors = template.survivors()
    state_spec, output_spec = layout_spec(ssm_state), layout_spec(output)
    if (state_ordinal is None or output_ordinal is None or state_ordinal == output_ordinal
            or state_ordinal not in survivors or output_ordinal not in survivors
            or output_ordinal in template.handed_on()
            or not template.handed_on() <= set(survivors)
            or state_spec is None or output_spec is None
            or any(e.phase != tracker.phase for e in template.events)):
        raise ScanNotRepeating

    count = seq_len - FIRST - LAST
    run = _Run(tracker, template, FIRST, count, state_ordinal, output_ordinal, state_spec,
               output_spec, template, _held_elsewhere(ssm_state))
    ssm_state = _Counted.apply(ssm_state, run)
    kept = run.kept
    assert kept is not None
    scan_outputs.extend(run.outputs)
    run.outputs.clear()
    run.kept = None
    previous = {kept.serial(FIRST + count - 1, o): o  # type: ignore[misc]
                for o in range(len(template.serials))}
    for index in range(FIRST + count, seq_len):
        start = len(tracker._events)
        scan_output = token(index)
        log = _read(tracker, start, len(tracker._events), previous)
        if log is None or log.events != template.events:
            raise ScanNotRepeating
        previous = kept.tokens[index] = log.ordinals()
        scan_outputs[-1].grad_fn.register_prehook(  # type: ignore[union-attr]
            functools.partial(_mark, run, index))
    return ssm_state, scan_output, scan_outputs

