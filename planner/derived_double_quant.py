"""Training steps of double-quantised 4-bit candidates derived from the single-quantised
row's step, not traced.

nf4-dq and nf4 (fp4-dq and fp4) load the same packed weights; double quantisation
(``bnb_4bit_use_double_quant``) only stores each layer's absmax as uint8 with a nested
float32 state. A training step (forward, checkpointed recompute, backward, the optimizer's
updates of the adapters) runs op for op the same on both, except where bitsandbytes reads
that absmax. Every such read goes through two functions of ``bitsandbytes.functional``,
and each makes, around the one storage it makes for a single-quantised weight, the
float32 absmax it dequantises first (bitsandbytes 0.50):

* ``dequantize_4bit`` (MatMul4Bit's forward and backward): the absmax (``n`` values, one
  per 64-value block) is made, then the weight, then the absmax is freed as the function
  returns: ``+A, +W, -A`` where the single-quantised call logs ``+W``;
* ``gemv_4bit`` (a one-token forward without autograd: a reference model's logits, a
  generated token): the absmax, then the absmax plus its offset (not in place), then the
  first is freed, then the output, then the second: ``+D, +E, -D, +out, -E``.

So the single-quantised row's step is recorded (``DequantRecorder``: the tracker's log
with the part of the step each storage was made in, and where each of those calls made
its one storage), and the double-quantised row's log is spliced together: its own
model's tensors (packed weights, uint8 absmax, nested state, adapters) where the
recorded model's were, and the absmax storages around each call's output. That log is
counted again by the tracker's own counting (``LiveTensorTracker.count_log``), so every
peak, part peak and snapshot is the one a trace of the double-quantised row finds.

What must hold, else the row is traced as before (``derive`` answers None):

* a training step without activation offloading (host copies are counted apart),
  Axolotl's LoRA kernels (they dequantise in their own code), quantised experts, images,
  remote code or a stored checkpoint format; the reuse switch on (``QPLAN_REUSE=0``
  traces); the model's code names none of double quantisation's fields;
* the two prepared models have the same modules, parameters and buffers;
* the recorded log starts with the model's own tensors, the step releases none of them
  but parameters or buffers (bitsandbytes casts a layer's float32 bias on its first
  forward; the release is then of the other model's tensor of that name), and every role
  the step names other than weights and adapters was made by the step. (The tracker
  counts nothing that its log does not hold, so the log counted again is the step:
  ``tests/test_derived_double_quant.py`` checks it);
* each recorded call of those functions made exactly its output, or nothing at all
  (inside ``untracked``, where the absmax is not counted either);
* the log is short enough to keep (``MAX_EVENTS``) until the derivation reads it.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from qplan.planner.derived_traces import (
    Event,
    _RecordingTracker,
    model_shape,
    names_any,
    record_once,
    structure,
)
from qplan.planner.live_tensors import LiveTensorTracker, PeakSnapshot
from qplan.planner.patching import swapped
from qplan.planner.precision import PRECISIONS, find_precision
from qplan.planner.steps import StepTensors, track_model
from qplan.planner.workload import Workload

# Bytes per value of the float32 absmax double quantisation dequantises.
ABSMAX_BYTES = 4
# A recording longer than this is not kept (a Mamba scan's step at 8,192 tokens logs
# millions of events): the double-quantised row is traced instead.
MAX_EVENTS = 500_000
TOO_LONG = "the step's log is too long to keep"
# Recordings kept at once, waiting for their double-quantised row (a search's probes ask
# for both rows at each value).
MAX_RECORDINGS = 16
# Words of a model's own code that would read double quantisation's state.
_DOUBLE_QUANT_WORDS = ("state2", "nested", "double_quant", "compress_statistics")


def single_quant_row(precision: str) -> str | None:
    """The row a double-quantised bitsandbytes 4-bit row's training step derives from (the
    same quant type without double quantisation), or None for any other row."""
    prec = PRECISIONS[precision]
    if prec.method_name != "bitsandbytes" or not prec.is_4bit or not prec.double_quant:
        return None
    return find_precision("bitsandbytes", bits=prec.bits, quant_type=prec.quant_type,
                          double_quant=False)


def records(precision: str) -> bool:
    """Whether ``precision``'s training steps are recorded for a double-quantised row."""
    return any(single_quant_row(name) == precision for name in PRECISIONS)


def derivable(workload: Workload, options: dict[str, Any]) -> bool:
    """A training step whose double-quantised row may be derived, as far as the workload
    and the trace's options tell."""
    return (workload.is_training and not workload.activation_offloading
            and not workload.quantize_moe_experts and not workload.images
            and not (workload.lora_mlp_kernel or workload.lora_qkv_kernel
                     or workload.lora_o_kernel)
            and not options.get("trust_remote_code") and options.get("stored_method") is None
            # A frozen copy of the policy (``ref_model: copy``) copies its quant states too.
            and not (workload.kind.weight_copies
                     and dict(workload.extra).get("ref_model") == "copy"))


