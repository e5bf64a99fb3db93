"""Memory components of a workload for one precision, apart from the CUDA context.

``load``: the weights as a load leaves them. Every other mode is predicted by tracing the
real step on the meta device (planner/trace.py) and splitting the live storages at the
tensor-level peak by what they are:

weights (with quant state; after peft's k-bit preparation for LoRA), adapters, gradients,
optimizer_states, kv_cache, logits (every tensor whose last dimension is the vocabulary:
logits, their fp32 upcast, the loss's log-softmax and their gradients), activations
(made in the forward and alive at the peak), transients (made in the backward or the
optimizer step: recomputed checkpoint segments, dequantised 4-bit weights, temporaries;
plus the cuBLAS workspace on CUDA), allocator (the caching allocator's segment rounding
and a fragmentation allowance).

Deep models are traced at two shallow depths and extrapolated linearly in depth, phase by
phase: every decoder layer (or every repeating block of layers, planner/depths.py) adds the
same weights, saved activations, gradients and states.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from qplan.planner import meta_models, reuse
from qplan.planner.collector import rare_collections
from qplan.planner.depths import (
    HOMOGENEOUS,
    TRAILING_LAYER_COUNTS,
    LayerPattern,
    TracePlan,
    is_index_list,
    kept_layers,
    layer_signatures,
    num_layers,
    set_depth,
    shallow_suffix,
    trace_plan,
)
from qplan.planner.inventory import Inventory, build_meta_model, take_inventory
from qplan.planner.live_tensors import PeakSnapshot
from qplan.planner.precision import DTYPE_BYTES, PRECISIONS, alloc_size, find_precision
from qplan.planner.prepared_models import CHANGES_THE_MODEL, state_of
from qplan.planner.quant import clear_step_scratch
from qplan.planner.recurrent_scan_graph import ScanNotRepeating, every_token
from qplan.planner.steps import StepTensors
from qplan.planner.weights import WeightBytes, load_dtype_for, weight_bytes
from qplan.planner.workload import Workload

MIB = 1024**2
# Workspace cuBLAS takes per handle through the caching allocator (memory-facts.md).
CUBLAS_WORKSPACE = {"hopper": 32 * MIB, "blackwell": 32 * MIB}
CUBLAS_WORKSPACE_DEFAULT = 8 * MIB
# Freed blocks of many sizes stay cached during a step; allowance on what churns.
FRAGMENTATION_ALLOWANCE = 0.05

# The paged optimizer states, a part of optimizer_states kept apart while tracing.
PAGED = "paged_optimizer_states"

COMPONENT_ORDER = (
    "weights", "adapters", "gradients", "optimizer_states", "kv_cache", "logits",
    "activations", "transients", "allocator",
)


@dataclass(frozen=True)
class ComponentPlan:
    weights: WeightBytes
    components: dict[str, int]  # name -> bytes, CUDA context excluded
    peak_allocated_bytes: int
    traced_layers: tuple[int, ...] = ()
    # Peak bytes per phase (setup, forward, backward, optimizer): multi-GPU plans re-split
    # the step when sharding moves the peak to another phase.
    phase_peaks: dict[str, int] = field(default_factory=dict)
    # Host memory the step holds at its own peak (activation offloading's pinned copies).
    host_bytes: int = 0


def load_components(
    inventory: Inventory, precision: str, compute_dtype: str, quant_storage: str = "uint8"
) -> ComponentPlan:
    """The weights resident on the device, as a load leaves them.

    While bitsandbytes quantises, each weight first lands on the device in the load dtype
    and is quantised there, so the peak holds the largest such weight on top of what is
    already loaded; the allocator keeps that block cached afterwards.
    """
    weights = weight_bytes(
        inventory, precision, compute_dtype=compute_dtype, quant_storage=quant_storage
    )
    transient = 0
    # Quantising on load lands each weight in the load dtype first; a stored format does not.
    if PRECISIONS[precision].quantized and inventory.stored is None:
        transient = alloc_size(weights.largest_quantized_numel * DTYPE_BYTES[compute_dtype])
    components = {
        "weights": weights.bytes,
        "transients": transient,
        "allocator": weights.reserved_bytes - weights.bytes,
    }
    return ComponentPlan(weights, components, weights.allocated_bytes + transient)


def _roles(seen: StepTensors) -> tuple[tuple[str, set[int]], ...]:
    """The roles a storage can have, in the order a storage in two takes the first."""
    return (
        *seen.roles.items(),
        (PAGED, seen.paged_states),
        ("weights", seen.weights),
        ("adapters", seen.adapters),
        ("gradients", seen.gradients),
        ("optimizer_states", seen.optimizer_states),
        ("kv_cache", seen.kv_cache),
    )


def owners(seen: StepTensors) -> dict[int, str]:
    """serial -> the role ``classify`` gives it: read once for the many snapshots of one
    step (a part peak each) instead of testing every role for every live storage."""
    found: dict[int, str] = {}
    for role, serials in reversed(_roles(seen)):
        for serial in serials:
            found[serial] = role
    return found


def classify(snapshot: PeakSnapshot, seen: StepTensors, rounded: bool,
             roles: dict[int, str] | None = None) -> dict[str, int]:
    """Split the storages live at the peak into components. ``roles``: ``owners(seen)``,
    where the caller classifies several snapshots of the step."""
    parts = dict.fromkeys(COMPONENT_ORDER, 0)
    if seen.paged_states:
        # Counted apart until the end (workload_components): outside torch's counters.
        parts[PAGED] = 0
    for role in seen.roles:
        parts.setdefault(role, 0)
    if roles is None:
        roles = owners(seen)
    for storage in snapshot.storages:
        size = alloc_size(storage.nbytes) if rounded else storage.nbytes
        name = roles.get(storage.serial)
        if name is None:
            if storage.tag == "logits":
                name = "logits"
            elif storage.phase == "forward":
                name = "activations"
            else:
                name = "transients"
        parts[name] += size
    return parts


def _truncate_layer_lists(text: Any, depth: int, kept: list[int]) -> None:
    """Keep the entries of the layers ``kept`` (indices into the ``depth`` layers, in order)
    in every per-layer list of ``text`` (layer_types, layers_block_type, no_rope_layers,
    ...) and renumber index lists (moe_layers, full_attn_idxs) to them, dropping the rest.
    Lists a config derives in a read-only property (falcon-mamba's layer_types, Jamba's
    layers_block_type) follow num_hidden_layers."""
    position = {index: new for new, index in enumerate(kept)}
    for name, value in list(vars(text).items()):
        if not isinstance(value, (list, tuple)) or name.startswith("_"):
            continue
        if is_index_list(name, value, depth):
            selected = [position[i] for i in value if i in position]
        elif len(value) == depth:
            selected = [value[i] for i in kept]
        else:
            continue
        setattr(text, name, type(value)(selected))


def _with_layers(config: Any, layers: int, suffix: int = 0) -> Any:
    """A copy of ``config`` with ``layers`` decoder layers: the first ``layers - suffix``
    and the last ``suffix`` (planner/depths.py: a suffix that breaks the period)."""
    truncated = copy.deepcopy(config)
    text = truncated.get_text_config()
    depth = num_layers(truncated)
    if layers >= depth:
        return truncated
    kept = kept_layers(depth, layers, suffix)
    _truncate_layer_lists(text, depth, kept)
    for name in TRAILING_LAYER_COUNTS:
        count = getattr(text, name, None)
        if isinstance(count, int) and not isinstance(count, bool) and count > 0:
            # The layers kept hold those of the last ``count`` that they reach.
            setattr(text, name, sum(1 for i in kept if i >= depth - count))
    # Some configs derive the depth from a per-layer list (Nemotron-H ignores a new
    # num_hidden_layers); the list cut above already set it there.
    if num_layers(truncated) != layers:
        set_depth(text, layers)
    return truncated


@dataclass(frozen=True)
class TraceOutcome:
    components: dict[str, int]
    peak_bytes: int
    phase_peaks: dict[str, int]
    # The components at each phase's own peak (same keys as phase_peaks).
    phase_components: dict[str, dict[str, int]] = field(default_factory=dict)
    # Peak host memory (activation offloading), beside the device's.
    host_bytes: int = 0


@rare_collections()
def trace_components(
    config: Any,
    workload: Workload,
    precision: str,
    compute_dtype: str,
    *,
    target: str = "cuda",
    quant_storage: str = "uint8",
    skip_modules: list[str] | None = None,
    trust_remote_code: bool = False,
    layers: int | None = None,
    pattern: LayerPattern = HOMOGENEOUS,
    stored_method: str | None = None,
    recorder: Any = None,
) -> TraceOutcome:
    """Trace ``workload`` at ``precision`` on a meta model of ``config`` (all its layers,
    or ``layers`` of them, whose structure is ``pattern``: the first ones, and the stack's
    last ``pattern.suffix_layers``) and split the peak into
    components, at the peak and at the peak of every phase and part of a phase.
    ``stored_method``: ``precision`` is the dequantised stand-in of a checkpoint stored in
    this method (gptq, awq), trained the way peft prepares that checkpoint. ``recorder``:
    keep the step's log for deriving other candidates from it (planner/derived_traces.py)."""
    from qplan.planner.trace import trace

    step = StepModel.taken(config, workload, precision, compute_dtype, target=target,
                           quant_storage=quant_storage, skip_modules=skip_modules,
                           trust_remote_code=trust_remote_code, layers=layers,
                           pattern=pattern, stored_method=stored_method)
    model = step.model
    # A shallow trace of a deeper model is extrapolated part by part, which needs the
    # components at every part's peak; a full-depth trace needs only the phase peaks.
    try:
        snapshot, seen, phase_peaks, phase_snapshots = trace(
            model, workload, target=target, pattern=pattern, phase_snapshots=layers is not None,
            recorder=recorder,
        )
    except ScanNotRepeating:
        # A Mamba scan's counted tokens did not repeat after their node was made
        # (planner/recurrent_scan_graph.py): the step again, on a new model, every token run.
        with every_token():
            return trace_components(
                config, workload, precision, compute_dtype, target=target,
                quant_storage=quant_storage, skip_modules=skip_modules,
                trust_remote_code=trust_remote_code, layers=layers, pattern=pattern,
                stored_method=stored_method, recorder=recorder)
    except Exception as exc:
        _raise_if_data_dependent(exc, model, workload)
        _raise_if_model_code(exc, model, workload)
        raise
    step.put_back()
    return trace_outcome(snapshot, seen, phase_peaks, phase_snapshots, target)


