"""The Mamba selective scan's reference path without running every token's ops twice over.

Without the ``mamba_ssm`` kernels, transformers' Mamba and FalconMamba layers run their
selective scan as a Python loop over the tokens (``mamba_selective_scan``'s recurrent
branch): a state update, a cast and a matmul per token and layer, a dozen dispatched ops
each. Where an autograd graph is recorded (training steps; the default non-reentrant
checkpointing records its graph in the first forward and recomputes with one), the middle
tokens are one counted node, forward and backward (planner/recurrent_scan_graph.py).
Where none is (inference, and the first forward of a layer under reentrant
checkpointing), every iteration after the first makes the same storages in the same order
and frees the same ones: the new state and the token's output stay, the temporaries and the
previous state go. That is a fact checked on the run itself, not assumed: the first
``WARMUP`` iterations run as ever, and the log of the last of them must equal the one
before it (sizes, phases, tags, which storage each release frees) with the same two
survivors (the state and the output, each a fresh storage of the same shape). Only then
are the remaining iterations counted from that log through the tracker's own counting
(the same serials in the same order, so every peak, phase peak and snapshot is the traced
one): the first one event by event, its previous state released when the loop lets go of
it; the rest built as arrays and counted at once (``_counted_iterations``), each releasing
the state before it in the log. Their outputs stay in the list ``torch.stack`` reads,
exactly as in the real loop: one meta tensor owns every output but the last
(``LiveTensorTracker.attach_group``), a view of it in each of their places. Anything else (a
log that differs, a storage released that is neither a temporary of the
iteration nor the previous state, activation offloading's host copies, no tracker) runs
the real loop. Where the tracker counts nothing (``untracked``), only the results' layout
is read: two iterations run, the rest are fresh tensors (``_untracked_loop``).

The rest of the function is transformers' own code, taken only where the source of the
installed ``mamba_selective_scan`` is the one read here (its digest): another version
runs as it is. ``QPLAN_REUSE=0`` (planner/reuse.py) turns this off: the reference path.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes, _get_current_dispatch_mode

from qplan.planner import reuse
from qplan.planner.kernel_fallbacks import closure, fallback_wrapper
from qplan.planner.live_tensors import LiveTensorTracker
from qplan.planner.patching import (
    Loaded,
    model_modules,
    once_per_object,
    source_digest,
    swapped,
    while_modules_unchanged,
)
from qplan.planner.recurrent_scan_graph import (
    LogEvent,
    counted_loop,
    layout_spec,
    standing_outputs,
    take_serials,
    tokens_log,
    zero_state,
)

# Iterations run for real before the rest is counted from the last one's log: the first
# differs (it frees the zero initial state, of the input's dtype), the second and third
# must agree.
WARMUP = 3

# Iterations an untracked scan runs (the first reads the zero state of the input's dtype;
# the second has the layout of every later one).
UNTRACKED_REAL = 2

# sha256 of ``inspect.getsource`` of the reference ``mamba_selective_scan`` this module
# mirrors (transformers 5.24: models/mamba and models/falcon_mamba hold the same text).
KNOWN_SOURCES = frozenset({
    "b43a3221205e6ecd359676030e063c99c008d2aa62c9a9f3165a8260c3ccce74",
})
NAME = "mamba_selective_scan"


# A release of the previous iteration's state, in an iteration's log (``LogEvent.ref``).
PREVIOUS_STATE = ("prev", -1)


@dataclass(frozen=True)
class _Iteration:
    events: tuple[LogEvent, ...]
    state: int  # ordinal of the storage the new state holds
    output: int  # ordinal of the storage the token's output holds
    state_spec: tuple
    output_spec: tuple

    @property
    def output_nbytes(self) -> int:
        return next(e.nbytes for e in self.events if e.alloc and e.ref[1] == self.output)


def _spec(tensor: torch.Tensor) -> tuple | None:
    """(shape, stride, dtype) when ``empty_strided`` recreates ``tensor``'s storage exactly
    and nothing records a graph through it."""
    if type(tensor) is not torch.Tensor or tensor.requires_grad:
        return None
    return layout_spec(tensor)


def _iteration(tracker: LiveTensorTracker, start: int, previous_state: int | None,
               state: torch.Tensor, output: torch.Tensor) -> _Iteration | None:
    """The log from event ``start`` on, in the form above; None where it is not one."""
    ordinals: dict[int, int] = {}
    events = []
    for serial, nbytes, phase, tag in tracker._events[start:]:
        if phase != tracker.phase:
            return None
        if nbytes > 0:
            if serial in ordinals:
                return None
            ordinals[serial] = len(ordinals)
            events.append(LogEvent(True, nbytes, phase, tag, ("own", ordinals[serial])))
        elif nbytes < 0:
            if serial in ordinals:
                ref: tuple = ("own", ordinals[serial])
            elif serial == previous_state:
                ref = PREVIOUS_STATE
            else:
                return None
            events.append(LogEvent(False, -nbytes, phase, tag, ref))
        else:
            return None  # an empty storage: its release reads as a new one
    # Serials are handed out one by one: the replay takes them from the same counter.
    serials = list(ordinals)
    if not serials or serials != list(range(serials[0], serials[0] + len(serials))):
        return None
    state_serial, output_serial = tracker.serial_of(state), tracker.serial_of(output)
    if (state_serial not in ordinals or output_serial not in ordinals
            or state_serial == output_serial):
        return None
    released = {e.ref for e in events if not e.alloc}
    if PREVIOUS_STATE not in released:
        return None
    kept = {o for o in ordinals.values() if ("own", o) not in released}
    state_ordinal, output_ordinal = ordinals[state_serial], ordinals[output_serial]
    if kept != {state_ordinal, output_ordinal}:
        return None
    state_spec, output_spec = _spec(state), _spec(output)
    if state_spec is None or output_spec is None:
        return None
    return _Iteration(tuple(events), state_ordinal, output_ordinal, state_spec, output_spec)


def _tracker() -> LiveTensorTracker | None:
    """The tracker counting this trace, where the scan may be counted from its log."""
    mode = _get_current_dispatch_mode()
    if not isinstance(mode, LiveTensorTracker) or mode.on_host or not reuse.enabled():
        return None
    return mode


def _untracked_loop(discrete_A: torch.Tensor, deltaB_u: torch.Tensor, C: torch.Tensor,
                    batch_size: int, intermediate_size: int, state_size: int,
                    input_dtype: torch.dtype, device: torch.device, seq_len: int,
                    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The recurrent iteration where the tracker counts nothing (GRPO's one long forward
    that fills a generation cache, planner/workloads/grpo.py): what is read of it is the
    final state and the outputs' layout, so after ``UNTRACKED_REAL`` real iterations the
    rest are fresh meta tensors of the layout the real ones have; none of their storages
    is counted, as none of the real loop's would be."""
    ssm_state, scan_output, scan_outputs = _loop(
        discrete_A, deltaB_u, C, batch_size, intermediate_size, state_size, input_dtype,
        device, min(seq_len, UNTRACKED_REAL), None)
    if seq_len <= UNTRACKED_REAL:
        return ssm_state, scan_output, scan_outputs
    with _disable_current_modes():
        for _ in range(UNTRACKED_REAL, seq_len):
            scan_output = torch.empty_strided(scan_output.shape, scan_output.stride(),
                                              dtype=scan_output.dtype, device="meta")
            scan_outputs.append(scan_output[:, :, 0])
        ssm_state = torch.empty_strided(ssm_state.shape, ssm_state.stride(),
                                        dtype=ssm_state.dtype, device="meta")
    return ssm_state, scan_output, scan_outputs


