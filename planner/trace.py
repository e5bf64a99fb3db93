"""Predict a workload's tensor-level peak by running its real step on the meta device.

The model is the real module tree (transformers, bitsandbytes layers, peft adapters) with
every tensor on meta: nothing is allocated, but every op produces outputs of the right
shape and dtype, and autograd saves exactly what it would. A LiveTensorTracker counts the
storages and finds the peak, which the components split by what each storage was.

Meta tensors carry no values, so the few places where a real run decides something from
data are pinned to what they decide for a dense, unpadded batch:

* attention: on meta, ``scaled_dot_product_attention`` would fall back to its math path
  (materialising the scores); the trace calls the fused kernel the target device picks
  instead: FlashAttention on CUDA for 16-bit inputs without a mask (memory-efficient
  attention otherwise), the flash kernel for CPU on CPU. Their meta kernels give the real
  output and logsumexp shapes, and autograd saves what the real kernels save.
* packed-sequence detection (transformers' ``find_packed_sequence_indices``) reads position
  ids; for an ordinary batch it finds no packing, for a packed one (sample packing) it
  returns the sequence index of every token (its ops, without the data-dependent test).
  An attention mask (preference trainers' collators pass one, BART makes one when none is
  passed) is all ones for an unpadded batch (``fast_all``, ``padding_mask.all()`` in the
  bidirectional mask skip, and ``torch.all(attention_mask == 1)`` in the Mamba /
  linear-attention layers' ``create_recurrent_attention_mask``).
* ``warn_if_padding_and_no_attention_mask`` (BERT-style models) looks for pad tokens to
  warn about; an unpadded batch has none, and the check changes nothing else.
* MoE routing is data dependent; the trace routes through transformers' ``grouped_mm``
  experts path, whose shapes are static: every expert sees its share of the
  ``tokens x top_k`` routed rows, the same rows in total as a real routing.
* fused AdamW (transformers' default optimizer) runs on meta through ``torch._fused_adamw_``.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

from qplan.planner.depths import HOMOGENEOUS, LayerPattern
from qplan.planner.grouped_mm_meta import grouped_mm_as_run
from qplan.planner.kernel_fallbacks import pytorch_paths
from qplan.planner.live_tensors import LiveTensorTracker, PeakSnapshot
from qplan.planner.longrope_scale import longrope_scale_on_meta
from qplan.planner.patching import loaded_modules, same_modules, swapped
from qplan.planner.quant import all_trace_patches
from qplan.planner.quiet_logs import quiet
from qplan.planner.recurrent_scan import counted_scans
from qplan.planner.step_runs import mark_run
from qplan.planner.steps import StepTensors, run_workload
from qplan.planner.workload import Workload

TARGETS = ("cuda", "cpu")


# The memory-efficient CUDA kernel wants its bias rows aligned to this many elements.
_MEM_EFFICIENT_MASK_ALIGNMENT = 8


def _additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """What SDPA does to a boolean mask before any fused kernel (``convert_boolean_attn_mask``
    in ATen's attention.cpp): a new [mask shape] tensor in the query dtype, which the kernel
    saves for backward. Sliding-window layers longer than their window get such a mask."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask.logical_not(), torch.full((), float("-inf"), dtype=dtype,
                                                      device=mask.device), zero)


def _mem_efficient_mask(mask: torch.Tensor, query: torch.Tensor,
                        key: torch.Tensor) -> torch.Tensor:
    """ATen's ``preprocess_mask``: pad the last dimension to the kernel's alignment (a copy,
    when the rows are not aligned), then expand to [batch, heads, q_len, kv_len] (a view)."""
    align = _MEM_EFFICIENT_MASK_ALIGNMENT
    aligned = mask.stride(-1) == 1 and all(st % align == 0 for st in mask.stride()[:-1])
    if not aligned:
        length = mask.shape[-1]
        mask = torch.nn.functional.pad(mask, (0, align - length % align))[..., :length]
    return mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])