@dataclass
class StepModel:
    """The meta model a step runs on, prepared for training as the workload prepares it
    (peft adapters, k-bit preparation), taken from the prepared models kept for reuse
    (planner/prepared_models.py) where one is kept; ``put_back`` keeps it again when the
    step left it as prepared."""

    model: Any
    inventory: Inventory
    prepared_key: tuple | None
    as_prepared: tuple | None

    @staticmethod
    def taken(config: Any, workload: Workload, precision: str, compute_dtype: str, *,
              target: str, quant_storage: str, skip_modules: list[str] | None,
              trust_remote_code: bool, layers: int | None, pattern: LayerPattern,
              stored_method: str | None) -> StepModel:
        # A shallow model keeps the stack's last ``suffix`` layers (planner/depths.py).
        suffix = shallow_suffix(layers, pattern)
        prepared_key = _prepared_key(config, workload, precision, compute_dtype, quant_storage,
                                     skip_modules, trust_remote_code, layers, stored_method,
                                     target, suffix)
        prepared = meta_models.take(prepared_key) if prepared_key is not None else None
        if prepared is CHANGES_THE_MODEL:
            # This preparation's step changed the model before (GRPO's reference adapter):
            # build and prepare afresh, without recording.
            meta_models.keep(prepared_key, CHANGES_THE_MODEL)
            prepared_key = prepared = None
        if prepared is not None:
            model, inventory, as_prepared = prepared
            return StepModel(model, inventory, prepared_key, as_prepared)
        model, inventory = step_model(
            config, workload, precision, compute_dtype, quant_storage=quant_storage,
            skip_modules=skip_modules, trust_remote_code=trust_remote_code, layers=layers,
            suffix=suffix,
        )
        as_prepared = None
        if workload.kind.prepare is not None:
            with _new_tensors_on_meta():
                packed = tuple(t.module for t in inventory.tensors
                               if stored_method is not None and t.kind == "parameter"
                               and t.quantizable)
                model = workload.kind.prepare(model, workload,
                                              PRECISIONS[precision].quantized,
                                              stored_method=stored_method,
                                              packed_modules=packed, target=target)
            if prepared_key is not None:
                as_prepared = state_of(model)
        return StepModel(model, inventory, prepared_key, as_prepared)

    def put_back(self) -> None:
        """Keep the model for the next step of this preparation, or remember that a step
        changes it."""
        if self.prepared_key is None or self.as_prepared is None:
            return
        clear_step_scratch(self.model)
        kept = state_of(self.model) == self.as_prepared
        meta_models.keep(self.prepared_key, (self.model, self.inventory, self.as_prepared)
                         if kept else CHANGES_THE_MODEL)


