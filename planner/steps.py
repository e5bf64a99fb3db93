"""Run one workload's steps on a model under a LiveTensorTracker.

The same code runs on meta tensors (the planner's prediction) and on real tensors (the
measurement), so the two differ only where kernels differ.

What they run is the loops users run (tests/test_user_loops.py runs those for real):

* inference: ``model.generate``'s prefill of ``batch x seq_len`` tokens into a DynamicCache
  (the KV cache for the whole context), keeping only the last position's logits.
* training: transformers' ``Trainer`` with its defaults, two optimizer steps: a batch
  whose labels are a tensor of their own (the default collator stacks them apart from the
  input ids), forward with labels, backward, gradient clipping to norm 1.0 (max_grad_norm),
  the optimizer step (fused AdamW by default), zero_grad; the second step starts with the
  optimizer states the first one created (its forward and backward are counted from the
  first's log where they provably run the same: planner/repeated_steps.py). No autocast:
  ``TrainingArguments(bf16=False)``, the default, with the model loaded in the plan's dtype.
  With a fused linear cross-entropy the forward is the decoder and the fused loss
  (planner/fused_ce.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qplan.errors import ModelCodeError, UsageError
from qplan.planner.depths import HOMOGENEOUS, LayerPattern, segment_keys
from qplan.planner.fused_ce import fused_ce_loss
from qplan.planner.live_tensors import LiveTensorTracker
from qplan.planner.patching import swapped
from qplan.planner.repeated_steps import StepRepeater, repeatable
from qplan.planner.workload import Workload

# transformers' TrainingArguments default.
MAX_GRAD_NORM = 1.0


@dataclass
class StepTensors:
    """Serials of the storages that turned out to be one thing or another."""

    weights: set[int] = field(default_factory=set)
    adapters: set[int] = field(default_factory=set)
    gradients: set[int] = field(default_factory=set)
    optimizer_states: set[int] = field(default_factory=set)
    kv_cache: set[int] = field(default_factory=set)
    # Paged optimizers: the states bitsandbytes puts in CUDA managed memory (a subset of
    # optimizer_states), which torch's allocator never counts.
    paged_states: set[int] = field(default_factory=set)
    # Peak host memory of the step (activation offloading's copies), in bytes.
    host_peak: int = 0
    # Roles a workload's own module declares (planner/workloads/): e.g. a frozen reference
    # model's weights, reported as a component of that name.
    roles: dict[str, set[int]] = field(default_factory=dict)


# bitsandbytes' paged optimizers page a state buffer only from this many elements
# (Optimizer8bit.get_state_buffer); smaller ones are ordinary torch tensors.
PAGED_MIN_NUMEL = 100_000
PAGED_STATE_KEYS = ("state1", "state2")


def _quant_tensors(param: Any) -> Iterator[torch.Tensor]:
    state = getattr(param, "quant_state", None)
    while state is not None:
        for value in vars(state).values():
            if isinstance(value, torch.Tensor):
                yield value
        state = getattr(state, "state2", None)
    scb = getattr(param, "SCB", None)
    if isinstance(scb, torch.Tensor):
        yield scb


def track_model(model: nn.Module, tracker: LiveTensorTracker, seen: StepTensors) -> None:
    """Count the tensors the model already holds: weights (frozen or full) and adapters."""
    for name, param in model.named_parameters():
        serial = tracker.add(param)
        is_adapter = param.requires_grad and "lora_" in name
        (seen.adapters if is_adapter else seen.weights).add(serial)  # type: ignore[arg-type]
        for extra in _quant_tensors(param):
            seen.weights.add(tracker.add(extra))  # type: ignore[arg-type]
    for buf in model.buffers():
        seen.weights.add(tracker.add(buf))  # type: ignore[arg-type]
    from qplan.planner.moe_experts import parametrization_state

    for module in model.modules():
        # A parametrised parameter's quant state (Axolotl's quantised experts) lives on
        # its parametrization, neither parameter nor buffer.
        for extra in parametrization_state(module):
            seen.weights.add(tracker.add(extra))  # type: ignore[arg-type]


def input_ids(batch: int, seq_len: int, vocab: int, device: torch.device) -> torch.Tensor:
    if device.type == "meta":
        return torch.empty((batch, seq_len), dtype=torch.long, device=device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    return ids.to(device)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _cache_tensors(cache: Any) -> Iterator[torch.Tensor]:
    """The tensors a generation cache holds: a Cache's layers (keys and values, or a linear
    attention layer's conv and recurrent states), both halves of an encoder-decoder cache,
    or the plain list of state tensors of models that keep their own (RWKV's ``state``)."""
    if isinstance(cache, torch.Tensor):
        yield cache
    elif isinstance(cache, (list, tuple)):
        for item in cache:
            yield from _cache_tensors(item)
    elif cache is not None:
        for half in ("self_attention_cache", "cross_attention_cache"):
            yield from _cache_tensors(getattr(cache, half, None))
        for layer in getattr(cache, "layers", []):
            for value in vars(layer).values():
                if isinstance(value, torch.Tensor):
                    yield value


# Where a model's output carries the generation state: the Cache (``cache``, formerly
# ``past_key_values``) or, for models that keep their own, ``state`` (RWKV).
_OUTPUT_STATE_KEYS = ("cache", "past_key_values", "state")


def generation_cache(model: nn.Module) -> Any:
    """The cache ``generate`` makes before the prefill, as GenerationMixin's
    ``_prepare_cache_for_generation`` makes it with the default generation config: a
    DynamicCache of the decoder's text config, wrapped with a cross-attention one for an
    encoder-decoder config; None for models that make their own (RWKV, Reformer, ...)."""
    from transformers import DynamicCache, EncoderDecoderCache

    supports = getattr(model, "_supports_default_dynamic_cache", None)
    if supports is not None and not supports():
        return None
    config = model.config.get_text_config(decoder=True)
    try:
        cache = DynamicCache(config=config)
    except (AttributeError, ValueError, TypeError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise ModelCodeError(
            f"transformers cannot make the generation cache of {type(model).__name__} from "
            f"this config (DynamicCache: {type(exc).__name__}: {first}), so model.generate "
            "fails the same way; plan --mode load, or a training mode"
        ) from exc
    if getattr(model.config, "is_encoder_decoder", False):
        cache = EncoderDecoderCache(cache, DynamicCache(config=config))
    return cache


def _cache_argument(model: nn.Module) -> str:
    """``cache``, transformers 5's name for the forward's cache argument, or
    ``past_key_values`` for code written before it (remote code)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def run_inference(
    model: nn.Module, workload: Workload, tracker: LiveTensorTracker, seen: StepTensors
) -> None:
    """The prefill of ``model.generate`` on an unpadded ``batch x seq_len`` prompt and its
    first token, with the inputs generate makes (GenerationMixin, transformers 5.x): an
    all-ones attention mask for position ids from its cumulative sum (so rotary tables are
    per batch row), then dropped because nothing is padded; a contiguous clone of the
    prompt; the cache generate makes (``generation_cache``); the last position's logits
    only, and their float32 copy for picking the token."""
    device = model_device(model)
    vocab = model.config.get_text_config().vocab_size
    ids = input_ids(workload.batch, workload.seq_len, vocab, device)
    images = _image_inputs(model, workload, ids)
    model.eval()
    with torch.no_grad():
        tracker.phase, tracker.segment = "forward", ("embed",)
        attention_mask = torch.ones_like(ids)
        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        del attention_mask
        if images is not None and images.position_ids is not None:
            # generate's prefill for multimodal rotary positions (Qwen2-VL style): the
            # text positions stacked on the model's 3-D ones.
            position_ids = torch.cat([position_ids[None], images.position_ids], dim=0)
        if images is not None:
            image_kwargs = _encoded_like_generate(model, images.inputs)
        cache = generation_cache(model)
        kwargs = {} if cache is None else {_cache_argument(model): cache}
        if images is not None:
            kwargs.update(image_kwargs)
            del image_kwargs
        out = model(input_ids=ids.clone(), position_ids=position_ids, use_cache=True,
                    logits_to_keep=1, **kwargs)
        tracker.segment = ()
        states = [out[key] for key in out if key in _OUTPUT_STATE_KEYS]
        for tensor in _cache_tensors([cache, *states]):
            serial = tracker.serial_of(tensor)
            if serial is not None:
                seen.kv_cache.add(serial)
        next_logits = out.logits[:, -1, :].to(copy=True, dtype=torch.float32)
        del out, next_logits, position_ids, states, cache, kwargs, images
    tracker.phase = "done"


def _encoded_like_generate(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The image inputs as ``generate`` hands them to the prefill: a model whose forward
    takes ``mm_encoder_outputs`` has its images encoded first (GenerationMixin's own
    ``_prepare_multimodal_encoder_kwargs_for_generation``, before the text embeddings
    exist), the others get the pixel values in the forward."""
    prepare = getattr(model, "_prepare_multimodal_encoder_kwargs_for_generation", None)
    supports = getattr(model, "_supports_mm_encoder_outputs", None)
    modalities = getattr(model, "input_modalities", ()) or ()
    if prepare is None or supports is None or not supports() or \
            not any(kind in modalities for kind in ("image", "video")):
        return dict(inputs)
    return prepare(dict(inputs))


def _image_inputs(model: nn.Module, workload: Workload, ids: torch.Tensor) -> Any:
    """The images of a vision-language workload (planner/vision.py): their placeholder
    tokens written into ``ids``, the pixel values and the processor's extras; None
    without images."""
    if not workload.images:
        return None
    from qplan.planner.vision import image_batch

    return image_batch(model, ids, workload.images, workload.image_size)


def make_optimizer(params: list[nn.Parameter], name: str, device: torch.device) -> Any:
    """The optimizer ``name`` as a training run builds it (transformers' defaults)."""
    if name == "adamw":
        # transformers 5.x defaults to torch's fused AdamW (adamw_torch_fused); the trace
        # lets it run on meta (planner/trace.py), so every device takes the same kernel.
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        import bitsandbytes as bnb

        # Paging needs CUDA managed memory (cget_managed_ptr, absent from CPU builds and
        # meaningless on meta). The paged optimizer's states have the non-paged one's
        # layout, so off CUDA the trace runs that and marks the buffers that would be paged
        # (run_training); a real CUDA run takes the paged class.
        paged = name.startswith("paged") and device.type == "cuda"
        cls = bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit
        return cls(params, lr=1e-4)
    if name in TORCHAO_OPTIMIZERS:
        # HF TrainingArguments' adamw_torch_8bit / adamw_torch_4bit: torchao's AdamW8bit
        # (uint8 codes + a float32 scale per 256 values + a 256-entry float32 code map,
        # per state tensor) and AdamW4bit (4-bit codes packed two a byte, a scale per 128
        # values, a 16-entry map); parameters under 4096 values, or not a whole number
        # of blocks, keep plain states in the parameter's dtype (torchao's _new_buffer).
        try:
            from torchao import optim as torchao_optim
        except ImportError:
            raise UsageError(
                f"--optimizer {name} is torchao's; pip install torchao (or qplan[torchao])"
            ) from None

        return getattr(torchao_optim, TORCHAO_OPTIMIZERS[name])(params, lr=1e-4)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-4)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=1e-4, scale_parameter=False, relative_step=False)
    raise ValueError(f"unknown optimizer {name!r}")


