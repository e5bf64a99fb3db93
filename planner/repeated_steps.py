"""The forward and backward of a training trace's second optimizer step, counted from
the first's log instead of run again.

run_training traces two optimizer steps, as Trainer runs them: the second runs beside the
optimizer state the first update made, which is where training peaks. Its forward and
backward run the same code, on the same inputs, on a model left as it was, so on meta
tensors they make and free storages of the same sizes in the same order. Counting the
first step's log again on top of what the first update left (fresh serials; the same
sizes, phases, parts and tags, through the tracker's own counting) gives every peak, part
peak and live set that running them gives, for half the model code. The update itself
still runs for real, on gradients laid out as the first backward made them.

The log is counted again only where nothing the tracker can see tells the two steps apart:

* the model's record (planner/prepared_models.state_of: its modules, tensors, flags,
  hooks and attributes) when the second step starts equals the record when the first
  started, once each quantisation method has put back the scratch its layers' forward
  sets before reading (``clear_step_scratch``: LLM.int8's training flag and outlier
  columns); a layer that changes otherwise on its first call is run again;
* the first step's forward and backward freed no storage made before them, and when they
  ended the only storages of theirs still alive were the parameters' gradients, one
  dense storage each, laid out like their parameter (and empty ones, which weigh nothing);
* none of their storages is alive when the second step starts;
* one exception to both: a tensor a quantisation method's layer casts on its first
  forward, before anything reads it, and never again (``first_forward_casts``:
  bitsandbytes' k-bit layers cast their float32 bias to the input's dtype). The cast
  frees a storage made before the step and keeps a new one, right after it is made, in
  the tensor; the second step makes neither. Its two events are left out of the log
  counted again, and the second step must start from the model as the first left it (its
  record, gradients set aside), which may differ from where the first started by those
  casts alone (``prepared_models.equal_but_recast``). Without it every QLoRA step of a
  model with biased linear layers (Qwen2, Qwen2.5, Mamba's ``dt_proj``) ran twice;
* no parameter runs a hook on its gradient (code the log does not hold: an optimizer in
  the backward), nothing went to host memory (activation offloading), and the loss is the
  causal-LM one, or a workload's own loss that reads nothing but the model, the modules
  it names (a frozen reference model, whose record must be unchanged too) and inputs made
  before the loop, keeping nothing of one step that the next one reads (TRL's DPO and KTO
  ``compute_loss`` on their fixed batch: their metrics are Python numbers). A loss that
  may keep state outside the model (GRPO's buffered generations) runs every step.
* a loss that keeps storages of its step outside the model only by accumulating them
  (TRL's ORPO and CPO store each metric, a scalar tensor, in a list the trainer empties
  when it logs) may leave them alive; they must still be alive when the next step starts,
  and the count keeps that step's again, as it would.

Otherwise the second step runs for real, and always on the reference path
(``QPLAN_REUSE=0``), which the tests compare against.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from qplan.planner import reuse
from qplan.planner.bulk_count import Columns, columns_of
from qplan.planner.live_tensors import LiveStorage, LiveTensorTracker, new_entry
from qplan.planner.prepared_models import equal_but_recast, state_of
from qplan.planner.quant import clear_step_scratch, first_forward_casts


@dataclass(frozen=True)
class _Gradient:
    param: nn.Parameter
    serial: int  # in the recorded section
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


@dataclass(frozen=True)
class _Section:
    record: tuple  # state_of(model) and its companions' when the section started
    # The section's log (the tracker's entries, and the part of each: None for a release).
    entries: list[LiveStorage]
    parts: list[tuple[str, ...] | None]
    columns: Columns  # what counting them reads (planner/bulk_count.py), read once
    # The section's storages made, by serial (increasing: the order they were made in),
    # and for each entry the place of its storage in that order.
    made: np.ndarray
    ordinals: np.ndarray
    gradients: tuple[_Gradient, ...]
    empty: frozenset[int]  # zero-byte storages still alive when the section ended
    kept: frozenset[int]  # storages the loss keeps outside the model (metrics)
    phase: str  # the tracker's phase and part when the section ended
    segment: tuple[str, ...]
    # Where in the log each entry was first counted (what a recording of the step maps to
    # the later steps' copies: planner/derived_double_quant.py).
    source: np.ndarray

    def ordinal(self, serial: int) -> int:
        return int(np.searchsorted(self.made, serial))


def repeatable(params: list[nn.Parameter], workload: Any, own_loss: bool) -> bool:
    """Whether a training run may count its later optimizer steps' forward and backward
    from the first's log (the conditions the step itself cannot check later)."""
    if own_loss or workload.activation_offloading or not reuse.enabled():
        return False
    return not any(getattr(p, "_post_accumulate_grad_hooks", None) or p._backward_hooks
                   for p in params)