def _prepared_key(config: Any, workload: Workload, precision: str, compute_dtype: str,
                  quant_storage: str, skip_modules: list[str] | None, trust_remote_code: bool,
                  layers: int | None, stored_method: str | None, target: str,
                  suffix: int = 0) -> tuple | None:
    """What identifies a prepared training model (planner/prepared_models.py): the same
    workload but for its batch and sequence length, at the same precision and depth; None
    where no prepared model is kept (no training preparation, remote code, activation
    offloading, a config that does not serialise, the reference path)."""
    key = meta_models.config_key(config)
    if (workload.kind.prepare is None or trust_remote_code or key is None
            or workload.activation_offloading or not reuse.enabled()):
        return None
    skips = tuple(skip_modules) if skip_modules is not None else None
    return ("prepared", key, layers, suffix, precision, compute_dtype, quant_storage, skips,
            stored_method, target, replace(workload, batch=1, seq_len=1))


def step_model(
    config: Any,
    workload: Workload,
    precision: str,
    compute_dtype: str,
    *,
    quant_storage: str = "uint8",
    skip_modules: list[str] | None = None,
    trust_remote_code: bool = False,
    layers: int | None = None,
    suffix: int = 0,
) -> tuple[Any, Inventory]:
    """The meta model a step of ``workload`` at ``precision`` runs on (before any training
    preparation), and its inventory: shared between the traces while they leave it as built.
    ``layers``: that many decoder layers, the last ``suffix`` of them the stack's last."""
    from qplan.planner.quantize_meta import quantize_meta_model

    def build() -> tuple[Any, Inventory]:
        cfg = (_with_layers(config, layers, suffix) if layers is not None
               else copy.deepcopy(config))
        built = build_meta_model(cfg, trust_remote_code, attn=workload.attn)
        inventory = replace(take_inventory(built, skip_modules),
                            moe_experts=workload.quantize_moe_experts)
        built = quantize_meta_model(built, inventory, precision, compute_dtype, quant_storage)
        return built, inventory

    key = meta_models.config_key(config)
    if workload.kind.training or trust_remote_code or key is None:
        return build()

    def recorded() -> tuple[Any, Inventory, tuple]:
        built, inventory = build()
        built.eval()  # the inference step's first call (planner/steps.py: run_inference)
        return built, inventory, state_of(built)

    # A step that only runs the model (inference) mostly leaves it as built: one build
    # serves every trace of this model at this precision and depth (planner/meta_models.py).
    # A model whose forward keeps something on its modules (LongRoPE's long_inv_freq, made
    # by its first forward) is built afresh for the next trace, which would otherwise not
    # make what a loaded model's first forward makes.
    shared_key = (key, layers, suffix, workload.attn, workload.quantize_moe_experts, precision,
                  compute_dtype, quant_storage,
                  tuple(skip_modules) if skip_modules is not None else None)
    built_now: list[tuple] = []

    def build_once() -> tuple[Any, Inventory, tuple]:
        built_now.append(recorded())
        return built_now[-1]

    model, inventory, as_built = meta_models.shared(shared_key, build_once)
    if not built_now and state_of(model) != as_built:
        model, inventory, as_built = recorded()
        meta_models.keep(shared_key, (model, inventory, as_built))
    return model, inventory