TORCHAO_OPTIMIZERS = {"adamw_torch_8bit": "AdamW8bit", "adamw_torch_4bit": "AdamW4bit"}


def _plain_tensors(value: torch.Tensor) -> Iterator[torch.Tensor]:
    """The tensors that own memory: a tensor subclass (torchao's quantised optimizer
    states) is a wrapper around the inner tensors its ``__tensor_flatten__`` names."""
    flatten = getattr(type(value), "__tensor_flatten__", None)
    if flatten is None:
        yield value
        return
    names, _ = value.__tensor_flatten__()
    for name in names:
        yield from _plain_tensors(getattr(value, name))


def _optimizer_state_tensors(optimizer: Any) -> Iterator[torch.Tensor]:
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                yield from _plain_tensors(value)


@contextlib.contextmanager
def optimizer_step_mode(name: str) -> Iterator[None]:
    """torchao's low-bit AdamW compiles its per-parameter update (torch.compile), which
    refuses to run under the live-tensor tracker (a TorchDispatchMode) and takes minutes
    to build on CPU: the update runs eagerly instead, the same code on the same state
    tensors. Eager keeps fp32 copies of one parameter's states while it updates it; the
    compiled GPU kernel fuses them, so the optimizer phase's transient is an upper bound
    by a few fp32 copies of the largest trainable parameter (the states are exact)."""
    if name not in TORCHAO_OPTIMIZERS:
        yield
        return
    def eager(model: Any = None, **_: Any) -> Any:
        return model if model is not None else (lambda fn: fn)

    with swapped((torch, "compile", eager)):
        yield