def _sdpa_for(target: str, attn: str, original: Any):
    aten = torch.ops.aten

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
             enable_gqa=False):
        same_head_dims = query.shape[-1] == key.shape[-1] == value.shape[-1]
        if target == "cpu" and (dropout_p > 0 or not same_head_dims):
            # PyTorch's CPU kernel selection takes the math path for attention dropout and
            # for values narrower than the keys (DeepSeek's MLA), which is what SDPA on
            # meta does too.
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                            is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        attn_mask = _additive_mask(attn_mask, query.dtype)
        if target == "cpu":
            return aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
            )[0]
        if key.shape[-3] != query.shape[-3]:
            # The CUDA fused kernels take equal head counts: expand K/V as SDPA does.
            groups = query.shape[-3] // key.shape[-3]
            key = key.repeat_interleave(groups, dim=-3)
            value = value.repeat_interleave(groups, dim=-3)
        flash_ok = (
            attn_mask is None
            and same_head_dims
            and query.dtype in (torch.float16, torch.bfloat16)
            and query.shape[-1] <= 256
        )
        if flash_ok:
            return aten._scaled_dot_product_flash_attention(
                query, key, value, dropout_p, is_causal, False, scale=scale
            )[0]
        needs_lse = any(t.requires_grad for t in (query, key, value))
        if attn_mask is not None:
            attn_mask = _mem_efficient_mask(attn_mask, query, key)
        return aten._scaled_dot_product_efficient_attention(
            query, key, value, attn_mask, needs_lse, dropout_p, is_causal, scale=scale
        )[0]

    return sdpa


def _allow_fused_on_meta() -> Iterator[None]:
    import torch.optim.optimizer as optimizer_module

    original = optimizer_module._get_fused_kernels_supported_devices

    def devices() -> list[str]:
        return [*original(), "meta"]

    with swapped((optimizer_module, "_get_fused_kernels_supported_devices", devices)):
        yield


def _packed_indices(position_ids: torch.Tensor) -> torch.Tensor:
    """transformers' ``find_packed_sequence_indices`` without its data-dependent "is
    anything packed" test (a packed plan is packed): the same ops, so the same tensors."""
    first_dummy_value = position_ids[:, :1] - 1
    position_diff = torch.diff(position_ids, prepend=first_dummy_value, dim=-1)
    return (position_diff != 1).cumsum(-1)


@contextlib.contextmanager
def trace_patches(target: str, attn: str,
                  packing: tuple[int, int] | None = None) -> Iterator[None]:
    """Pin the data-dependent decisions of a real run while tracing on meta; ``packing``:
    (sequences, tokens each) packed into one row (sample packing)."""
    from transformers import masking_utils

    from qplan.planner.bnb_import import import_bitsandbytes

    import_bitsandbytes()
    with contextlib.ExitStack() as stack:
        original_sdpa = torch.nn.functional.scaled_dot_product_attention
        original_all = masking_utils.fast_all
        stack.enter_context(swapped(
            (torch.nn.functional, "scaled_dot_product_attention",
             _sdpa_for(target, attn, original_sdpa)),
            (masking_utils, "find_packed_sequence_indices",
             _packed_indices if packing is not None else lambda *a, **k: None),
            # An attention mask on meta (TRL's collators pass one) has no values: the batch
            # is unpadded, all ones, so the causal mask is skipped as in a real run.
            (masking_utils, "fast_all",
             lambda t: True if t.device.type == "meta" else original_all(t)),
        ))
        # Boolean indexing on meta (TRL's metrics select the completion tokens) needs a
        # count of true values: take every element (a few bytes per token, logged only).
        from torch.fx.experimental import _config as fx_config

        stack.enter_context(fx_config.patch(meta_nonzero_assume_all_nonzero=True))
        stack.enter_context(_no_padding_warning_on_meta())
        stack.enter_context(_unpadded_bidirectional_skip(masking_utils))
        stack.enter_context(_unpadded_recurrent_mask_skip(masking_utils))
        stack.enter_context(contextlib.contextmanager(_allow_fused_on_meta)())
        stack.enter_context(_meta_autocast_off())
        stack.enter_context(grouped_mm_as_run())
        # Functions transformers takes from an installed kernel package (mamba-ssm, ...)
        # run their PyTorch code, as where it is not installed (planner/kernel_fallbacks.py);
        # before the scan's stand-ins, which take only a wrapper calling that code.
        stack.enter_context(pytorch_paths())
        # The Mamba scan's repeated iterations counted from their log (planner/recurrent_scan.py).
        stack.enter_context(counted_scans())
        stack.enter_context(_image_checks_on_meta())
        # Phi-3.5-MoE's LongRoPE scale, a float picked by a position id's value
        # (planner/longrope_scale.py).
        stack.enter_context(longrope_scale_on_meta())
        if packing is not None:
            from qplan.planner.attention import packed_flash

            stack.enter_context(packed_flash(*packing))
        # Each quantisation method's own patches (planner/quant/<method>.py).
        stack.enter_context(all_trace_patches(target))
        yield


@dataclass
class _Holders:
    """What ``modules_holding`` knows of one (prefix, attribute, value): the id of each
    module looked at and the modules holding the value, by name, and sys.modules (its
    names and its module objects, in order) when it last looked."""

    seen: dict[str, int] = field(default_factory=dict)
    holders: dict[str, ModuleType] = field(default_factory=dict)
    names: tuple[str, ...] = ()
    modules: tuple[Any, ...] = ()