def trace_outcome(snapshot: PeakSnapshot, seen: StepTensors, phase_peaks: dict[str, int],
                  phase_snapshots: dict[str, PeakSnapshot], target: str) -> TraceOutcome:
    """A traced (or derived) step's components at its peak and at every phase's peak."""
    rounded = target == "cuda"
    roles = owners(seen)
    parts = classify(snapshot, seen, rounded, roles)
    peak = snapshot.peak_allocated_bytes if rounded else snapshot.peak_bytes
    # The allocated peak may fall a few bytes apart from the raw-bytes peak moment.
    parts["transients"] += max(0, peak - sum(parts.values()))
    phase_components = {key: classify(snap, seen, rounded, roles)
                        for key, snap in phase_snapshots.items()}
    host = seen.host_peak
    return TraceOutcome(parts, peak, phase_peaks, phase_components, host)


def step_key(config: Any, workload: Workload, precision: str, compute_dtype: str,
             options: dict[str, Any]) -> tuple:
    """What identifies one traced step among the plans of one config (its arguments)."""
    return (id(config), workload, precision, compute_dtype,
            tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                         for k, v in options.items())))


def shared_traces(tracer: Callable[..., TraceOutcome]) -> Callable[..., TraceOutcome]:
    """``tracer`` for the plans of one config: a step traced with the same arguments again
    returns the first outcome. Precisions traced as another row (fp8 as its bf16 proxy,
    planner/components.py: ``_traced_as``) run the very same trace as that row, and the
    searches of ``--solve`` revisit workloads. Off on the reference path."""
    outcomes: dict[tuple, TraceOutcome] = {}

    def trace(config: Any, workload: Workload, precision: str, compute_dtype: str,
              **options: Any) -> TraceOutcome:
        if not reuse.enabled():
            return tracer(config, workload, precision, compute_dtype, **options)
        key = step_key(config, workload, precision, compute_dtype, options)
        found = outcomes.get(key)
        if found is None:
            found = outcomes[key] = tracer(config, workload, precision, compute_dtype,
                                           **options)
        return found

    return trace