def _paged_state_serials(optimizer: Any, tracker: LiveTensorTracker) -> Iterator[int]:
    """The state buffers a paged bitsandbytes optimizer allocates as managed memory."""
    for param, state in optimizer.state.items():
        if param.numel() < PAGED_MIN_NUMEL:
            continue
        for key in PAGED_STATE_KEYS:
            value = state.get(key)
            serial = tracker.serial_of(value) if isinstance(value, torch.Tensor) else None
            if serial is not None:
                yield serial


def segment_by_layer(model: nn.Module, tracker: LiveTensorTracker,
                     pattern: LayerPattern = HOMOGENEOUS) -> list[Any]:
    """Name the parts of the forward and the backward by decoder layer (``segment_keys``),
    plus ``embed`` (before the first layer's forward) and ``head`` (after the last layer's
    forward: final norm, lm_head, loss; and the backward's start, down to the last layer).

    Each part's peak is linear in the model's depth, while a phase's overall peak is the
    largest of several (in the backward: an early one, the fp32 logits and their gradient,
    and a late one, every gradient made): a maximum of lines, which a line through two
    shallow traces cannot follow. Deep models are extrapolated part by part
    (planner/components.py). A pre-hook on each layer marks its forward; a tensor hook on
    its output marks its backward (and, with gradient checkpointing, its recomputation),
    which begins when that gradient arrives. The hooks change no tensor.
    """
    from qplan.planner.inventory import decoder_layers

    names = decoder_layers(model)
    handles = []
    for index, name in enumerate(names):
        keys = segment_keys(index, len(names), pattern)
        last = index == len(names) - 1

        def on_input(module: nn.Module, args: Any, keys: tuple[str, ...] = keys) -> None:
            if tracker.phase == "forward":  # not the recomputation inside the backward
                tracker.segment = keys

        def on_backward(grad: torch.Tensor, keys: tuple[str, ...] = keys) -> None:
            if tracker.phase == "backward":
                tracker.segment = keys

        def on_output(module: nn.Module, args: Any, output: Any, last: bool = last,
                      on_backward: Any = on_backward) -> None:
            if tracker.phase != "forward":
                return
            first = _first_tensor(output)
            if first is not None and first.requires_grad:
                first.register_hook(on_backward)
            if last:
                tracker.segment = ("head",)

        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(on_input))
        handles.append(module.register_forward_hook(on_output))
    return handles


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, torch.Tensor)), None)
    return None


