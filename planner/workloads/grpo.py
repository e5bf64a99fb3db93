"""GRPO through ``trl.GRPOTrainer`` with generation through transformers (``use_vllm`` off):
each training step first generates, then trains on what it generated.

* Generation (``_generate_single_turn``): the policy's ``generate`` on ``batch x
  steps_per_generation`` prompt rows (TRL's generation batch: ``num_generations`` rows per
  prompt, every prompt repeated) of ``seq_len`` tokens, sampling ``max_completion_length``
  tokens each, in train mode, under no_grad, with gradient checkpointing switched off
  (``unwrap_model_for_generation``). Its peak is the larger of the prefill (the prompt
  through the model into the KV cache, the last position's logits) and the last decoding
  step (the cache holding prompt + completion - 1 tokens growing by one, the growing ids
  and masks, the sampling step's float32 logits and probabilities); every step between
  holds a shorter cache. The optimizer states of the previous step stay resident.
* The reference's per-token log-probs when ``beta`` > 0 (TRL's default beta is 0.0: no
  reference at all): the adapter-disabled policy under LoRA, a frozen copy under full
  fine-tuning, through TRL's own ``_get_per_token_logps_and_entropies`` under no_grad.
* The policy step: TRL's ``compute_loss`` (its fused LM head: per-token log-probs and
  entropies of the completion tokens without [rows, seq, vocab] logits) over ``batch``
  rows of prompt + completion, backward, clipping, the optimizer (planner/steps.py).

The generated tokens are data (sampled); qplan plans every completion at
``max_completion_length`` (TRL pads to the longest, and a sampled batch rarely ends every
row early). Rewards from Python functions run on the host and cost no GPU memory; a
reward *model* (a second network TRL runs on the completions) is not planned.

``rl: grpo`` in Axolotl (``trl:`` keys num_generations, max_completion_length, beta,
use_vllm); ``--mode grpo``. ``--batch`` is TRL's per_device_train_batch_size: completions
per device per step, not prompts; ``--seq-len`` is the prompt length (TRL 1.x keeps
prompts whole, left-padded to the longest)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from qplan.errors import UsageError
from qplan.planner.workloads import preference
from qplan.planner.workloads.finetune import prepare
from qplan.planner.workloads.kind import WorkloadKind, WorkloadOption

# GRPOConfig's defaults (TRL 1.x).
NUM_GENERATIONS = WorkloadOption(
    "num_generations", 8,
    "GRPO: completions sampled per prompt (TRL's default 8); the generation batch "
    "(batch x steps_per_generation rows) must hold whole groups of them",
)
MAX_COMPLETION_LENGTH = WorkloadOption(
    "max_completion_length", 512,
    "GRPO: tokens generated per completion (TRL's default 512), planned at full length",
)
BETA = WorkloadOption(
    "beta", 0.0,
    "GRPO: KL coefficient (TRL's default 0.0 keeps no reference model; > 0 adds the "
    "reference's log-probs: the adapter-disabled base for LoRA, a frozen copy for full)",
)
STEPS_PER_GENERATION = WorkloadOption(
    "steps_per_generation", 1,
    "GRPO: training steps per generation (TRL's default: gradient_accumulation_steps); "
    "one generation covers batch x steps_per_generation rows",
)
# The prompt length's default when --seq-len is not given: TRL's former max_prompt_length.
DEFAULT_PROMPT_LEN = 512
GENERATE_PHASE = "generate"
# The name of the reference adapter GRPOTrainer adds to a peft model when beta > 0.
REFERENCE_ADAPTER = "ref"
REFERENCE_PHASE = "reference"


# Bounds in the spirit of --batch and --seq-len's.
LIMITS = {"num_generations": 1 << 20, "max_completion_length": 1 << 24,
          "steps_per_generation": 1 << 16}


def _check(mode: str, options: Mapping[str, Any]) -> None:
    for name, most in LIMITS.items():
        if not 1 <= int(options[name]) <= most:
            raise UsageError(f"--mode {mode} option {name} must be between 1 and {most}, not "
                             f"{options[name]}")
    if int(options["num_generations"]) < 2:
        raise UsageError(f"--mode {mode} needs num_generations of at least 2 (GRPO compares "
                         "the completions of one prompt)")
    if float(options["beta"]) < 0:
        raise UsageError(f"--mode {mode} option beta must be 0 or more, not {options['beta']}")


class _Accelerator(preference.MetricsAccelerator):
    """The accelerator GRPO's ``compute_loss`` reads, for one process."""

    is_main_process = True
    num_processes = 1
    sync_gradients = True

    def reduce(self, tensor: Any, reduction: str = "sum") -> Any:
        return self.gather(tensor)