def _new_tensors_on_meta() -> Any:
    """peft builds each adapter on the CPU, fills it with random numbers, then moves it to
    its base layer's device (meta here): seconds of real work for models with many experts.
    Created on meta directly, every adapter has the same shape and dtype, and the trace the
    same storages. Off on the reference path."""
    import torch

    return torch.device("meta") if reuse.enabled() else contextlib.nullcontext()


# What torch raises when code reads the values of a meta tensor (``.item()``,
# ``.tolist()``, ``.cpu()``) or calls an op whose output shape depends on them.
_META_VALUE_READS = (
    "cannot be called on meta tensors",
    "Cannot copy out of meta tensor",
    "a correct data-independent implementation does not exist",
)


def _raise_if_data_dependent(exc: Exception, model: Any, workload: Workload) -> None:
    """The model's own code read tensor values (a data-dependent shape or decision): say
    where, in one line, and refuse; a planner on meta tensors cannot follow it."""
    import traceback

    from qplan.errors import DataDependentModelError

    if not any(text in str(exc) for text in _META_VALUE_READS):
        return
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if f"transformers{os.sep}" in f.filename]
    if not frames:
        return
    where = frames[-1]
    name = type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__
    code = (where.line or "").strip()[:80]
    raise DataDependentModelError(
        f"{name}'s code reads tensor values in the {workload.mode} step "
        f"({os.path.basename(where.filename)}:{where.lineno}: {code}), so its memory depends "
        "on the data; qplan traces on the meta device, where tensors have no values, and "
        "cannot plan this step: plan --mode load"
    ) from exc


# transformers' code that runs a model: its modeling files, its caches (a cache that
# cannot serve the model's layers fails the same way in generate), its masks and losses,
# and its MoE experts' grouped_mm dispatch (the meta kernel checks the CUDA kernel's
# 16-byte row alignment, so expert matrices too narrow for it fail on the GPU as well).
_MODEL_CODE = (f"transformers{os.sep}models{os.sep}", f"transformers{os.sep}cache_utils.py",
               f"transformers{os.sep}masking_utils.py", f"transformers{os.sep}loss{os.sep}",
               f"transformers{os.sep}integrations{os.sep}moe.py")


# Frames between a model's code and the op that raised: torch, qplan's tracker and its
# stand-in for torch's grouped_mm meta kernel.
_OP_MACHINERY = (f"{os.sep}torch{os.sep}", f"planner{os.sep}live_tensors.py",
                 f"planner{os.sep}meta_memo.py", f"planner{os.sep}grouped_mm_meta.py")


