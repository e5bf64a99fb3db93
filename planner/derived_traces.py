"""Inference steps of bitsandbytes candidates derived from the plain row's step, not traced.

An inference step (``model.generate``'s prefill) of a model bitsandbytes quantised runs op
for op as the same model in its compute dtype (the plain row: bf16 on a bf16 GPU) except in
two places: the weights it holds (packed weights and quant states instead of the Linears'
matrices) and what happens inside each replaced Linear's forward (dequantised weights,
LLM.int8's quantised activations and int32 products, ...). Everything outside reads only
the Linears' outputs, which have the same shape, strides, dtype and storage size in both.

So the plain row's trace is recorded (``Recorder``: the tracker's log with the part of the
step each storage was made in, and where every call of a Linear the candidate would
replace began and ended), each distinct replaced Linear is run once on its own on a meta
input shaped as recorded (a micro step, remembered per process), and the candidate's log is
spliced together: the candidate's weights where the plain row's were, each replaced call's
own storages where the plain call's were. That log is replayed through the tracker's own
counting (``LiveTensorTracker.count_log``), so every peak, part peak and
snapshot is the one a trace of the candidate finds: the same figures, byte for byte.

What must hold, else the candidate is traced as before (``derive`` answers None):

* an inference step (no training, no preparation, no offloading, no images, no quantised
  experts, no remote code), the candidate's method replacing Linear layers only
  (``QuantMethod.replaces_linear_only``), the reuse switch on (``QPLAN_REUSE=0`` traces);
* the two models have the same modules, types, parameters and buffers except for the
  replaced Linears, and the same dtype; the model's own code never asks whether it is
  quantised (its modeling files name no quantisation flag);
* in the plain step, no replaced Linear's weight or bias is touched outside that Linear's
  own call (a ``.dtype`` read included), every call took one tensor and gave one new storage, and
  made nothing else that outlived it;
* each micro step keeps only its output, whose layout equals the plain call's output, and
  leaves its module as it found it (or as a second call finds it, with the same storages).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qplan.planner import meta_models, reuse
from qplan.planner.depths import HOMOGENEOUS, shallow_suffix
from qplan.planner.live_tensors import LiveTensorTracker
from qplan.planner.precision import PRECISIONS, find_precision, trace_group
from qplan.planner.steps import StepTensors, track_model
from qplan.planner.weights import load_dtype_for
from qplan.planner.workload import Workload

# (serial, +/- bytes, phase, tag, part of the phase) of one storage made, or (serial, -bytes,
# phase, None, None) of one released: the tracker's log with the parts it peaked in.
Event = tuple[int, int, str, "str | None", "tuple[str, ...] | None"]


@dataclass(frozen=True)
class TensorLayout:
    """What an op downstream of a tensor can see of it on meta."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    storage_bytes: int
    requires_grad: bool

    @staticmethod
    def of(tensor: torch.Tensor) -> TensorLayout:
        return TensorLayout(tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype,
                            tensor.storage_offset(), tensor.untyped_storage().nbytes(),
                            tensor.requires_grad)

    def make(self) -> torch.Tensor:
        """A meta tensor of this layout, over a storage of the same size."""
        size = self.dtype.itemsize
        numel = self.storage_bytes // size
        exact = all(n > 0 for n in self.shape) and self.offset == 0 and \
            1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=True)) == numel
        if exact:
            return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device="meta")
        base = torch.empty(numel, dtype=self.dtype, device="meta")
        return base.as_strided(self.shape, self.stride, self.offset)


@dataclass(frozen=True)
class LinearCall:
    """One call of a Linear the candidate may replace, in the plain step's log."""

    module: str
    start: int  # index of the first event inside the call
    end: int  # index after the last one
    phase: str
    segment: tuple[str, ...]
    input: TensorLayout
    output: TensorLayout
    output_serial: int


@dataclass(frozen=True)
class Recording:
    """The plain row's step, as a candidate's is derived from it."""

    events: tuple[Event, ...]
    weights_end: int  # events[:weights_end] are the model's own tensors (track_model)
    calls: tuple[LinearCall, ...]
    kv_cache: frozenset[int]
    host_peak: int
    structure: dict[str, tuple]
    dtypes: tuple[tuple[str, str], ...]
    # Why no candidate can be derived from this step ("" when one can).
    problem: str