def _trainer(args: Any, model: Any, ref: Any) -> Any:
    """A GRPOTrainer with what ``compute_loss`` and the log-prob helper read, as its
    ``__init__`` sets them from the config."""
    from trl import GRPOTrainer

    trainer = preference.trainer_shell(GRPOTrainer, args, model, ref)
    trainer.accelerator = _Accelerator(trainer.accelerator.device)
    trainer.beta = args.beta
    trainer.loss_type = args.loss_type
    trainer.importance_sampling_level = args.importance_sampling_level
    trainer.epsilon_low = args.epsilon
    trainer.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    trainer.top_entropy_quantile = args.top_entropy_quantile
    trainer.off_policy_mask_threshold = args.off_policy_mask_threshold
    trainer.entropy_coef = args.entropy_coef
    trainer.use_adaptive_entropy = args.use_adaptive_entropy
    trainer._entropy_bonus_enabled = args.entropy_coef != 0.0 or args.use_adaptive_entropy
    trainer._last_world_entropy = float("inf")
    trainer._entropy_window_stats = None
    trainer.max_completion_length = args.max_completion_length
    trainer.num_iterations = args.num_iterations
    trainer.use_vllm = False
    trainer.vllm_importance_sampling_correction = False
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    return trainer


@contextlib.contextmanager
def _generation_mode(model: Any, workload: Any) -> Iterator[None]:
    """``unwrap_model_for_generation`` on one process: checkpointing off while generating
    (the cache needs ``use_cache``), back on after; no_grad (``_generate_single_turn``)."""
    import torch

    from qplan.planner.training_setup import gc_kwargs

    checkpointing = bool(getattr(model, "is_gradient_checkpointing", False))
    if checkpointing:
        model.gradient_checkpointing_disable()
    try:
        with torch.no_grad():
            yield
    finally:
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs(workload))


def _sample(model: Any, out: Any, ids: Any, mask: Any, positions: Any) -> tuple[Any, ...]:
    """One step of GenerationMixin._sample after the forward: the mask and position ids
    grow by one (``_update_model_kwargs_for_generation``), the last position's logits are
    copied to float32, softmax, multinomial, and the ids grow by the sampled token."""
    import torch

    mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
    step = torch.arange(1, dtype=positions.dtype, device=positions.device).view(1, -1)
    positions = torch.cat([positions, step + positions[..., -1:] + 1], dim=-1)
    logits = out.logits[:, -1].to(copy=True, dtype=torch.float32)
    del out
    probs = torch.nn.functional.softmax(logits, dim=-1)
    tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
    del logits, probs
    ids = torch.cat([ids, tokens[:, None]], dim=-1)
    return ids, mask, positions