def _shape_error(exc: Exception) -> bool:
    """A torch op refusing its operands' shapes: raised the same on every device (a meta
    kernel missing is a NotImplementedError, a value read is caught before)."""
    return isinstance(exc, (RuntimeError, ValueError)) and "meta" not in str(exc).lower()


def _raise_if_model_code(exc: Exception, model: Any, workload: Workload) -> None:
    """A failure raised by the model's own modeling code (not by the trace or a library
    below it) happens in a real run too: refuse in one line, naming it."""
    import traceback

    import transformers

    from qplan.errors import ModelCodeError

    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return
    raiser = frames[-1]
    if _shape_error(exc):
        # A torch op the model's code called refused its shapes (a rotary split that does
        # not add up to the head size): the op is torch's, the fault the model code's.
        callers = [f for f in frames if not any(p in f.filename for p in _OP_MACHINERY)]
        raiser = callers[-1] if callers else raiser
    if not any(part in raiser.filename for part in _MODEL_CODE):
        return
    name = type(getattr(model, "base_model", model)).__name__
    if hasattr(model, "get_base_model"):
        name = type(model.get_base_model()).__name__
    first = (str(exc).strip().splitlines() or [""])[0][:160]
    raise ModelCodeError(
        f"transformers {transformers.__version__}'s {name} fails in its own code in the "
        f"{workload.mode} step on token ids ({type(exc).__name__}: {first}), so a real run "
        "of that step with this config fails the same way; fix the config, plan --mode load, "
        "or use a transformers version where this model runs"
    ) from exc


def _extrapolate(low: TraceOutcome, high: TraceOutcome, depths: tuple[int, int],
                 target_layers: int) -> TraceOutcome:
    """Linear in depth: value(L) = value(d1) + (L - d1) * (value(d2) - value(d1)) / (d2 - d1),
    for the peak of every phase and part of a phase; the components are those of the
    part that peaks highest at the target depth, extrapolated the same way."""
    d1, d2 = depths
    scale = (target_layers - d1) / (d2 - d1)

    def line(a: int, b: int) -> int:
        return max(0, round(a + (b - a) * scale))

    def line_parts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
        return {name: line(a.get(name, 0), b[name]) for name in b}

    # Parts both traces have, but not the "middle" occurrences of a block's layers: there
    # are more of them in the deeper trace, and they lie between the block's topmost and
    # bottommost ones (planner/depths.py: segment_keys).
    lines = {
        phase: line(low.phase_peaks[phase], high.phase_peaks[phase])
        for phase in high.phase_peaks
        if phase in low.phase_peaks and not phase.endswith("-middle")
    }
    phase_components = {
        k: line_parts(low.phase_components[k], high.phase_components[k])
        for k in lines if k in low.phase_components and k in high.phase_components
    }
    # A phase peaks at the largest of its parts (a line through two shallow peaks of the
    # whole phase follows whichever part led there, and falls short of a part that
    # overtakes it deeper down).
    phases = dict(lines)
    for key, value in lines.items():
        phase, _, part = key.partition(":")
        if part and phase in phases:
            phases[phase] = max(phases[phase], value)
    components = line_parts(low.components, high.components)
    peak = line(low.peak_bytes, high.peak_bytes)
    leader = max(phase_components, key=lambda k: lines[k], default=None)
    if leader is not None and lines[leader] > peak:
        components = dict(phase_components[leader])
        peak = max(lines[leader], sum(components.values()))
    components["transients"] += max(0, peak - sum(components.values()))
    host = line(low.host_bytes, high.host_bytes)
    return TraceOutcome(components, peak, phases, phase_components, host)