# (prefix, attribute, id of its value) -> what was found.
_HOLDERS: dict[tuple[str, str, int], _Holders] = {}


def modules_holding(prefix: str, attr: str, value: Any) -> list[ModuleType]:
    """The loaded modules named ``prefix...`` whose ``attr`` is ``value`` (modeling files
    import transformers' helpers by name, so a patch swaps each copy). Every trace asks
    again; only modules loaded (or reloaded) since the last answer are looked at: an
    import binds the name once, and the patches restore it.

    Usually nothing was imported since the last answer (every trace of a plan after the
    first): sys.modules then holds the same names and the same module objects in the same
    order, which two C-level comparisons tell (names by equality, modules by identity)
    instead of a Python loop over its ~2,800 entries, twice per trace (a fifth of the
    default plan's own CPU time). The snapshot keeps its modules alive, so an id looked
    at is never reused by a new module.

    A holder binds the name in its namespace (``from ... import name``), so the module's
    ``__dict__`` is read, not ``getattr``: a lazy module (transformers' packages) answers
    a name it does not hold by looking it up in its index of exports, which the command
    line builds only when something reads it (qplan/deferred_model_index.py)."""
    found = _HOLDERS.get((prefix, attr, id(value)))
    if found is None:
        found = _HOLDERS[prefix, attr, id(value)] = _Holders()
    names, modules = loaded = loaded_modules()
    unchanged = same_modules(loaded, (found.names, found.modules))
    if not unchanged:
        for name, module in zip(names, modules, strict=True):
            if found.seen.get(name) == id(module) or not name.startswith(prefix):
                continue
            found.seen[name] = id(module)
            found.holders.pop(name, None)
            if getattr(module, "__dict__", {}).get(attr) is value:
                found.holders[name] = module
        found.names, found.modules = names, modules
    return [module for name, module in found.holders.items()
            if sys.modules.get(name) is module]


@contextlib.contextmanager
def _unpadded_recurrent_mask_skip(masking_utils: Any) -> Iterator[None]:
    """Mamba / linear-attention layers' 2-D padding mask (``create_recurrent_attention_mask``,
    Nemotron-H, Qwen3-Next, ...) is skipped, None, when ``torch.all(attention_mask == 1)``:
    a meta mask is the all-ones mask of an unpadded batch (as ``fast_all`` decides), so
    the trace takes that outcome. The models import the function by name: it is swapped
    in every loaded module that holds it."""
    original = getattr(masking_utils, "create_recurrent_attention_mask", None)
    if original is None:
        yield
        return

    def skip(config: Any, inputs_embeds: Any, attention_mask: Any, *args: Any,
             **kwargs: Any) -> Any:
        if (isinstance(attention_mask, torch.Tensor) and attention_mask.device.type == "meta"
                and attention_mask.ndim == 2):
            return None
        return original(config, inputs_embeds, attention_mask, *args, **kwargs)

    holders = modules_holding("transformers", "create_recurrent_attention_mask", original)
    with swapped(*((module, "create_recurrent_attention_mask", skip) for module in holders)):
        yield