def _generate(model: Any, workload: Any, tracker: Any, seen: Any) -> tuple[Any, Any]:
    """The memory of ``model.generate`` for TRL's generation batch: its prefill, and its
    last decoding step over a cache of prompt + completion - 2 tokens. That cache is made
    by one untracked forward and then counted tensor by tensor (a cache's tensors are the
    same after one long forward as after many one-token steps); the steps between hold
    less. Returns the prompt ids and the completion ids TRL keeps."""
    import torch

    from qplan.planner.steps import (
        _cache_argument,
        _cache_tensors,
        generation_cache,
        input_ids,
        model_device,
    )

    device = model_device(model)
    vocab = model.config.get_text_config().vocab_size
    rows = workload.batch * int(workload.option("steps_per_generation"))
    prompt, completion = workload.seq_len, int(workload.option("max_completion_length"))
    cache_key = _cache_argument(model)
    # TRL's left-padded prompt batch (nothing to pad: every prompt planned at seq_len).
    prompt_ids = input_ids(rows, prompt, vocab, device)
    prompt_mask = torch.ones_like(prompt_ids)
    positions = (prompt_mask.long().cumsum(-1) - 1).masked_fill(prompt_mask == 0, 0)
    cache = generation_cache(model)
    kwargs = {} if cache is None else {cache_key: cache}
    out = model(input_ids=prompt_ids.clone(), attention_mask=prompt_mask,
                position_ids=positions, use_cache=True, logits_to_keep=1, **kwargs)
    _mark_cache(tracker, seen, cache, out)
    ids, mask, positions = _sample(model, out, prompt_ids, prompt_mask, positions)
    del out, cache, kwargs, ids, mask, positions
    if completion > 1:
        # The last step: ids, mask and positions of prompt + completion - 1 tokens.
        length = prompt + completion - 1
        ids = input_ids(rows, length, vocab, device)
        mask = torch.ones_like(ids)
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        cache = generation_cache(model)
        kwargs = {} if cache is None else {cache_key: cache}
        with tracker.untracked():
            filled = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1],
                           position_ids=positions[:, :-1], use_cache=True, logits_to_keep=1,
                           **kwargs)
        states = [filled[key] for key in filled if key in ("cache", "past_key_values", "state")]
        del filled
        for tensor in _cache_tensors([cache, *states]):
            tracker.add(tensor)
        if cache is None and states:
            kwargs = {cache_key: states[0]}
        out = model(input_ids=ids[:, -1:].clone(), attention_mask=mask,
                    position_ids=positions[:, -1:].clone(), use_cache=True, logits_to_keep=1,
                    **kwargs)
        _mark_cache(tracker, seen, cache, out)
        ids, mask, positions = _sample(model, out, ids, mask, positions)
        del out, cache, kwargs, states, mask, positions, ids
    completion_ids = input_ids(rows, completion, vocab, device)
    return prompt_ids, completion_ids


def _mark_cache(tracker: Any, seen: Any, cache: Any, out: Any) -> None:
    from qplan.planner.steps import _cache_tensors

    states = [out[key] for key in out if key in ("cache", "past_key_values", "state")]
    for tensor in _cache_tensors([cache, *states]):
        serial = tracker.serial_of(tensor)
        if serial is not None:
            seen.kv_cache.add(serial)


def _reference_adapter(model: Any, tracker: Any, seen: Any) -> None:
    """GRPOTrainer given a peft model and beta > 0 adds a "ref" adapter, a copy of the
    policy's, as the reference (its ``__init__``); it is counted as the reference model.
    (Given a base model and ``peft_config`` instead, TRL disables the adapter: no copy.)"""
    import torch

    config = model.peft_config["default"]
    model.add_adapter(REFERENCE_ADAPTER, config)
    # peft places a new adapter on its base layer's device, but leaves it on the host for
    # a meta base layer: on the device, as in the real run.
    device = next(model.parameters()).device
    for module in model.modules():
        for attr in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
            adapters = getattr(module, attr, None)
            if adapters is None or REFERENCE_ADAPTER not in adapters:
                continue
            adapter = adapters[REFERENCE_ADAPTER]
            if isinstance(adapter, torch.nn.Module):
                adapter.to(device)
            else:  # an embedding's adapter: a bare parameter
                adapters[REFERENCE_ADAPTER] = torch.nn.Parameter(
                    adapter.to(device), requires_grad=adapter.requires_grad)
    role = seen.roles.setdefault(preference.REFERENCE_ROLE, set())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f".{REFERENCE_ADAPTER}." in name:
                source = model.get_parameter(name.replace(f".{REFERENCE_ADAPTER}.", ".default."))
                param.data.copy_(source.data)
                serial = tracker.add(param)
                seen.adapters.discard(serial)
                if serial is not None:
                    role.add(serial)