def training_shape(workload: Workload) -> tuple[int, int]:
    """(rows, tokens per row) of a training batch: Axolotl's sample packing puts the
    micro-batch in one row of ``batch x seq_len`` tokens (MultipackBatchSampler with
    batch_size 1 and batch_max_len = micro_batch_size x sequence_len), a full row as the
    most it packs; otherwise ``batch`` rows of ``seq_len``."""
    if workload.sample_packing:
        return 1, workload.batch * workload.seq_len
    return workload.batch, workload.seq_len


def packed_position_ids(workload: Workload, device: torch.device) -> torch.Tensor:
    """Position ids of ``batch`` sequences of ``seq_len`` tokens packed in one row."""
    return torch.arange(workload.seq_len, device=device).repeat(workload.batch)[None, :]


def _step_context(model: nn.Module, workload: Workload, tracker: LiveTensorTracker) -> Any:
    """What the forward and backward run under: Axolotl's activation offloading wraps its
    training_step (planner/offload.py), nothing otherwise."""
    if not workload.activation_offloading:
        return contextlib.nullcontext()
    from qplan.planner.offload import offload_step

    return offload_step(model, tracker)


def run_training(
    model: nn.Module,
    workload: Workload,
    tracker: LiveTensorTracker,
    seen: StepTensors,
    steps: int = 2,
    loss_of: Callable[[nn.Module], torch.Tensor] | None = None,
    accumulation: int = 1,
    loss_reads: tuple[nn.Module, ...] | None = None,
    loss_accumulates: bool = False,
) -> None:
    """Trainer's loop; ``loss_of(model)``: the forward and loss of a workload whose loss is
    not the causal-LM one (a preference trainer's ``compute_loss``), on its own inputs.
    ``accumulation``: micro-steps per optimizer step (gradient accumulation: the gradients
    stay between them, clipping and the update run after the last). ``loss_reads``: given
    where ``loss_of`` reads nothing but the model, these modules (a frozen reference model)
    and inputs made before the loop, and keeps nothing of one step for the next; its later
    steps may then be counted from the first's log (planner/repeated_steps.py). None: the
    loss may keep state between steps, and every step runs. ``loss_accumulates``: such a
    loss keeps storages of its steps outside the model, only by accumulating them (ORPO's
    stored metrics), none of them freed by a later step."""
    device = model_device(model)
    vocab = model.config.get_text_config().vocab_size
    if loss_of is None:
        rows, length = training_shape(workload)
        ids = input_ids(rows, length, vocab, device)
        images = _image_inputs(model, workload, ids)
        labels = ids.clone()
        image_kwargs = {} if images is None else dict(images.inputs)
        # Packed: Axolotl's multipack collator restarts the position ids at every sequence,
        # which transformers reads as packing (a block-diagonal mask, or varlen flash).
        position_ids = packed_position_ids(workload, device) if workload.sample_packing else None
        if images is not None and images.position_ids is not None:
            position_ids = images.position_ids
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, workload.optimizer, device)
    model.train()
    # The later optimizer steps' forward and backward counted from the first's log where
    # they provably run the same (planner/repeated_steps.py).
    own_state = loss_of is not None and loss_reads is None
    repeater = (StepRepeater(model, params, tracker, seen, loss_reads or (),
                             keeps=loss_accumulates)
                if repeatable(params, workload, own_state) else None)

    def forward_backward() -> None:
        with _step_context(model, workload, tracker):
            tracker.phase, tracker.segment = "forward", ("embed",)
            if loss_of is not None:
                loss = loss_of(model)
            elif workload.fused_ce is not None:
                loss = fused_ce_loss(model, ids, workload.fused_ce, labels, position_ids,
                                     image_kwargs)
            else:
                out = model(input_ids=ids, labels=labels, position_ids=position_ids,
                            use_cache=False, **image_kwargs)
                loss = out.loss
                del out
            tracker.phase, tracker.segment = "backward", ("head",)
            loss.backward()
            tracker.segment = ()
            del loss
        for param in params:
            if param.grad is not None:
                serial = tracker.serial_of(param.grad)
                if serial is not None:
                    seen.gradients.add(serial)

    for first in range(0, steps, accumulation):
        micros = range(first, min(first + accumulation, steps))
        whole = len(micros) == accumulation
        if not (repeater is not None and first > 0 and whole and repeater.repeat()):
            recording = (repeater.recording() if repeater is not None and first == 0 and whole
                         else contextlib.nullcontext())
            with recording:
                for _ in micros:
                    forward_backward()
        if not whole:
            # An accumulation cut short: no update.
            break
        tracker.phase = "optimizer"
        # Trainer's max_grad_norm=1.0 (accelerate's clip_grad_norm_ -> torch's).
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        with optimizer_step_mode(workload.optimizer):
            optimizer.step()
        for tensor in _optimizer_state_tensors(optimizer):
            serial = tracker.serial_of(tensor)
            if serial is None and tensor.device == device:
                # Made from Python data (torchao's code maps: torch.tensor(list,
                # device=...)): no op the tracker sees on an accelerator or on meta, only
                # on CPU; count it from here, the same on every device.
                serial = tracker.add(tensor)
            if serial is not None:
                seen.optimizer_states.add(serial)
        if workload.optimizer.startswith("paged"):
            seen.paged_states.update(_paged_state_serials(optimizer, tracker))
        optimizer.zero_grad(set_to_none=True)
    tracker.phase = "done"


def run_workload(model: nn.Module, workload: Workload, tracker: LiveTensorTracker,
                 pattern: LayerPattern = HOMOGENEOUS) -> StepTensors:
    """Track the model's tensors, then run the workload; returns what each storage was.
    ``pattern``: the decoder layers' structure, for naming the parts of each phase."""
    step = workload.kind.step
    if step is None:
        raise ValueError(f"--mode {workload.mode} runs no step to trace")
    seen = StepTensors()
    track_model(model, tracker, seen)
    handles = segment_by_layer(model, tracker, pattern)
    try:
        with tracker:
            step(model, workload, tracker, seen)
    finally:
        for handle in handles:
            handle.remove()
    seen.host_peak = tracker.host_peak
    return seen