@dataclass(frozen=True)
class DequantCall:
    """Where one call of a function that reads the absmax made its one storage."""

    at: int  # index in the log of the storage it made
    function: str  # "dequantize_4bit" | "gemv_4bit"
    blocks: int  # values of the absmax (one per block of the weight)


@dataclass(frozen=True)
class TrainingRecording:
    """The single-quantised row's step, as a double-quantised row's is derived from it."""

    events: tuple[Event, ...]
    weights_end: int  # events[:weights_end] are the model's own tensors (track_model)
    calls: tuple[DequantCall, ...]
    # Releases in the step of the model's own parameters or buffers (bitsandbytes casts a
    # layer's float32 bias on its first forward): index in the log -> the tensor's name.
    released: dict[int, str]
    seen: StepTensors
    structure: dict[str, tuple] = field(compare=False)
    # Why nothing can be derived from this step ("" when it can).
    problem: str


class DequantRecorder:
    """Records a single-quantised row's training step (``planner/trace.py: trace(...,
    recorder=...)``): the log with parts, and each absmax read's storage."""

    def __init__(self) -> None:
        self._tracker: _RecordingTracker | None = None
        self._calls: list[DequantCall] = []
        self._problem = ""
        self._structure: dict[str, tuple] = {}
        self.recording: TrainingRecording | None = None

    def tracker(self, tagger: Callable[[torch.Tensor], str | None]) -> LiveTensorTracker:
        self._tracker = _NamingTracker(tagger)
        self._tracker.repeats = []
        return self._tracker

    @contextlib.contextmanager
    def watching(self, model: nn.Module) -> Iterator[None]:
        """``dequantize_4bit`` and ``gemv_4bit`` watched for the step."""
        import bitsandbytes.functional as functional

        self._structure = structure(model)
        assert self._tracker is not None
        # Storage ids only: a reference would keep a storage the step frees alive.
        self._tracker.storage_names = {id(t.untyped_storage()): name
                                       for name, t in own_tensors(model)}
        if names_any(model, _DOUBLE_QUANT_WORDS):
            self._problem = "the model's code reads double quantisation's state"
        from bitsandbytes.nn import Params4bit

        def copied(original: Callable[..., Any]) -> Callable[..., Any]:
            # A step that copies or moves a quant state holds what differs between the rows.
            def flagged(*args: Any, **kwargs: Any) -> Any:
                if self._tracker is not None and self._tracker.armed:
                    self._problem = self._problem or "the step copies a 4-bit weight"
                return original(*args, **kwargs)

            return flagged

        with swapped(*((functional, name, self._watched(name, getattr(functional, name)))
                       for name in ("dequantize_4bit", "gemv_4bit")),
                     (Params4bit, "__deepcopy__", copied(Params4bit.__deepcopy__)),
                     (functional.QuantState, "to", copied(functional.QuantState.to))):
            yield

    def _watched(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def watched(*args: Any, **kwargs: Any) -> Any:
            tracker = self._tracker
            if tracker is None or not tracker.armed:
                return function(*args, **kwargs)
            start = len(tracker._events)
            out = function(*args, **kwargs)
            self._note(name, args, kwargs, out, start)
            return out

        return watched

    def _note(self, name: str, args: tuple, kwargs: dict, out: Any, start: int) -> None:
        tracker = self._tracker
        assert tracker is not None
        events = tracker._events
        state = kwargs.get("quant_state" if name == "dequantize_4bit" else "state")
        if state is None:
            position = 1 if name == "dequantize_4bit" else 5
            state = args[position] if len(args) > position else None
        if self._problem:
            return
        out_position = 3 if name == "dequantize_4bit" else 2
        given = kwargs.get("out", args[out_position] if len(args) > out_position else None)
        if given is not None:
            self._problem = f"{name} writes into a given tensor"
            return
        if state is None or getattr(state, "nested", True):
            self._problem = f"{name} is called without a single-quantised state"
            return
        made = len(events) - start
        if made == 0 and tracker._untracked:
            return  # nothing is counted in there: the absmax would not be either
        if made != 1 or events[start][1] <= 0 or \
                not isinstance(out, torch.Tensor) or tracker.serial_of(out) != events[start][0]:
            self._problem = f"{name} made more or less than its output"
            return
        self._calls.append(DequantCall(start, name, int(state.absmax.numel())))

    def finish(self, seen: StepTensors) -> None:
        tracker = self._tracker
        assert tracker is not None
        weights_end = tracker.entered_at
        problem = self._problem
        if not problem and len(tracker._events) > MAX_EVENTS:
            problem = TOO_LONG
        events = tuple(tracker.log()) if not problem else ()
        problem = problem or _impure_step(seen, events, weights_end)
        released: dict[int, str] = {}
        if not problem:
            # The step's events about the model's own tensors (found in numpy: the log is
            # long): releases of parameters or buffers only, named.
            serials = np.fromiter(map(operator.itemgetter(0), events), dtype=np.int64,
                                  count=len(events))
            prefix = serials[:weights_end]
            for index in (weights_end + np.flatnonzero(
                    np.isin(serials[weights_end:], prefix))).tolist():
                name = tracker.serial_names.get(events[index][0])
                if name is None or events[index][4] is not None:
                    problem = "the step releases a quant state"
                    break
                released[index] = name
        calls = _with_repeats(self._calls, tracker.repeats or []) if not problem else ()
        self.recording = TrainingRecording(
            events if not problem else (), weights_end, calls, released, seen,
            self._structure, problem)


class _NamingTracker(_RecordingTracker):
    """The recording tracker, naming the serials of the model's parameters and buffers
    when the step starts (``storage_names``: id of each one's storage -> its name)."""

    def __init__(self, tagger: Callable[[torch.Tensor], str | None] | None = None) -> None:
        super().__init__(tagger)
        self.storage_names: dict[int, str] = {}
        self.serial_names: dict[int, str] = {}

    def __enter__(self) -> _NamingTracker:
        if self.entered_at < 0:
            self.serial_names = {self._live[key][0]: name
                                 for key, name in self.storage_names.items()
                                 if key in self._live}
        super().__enter__()
        return self


def own_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's parameters and buffers, by name (what both rows' models hold alike)."""
    for name, param in model.named_parameters():
        yield f"parameter {name}", param
    for name, buffer in model.named_buffers():
        yield f"buffer {name}", buffer


def _with_repeats(calls: list[DequantCall], repeats: list[tuple[int, Any]],
                  ) -> tuple[DequantCall, ...]:
    """The calls, and their copies in the later optimizer steps counted from the first's
    log (``repeats``: where each copy starts, and the log index of each entry copied)."""
    found = list(calls)
    for start, source in repeats:
        for call in calls:
            place = int(np.searchsorted(source, call.at))
            if place < len(source) and int(source[place]) == call.at:
                found.append(replace(call, at=start + place))
    return tuple(sorted(found, key=lambda call: call.at))


def _own_serials(seen: StepTensors) -> set[int]:
    return set(seen.weights) | set(seen.adapters)


def _impure_step(seen: StepTensors, events: tuple[Event, ...], weights_end: int) -> str:
    """The log must start with the model's own tensors, the step must never release one,
    and only weights and adapters may be the model's."""
    own = _own_serials(seen)
    prefix = {e[0] for e in events[:weights_end]}
    if prefix != own or any(e[4] is None for e in events[:weights_end]):
        return "the model's tensors are not the start of the log"
    # (What the step does with them is read in numpy by ``finish``.)
    others = (seen.gradients, seen.optimizer_states, seen.paged_states, seen.kv_cache,
              *seen.roles.values())
    if any(own & set(serials) for serials in others):
        return "a role of the step holds the model's own tensors"
    if seen.host_peak:
        return "the step keeps copies on the host"
    return ""