def _scored_batch(trainer: Any, model: Any, ref: Any, workload: Any, prompt_ids: Any,
                  completion_ids: Any) -> list[dict[str, Any]]:
    """What ``_generate_and_score_completions`` returns, split in ``steps_per_generation``
    training batches: ids and masks (TRL's ``pad``: ones for unpadded rows), the
    advantages, and the reference's per-token log-probs when beta > 0."""
    import torch
    from trl.trainer.utils import use_adapter

    device = prompt_ids.device
    prompt_mask = torch.ones_like(prompt_ids)
    completion_mask = torch.ones_like(completion_ids)
    batch: dict[str, Any] = {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
        "completion_ids": completion_ids, "completion_mask": completion_mask,
    }
    if float(workload.option("beta")) != 0.0:
        ids = torch.cat([prompt_ids, completion_ids], dim=1)
        mask = torch.cat([prompt_mask, completion_mask], dim=1)
        keep = completion_ids.size(1)
        with torch.no_grad(), _generation_mode(model, workload):
            if ref is not None:
                logps, _, _ = trainer._get_per_token_logps_and_entropies(
                    ref, ids, mask, keep, batch_size=workload.batch)
            else:
                with use_adapter(model, adapter_name=REFERENCE_ADAPTER):
                    logps, _, _ = trainer._get_per_token_logps_and_entropies(
                        model, ids, mask, keep, batch_size=workload.batch)
        del ids, mask
        batch["ref_per_token_logps"] = logps
    rows = prompt_ids.size(0)
    batch["advantages"] = torch.zeros(rows, dtype=torch.float32, device=device)
    batch["num_items_in_batch"] = completion_mask.sum()
    steps = int(workload.option("steps_per_generation"))
    size = rows // steps
    return [
        {key: value[i * size:(i + 1) * size] if value.dim() else value
         for key, value in batch.items()}
        for i in range(steps)
    ]


def step(model: Any, workload: Any, tracker: Any, seen: Any) -> None:
    with preference.trace_quiet():
        from trl import GRPOConfig

    from qplan.planner.steps import run_training
    from qplan.planner.training_setup import gc_kwargs

    generations = int(workload.option("num_generations"))
    steps = int(workload.option("steps_per_generation"))
    if workload.batch * steps % generations:
        raise UsageError(
            f"--mode grpo: the generation batch (batch {workload.batch} x steps_per_generation "
            f"{steps}) must be a multiple of num_generations {generations}; TRL refuses it"
        )
    beta = float(workload.option("beta"))
    ref = None
    if beta != 0.0 and workload.tuning == "full":
        ref = preference.reference_copy(model, tracker, seen)
    elif beta != 0.0:
        _reference_adapter(model, tracker, seen)
    with preference.trace_quiet():
        args = GRPOConfig(
            output_dir=preference.scratch_dir(), per_device_train_batch_size=workload.batch,
            num_generations=generations, gradient_accumulation_steps=steps,
            max_completion_length=int(workload.option("max_completion_length")), beta=beta,
            use_cpu=True, report_to=[], gradient_checkpointing=workload.gradient_checkpointing,
            gradient_checkpointing_kwargs=gc_kwargs(workload),
        )
    trainer = _trainer(args, model, ref)
    preference.check_fused_lm_head(model, workload.mode)
    buffered: list[dict[str, Any]] = []
    done = [0]
    # Micro-steps traced per optimizer step: the third and later of an accumulation hold
    # what the second holds (the accumulated gradients, every buffered batch).
    micro = min(steps, 2)

    def loss_of(m: Any) -> Any:
        # Trainer.training_step: _prepare_inputs generates every steps_per_generation steps
        # (the previous batch stays buffered until the new one replaces it), then the loss.
        if done[0] % micro == 0:
            tracker.phase, tracker.segment = GENERATE_PHASE, ()
            with _generation_mode(m, workload):
                prompt_ids, completion_ids = _generate(m, workload, tracker, seen)
            tracker.phase = REFERENCE_PHASE
            buffered[:] = _scored_batch(trainer, m, ref, workload, prompt_ids, completion_ids)
            del prompt_ids, completion_ids
            tracker.phase, tracker.segment = "forward", ("embed",)
        inputs = buffered[done[0] % micro]
        done[0] += 1
        return trainer.compute_loss(m, inputs)

    # TRL generates once per optimizer step (steps_per_generation is the gradient
    # accumulation): two of them, the second generation beside the first update's
    # optimizer states, the gradients kept between the micro-steps of one.
    with preference.fused_lm_heads(model, ref, ("log_probs", "entropy"),
                                   temperature=args.temperature):
        run_training(model, workload, tracker, seen, steps=2 * micro, loss_of=loss_of,
                     accumulation=micro)