class _RecordingTracker(LiveTensorTracker):
    """The tracker, keeping the part of the phase each storage was made in from the start
    (``log``) and where the step itself began (after the model's own tensors)."""

    def __init__(self, tagger: Callable[[torch.Tensor], str | None] | None = None) -> None:
        super().__init__(tagger)
        self.record_parts()
        self.entered_at = -1
        self.armed = False

    def __enter__(self) -> _RecordingTracker:
        if self.entered_at < 0:
            self.entered_at = len(self._events)
        self.armed = True
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.armed = False
        super().__exit__(*exc)


# The watches of the recordings running now (one per trace; traces do not nest).
_WATCHES: list[_Watch] = []


class _Watch:
    """Which replaced-candidate Linears are in their own call, and whether a weight of one
    was touched outside it."""

    def __init__(self, tracker: _RecordingTracker) -> None:
        self.tracker = tracker
        self.active: set[str] = set()
        self.problem = ""

    def check(self, values: Any) -> None:
        if self.problem or not self.tracker.armed:
            return
        for leaf in _leaves(values):
            if isinstance(leaf, _WatchedWeight) and leaf.qplan_owner not in self.active:
                self.problem = f"{leaf.qplan_owner}'s tensors are used outside its own call"
                return


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, (tuple, list)):
        for item in value:
            yield from _leaves(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    else:
        yield value


class _WatchedWeight(nn.Parameter):
    """A Linear's weight (or bias) that reports any use (an op, a ``.dtype`` read) to the
    recording's watch, then runs it as a plain parameter would: same storage, same ops,
    plain outputs."""

    qplan_owner: str

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        kwargs = kwargs or {}
        if _WATCHES:
            _WATCHES[-1].check((args, kwargs))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def replaceable(module: nn.Module) -> bool:
    """What transformers' bitsandbytes integration replaces (planner/inventory.py)."""
    from qplan.planner.inventory import _is_bnb_replaceable

    return _is_bnb_replaceable(module)


def structure(model: nn.Module) -> dict[str, tuple]:
    """Every module's type and its own parameters and buffers (name, dtype, shape, grad)."""
    return {
        name: (
            type(module),
            tuple((n, p.dtype, tuple(p.shape), p.requires_grad)
                  for n, p in module._parameters.items() if p is not None),
            tuple((n, b.dtype, tuple(b.shape)) for n, b in module._buffers.items()
                  if b is not None),
        )
        for name, module in model.named_modules()
    }


def model_dtypes(model: nn.Module) -> tuple[tuple[str, str], ...]:
    """``dtype`` of every PreTrainedModel in the tree (model code reads it)."""
    from transformers import PreTrainedModel

    return tuple((name, str(module.dtype)) for name, module in model.named_modules()
                 if isinstance(module, PreTrainedModel))


# id(model) -> (the model, steps run on it when read, what model_shape answers).
_SHAPES: dict[int, tuple[weakref.ref, int, tuple]] = {}


def model_shape(model: nn.Module) -> tuple[dict[str, tuple], tuple[tuple[str, str], ...], bool]:
    """``structure``, ``model_dtypes`` and ``asks_if_quantized`` of ``model``; read again
    once a step ran on it."""
    from qplan.planner.step_runs import runs_on

    runs = runs_on(model)
    found = _SHAPES.get(id(model))
    if found is not None and found[0]() is model and found[1] == runs:
        return found[2]
    answer = (structure(model), model_dtypes(model), asks_if_quantized(model))
    if len(_SHAPES) >= meta_models.MAX_MODELS:
        _SHAPES.clear()
    _SHAPES[id(model)] = (weakref.ref(model), runs, answer)
    return answer


class Recorder:
    """Records a plain row's step (``planner/trace.py: trace(..., recorder=...)``)."""

    def __init__(self) -> None:
        self._tracker: _RecordingTracker | None = None
        self._calls: list[LinearCall] = []
        self._open: list[tuple[str, int, str, tuple[str, ...], TensorLayout]] = []
        self._watch: _Watch | None = None
        self._structure: dict[str, tuple] = {}
        self._dtypes: tuple[tuple[str, str], ...] = ()
        self.recording: Recording | None = None

    def tracker(self, tagger: Callable[[torch.Tensor], str | None]) -> LiveTensorTracker:
        self._tracker = _RecordingTracker(tagger)
        self._watch = _Watch(self._tracker)
        return self._tracker

    @contextlib.contextmanager
    def watching(self, model: nn.Module) -> Iterator[None]:
        """Hooks on every replaceable Linear marking its calls, and its weight watched,
        for the step; the model is left as it was."""
        tracker, watch = self._tracker, self._watch
        assert tracker is not None and watch is not None
        self._structure, self._dtypes, asks = model_shape(model)
        if asks:
            watch.problem = "the model's code asks whether it is quantised"
        names = {id(m): n for n, m in model.named_modules() if replaceable(m)}
        modules = {n: model.get_submodule(n) for n in names.values()}

        def before(module: nn.Module, args: Any, kwargs: Any) -> None:
            if not tracker.armed:
                return
            name = names[id(module)]
            if kwargs or len(args) != 1 or type(args[0]) is not torch.Tensor \
                    or name in watch.active:
                watch.problem = watch.problem or f"{name} is called with other arguments"
            watch.active.add(name)
            layout = TensorLayout.of(args[0]) if args and isinstance(args[0], torch.Tensor) \
                else TensorLayout((), (), torch.uint8, 0, 0, False)
            self._open.append((name, len(tracker._events), tracker.phase, tracker.segment,
                               layout))

        def after(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if not tracker.armed or not self._open:
                return
            name, start, phase, segment, layout = self._open.pop()
            watch.active.discard(name)
            serial = tracker.serial_of(output) if type(output) is torch.Tensor else None
            if serial is None:
                watch.problem = watch.problem or f"{name} returns no new tensor"
                return
            self._calls.append(LinearCall(name, start, len(tracker._events), phase, segment,
                                          layout, TensorLayout.of(output), serial))

        originals: dict[tuple[str, str], nn.Parameter] = {}
        handles = []
        try:
            for name, module in modules.items():
                # The candidate holds other tensors there (a packed weight, a bias in the
                # compute dtype): a read outside the call would find them otherwise.
                for leaf in ("weight", "bias"):
                    param = module._parameters.get(leaf)
                    if param is None:
                        continue
                    watched = _WatchedWeight(param.data, requires_grad=param.requires_grad)
                    watched.qplan_owner = name
                    originals[name, leaf] = param
                    module._parameters[leaf] = watched
                handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
                handles.append(module.register_forward_hook(after, with_kwargs=True))
            _WATCHES.append(watch)
            yield
        finally:
            if _WATCHES and _WATCHES[-1] is watch:
                _WATCHES.pop()
            for handle in handles:
                handle.remove()
            for (name, leaf), param in originals.items():
                modules[name]._parameters[leaf] = param

    def finish(self, seen: StepTensors) -> None:
        tracker, watch = self._tracker, self._watch
        assert tracker is not None and watch is not None
        events = tuple(tracker.log())
        problem = watch.problem or _impure_step(seen, events, tracker.entered_at)
        calls = tuple(self._calls)
        for call in calls:
            problem = problem or _impure_call(call, events)
        self.recording = Recording(
            events, tracker.entered_at, calls, frozenset(seen.kv_cache), seen.host_peak,
            self._structure, self._dtypes, problem,
        )


def _impure_step(seen: StepTensors, events: tuple[Event, ...], weights_end: int) -> str:
    others = (seen.adapters, seen.gradients, seen.optimizer_states, seen.paged_states)
    if any(others) or seen.roles:
        return "the step holds more than weights and a cache"
    prefix = {e[0] for e in events[:weights_end]}
    if prefix != seen.weights or any(e[4] is None for e in events[:weights_end]):
        return "the model's tensors are not the start of the log"
    if any(e[4] is None and e[0] in prefix for e in events[weights_end:]):
        return "the step releases a weight"
    return ""


def _impure_call(call: LinearCall, events: tuple[Event, ...]) -> str:
    """A call may only make storages, release those it made, and keep its output's."""
    made: set[int] = set()
    for serial, _, _, _, part in events[call.start:call.end]:
        if part is not None:
            made.add(serial)
        elif serial in made:
            made.discard(serial)
        else:
            return f"{call.module} releases a storage it did not make"
    if made != {call.output_serial}:
        return f"{call.module} leaves more than its output"
    return ""


# ---------------------------------------------------------------------- micro steps


@dataclass(frozen=True)
class MicroStep:
    """One replaced Linear's call on its own: its log (local serials) and its output's."""

    events: tuple[Event, ...]
    output_serial: int
    output: TensorLayout


_MICRO: dict[tuple, MicroStep | None] = {}
MAX_MICRO = 4096


# A module's hooks for saving and loading its state: they never run in a forward, and are
# keyed by a process-wide handle counter (which would tell identical layers apart).
_STATE_DICT_HOOKS = frozenset({"_state_dict_hooks", "_state_dict_pre_hooks",
                               "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"})
_PLAIN_VALUES = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device,
                 torch.Size)


def fingerprint(value: Any, storages: dict[int, int] | None = None, depth: int = 0) -> Any:
    """Everything a module's forward can read of itself, as a hashable value: tensors by
    layout and by which storage they share with one another, objects by their attributes,
    classes and functions by name. Two modules with the same fingerprint run the same ops
    on the same input."""
    storages = {} if storages is None else storages
    if depth > 24:
        return ("deep", type(value).__qualname__)
    if isinstance(value, _PLAIN_VALUES):
        return (type(value).__qualname__, value)
    if isinstance(value, torch.Tensor):
        storage = storages.setdefault(id(value.untyped_storage()), len(storages))
        extra = fingerprint(vars(value), storages, depth + 1) if type(value) not in (
            torch.Tensor, nn.Parameter) else None
        return ("tensor", type(value).__qualname__, storage, TensorLayout.of(value), extra)
    if isinstance(value, (tuple, list)):
        return (type(value).__qualname__,
                tuple(fingerprint(v, storages, depth + 1) for v in value))
    if isinstance(value, dict):
        if any(isinstance(k, int) for k in value):
            # Hook handles (process-wide ids): the hooks, in order, not their ids.
            return ("hooks", tuple(fingerprint(v, storages, depth + 1)
                                   for v in value.values()))
        return ("dict", tuple((k, fingerprint(v, storages, depth + 1))
                              for k, v in value.items()))
    if isinstance(value, (set, frozenset)):
        return ("set", tuple(sorted(repr(v) for v in value)))
    if isinstance(value, type) or inspect.isroutine(value):
        return ("named", getattr(value, "__module__", None),
                getattr(value, "__qualname__", repr(type(value))))
    if isinstance(value, nn.Module):
        if depth > 0:
            return ("module", type(value).__qualname__)
        attrs = {k: v for k, v in vars(value).items() if k not in _STATE_DICT_HOOKS}
        return (type(value).__qualname__, fingerprint(attrs, storages, depth + 1))
    attrs = getattr(value, "__dict__", None)
    if attrs is None:
        return ("object", type(value).__qualname__, repr(value))
    return (type(value).__qualname__, fingerprint(dict(attrs), storages, depth + 1))


def _micro_step(module: nn.Module, layout: TensorLayout, phase: str,
                vocab: int) -> tuple[MicroStep | None, Any]:
    """Run ``module`` on a meta input of ``layout`` under a fresh tracker, as the step runs
    it (no grad, the call's phase); returns its MicroStep (None when the call is not pure:
    it released a storage it did not make, or kept more than its output and empty
    storages) and the module's fingerprint after the call."""
    from qplan.planner.trace import vocab_tagger

    tracker = _RecordingTracker(vocab_tagger(vocab))
    track_model(module, tracker, StepTensors())
    x = layout.make()
    tracker.add(x)
    own = {e[0] for e in tracker._events}
    start = len(tracker._events)
    tracker.phase = phase
    with tracker, torch.no_grad():
        out = module(x)
    after = fingerprint(module)
    if type(out) is not torch.Tensor:
        return None, after
    output_serial = tracker.serial_of(out)
    output = TensorLayout.of(out)
    log = tracker.log()[start:]  # before the output is dropped (and logged as released)
    del out, x
    made: dict[int, int] = {}
    for serial, nbytes, _, _, part in log:
        if part is not None:
            made[serial] = nbytes
        elif serial in made:
            del made[serial]
        else:
            return None, after
    # Only the output may outlive the call, and empty storages the layer keeps in its
    # state (LLM.int8's outlier columns, none on meta): they hold no byte at any peak.
    if output_serial is None or output_serial in own or output_serial not in made or \
            any(nbytes for serial, nbytes in made.items() if serial != output_serial):
        return None, after
    return MicroStep(tuple(log), output_serial, output), after


# id(module) -> (the module, the steps run on its model when read, its fingerprint): a
# module changes only when a step runs it (a trace of its model, planner/trace.py:
# mark_run; or a micro step, which records what it leaves).
_FINGERPRINTS: dict[int, tuple[weakref.ref, int, Any]] = {}


def _fingerprint_of(module: nn.Module, runs: int) -> Any:
    found = _FINGERPRINTS.get(id(module))
    if found is not None and found[0]() is module and found[1] == runs:
        return found[2]
    value = fingerprint(module)
    _remember(module, runs, value)
    return value


def _remember(module: nn.Module, runs: int, value: Any) -> None:
    if len(_FINGERPRINTS) >= MAX_MICRO:
        _FINGERPRINTS.clear()
    _FINGERPRINTS[id(module)] = (weakref.ref(module), runs, value)


def micro_step(module: nn.Module, layout: TensorLayout, phase: str, vocab: int,
               target: str, context: Callable[[], None], runs: int = -1) -> MicroStep | None:
    """``_micro_step``, remembered per module fingerprint, input layout, phase, vocabulary
    (which storages are tagged logits) and target; ``runs``: the steps run on the
    module's model (``step_runs.runs_on``), for reusing its fingerprint until one more runs
    (-1: read it afresh). A call that changes its module (a
    first call sets bitsandbytes' compute type) is run again on the changed module: the
    two must log the same and leave it unchanged, as every later call then finds it."""
    before = _fingerprint_of(module, runs) if runs >= 0 else fingerprint(module)
    key = (before, layout, phase, vocab, target)
    if key in _MICRO:
        return _MICRO[key]
    context()
    step, after = _micro_step(module, layout, phase, vocab)
    if len(_MICRO) >= MAX_MICRO:
        _MICRO.clear()
    if step is not None and after != before:
        changed = (after, layout, phase, vocab, target)
        if changed in _MICRO:  # a call on a module in that state already ran
            if _MICRO[changed] != step:
                step = None
        else:
            again, settled = _micro_step(module, layout, phase, vocab)
            if again != step or settled != after:
                step = None
            else:
                # That second call ran on the changed module: its answer for that state.
                _MICRO[changed] = again
            after = settled
    if runs >= 0:
        _remember(module, runs, after)
    _MICRO[key] = step
    return step


def clear() -> None:
    _MICRO.clear()
    _ASKS.clear()
    _FINGERPRINTS.clear()
    _MODEL_TENSORS.clear()
    _SHAPES.clear()


# ---------------------------------------------------------------------- the derivation


# Names a model's code would read to learn that it is quantised (and behave otherwise).
_QUANTISATION_WORDS = ("_is_quantized", "is_quantized", "quantization_config",
                       "is_loaded_in_4bit", "is_loaded_in_8bit", "hf_quantizer",
                       "quant_state", "bitsandbytes")
# (modeling file, words) -> whether the file names one of the words.
_ASKS: dict[tuple[str, tuple[str, ...]], bool] = {}


def names_any(model: nn.Module, words: tuple[str, ...]) -> bool:
    """Whether the modeling files of the model's classes name one of ``words`` (each file
    read once per process; an unreadable one counts as naming them)."""
    files = {sys.modules[type(m).__module__].__file__ for m in model.modules()
             if type(m).__module__.startswith("transformers.models.")
             and type(m).__module__ in sys.modules}
    for path in files:
        if path is None:
            continue
        if (path, words) not in _ASKS:
            try:
                with open(path, encoding="utf-8") as handle:
                    text = handle.read()
            except OSError:
                text = words[0]
            _ASKS[path, words] = any(word in text for word in words)
        if _ASKS[path, words]:
            return True
    return False


def asks_if_quantized(model: nn.Module) -> bool:
    """Whether the modeling files of the model's classes name a quantisation flag: such
    code may run otherwise once the model is quantised, so nothing is derived for it."""
    return names_any(model, _QUANTISATION_WORDS)


def derive(recording: Recording, model: nn.Module, target: str, phase_snapshots: bool,
           context: Callable[[], None] = lambda: None,
           ) -> tuple[Any, StepTensors, dict[str, int], dict[str, Any]] | None:
    """The candidate's step on ``model`` (its meta model, as built for a trace) from the
    plain row's ``recording``: what ``planner/trace.py: trace`` returns, or None when it
    cannot be derived exactly. ``context()`` enters what a trace runs under, before the
    first layer is run on its own."""
    from qplan.planner.step_runs import runs_on
    from qplan.planner.trace import use_static_experts, vocab_tagger

    if recording.problem:
        return None
    use_static_experts(model)  # what trace() does first
    model.eval()  # what the inference step does first
    shape, dtypes, asks = model_shape(model)
    if asks or shape.keys() != recording.structure.keys() or dtypes != recording.dtypes:
        return None
    replaced = set()
    for name, (kind, params, buffers) in shape.items():
        plain = recording.structure[name]
        if kind is plain[0]:
            if (params, buffers) != plain[1:]:
                return None
        elif replaceable_type(plain[0]):
            replaced.add(name)
        else:
            return None
    vocab = model.config.get_text_config().vocab_size
    micro: dict[int, MicroStep] = {}
    calls = [c for c in recording.calls if c.module in replaced]
    for index, call in enumerate(calls):
        step = micro_step(model.get_submodule(call.module), call.input, call.phase, vocab,
                          target, context, runs_on(model))
        if step is None or step.output != call.output:
            return None
        micro[index] = step
    own, weight_serials = _model_tensors(model, vocab_tagger(vocab))
    # The candidate's own tensors take negative serials; the plain step's keep theirs;
    # the micro steps' get new ones past the largest (their output takes the plain call's,
    # which later releases name).
    log: list[Event] = list(own)
    fresh = itertools.count(1 + max((e[0] for e in recording.events), default=0))
    position = recording.weights_end
    for index, call in enumerate(calls):
        log.extend(recording.events[position:call.start])
        step = micro[index]
        serials = {step.output_serial: call.output_serial}
        for serial, nbytes, _, tag, part in step.events:
            if serial not in serials:
                serials[serial] = next(fresh)
            log.append((serials[serial], nbytes, call.phase, tag,
                        call.segment if part is not None else None))
        position = call.end
    log.extend(recording.events[position:])
    replay = LiveTensorTracker()
    replay.count_log(log)
    derived = StepTensors(weights=set(weight_serials),
                          kv_cache=set(recording.kv_cache), host_peak=recording.host_peak)
    peak, snapshots = replay.snapshots(phases=phase_snapshots)
    return peak, derived, dict(replay.phase_peaks), snapshots


# id(model) -> (the model, steps run on it when read, its tensors' log and serials).
_MODEL_TENSORS: dict[int, tuple[weakref.ref, int, tuple[Event, ...], frozenset[int]]] = {}


def _model_tensors(model: nn.Module, tagger: Callable[[torch.Tensor], str | None],
                   ) -> tuple[tuple[Event, ...], frozenset[int]]:
    """The log ``track_model`` makes of the model's own tensors (negative serials), as the
    start of a trace logs them, and their serials; read again once a step ran on it."""
    from qplan.planner.step_runs import runs_on

    runs = runs_on(model)
    found = _MODEL_TENSORS.get(id(model))
    if found is not None and found[0]() is model and found[1] == runs:
        return found[2], found[3]
    tracker = _RecordingTracker(tagger)
    seen = StepTensors()
    track_model(model, tracker, seen)
    log = tuple((-1 - s, n, phase, tag, part) for s, n, phase, tag, part in tracker.log())
    serials = frozenset(-1 - s for s in seen.weights)
    if len(_MODEL_TENSORS) >= meta_models.MAX_MODELS:
        _MODEL_TENSORS.clear()
    _MODEL_TENSORS[id(model)] = (weakref.ref(model), runs, log, serials)
    return log, serials


def replaceable_type(kind: type) -> bool:
    from transformers.pytorch_utils import Conv1D

    return kind is nn.Linear or issubclass(kind, Conv1D)


# ---------------------------------------------------------------------- the tracer


def _inference_step(workload: Workload, options: dict[str, Any]) -> bool:
    """A step that only runs the model forward, as ``derive`` assumes."""
    return (not workload.kind.training and workload.kind.prepare is None
            and not workload.activation_offloading and not workload.quantize_moe_experts
            and not workload.images and not options.get("trust_remote_code")
            and options.get("stored_method") is None)


def reference_row(precision: str, compute_dtype: str) -> str | None:
    """The plain row a candidate's step derives from (its load dtype's), or None when its
    method's layers differ from plain Linears in more than their forward."""
    prec = PRECISIONS[precision]
    if not prec.method.replaces_linear_only:
        return None
    return find_precision("none", full_dtype=load_dtype_for(prec, compute_dtype))


@functools.cache
def _plain_rows(compute_dtype: str) -> frozenset[str | None]:
    """The rows other candidates derive from, at ``compute_dtype``."""
    return frozenset(reference_row(name, compute_dtype) for name in PRECISIONS)


def record_once(record: Callable[[], Any], key: tuple, failed: set[tuple]) -> None:
    """Record the step of the row a candidate derives from (``record()``, keyed ``key``),
    unless it failed before (``failed``). A step that fails is remembered there and its
    error dropped: the candidate is then traced, as without derivation, and that row's
    own error is raised where that row itself is asked for."""
    if key in failed:
        return
    try:
        record()
    except Exception:
        failed.add(key)


def deriving(tracer: Callable[..., Any]) -> Callable[..., Any]:
    """``tracer`` (``trace_components``) for the plans of one config, with the inference
    steps of candidates whose method ``replaces_linear_only`` derived from their plain
    row's recorded step (traced first when it was not yet). Off on the reference path."""
    from qplan.planner.components import step_key, step_model, trace_outcome

    recordings: dict[tuple, Recording | None] = {}
    outcomes: dict[tuple, Any] = {}
    representatives: dict[tuple, str] = {}
    failed: set[tuple] = set()

    def recorded(config: Any, workload: Workload, precision: str, compute_dtype: str,
                 options: dict[str, Any]) -> Any:
        key = step_key(config, workload, precision, compute_dtype, options)
        if key not in outcomes:
            recorder = Recorder()
            outcomes[key] = tracer(config, workload, precision, compute_dtype,
                                   recorder=recorder, **options)
            recordings[key] = recorder.recording
        return outcomes[key]

    def trace(config: Any, workload: Workload, precision: str, compute_dtype: str,
              **options: Any) -> Any:
        usable = (reuse.enabled() and _inference_step(workload, options)
                  and meta_models.config_key(config) is not None)
        if not usable:
            return tracer(config, workload, precision, compute_dtype, **options)
        if precision in _plain_rows(compute_dtype):
            return recorded(config, workload, precision, compute_dtype, options)
        plain = reference_row(precision, compute_dtype)
        if plain is None:
            return tracer(config, workload, precision, compute_dtype, **options)
        plain_key = step_key(config, workload, plain, compute_dtype, options)
        record_once(lambda: recorded(config, workload, plain, compute_dtype, options),
                    plain_key, failed)
        recording = recordings.get(plain_key)
        if recording is None or recording.problem:
            return tracer(config, workload, precision, compute_dtype, **options)
        # Rows of one trace group run the same step (planner/precision.py: trace_group,
        # fp4 and nf4): the first one asked for stands for the others, one meta model and
        # one set of micro steps for all of them.
        built_as = representatives.setdefault((id(config), trace_group(precision)), precision)
        model, _ = step_model(
            config, workload, built_as, compute_dtype,
            quant_storage=options.get("quant_storage", "uint8"),
            skip_modules=options.get("skip_modules"),
            trust_remote_code=bool(options.get("trust_remote_code")),
            layers=options.get("layers"),
            suffix=shallow_suffix(options.get("layers"), options.get("pattern", HOMOGENEOUS)),
        )
        target = options.get("target", "cuda")
        entered: list[None] = []
        with contextlib.ExitStack() as stack:

            def context() -> None:
                if not entered:  # once, when a layer first runs alone
                    entered.append(stack.enter_context(_step_context(target, workload)))

            try:
                found = derive(recording, model, target, options.get("layers") is not None,
                               context)
            except Exception:  # a layer that cannot run alone: the trace says what fails
                found = None
        if found is None:
            return tracer(config, workload, precision, compute_dtype, **options)
        return trace_outcome(*found, target)

    return trace


@contextlib.contextmanager
def _step_context(target: str, workload: Workload) -> Iterator[None]:
    """What a trace runs the model under (planner/trace.py: trace), for the micro steps."""
    from qplan.planner.quiet_logs import quiet
    from qplan.planner.trace import trace_patches

    with quiet("bitsandbytes"), warnings.catch_warnings(), \
            trace_patches(target, workload.attn, None):
        warnings.simplefilter("ignore")
        yield