def derive(recording: TrainingRecording, model: nn.Module, phase_snapshots: bool,
           ) -> tuple[PeakSnapshot, StepTensors, dict[str, int], dict[str, PeakSnapshot]] | None:
    """The double-quantised row's step on ``model`` (its prepared meta model) from the
    single-quantised row's ``recording``: what ``planner/trace.py: trace`` returns, or
    None when it cannot be derived exactly."""
    from qplan.planner.trace import use_static_experts, vocab_tagger

    if recording.problem:
        return None
    use_static_experts(model)  # what trace() does first
    # Read once per prepared model while no step runs on it (``model_shape``).
    if model_shape(model)[0] != recording.structure:
        return None
    tracker = _RecordingTracker(vocab_tagger(model.config.get_text_config().vocab_size))
    own = StepTensors()
    track_model(model, tracker, own)
    # The model's own tensors take negative serials; the recorded step's keep theirs; the
    # absmax storages get new ones past the largest.
    log: list[Event] = [(-1 - s, n, phase, tag, part)
                        for s, n, phase, tag, part in tracker.log()]
    fresh = 1 + max((e[0] for e in recording.events), default=0)
    events = recording.events
    if recording.released:
        # The model's own tensors the step releases, under this model's serials.
        serials = {name: -1 - tracker.serial_of(tensor) for name, tensor in own_tensors(model)
                   if tracker.serial_of(tensor) is not None}
        if any(name not in serials for name in recording.released.values()):
            return None
        events = list(events)
        for index, name in recording.released.items():
            _, nbytes, phase, tag, part = events[index]
            events[index] = (serials[name], nbytes, phase, tag, part)
    position = recording.weights_end
    for call in recording.calls:
        log.extend(events[position:call.at])
        _, _, phase, _, part = made = events[call.at]
        nbytes = call.blocks * ABSMAX_BYTES
        if call.function == "dequantize_4bit":
            absmax, fresh = fresh, fresh + 1
            log.extend(((absmax, nbytes, phase, None, part), made,
                        (absmax, -nbytes, phase, None, None)))
        else:
            dequantised, shifted, fresh = fresh, fresh + 1, fresh + 2
            log.extend(((dequantised, nbytes, phase, None, part),
                        (shifted, nbytes, phase, None, part),
                        (dequantised, -nbytes, phase, None, None), made,
                        (shifted, -nbytes, phase, None, None)))
        position = call.at + 1
    log.extend(events[position:])
    replay = LiveTensorTracker()
    replay.count_log(log)
    seen = recording.seen
    derived = StepTensors(
        weights={-1 - s for s in own.weights}, adapters={-1 - s for s in own.adapters},
        gradients=set(seen.gradients), optimizer_states=set(seen.optimizer_states),
        kv_cache=set(seen.kv_cache), paged_states=set(seen.paged_states),
        host_peak=seen.host_peak, roles={k: set(v) for k, v in seen.roles.items()})
    peak, snapshots = replay.snapshots(phases=phase_snapshots)
    return peak, derived, dict(replay.phase_peaks), snapshots