def _batch_multiple(workload: Any) -> int:
    """The smallest batch step whose generation batch holds whole groups."""
    import math

    generations = int(workload.option("num_generations"))
    return generations // math.gcd(generations, int(workload.option("steps_per_generation")))


def _from_axolotl(raw: Mapping[str, Any], adapter: str | None) -> dict[str, Any]:
    """Axolotl's ``adapter`` and its ``trl:`` keys; TRL's steps_per_generation default is
    the run's gradient_accumulation_steps."""
    trl = raw.get("trl") or {}
    options: dict[str, Any] = {"adapter": adapter or "full"}
    for name in ("num_generations", "max_completion_length", "beta"):
        if trl.get(name) is not None:
            options[name] = trl[name]
    if trl.get("beta") is None and raw.get("rl_beta") is not None:
        options["beta"] = raw["rl_beta"]
    accumulation = raw.get("gradient_accumulation_steps")
    if accumulation:
        options["steps_per_generation"] = int(accumulation)
    return options


def _axolotl_not_modelled(raw: Mapping[str, Any]) -> dict[str, str]:
    """vLLM generation and reward models are not planned: said in one line each."""
    trl = raw.get("trl") or {}
    found: dict[str, str] = {}
    if trl.get("use_vllm"):
        found["trl"] = ("trl.use_vllm: true generates with vLLM (its own engine or server), "
                        "which qplan does not plan; planned as transformers' generate on "
                        "the training GPU")
    models = [f for f in trl.get("reward_funcs") or [] if isinstance(f, str) and "/" in f]
    if models:
        found["trl.reward_funcs"] = (f"reward model {models[0]}: a second network on the "
                                     "GPU, not planned (Python reward functions cost none)")
    return found


def _to_axolotl(workload: Any) -> dict[str, Any]:
    return {
        "rl": "grpo",
        "trl": {
            "num_generations": int(workload.option("num_generations")),
            "max_completion_length": int(workload.option("max_completion_length")),
            "beta": float(workload.option("beta")),
            "use_vllm": False,
        },
        "gradient_accumulation_steps": int(workload.option("steps_per_generation")),
    }


def _replan(workload: Any, four_bit: bool) -> dict[str, Any]:
    options = dict(workload.extra)
    if options["adapter"] == "lora" and four_bit:
        options["adapter"] = "qlora"
    return options


KINDS = (
    WorkloadKind(
        name="grpo",
        summary="GRPO (TRL): generate completions, then train on them",
        tuning=preference.adapter_tuning, step=step, default_seq_len=DEFAULT_PROMPT_LEN,
        prepare=prepare,
        options=(preference.ADAPTER, NUM_GENERATIONS, MAX_COMPLETION_LENGTH, BETA,
                 STEPS_PER_GENERATION),
        roles=(preference.REFERENCE_ROLE,), weight_copies=(preference.REFERENCE_ROLE,),
        check=_check, axolotl_rl=("grpo",), needs=("trl",), causal_lm_step=False,
        from_axolotl=_from_axolotl, to_axolotl=_to_axolotl, replan=_replan,
        axolotl_keys=("trl", "rl_beta", "gradient_accumulation_steps"),
        axolotl_not_modelled=_axolotl_not_modelled, batch_multiple=_batch_multiple,
    ),
)