def workload_components(
    inventory: Inventory,
    workload: Workload,
    precision: str,
    compute_dtype: str,
    quant_storage: str = "uint8",
    *,
    config: Any = None,
    gpu_architecture: str | None = None,
    trust_remote_code: bool = False,
    skip_modules: list[str] | None = None,
    target: str = "cuda",
    tracer: Callable[..., TraceOutcome] = trace_components,
    depth_plan: TracePlan | None = None,
) -> ComponentPlan:
    """Components of ``workload`` at ``precision``; ``config`` is needed beyond ``load``.
    ``depth_plan``: the model's ``trace_plan`` when the caller already has it."""
    if not workload.runs_step:
        return load_components(inventory, precision, compute_dtype, quant_storage)
    if config is None:
        raise ValueError("a config is needed to trace a workload")
    weights = weight_bytes(
        inventory, precision, compute_dtype=compute_dtype, quant_storage=quant_storage
    )
    depth = num_layers(config)
    common = dict(
        target=target, quant_storage=quant_storage, skip_modules=skip_modules,
        trust_remote_code=trust_remote_code,
    )
    plan = depth_plan or trace_plan(layer_signatures(inventory, config), depth)
    traced_as = _traced_as(precision, compute_dtype)
    stored = inventory.stored
    if (workload.is_lora and stored is not None and traced_as != precision
            and PRECISIONS[precision].trainable("lora")):
        # LoRA on a GPTQ / AWQ checkpoint: peft's k-bit preparation, as for the real model.
        common["stored_method"] = stored.quant_method
    if plan.depths is None or sum(plan.depths) > depth:
        # Whole, also where the two shallow traces would hold more layers together than
        # the model (Nemotron-H-56B read without its suffix: 112 and 114 of 118 layers):
        # one trace of every layer is the figure the extrapolation reproduces, for fewer
        # ops and no part snapshots.
        outcome = tracer(config, workload, traced_as, compute_dtype, **common)
        traced: tuple[int, ...] = (depth,)
    else:
        low, high = (
            tracer(config, workload, traced_as, compute_dtype, layers=layers,
                   pattern=plan.pattern, **common)
            for layers in plan.depths
        )
        outcome = _extrapolate(low, high, plan.depths, depth)
        traced = plan.depths
    components = dict(outcome.components)
    peak = outcome.peak_bytes
    if traced_as != precision:
        # Traced on the dequantised model (the method's kernels have no meta version):
        # same activations, the weights swapped for the stored ones.
        proxy = weight_bytes(inventory, traced_as, compute_dtype=compute_dtype)
        delta = (weights.allocated_bytes - proxy.allocated_bytes if target == "cuda"
                 else weights.bytes - proxy.bytes)
        components["weights"] = max(0, components["weights"] + delta)
        peak = max(0, peak + delta)
        for role in workload.kind.weight_copies:
            # A second load of the same checkpoint (a frozen reference model): stored too.
            if components.get(role):
                components[role] = max(0, components[role] + delta)
                peak = max(0, peak + delta)
    if workload.kv_dtype and components.get("kv_cache"):
        model_kv = DTYPE_BYTES[_kv_model_dtype(precision, compute_dtype)]
        delta = components["kv_cache"] * DTYPE_BYTES[workload.kv_dtype] // model_kv - \
            components["kv_cache"]
        components["kv_cache"] += delta
        peak += delta
    paged = components.pop(PAGED, 0)
    if paged:
        # Paged states live in CUDA managed memory: outside torch's counters, seen by NVML.
        # They are still optimizer state the GPU holds, so the component keeps them.
        components["optimizer_states"] += paged
        peak -= paged
    if target == "cuda":
        workspace = CUBLAS_WORKSPACE.get(gpu_architecture or "", CUBLAS_WORKSPACE_DEFAULT)
        components["transients"] += workspace
        peak += workspace
        churn = sum(components[k] for k in ("activations", "logits", "transients",
                                            "gradients"))
        components["allocator"] = int(churn * FRAGMENTATION_ALLOWANCE)
    return ComponentPlan(weights, components, peak, traced, dict(outcome.phase_peaks),
                         outcome.host_bytes)


def _kv_model_dtype(precision: str, compute_dtype: str) -> str:
    return load_dtype_for(PRECISIONS[precision], compute_dtype)


def _traced_as(precision: str, compute_dtype: str) -> str:
    """The row whose meta model is traced for ``precision``: itself, or for methods
    without meta kernels the plain row of their load dtype (the dequantised model)."""
    prec = PRECISIONS[precision]
    if not prec.method.traced_dequantized:
        return precision
    dtype = load_dtype_for(prec, compute_dtype)
    return find_precision("none", full_dtype=dtype) or precision