@contextlib.contextmanager
def _unpadded_bidirectional_skip(masking_utils: Any) -> Iterator[None]:
    """A meta padding mask is the all-ones mask of an unpadded batch: decide the
    bidirectional SDPA mask skip (BERT-style decoders such as BigBird's; it calls
    ``padding_mask.all()``, not ``fast_all``) as transformers does for no padding mask."""
    original = masking_utils._ignore_bidirectional_mask_sdpa

    def decide(padding_mask: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(padding_mask, torch.Tensor) and padding_mask.device.type == "meta":
            padding_mask = None
        return original(padding_mask, *args, **kwargs)

    with swapped((masking_utils, "_ignore_bidirectional_mask_sdpa", decide)):
        yield


@contextlib.contextmanager
def _no_padding_warning_on_meta() -> Iterator[None]:
    """transformers' pad-token check only warns; on meta ids it would read values."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.warn_if_padding_and_no_attention_mask

    def check(self: Any, input_ids: Any, attention_mask: Any) -> None:
        if isinstance(input_ids, torch.Tensor) and input_ids.device.type == "meta":
            return
        original(self, input_ids, attention_mask)

    with swapped((PreTrainedModel, "warn_if_padding_and_no_attention_mask", check)):
        yield


@contextlib.contextmanager
def _image_checks_on_meta() -> Iterator[None]:
    """Vision-language models (planner/vision.py) check that the image placeholder
    tokens match the image features (``torch._check_tensor_all_with`` on a count): on
    meta there is no count, and the step put exactly as many placeholders as the features
    (the real run's check passes). Qwen2-VL-style towers read their image grid's values
    for window and sequence bookkeeping: the step passes the grid on the CPU, and the
    rotary position ids made from it go to meta with the hidden states."""

    from transformers import vision_utils

    original_check = torch._check_tensor_all_with

    def check(error_type: Any, cond: Any, message: Any = None) -> None:
        if isinstance(cond, torch.Tensor) and cond.device.type == "meta":
            return
        original_check(error_type, cond, message)

    original_ids = vision_utils.get_vision_position_ids

    def position_ids(*args: Any, **kwargs: Any) -> Any:
        result = original_ids(*args, **kwargs)
        return result.to("meta") if isinstance(result, torch.Tensor) else result

    holders = [vision_utils, *modules_holding("transformers.models.",
                                              "get_vision_position_ids", original_ids)]
    with swapped((torch, "_check_tensor_all_with", check),
                 *((module, "get_vision_position_ids", position_ids) for module in holders)):
        yield


@contextlib.contextmanager
def _meta_autocast_off() -> Iterator[None]:
    """``torch.autocast("meta", enabled=False)`` (peft's expert LoRA) is a no-op: meta
    tensors have no autocast to turn off, but torch rejects the device type."""
    original = torch.autocast

    class _Autocast(original):  # type: ignore[misc, valid-type]
        def __new__(cls, device_type: str, *args: Any, **kwargs: Any):
            if device_type == "meta":
                return contextlib.nullcontext()
            return original(device_type, *args, **kwargs)

    # Kernels that ask whether autocast is on for their input's device (TRL's chunked
    # log-prob head): never on meta.
    original_enabled = torch.is_autocast_enabled

    def enabled(*args: Any) -> bool:
        if args and args[0] == "meta":
            return False
        return original_enabled(*args)

    with swapped((torch, "autocast", _Autocast), (torch, "is_autocast_enabled", enabled)):
        yield


def _reference_path_if(offloading: bool) -> Any:
    """Activation offloading decides what stays on the device from storage use counts
    (planner/offload.py, as TRL does), which the meta-op memo's replayed outputs do not
    reproduce: its steps are traced without the memo."""
    from qplan.planner import reuse

    return reuse.disabled() if offloading else contextlib.nullcontext()


def use_static_experts(model: Any) -> None:
    """Route MoE layers through transformers' grouped_mm experts (static shapes)."""
    setter = getattr(model, "set_experts_implementation", None)
    can = getattr(model, "_can_set_experts_implementation", None)
    if setter is not None and can is not None and can():
        setter("grouped_mm")


def vocab_tagger(vocab: int):
    """Tag storages whose last dimension is the vocabulary: logits, their fp32 copies,
    the loss's log-softmax and their gradients."""

    def tag(tensor: torch.Tensor) -> str | None:
        if tensor.dim() >= 2 and tensor.shape[-1] == vocab:
            return "logits"
        return None

    return tag


def trace(
    model: Any, workload: Workload, target: str = "cuda", pattern: LayerPattern = HOMOGENEOUS,
    phase_snapshots: bool = False, recorder: Any = None,
) -> tuple[PeakSnapshot, StepTensors, dict[str, int], dict[str, PeakSnapshot]]:
    """Run ``workload`` on the meta ``model``; returns the peak, the storage roles, the
    peak of each phase (forward, backward, optimizer) and part of a phase
    ("backward:block0-top", ...), and, when asked (for extrapolating in depth), the live
    storages at each of those peaks. ``recorder`` (planner/derived_traces.py: a
    ``Recorder``) also keeps the step's log and its Linear calls, for deriving the
    quantised candidates' steps from this one; it changes no storage of the step."""
    mark_run(model)
    vocab = model.config.get_text_config().vocab_size
    tagger = vocab_tagger(vocab)
    tracker = LiveTensorTracker(tagger=tagger) if recorder is None else recorder.tracker(tagger)
    use_static_experts(model)
    # bitsandbytes and transformers warn about dtype casts on every layer call; those are
    # facts of the real run, not news to the user of a plan.
    packing = (workload.batch, workload.seq_len) if workload.sample_packing else None
    with quiet("bitsandbytes"), warnings.catch_warnings(), \
            trace_patches(target, workload.attn, packing), \
            _reference_path_if(workload.activation_offloading), \
            (recorder.watching(model) if recorder is not None else contextlib.nullcontext()):
        warnings.simplefilter("ignore")
        seen = run_workload(model, workload, tracker, pattern)
    if recorder is not None:
        recorder.finish(seen)
    peak, snapshots = tracker.snapshots(phases=phase_snapshots)
    return peak, seen, dict(tracker.phase_peaks), snapshots