def _loop(discrete_A: torch.Tensor, deltaB_u: torch.Tensor, C: torch.Tensor,
          batch_size: int, intermediate_size: int, state_size: int, input_dtype: torch.dtype,
          device: torch.device, seq_len: int, tracker: LiveTensorTracker | None,
          ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """transformers' recurrent iteration: the final state, the last token's output and
    the list of every token's output; after ``WARMUP`` iterations the rest are counted
    from the log where it repeats (``tracker``: None runs every iteration)."""
    ssm_state = zero_state(batch_size, intermediate_size, state_size, input_dtype, device)
    scan_outputs: list[torch.Tensor] = []
    template: _Iteration | None = None
    before: _Iteration | None = None
    index = 0
    while index < seq_len and not (index == WARMUP and template is not None):
        start = len(tracker._events) if tracker is not None else 0
        previous = tracker.serial_of(ssm_state) if tracker is not None else None
        # State calculation
        ssm_state = discrete_A[:, :, index] * ssm_state + deltaB_u[:, :, index]

        # Subsequent output
        scan_output = torch.matmul(ssm_state.to(input_dtype), C[:, index, :].unsqueeze(-1))
        scan_outputs.append(scan_output[:, :, 0])
        index += 1
        if tracker is not None and 1 < index <= WARMUP and previous is not None:
            this = _iteration(tracker, start, previous, ssm_state, scan_output)
            if this is not None and this == before:
                template = this
            before = this
    if index == seq_len or template is None or tracker is None:
        return ssm_state, scan_output, scan_outputs

    # The remaining iterations, each counted from ``template``: its new storages take the
    # next serials, the state and the output get a fresh meta tensor owning theirs (made
    # outside the tracker, which counts them here), the temporaries are released where
    # the log releases them, and the previous state where the loop lets go of it.
    state_shape, state_stride, state_dtype = template.state_spec
    out_shape, out_stride, out_dtype = template.output_spec
    meta = torch.device("meta")
    made = [0] * sum(1 for e in template.events if e.alloc)
    plan = [(e.alloc, e.nbytes, e.tag, -1 if e.ref == PREVIOUS_STATE else e.ref[1],
             1 if e.ref[1] == template.state else 2 if e.ref[1] == template.output else 0)
            for e in template.events]
    serials = tracker._serials
    with _disable_current_modes():
        # The first of them one event at a time: the state it releases is the last real
        # iteration's, whose release the tracker logs when the loop lets go of it.
        new_state = new_output = None
        for alloc, nbytes, tag, ordinal, role in plan:
            if alloc:
                serial = made[ordinal] = next(serials)
                tracker._count(serial, nbytes, tag)
                if role == 1:
                    new_state = torch.empty_strided(state_shape, state_stride,
                                                    dtype=state_dtype, device=meta)
                    tracker.attach(new_state, serial)
                elif role == 2:
                    new_output = torch.empty_strided(out_shape, out_stride,
                                                     dtype=out_dtype, device=meta)
                    tracker.attach(new_output, serial)
            elif ordinal < 0:
                # The last reference to the previous state: its release is logged now.
                ssm_state = None  # type: ignore[assignment]
            else:
                tracker._uncount(made[ordinal], nbytes)
        assert new_state is not None and new_output is not None
        ssm_state, scan_output = new_state, new_output
        scan_outputs.append(scan_output[:, :, 0])
        remaining = seq_len - index - 1
        if remaining:
            ssm_state, scan_output = _counted_iterations(
                tracker, template, remaining, ssm_state, made[template.state], scan_outputs)
    return ssm_state, scan_output, scan_outputs


def _counted_iterations(tracker: LiveTensorTracker, template: _Iteration, count: int,
                        state: torch.Tensor, state_serial: int,
                        scan_outputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The last ``count`` iterations counted from ``template`` at once, after one counted
    one left ``state`` (serial ``state_serial``): their log built as arrays
    (``tokens_log``) and counted together, their outputs appended to ``scan_outputs``
    (one tensor standing for all but the last), the state of none but the last made (each
    releases the one before, in the log). Returns the last state and output.

    The loop this replaces called the tracker per event, a tenth of a Mamba plan."""
    per_token = sum(1 for e in template.events if e.alloc)
    base = next(tracker._serials)
    take_serials(tracker._serials, count * per_token - 1)

    def earlier(ref: tuple, tokens: Any) -> Any:
        # The state of the iteration before: ``state`` for the first.
        column = base + (tokens - 1) * per_token + template.state
        column[0] = state_serial
        return column

    entries, parts, columns, _ = tokens_log(template.events, count, base, earlier,
                                            tracker.phase, tracker.segment)
    tracker.count_entries(entries, parts, columns)
    # ``state``'s release is in the log: the tracker lets go of it.
    tracker.let_go(state)
    del state
    out_shape, out_stride, out_dtype = template.output_spec
    meta = torch.device("meta")
    # The outputs but the last, which the loop's own variable holds too: one tensor
    # stands for them all (``attach_group``), a view of it in each of their places in the
    # list ``torch.stack`` reads.
    scan_outputs.extend(standing_outputs(
        tracker, template.output_spec,
        list(range(base + template.output, base + (count - 1) * per_token, per_token)),
        template.output_nbytes))
    output = torch.empty_strided(out_shape, out_stride, dtype=out_dtype, device=meta)
    tracker.attach(output, base + (count - 1) * per_token + template.output)
    scan_outputs.append(output[:, :, 0])
    state_shape, state_stride, state_dtype = template.state_spec
    last = torch.empty_strided(state_shape, state_stride, dtype=state_dtype, device=meta)
    tracker.attach(last, base + (count - 1) * per_token + template.state)
    return last, output


def _selective_scan(
    hidden_states: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    use_mambapy: bool = False,
    use_associative_scan: bool = False,
    *,
    tracker: LiveTensorTracker,
    **kwargs: Any,
) -> Any:
    """transformers' ``mamba_selective_scan`` on its recurrent branch (the caller took
    the others away), its statements as there, the loop in ``_loop``."""
    batch_size, intermediate_size, seq_len = hidden_states.shape
    input_dtype = hidden_states.dtype

    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)

    # We need to transpose on the basis of the original kernel layout
    B = B.transpose(1, 2)
    C = C.transpose(1, 2)

    # Discretize A and B for the entire sequence
    discrete_A = torch.exp(A[None, :, None, :] * dt[:, :, :, None])
    discrete_B = dt[:, :, :, None] * B[:, None, :, :].float()
    deltaB_u = discrete_B * hidden_states[:, :, :, None].float()

    # An iteration that records an autograd graph keeps what it saves: its middle tokens
    # are one counted node (planner/recurrent_scan_graph.py).
    graph = torch.is_grad_enabled() and any(
        t.requires_grad for t in (discrete_A, deltaB_u, C))
    # (No tuple of the arguments: where nothing saves them, they are freed as this frame's
    # locals, in the real function's order.)
    shortcut = None
    if graph and not tracker._untracked:
        shortcut = counted_loop(
            discrete_A, deltaB_u, C, batch_size, intermediate_size, A.shape[-1], input_dtype,
            hidden_states.device, seq_len, tracker)
    elif tracker._untracked and not graph and hidden_states.is_meta:
        shortcut = _untracked_loop(
            discrete_A, deltaB_u, C, batch_size, intermediate_size, A.shape[-1], input_dtype,
            hidden_states.device, seq_len)
    ssm_state, scan_output, scan_outputs = shortcut if shortcut is not None else _loop(
        discrete_A, deltaB_u, C, batch_size, intermediate_size, A.shape[-1], input_dtype,
        hidden_states.device, seq_len, None if graph or tracker._untracked else tracker)
    scan_output = torch.stack(scan_outputs, dim=-1)

    if D is not None:
        scan_output = scan_output + hidden_states * D[None, :, None]

    if z is not None:
        scan_output = scan_output * F.silu(z)

    if return_last_state:
        return scan_output, ssm_state

    return scan_output


@once_per_object
def _stand_in(wrapper: Any) -> Callable[..., Any] | None:
    """A stand-in for transformers' hub wrapper of ``mamba_selective_scan``, where it runs
    the reference function read here; None otherwise."""
    stand_in = None
    hub = fallback_wrapper(wrapper)
    values = closure(hub) if hub is not None else {}
    reference = values.get("torch_function")
    if (source_digest(reference) in KNOWN_SOURCES and values.get("is_new_implementation") is False
            and values.get("implementation") is reference):
        params = tuple(inspect.signature(reference).parameters)

        def scan(*args: Any, **kwargs: Any) -> Any:
            tracker = _tracker()
            if (tracker is None or kwargs.get("use_mambapy") or kwargs.get("cu_seqlens")
                    is not None or kwargs.get("seq_idx") is not None
                    or (kwargs.get("use_associative_scan")
                        and torch.compiler.is_compiling())):
                return wrapper(*args, **kwargs)
            kwargs = {k: v for k, v in kwargs.items() if k in params}
            return _selective_scan(*args, tracker=tracker, **kwargs)

        stand_in = scan
    return stand_in


def _find_swaps(loaded: Loaded) -> tuple[tuple[Any, str, Any], ...]:
    """(module, name, stand-in) for every loaded transformers model module holding a
    reference ``mamba_selective_scan`` (found again only when sys.modules changed: every
    trace asks)."""
    swaps = []
    for _, module in model_modules(loaded):
        wrapper = getattr(module, "__dict__", {}).get(NAME)
        stand_in = _stand_in(wrapper) if wrapper is not None else None
        if stand_in is not None:
            swaps.append((module, NAME, stand_in))
    return tuple(swaps)


_swaps = while_modules_unchanged(_find_swaps)


@contextlib.contextmanager
def counted_scans() -> Iterator[None]:
    """During the block, every loaded transformers model module's ``mamba_selective_scan``
    that runs the reference recurrent loop read here counts its repeated iterations from
    the log (nothing where ``QPLAN_REUSE=0``)."""
    with swapped(*(_swaps() if reuse.enabled() else ())):
        yield