class StepRepeater:
    """Records the forward and backward of one optimizer step (``recording``) and counts
    them again for a later one (``repeat``) when that step provably runs the same."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter],
                 tracker: LiveTensorTracker, seen: Any,
                 companions: tuple[nn.Module, ...] = (), keeps: bool = False) -> None:
        self._model = model
        # Whether the loss may keep storages of its step by accumulating them.
        self._keeps = keeps
        # Modules beside the model that the loss runs (a frozen reference model): their
        # records join the model's.
        self._companions = companions
        self._params = params
        self._tracker = tracker
        self._seen = seen
        self._section: _Section | None = None

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        tracker, seen = self._tracker, self._seen
        record = self._record()
        castable = self._castable()
        start = tracker.record_parts()
        before = _other_roles(seen)
        host = (tracker.host_current, tracker.host_peak)
        yield
        if _other_roles(seen) != before or (tracker.host_current, tracker.host_peak) != host:
            return
        # The log's own entries, not a copy of each: a Mamba step logs millions.
        entries, parts = tracker._events[start:], tracker.parts(start)
        serials = _serials(entries)
        source = np.arange(start, start + len(entries))
        casts = self._casts(entries, parts, serials, castable)
        if casts:
            # The first step cast these tensors, the next ones will not: their events
            # are not counted again, and the next step must start from the model as the
            # first one left it, which differs from where it started by the casts alone.
            keep = ~np.isin(serials, [*casts, *casts.values()])
            entries = list(itertools.compress(entries, keep.tolist()))
            parts = list(itertools.compress(parts, keep.tolist()))
            serials = serials[keep]
            source = source[keep]
            after = self._record_without_gradients()
            if not equal_but_recast(record, after, {id(castable[s]) for s in casts}):
                return
            record = after
        self._section = self._section_of(record, entries, parts, serials,
                                         columns_of(entries, parts), source)

    def _castable(self) -> dict[int, torch.Tensor]:
        """serial -> tensor, for the tensors the model's quantised layers cast on their
        first forward (planner/quant: ``first_forward_casts``)."""
        found = {}
        for module in (self._model, *self._companions):
            for tensor in first_forward_casts(module):
                serial = self._tracker.serial_of(tensor)
                if serial is not None:
                    found[serial] = tensor
        return found

    def _casts(self, entries: list[LiveStorage], parts: list[tuple[str, ...] | None],
               serials: np.ndarray, castable: dict[int, torch.Tensor]) -> dict[int, int]:
        """old serial -> new serial of each cast the section made: a castable tensor's
        storage released right after a new storage was made, that new storage what the
        tensor holds now (``tensor.data = tensor.data.to(dtype)``)."""
        casts: dict[int, int] = {}
        if not castable:
            return casts
        for at in np.flatnonzero(np.isin(serials, list(castable))).tolist():
            serial = entries[at][0]
            if (parts[at] is None and at > 0 and parts[at - 1] is not None
                    and self._tracker.serial_of(castable[serial]) == entries[at - 1][0]):
                casts[serial] = entries[at - 1][0]
        return casts

    def _record_without_gradients(self) -> tuple:
        """The record with every parameter's gradient set aside, as a step starts."""
        grads = [(param, param.grad) for param in self._params if param.grad is not None]
        for param, _ in grads:
            param.grad = None
        try:
            return self._record()
        finally:
            for param, grad in grads:
                param.grad = grad

    def _section_of(self, record: tuple, entries: list[LiveStorage],
                    parts: list[tuple[str, ...] | None], serials: np.ndarray,
                    columns: Columns, source: np.ndarray) -> _Section | None:
        n = len(entries)
        made_here = columns.made
        made_at, released_at = np.flatnonzero(made_here), np.flatnonzero(~made_here)
        made = serials[made_at]
        if len(made) > 1 and not (np.diff(made) > 0).all():
            return None  # serials out of the order they are handed out in
        # Every release is of a storage made earlier in the section.
        ordinals = np.empty(n, dtype=np.int64)
        ordinals[made_at] = np.arange(len(made))
        released = serials[released_at]
        of = np.searchsorted(made, released)
        if len(released) and not len(made):
            return None
        if len(released) and ((of >= len(made)).any()
                              or (made[np.minimum(of, len(made) - 1)] != released).any()
                              or (made_at[np.minimum(of, len(made) - 1)] >= released_at).any()):
            return None  # a storage made before the section
        ordinals[released_at] = of
        # A release logs no tag: the count logs the same entries again.
        if any(map(operator.is_not, map(operator.itemgetter(3),
                                        itertools.compress(entries, (~made_here).tolist())),
                   itertools.repeat(None))):
            return None
        freed = np.zeros(len(made), dtype=bool)
        freed[of] = True
        left = made_at[~freed]
        survivors = {entries[at][0]: entries[at][1] for at in left.tolist()}
        gradients = []
        for param in self._params:
            grad = param.grad
            if grad is None:
                continue
            serial = self._tracker.serial_of(grad)
            storage = grad.untyped_storage().nbytes()
            dense = (grad.storage_offset() == 0 and grad.is_contiguous()
                     and storage == grad.numel() * grad.element_size())
            if (serial is None or not dense or grad.dtype != param.dtype
                    or grad.shape != param.shape or grad.device != param.device):
                return None
            gradients.append(_Gradient(param, serial, tuple(grad.shape), tuple(grad.stride()),
                                       grad.dtype, storage))
        grad_serials = [g.serial for g in gradients]
        # Empty storages the backward leaves to the autograd engine weigh nothing: they
        # are released with the section's end, which no count can tell from later.
        empty = frozenset(s for s, nbytes in survivors.items()
                          if nbytes == 0 and s not in grad_serials)
        kept = (frozenset(set(survivors) - empty - set(grad_serials)) if self._keeps
                else frozenset())
        if (len(set(grad_serials)) != len(grad_serials)
                or set(grad_serials) != set(survivors) - empty - kept):
            return None
        return _Section(record, entries, parts, columns, made, ordinals, tuple(gradients),
                        empty, kept, self._tracker.phase, self._tracker.segment, source)

    def _record(self) -> tuple:
        return (state_of(self._model), *map(state_of, self._companions))

    def repeat(self) -> bool:
        """Count the recorded section again, as this optimizer step's forward and
        backward, and give the parameters their gradients; False (nothing counted) when
        this step could run differently."""
        section, tracker = self._section, self._tracker
        if section is None or any(p.grad is not None for p in self._params):
            return False
        # What the first step left in layers that the next one sets before reading it
        # (LLM.int8's training flag and outlier columns) goes back to as it was: the
        # record can then match, and the columns' storage (empty on meta) is released.
        for module in (self._model, *self._companions):
            clear_step_scratch(module)
        live = tracker.live_serials()
        alive = np.fromiter(live, dtype=np.int64, count=len(live))
        made_live = set(alive[np.isin(alive, section.made)].tolist())
        if made_live - section.kept or not section.kept <= live \
                or self._record() != section.record:
            return False
        # The gradients first (nothing counted), so a layout that would differ stops here.
        with tracker.untracked():
            grads = [torch.empty_strided(g.shape, g.stride, dtype=g.dtype,
                                         device=g.param.device) for g in section.gradients]
        if any(grad.untyped_storage().nbytes() != g.nbytes
               for grad, g in zip(grads, section.gradients, strict=True)):
            return False
        # The section's log under fresh serials, handed out in the order the step would
        # make its storages: the storage made k-th gets the k-th.
        first = next(tracker._serials) if len(section.made) else 0
        if len(section.made) > 1:
            next(itertools.islice(tracker._serials, len(section.made) - 2, None))
        entries = section.entries
        log = list(map(new_entry, itertools.repeat(LiveStorage), zip(
            (section.ordinals + first).tolist(), map(operator.itemgetter(1), entries),
            map(operator.itemgetter(2), entries), map(operator.itemgetter(3), entries),
            strict=True)))
        if tracker.repeats is not None:
            tracker.repeats.append((len(tracker._events), section.source))
        tracker.count_entries(log, list(section.parts), section.columns)
        phase = entries[-1][2] if entries else section.phase
        tracker.count_entries(
            [new_entry(LiveStorage, (first + section.ordinal(serial), 0, phase, None))
             for serial in section.empty], [None] * len(section.empty))
        tracker.phase, tracker.segment = section.phase, section.segment
        for grad, g in zip(grads, section.gradients, strict=True):
            g.param.grad = grad
            serial = first + section.ordinal(g.serial)
            tracker.attach(grad, serial)
            self._seen.gradients.add(serial)
        return True


def _other_roles(seen: Any) -> dict[str, Any]:
    """What the step has found so far, but the gradients (which the section adds)."""
    found = {name: copy.copy(value) for name, value in vars(seen).items()
             if name != "gradients"}
    found["roles"] = {name: set(value) for name, value in seen.roles.items()}
    return found


def _serials(entries: list[LiveStorage]) -> np.ndarray:
    return np.fromiter(map(operator.itemgetter(0), entries), dtype=np.int64,
                       count=len(entries))
