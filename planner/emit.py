"""Turn a Report into configs people run: a transformers snippet, a peft snippet, Axolotl YAML.

Pure text generation: no torch, no transformers, no files. Every value comes from the
report (the chosen candidate and ``report.workload``), so what is emitted is what was
planned; settings the report does not record fall back to the ``Workload`` defaults.
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

from qplan.errors import UsageError
from qplan.planner.families import auto_class_of
from qplan.planner.precision import PRECISIONS
from qplan.planner.quant import QuantSettings
from qplan.planner.workload import Workload

# qplan optimizer -> the Axolotl / HF TrainingArguments name that runs it.
AXOLOTL_OPTIMIZERS = {
    "adamw": "adamw_torch_fused",
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "adamw_torch_8bit": "adamw_torch_8bit",
    "adamw_torch_4bit": "adamw_torch_4bit",
    "sgd": "sgd",
    "adafactor": "adafactor",
}
# Fused linear cross-entropy -> the Axolotl plugin and key that turn it on.
LIGER_PLUGIN = "axolotl.integrations.liger.LigerPlugin"
AXOLOTL_FUSED_CE: dict[str, dict[str, Any]] = {
    "cce": {
        "plugins": ["axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"],
        "cut_cross_entropy": True,
    },
    "liger": {
        "plugins": ["axolotl.integrations.liger.LigerPlugin"],
        "liger_fused_linear_cross_entropy": True,
    },
}

# A training strategy across GPUs -> the Axolotl keys that ask for it (read back by
# loaders/axolotl_sharding.py). DeepSpeed: the file of Axolotl's deepspeed_configs/ with
# exactly that ZeRO stage and offload, inline where it ships none (its zero2.json offloads
# the optimizer); FSDP: FSDP2 as Axolotl's own examples write it.
_DEEPSPEED_AUTO = {
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
}
AXOLOTL_STRATEGY_KEYS: dict[str, dict[str, Any]] = {
    "ddp": {"ddp": True},
    "zero2": {"deepspeed": {"zero_optimization": {"stage": 2, "overlap_comm": True,
                                                  "contiguous_gradients": True},
                            **_DEEPSPEED_AUTO}},
    "zero2+offload": {"deepspeed": "deepspeed_configs/zero2.json"},
    "zero3": {"deepspeed": "deepspeed_configs/zero3_bf16.json"},
    "zero3+offload": {"deepspeed": "deepspeed_configs/zero3_bf16_cpuoffload_all.json"},
    "fsdp": {"fsdp_version": 2, "fsdp_config": {"offload_params": False}},
    "fsdp+offload": {"fsdp_version": 2, "fsdp_config": {"offload_params": True}},
}


def _gc_kwargs(workload: Workload) -> str:
    return f'{{"use_reentrant": {workload.gc_reentrant}}}'


def workload_of(report: Any) -> Workload:
    """The Workload a report was planned for; keys it lacks take the Workload defaults.

    Reports only carry JSON types, so the targets list comes back as a tuple here.
    """
    data = dict(report.workload)
    known = {f.name for f in fields(Workload)}
    values = {k: v for k, v in data.items() if k in known and v is not None}
    for name in ("unfrozen_parameters", "lora_target_parameters"):
        if name in values:
            values[name] = tuple(values[name])
    if "image_size" in values:
        values["image_size"] = tuple(values["image_size"])
    mode = str(values.get("mode", "inference"))
    from qplan.planner.workloads import WORKLOADS

    kind = WORKLOADS.get(mode)
    if kind is not None and kind.options:
        # The mode's own options sit beside the common ones in the report.
        values["extra"] = kind.parse_options(
            {o.name: data[o.name] for o in kind.options if data.get(o.name) is not None})
    if "lora_targets" in values:
        targets = values["lora_targets"]
        values["lora_targets"] = (targets,) if isinstance(targets, str) else tuple(targets)
    return Workload(**values)


def chosen_precision(report: Any, precision: str | None = None) -> str:
    """``precision`` when given (it must be a candidate), else the recommendation."""
    names = [c.precision for c in report.candidates]
    if precision is not None:
        if precision not in names:
            raise UsageError(
                f"precision {precision!r} is not in the plan ({', '.join(names)}); "
                "pick one of those"
            )
        return precision
    if report.recommendation is None:
        raise UsageError(
            f"nothing fits {report.gpu.name}, so there is no recommendation to emit; "
            "name a precision (--precisions) or pick a bigger GPU"
        )
    return str(report.recommendation.precision)


def _compute_dtype(report: Any, precision: str) -> str:
    return str(report.candidate(precision).compute_dtype)


def settings_of(report: Any, precision: str) -> QuantSettings:
    """The method settings ``report`` planned ``precision`` with."""
    skips = report.workload.get("skip_modules")
    return QuantSettings(
        _compute_dtype(report, precision),
        str(report.workload.get("quant_storage") or "uint8"),
        tuple(skips) if skips is not None else None,
    )


def _placement(report: Any, quantized: bool | float) -> tuple[list[str], list[str]]:
    """Lines defining the planned placement, and the from_pretrained arguments using it.

    Several GPUs: the exact device map and max_memory qplan planned (accelerate's split with
    qplan's budgets), not "auto", so the load is the one estimated.
    """
    strategy = getattr(report, "strategy", None)
    if report.gpu.count > 1 and strategy is not None and strategy.device_map:
        from qplan.planner.device_map import from_pretrained_max_memory

        entries = [f"    {name!r}: {device!r}," for name, device in strategy.device_map.items()]
        lines = ["device_map = {", *entries, "}"]
        call = ["    device_map=device_map,"]
        if strategy.max_memory:
            memory = from_pretrained_max_memory(strategy.max_memory, quantized)
            lines.append(f"max_memory = {memory!r}")
            call.append("    max_memory=max_memory,")
        return lines, call
    if report.gpu.count > 1:
        return [], ['    device_map="auto",']
    return [], ['    device_map={"": 0},']


def _exclude_line(report: Any) -> list[str]:
    # A frozen vision tower: one regular expression (it holds the refused names too).
    regex = report.workload.get("lora_exclude_regex")
    if regex:
        return [f"    exclude_modules={json.dumps(regex)},"]
    excluded = report.workload.get("lora_exclude_modules")
    return [f"    exclude_modules={json.dumps(list(excluded))},"] if excluded else []


def emit_transformers(report: Any, precision: str | None = None) -> str:
    """A Python snippet that loads the model with the planned precision and placement."""
    precision = chosen_precision(report, precision)
    prec = PRECISIONS[precision]
    workload = workload_of(report)
    dtype = _compute_dtype(report, precision)
    config_class, config_lines = prec.method.emit_config(prec, settings_of(report, precision))
    stored = getattr(report.model, "quantization", None) or {}
    if precision == stored.get("dequantizes_to"):
        # The checkpoint's own quantization config, dequantised at load.
        fields = {"quant_method": stored["method"], "dequantize": True}
        config_class = "AutoQuantizationConfig"
        config_lines = [f"quantization_config = AutoQuantizationConfig.from_dict({fields!r})"]
    auto = auto_class_of(report.model.architecture)
    imports = ", ".join([auto, *([config_class] if config_class else [])])
    lines = [
        f"# qplan plan: {report.model.id} at {precision} on {report.gpu.name} "
        f"(mode {workload.mode})",
        "import torch",
        f"from transformers import {imports}".replace(
            ", AutoQuantizationConfig", "\nfrom transformers.quantizers.auto import "
            "AutoQuantizationConfig"),
        "",
    ]
    call = [f"    {json.dumps(report.model.id)},"]
    if config_lines:
        lines += [*config_lines, ""]
        call.append("    quantization_config=quantization_config,")
    placement_lines, placement_args = _placement(report, prec.method.max_memory_fraction())
    call += [
        f"    dtype=torch.{dtype},",
        *placement_args,
        f'    attn_implementation="{workload.attn}",',
    ]
    lines += [*placement_lines, f"model = {auto}.from_pretrained(", *call, ")"]
    return "\n".join(lines) + "\n"


def emit_peft(report: Any, precision: str | None = None) -> str:
    """A snippet that turns the loaded ``model`` into the planned LoRA / QLoRA model.

    It mirrors ``planner.training_setup.prepare_for_training``, the patches the estimate
    traced, so the emitted run needs what was planned.
    """
    workload = workload_of(report)
    if not workload.is_lora:
        raise UsageError(
            f"--emit peft needs a LoRA plan (--mode lora or qlora), not mode {workload.mode}"
        )
    precision = chosen_precision(report, precision)
    quantized = PRECISIONS[precision].quantized
    gc = workload.gradient_checkpointing
    lines = ["from peft import LoraConfig, get_peft_model"]
    if quantized and workload.quantize_moe_experts:
        lines += ["", "# the fused experts quantised as Axolotl's quantize_moe_experts does "
                  "(qplan.planner.moe_experts.quantize_fused_experts); no k-bit preparation"]
    if quantized and not workload.quantize_moe_experts:
        lines[0] += ", prepare_model_for_kbit_training"
        lines += [
            "",
            "model = prepare_model_for_kbit_training(",
            "    model,",
            f"    use_gradient_checkpointing={gc},",
            f"    gradient_checkpointing_kwargs={_gc_kwargs(workload)},",
            ")",
        ]
        if not workload.kbit_upcast:
            lines += _cast_back_lines(report, precision)
    else:
        lines += ["", "model.requires_grad_(False)"]
        if gc:
            lines.append(
                "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                f"{_gc_kwargs(workload)})"
            )
    targets = workload.target_modules
    lines += [
        "lora_config = LoraConfig(",
        f"    r={workload.lora_r},",
        f"    lora_alpha={workload.alpha},",
        f"    lora_dropout={workload.lora_dropout!r},",
        f"    target_modules={json.dumps(targets)},",
        *_exclude_line(report),
        *([f"    target_parameters={json.dumps(list(workload.lora_target_parameters))},"]
          if workload.lora_target_parameters else []),
        '    task_type="CAUSAL_LM",',
        ")",
        "model = get_peft_model(model, lora_config)",
        "model.config.use_cache = False",
        "model.print_trainable_parameters()",
    ]
    return "\n".join(lines) + "\n"


def _cast_back_lines(report: Any, precision: str) -> list[str]:
    """Axolotl's cast of norms and embeddings back to the load dtype after peft's k-bit
    preparation (planner/training_setup.py: cast_back_like_axolotl)."""
    from qplan.planner.training_setup import (
        AXOLOTL_DEFAULT_EMBEDDINGS,
        AXOLOTL_EMBEDDING_MODULES,
    )

    names = json.dumps(list(AXOLOTL_EMBEDDING_MODULES.get(report.model.model_type,
                                                          AXOLOTL_DEFAULT_EMBEDDINGS)))
    dtype = _compute_dtype(report, precision)
    return [
        "# as Axolotl's loader: norms and embeddings back to the load dtype",
        "for name, module in model.named_modules():",
        "    if \"norm\" in name or (",
        f"        any(m in name for m in {names}) and hasattr(module, \"weight\")",
        "    ):",
        f"        module.to(torch.{dtype})",
    ]


def _yaml_scalar(value: Any) -> str:
    # JSON scalars are valid YAML scalars (strings quoted, true/false, numbers).
    return json.dumps(value)


def axolotl_settings(report: Any, precision: str | None = None) -> dict[str, Any]:
    """The Axolotl keys of a training plan, in the order they are written."""
    workload = workload_of(report)
    if not workload.is_training:
        raise UsageError(
            f"Axolotl configs are for training; plan with --mode lora, qlora or full "
            f"(this plan is mode {workload.mode})"
        )
    precision = chosen_precision(report, precision)
    prec = PRECISIONS[precision]
    if workload.tuning == "full" and not prec.trainable("full"):
        raise UsageError(f"full fine-tuning cannot train {precision} weights; pick bf16 or fp16")
    dtype = _compute_dtype(report, precision)
    out: dict[str, Any] = {"base_model": report.model.id}
    out.update(prec.method.axolotl_keys(prec, settings_of(report, precision), workload.is_lora))
    if workload.kind.to_axolotl is not None:
        out.update(workload.kind.to_axolotl(workload))
    if workload.is_lora:
        out["lora_r"] = workload.lora_r
        out["lora_alpha"] = workload.alpha
        out["lora_dropout"] = workload.lora_dropout
        if workload.lora_target_regex is not None:
            # Axolotl hands a string to peft, which matches it as a regular expression.
            out["lora_target_modules"] = workload.lora_target_regex
        elif workload.target_modules == "all-linear":
            out["lora_target_linear"] = True
        else:
            out["lora_target_modules"] = list(workload.target_modules)
        if workload.lora_target_parameters:
            out["lora_target_parameters"] = list(workload.lora_target_parameters)
        if workload.quantize_moe_experts and prec.quantized:
            out["quantize_moe_experts"] = True
    if workload.seq_len:
        out["sequence_len"] = workload.seq_len
    out["micro_batch_size"] = workload.batch
    # A workload's own keys may set it (GRPO: its steps per generation).
    out.setdefault("gradient_accumulation_steps", 1)
    out["gradient_checkpointing"] = workload.gradient_checkpointing
    if workload.gradient_checkpointing:
        out["gradient_checkpointing_kwargs"] = {"use_reentrant": workload.gc_reentrant}
    out["optimizer"] = AXOLOTL_OPTIMIZERS[workload.optimizer]
    if workload.activation_offloading:
        out["activation_offloading"] = True
    if workload.sample_packing:
        out["sample_packing"] = True
    if workload.unfrozen_parameters:
        out["unfrozen_parameters"] = list(workload.unfrozen_parameters)
    out.update(_axolotl_image_keys(report, workload))
    if workload.fused_ce is not None:
        out.update(AXOLOTL_FUSED_CE[workload.fused_ce])
    liger_keys = {"liger_rms_norm": workload.liger_rms_norm,
                  "liger_glu_activation": workload.liger_glu,
                  "liger_rope": workload.liger_rope,
                  "liger_layer_norm": workload.liger_layer_norm}
    if any(liger_keys.values()):
        plugins = out.setdefault("plugins", [])
        if LIGER_PLUGIN not in plugins:
            out["plugins"] = [*plugins, LIGER_PLUGIN]
        out.update({key: True for key, on in liger_keys.items() if on})
    if workload.is_lora:
        # Written either way: Axolotl 0.19 turns the three on for a LoRA / QLoRA YAML that
        # leaves them unset (check_auto_enable_lora_kernels), which is not what was planned.
        out["lora_mlp_kernel"] = workload.lora_mlp_kernel
        out["lora_qkv_kernel"] = workload.lora_qkv_kernel
        out["lora_o_kernel"] = workload.lora_o_kernel
    full_dtype = prec.full_dtype or dtype
    out["bf16"] = full_dtype == "bfloat16"
    out["fp16"] = full_dtype == "float16"
    if workload.attn == "flash_attention_2":
        out["flash_attention"] = True
    elif workload.attn == "sdpa":
        out["sdp_attention"] = True
    else:
        out["eager_attention"] = True
    out.update(_axolotl_strategy_keys(report, precision))
    return out


def _training_strategy(report: Any, precision: str) -> str | None:
    """The multi-GPU training strategy the plan gives ``precision`` (None on one GPU)."""
    name = getattr(report.candidate(precision), "strategy", None)
    return name if name in AXOLOTL_STRATEGY_KEYS else None


def _axolotl_strategy_keys(report: Any, precision: str) -> dict[str, Any]:
    """The DeepSpeed / FSDP / DDP keys of the candidate's strategy; FSDP wraps the decoder
    layer class the multi-GPU planner sharded by."""
    name = _training_strategy(report, precision)
    if name is None:
        return {}
    keys = json.loads(json.dumps(AXOLOTL_STRATEGY_KEYS[name]))  # a copy to fill in
    if "fsdp_config" in keys:
        layer_class = getattr(report.strategy, "layer_class", None)
        keys["fsdp_config"].update({
            "state_dict_type": "FULL_STATE_DICT",
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            **({"transformer_layer_cls_to_wrap": layer_class} if layer_class else {}),
            "reshard_after_forward": True,
        })
    return keys


def _axolotl_image_keys(report: Any, workload: Workload) -> dict[str, Any]:
    """Axolotl's multimodal keys: its processor (images in the batches), the image size
    asked, and whether the vision tower and projector are frozen (``freeze_mm_modules``).
    Axolotl's YAML does not say how many images a sample holds: it reads back as one."""
    out: dict[str, Any] = {}
    if workload.images:
        out["processor_type"] = "AutoProcessor"
        out["skip_prepare_dataset"] = True
        out["remove_unused_columns"] = False
        if workload.image_size is not None:
            height, width = workload.image_size
            out["image_size"] = height if height == width else [height, width]
    if "vision_frozen" in report.workload:
        out["freeze_mm_modules"] = bool(report.workload["vision_frozen"])
    return out


def emit_axolotl(report: Any, precision: str | None = None) -> str:
    """Axolotl YAML for the plan's model, precision and training workload.

    Dataset, output and schedule keys are left for the user: qplan plans memory, not data.
    """
    settings = axolotl_settings(report, precision)
    lines = [f"# qplan plan: {report.model.id} on {report.gpu.name}; add datasets and output_dir"]
    workload = workload_of(report)
    if (workload.is_lora and workload.kbit_upcast
            and PRECISIONS[chosen_precision(report, precision)].quantized):
        lines.append("# Axolotl casts norms and embeddings back to the load dtype after peft's "
                     "k-bit preparation: qplan estimate --axolotl plans that (--no-kbit-upcast)")
    strategy = _training_strategy(report, chosen_precision(report, precision))
    if strategy is not None:
        lines.append(f"# planned for {report.gpu.count} GPUs with {strategy}: run it on as many "
                     "(--gpu Nx... or --num-gpus N plans it again)")
    for key, value in settings.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            # Nested mappings (an inline DeepSpeed config) as JSON, which YAML reads.
            lines += [f"  {k}: {_yaml_scalar(v)}" for k, v in value.items()]
        elif isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"  - {_yaml_scalar(v)}" for v in value]
        else:
            lines.append(f"{key}: {_yaml_scalar(value)}")
    return "\n".join(lines) + "\n"