def deriving(tracer: Callable[..., Any]) -> Callable[..., Any]:
    """``tracer`` (``trace_components``) for the plans of one config, with the training
    steps of double-quantised 4-bit rows derived from their single-quantised row's
    recorded step (traced first when it was not yet). Off on the reference path."""
    from qplan.planner import meta_models, reuse
    from qplan.planner.components import StepModel, step_key, trace_outcome
    from qplan.planner.depths import HOMOGENEOUS

    recordings: dict[tuple, TrainingRecording | None] = {}
    outcomes: dict[tuple, Any] = {}
    failed: set[tuple] = set()
    # Per config: the fewest tokens (batch x sequence) of a step whose log came out too
    # long to keep. A step of as many tokens or more is not recorded: keeping the part of
    # every event from the start costs a Mamba scan's step time, for nothing.
    too_long: dict[int, int] = {}

    def recorded(config: Any, workload: Workload, precision: str, compute_dtype: str,
                 options: dict[str, Any]) -> Any:
        key = step_key(config, workload, precision, compute_dtype, options)
        tokens = workload.batch * workload.seq_len
        if key not in outcomes and tokens >= too_long.get(id(config), tokens + 1):
            outcomes[key] = tracer(config, workload, precision, compute_dtype, **options)
            recordings[key] = None
        if key not in outcomes:
            recorder = DequantRecorder()
            outcomes[key] = tracer(config, workload, precision, compute_dtype,
                                   recorder=recorder, **options)
            recordings[key] = recorder.recording
            if recorder.recording is not None and recorder.recording.problem == TOO_LONG:
                too_long[id(config)] = min(tokens, too_long.get(id(config), tokens))
            while len(recordings) > MAX_RECORDINGS:  # the oldest, never asked for
                recordings.pop(next(iter(recordings)))
        return outcomes[key]

    def trace(config: Any, workload: Workload, precision: str, compute_dtype: str,
              **options: Any) -> Any:
        usable = (reuse.enabled() and "recorder" not in options
                  and derivable(workload, options)
                  and meta_models.config_key(config) is not None)
        if not usable:
            return tracer(config, workload, precision, compute_dtype, **options)
        if records(precision):
            return recorded(config, workload, precision, compute_dtype, options)
        single = single_quant_row(precision)
        if single is None:
            return tracer(config, workload, precision, compute_dtype, **options)
        single_key = step_key(config, workload, single, compute_dtype, options)
        record_once(lambda: recorded(config, workload, single, compute_dtype, options),
                    single_key, failed)
        # Read once: the recording serves no other row, and its log is long.
        recording = recordings.pop(single_key, None)
        if recording is None or recording.problem:
            return tracer(config, workload, precision, compute_dtype, **options)
        step = StepModel.taken(
            config, workload, precision, compute_dtype, target=options.get("target", "cuda"),
            quant_storage=options.get("quant_storage", "uint8"),
            skip_modules=options.get("skip_modules"),
            trust_remote_code=bool(options.get("trust_remote_code")),
            layers=options.get("layers"), pattern=options.get("pattern", HOMOGENEOUS),
            stored_method=options.get("stored_method"))
        try:
            found = derive(recording, step.model, options.get("layers") is not None)
        finally:
            step.put_back()
        if found is None:
            return tracer(config, workload, precision, compute_dtype, **options)
        return trace_outcome(*found, options.get("target", "cuda"))

    return trace