def estimate_kwargs_of(report: Any, precision: str | None = None) -> dict[str, Any]:
    """The ``qplan.api.estimate`` keyword arguments that re-plan ``report`` at one precision.

    This is what an emitted Axolotl YAML reads back as (``loaders.axolotl.read_axolotl``).
    """
    precision = chosen_precision(report, precision)
    workload = workload_of(report)
    mode = workload.mode
    if mode == "lora" and PRECISIONS[precision].trainable("qlora"):
        # LoRA on a 4-bit base is QLoRA: the same patches, and Axolotl's name for it.
        mode = "qlora"
    kwargs: dict[str, Any] = {"mode": mode, "precisions": precision}
    if workload.kind.replan is not None:
        kwargs.update(workload.kind.replan(workload, PRECISIONS[precision].is_4bit))
    if PRECISIONS[precision].is_4bit:
        kwargs["quant_storage"] = str(report.workload.get("quant_storage") or "uint8")
    if report.workload.get("skip_modules") is not None:
        kwargs["skip_modules"] = tuple(report.workload["skip_modules"])
    if workload.seq_len:
        kwargs["seq_len"] = workload.seq_len
    kwargs["batch"] = workload.batch
    kwargs["gradient_checkpointing"] = workload.gradient_checkpointing
    if workload.gradient_checkpointing:
        kwargs["gc_reentrant"] = workload.gc_reentrant
    kwargs["optimizer"] = workload.optimizer
    kwargs["attn"] = workload.attn
    if workload.fused_ce is not None:
        kwargs["fused_ce"] = workload.fused_ce
    if workload.activation_offloading:
        kwargs["activation_offloading"] = True
    if workload.sample_packing:
        kwargs["sample_packing"] = True
    if workload.unfrozen_parameters:
        kwargs["unfrozen_parameters"] = tuple(workload.unfrozen_parameters)
    if workload.images:
        kwargs["images"] = 1  # the YAML's processor: one image per sample
        if workload.image_size is not None:
            kwargs["image_size"] = tuple(workload.image_size)
    if "vision_frozen" in report.workload:
        kwargs["train_vision"] = not report.workload["vision_frozen"]
    strategy = _training_strategy(report, precision)
    if strategy is not None:
        kwargs["strategy"] = strategy
    if workload.liger_rms_norm:
        kwargs["liger_rms_norm"] = True
    if workload.liger_glu:
        kwargs["liger_glu"] = True
    for key in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel"):
        if getattr(workload, key):
            kwargs[key] = True
    if workload.liger_rope:
        kwargs["liger_rope"] = True
    if workload.liger_layer_norm:
        kwargs["liger_layer_norm"] = True
    if workload.is_lora:
        kwargs["lora_r"] = workload.lora_r
        kwargs["lora_alpha"] = workload.alpha
        kwargs["lora_dropout"] = workload.lora_dropout
        targets = workload.target_modules
        if workload.lora_target_regex is not None:
            kwargs["lora_target_regex"] = workload.lora_target_regex
        else:
            kwargs["lora_targets"] = ("all-linear",) if targets == "all-linear" else tuple(targets)
        if workload.lora_target_parameters:
            kwargs["lora_target_parameters"] = tuple(workload.lora_target_parameters)
        if workload.quantize_moe_experts and PRECISIONS[precision].quantized:
            kwargs["quantize_moe_experts"] = True
        if PRECISIONS[precision].quantized:
            # Axolotl casts norms and embeddings back after peft's k-bit preparation.
            kwargs["kbit_upcast"] = False
    return kwargs
