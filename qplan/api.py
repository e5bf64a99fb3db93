"""The public Python API: ``qplan.estimate(...)`` returns a Report. The CLI is a layer over it."""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import asdict, replace
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from qplan.errors import ExpertDropoutError, UsageError, enter_step
from qplan.planner.advice import (
    advice_plans,
    advice_when_nothing_fits,
    plans_ahead,
    solve_one,
    unquantized_warning,
)
from qplan.planner.budget import Headroom, budget_for
from qplan.planner.collector import rare_collections
from qplan.planner.components import num_layers, shared_traces, workload_components
from qplan.planner.config_checks import check_config
from qplan.planner.decide import Decision, choosable, compute_dtype_for, decide
from qplan.planner.depths import layer_signatures, trace_plan
from qplan.planner.device_map import from_pretrained_max_memory
from qplan.planner.families import check_text_step
from qplan.planner.fused_ce import FUSED_CE
from qplan.planner.gpu import GpuTarget
from qplan.planner.parallel import STRATEGIES
from qplan.planner.precision import (
    PRECISION_NAMES,
    PRECISIONS,
    REQUESTABLE,
    default_candidates,
    trace_group,
)
from qplan.planner.quant import QuantSettings
from qplan.planner.quant import stored as stored_plan
from qplan.planner.quiet_logs import quiet_plan
from qplan.planner.solve import Solution
from qplan.planner.spec import ModelSpec
from qplan.planner.workload import (
    ATTENTIONS,
    KV_DTYPES,
    MODES,
    OPTIMIZERS,
    TRAINING_MODES,
    Workload,
    default_seq_len,
)
from qplan.planner.workloads import STEP_MODES, kind_of
from qplan.report import GpuInfo, ModelInfo, Report

# Candidates each mode plans, from the precision table: full fine-tuning only on weights
# its method can train (not bitsandbytes'), QLoRA is LoRA on a 4-bit base.
MODE_PRECISIONS = {
    mode: tuple(n for n, p in PRECISIONS.items() if p.trainable(mode))
    for mode in ("full", "qlora")
}


def parse_headroom(text: str | None) -> Headroom:
    """``"5%"`` (of the device) or a size (``"1.5GiB"``); None gives the default."""
    if text is None:
        return Headroom()
    raw = text.strip()
    if raw.endswith("%"):
        try:
            percent = float(raw[:-1])
        except ValueError:
            percent = float("nan")
        if not 0 <= percent < 90:
            raise UsageError(
                f"headroom {text!r} is not a percentage between 0 and 90; "
                "use e.g. --headroom 5% or --headroom 1GiB"
            )
        return Headroom(fraction=percent / 100)
    if raw in ("0", "0B"):
        return Headroom(fraction=None, bytes=0)
    from qplan.loaders.gpus import parse_size

    if raw.startswith("-"):
        raise UsageError(
            f"headroom {text!r} cannot be negative; use e.g. --headroom 5% or --headroom 1GiB"
        )
    try:
        size = parse_size(raw)
    except UsageError:
        raise UsageError(
            f"headroom {text!r} is neither a percentage nor a size; "
            "use e.g. --headroom 5% or --headroom 1GiB"
        ) from None
    return Headroom(fraction=None, bytes=size)


def parse_precisions(
    value: str | Sequence[str] | None, stored_ok: bool = False
) -> tuple[list[str], bool]:
    """The candidate list and whether the user named it. ``stored_ok`` also accepts the
    rows planned only for pre-quantised checkpoints (mxfp4, fp8, gptq, awq)."""
    if value is None:
        return list(PRECISION_NAMES), False
    known = tuple(PRECISIONS) if stored_ok else REQUESTABLE
    names = [p.strip().lower() for p in (value.split(",") if isinstance(value, str) else value)]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise UsageError(
            f"unknown precision {', '.join(unknown) or '(none given)'}; "
            f"--precisions takes a comma list of {', '.join(REQUESTABLE)}"
        )
    return [p for p in known if p in names], True


LORA_KERNEL_OPTIONS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel")


def _lora_kernel_bases(names: list[str], asked: bool, kbit_upcast: bool) -> list[str]:
    """The candidates Axolotl's LoRA kernels run on; a precision asked for (or the stored
    checkpoint's) that they cannot: refused in one line."""
    from qplan.planner.lora_kernels import kernel_base_refusal

    refused = {n: why for n in names if (why := kernel_base_refusal(n, kbit_upcast))}
    if refused and (asked or len(refused) == len(names)):
        name, why = next(iter(refused.items()))
        raise UsageError(f"Axolotl's LoRA kernels (--lora-*-kernel, lora_*_kernel) on the "
                         f"{name} base: {why}; or plan without them")
    return [n for n in names if n not in refused]


def _with_gpu_rows(names: list[str], tuning: str | None, gpu: GpuTarget) -> list[str]:
    """The default candidates plus the rows this GPU runs (fp8 on compute capability 8.9+),
    where the workload's tuning (None: it trains nothing) can use them, in table order."""
    extra = {
        n for n in default_candidates(gpu.compute_capability)
        if n not in PRECISION_NAMES and (tuning is None or PRECISIONS[n].trainable(tuning))
    }
    return [n for n in PRECISIONS if n in names or n in extra]


def _versions() -> dict[str, str]:
    found = {}
    for dist in ("qplan", "torch", "transformers", "accelerate", "bitsandbytes", "peft"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return found


def _dtype_name(value: Any) -> str | None:
    if value is None:
        return None
    return str(value).removeprefix("torch.")


def resolve(model: str | ModelSpec, revision: str | None, trust_remote_code: bool) -> ModelSpec:
    if isinstance(model, ModelSpec):
        return model
    from qplan.loaders.model_source import resolve_model

    return resolve_model(model, revision=revision, trust_remote_code=trust_remote_code)


def resolve_target(gpu: str | GpuTarget, num_gpus: int | None) -> GpuTarget:
    if isinstance(gpu, GpuTarget):
        return gpu
    from qplan.loaders.gpus import resolve_gpu

    return resolve_gpu(gpu, num_gpus=num_gpus)


def _choice(value: str | None, allowed: Sequence[str], option: str) -> None:
    if value is not None and value not in allowed:
        raise UsageError(f"unknown {option} {value!r}; choose one of {', '.join(allowed)}")


def make_workload(
    mode: str,
    config: Any,
    *,
    batch: int | None = None,
    seq_len: int | None = None,
    kv_dtype: str | None = None,
    lora_r: int = 16,
    lora_alpha: int | None = None,
    lora_targets: str | Sequence[str] | None = None,
    lora_target_regex: str | None = None,
    lora_dropout: float = 0.0,
    gradient_checkpointing: bool = True,
    gc_reentrant: bool = False,
    optimizer: str = "adamw",
    attn: str = "sdpa",
    fused_ce: str | None = None,
    activation_offloading: bool = False,
    sample_packing: bool = False,
    unfrozen_parameters: Sequence[str] | None = None,
    liger_rms_norm: bool = False,
    liger_glu: bool = False,
    liger_rope: bool = False,
    liger_layer_norm: bool = False,
    images: int = 0,
    image_size: int | str | Sequence[int] | None = None,
    train_vision: bool | None = None,
    quantize_moe_experts: bool = False,
    lora_target_parameters: str | Sequence[str] | None = None,
    kbit_upcast: bool = True,
    lora_mlp_kernel: bool = False,
    lora_qkv_kernel: bool = False,
    lora_o_kernel: bool = False,
    **mode_options: Any,
) -> Workload:
    """Validate the workload options; seq_len defaults to the mode's default, capped by
    the model's max positions; batch to 1, or the smallest a mode takes (GRPO: one group
    of completions). ``mode_options``: the options of the mode's own module
    (planner/workloads/), e.g. adapter and ref_model for dpo."""
    _choice(mode, MODES, "mode")
    kind = kind_of(mode)
    extra = kind.parse_options(mode_options)
    for package in kind.needs:
        _needs(package, mode)
    _choice(optimizer, OPTIMIZERS, "optimizer")
    _choice(attn, ATTENTIONS, "attention implementation")
    _choice(kv_dtype, KV_DTYPES, "KV cache dtype")
    _choice(fused_ce, FUSED_CE, "--fused-ce")
    if fused_ce is not None and mode not in TRAINING_MODES:
        raise UsageError(f"--fused-ce is a training loss; use it with --mode "
                         f"{', '.join(TRAINING_MODES)}, not {mode}")
    if activation_offloading and mode not in TRAINING_MODES:
        raise UsageError(f"--activation-offloading moves training activations to the host; "
                         f"use it with --mode {', '.join(TRAINING_MODES)}, not {mode}")
    if activation_offloading and not gradient_checkpointing:
        raise UsageError("--activation-offloading checkpoints every layer (as Axolotl "
                         "requires); drop --no-gradient-checkpointing")
    if (liger_rms_norm or liger_glu) and mode not in TRAINING_MODES:
        raise UsageError(f"--liger-rms-norm / --liger-glu are Axolotl's training kernels; use "
                         f"them with --mode lora, qlora or full, not {mode}")
    if (liger_rope or liger_layer_norm) and mode not in TRAINING_MODES:
        raise UsageError(f"--liger-rope / --liger-layer-norm are Axolotl's training kernels; "
                         f"use them with --mode lora, qlora or full, not {mode}")
    if isinstance(lora_target_parameters, str):
        lora_target_parameters = [t.strip() for t in lora_target_parameters.split(",")
                                  if t.strip()]
    target_params = tuple(lora_target_parameters or ())
    lora_tuned = kind.tuning(dict(extra)) in ("lora", "qlora")
    if quantize_moe_experts and not lora_tuned:
        raise UsageError(f"--quantize-moe-experts quantises the frozen experts of a LoRA "
                         f"base (Axolotl requires an adapter); use it with --mode lora or "
                         f"qlora, not {mode}")
    if target_params and not lora_tuned:
        raise UsageError(f"--lora-target-parameters adds LoRA adapters; use it with --mode "
                         f"lora or qlora, not {mode}")
    if not kbit_upcast and not lora_tuned:
        raise UsageError(f"--no-kbit-upcast is about LoRA on a k-bit base (Axolotl casts its "
                         f"norms and embeddings back); use it with --mode lora or qlora, "
                         f"not {mode}")
    lora_kernels = lora_mlp_kernel or lora_qkv_kernel or lora_o_kernel
    if lora_kernels and not lora_tuned:
        raise UsageError(f"--lora-mlp-kernel / --lora-qkv-kernel / --lora-o-kernel are "
                         f"Axolotl's kernels for LoRA adapters; use them with --mode lora or "
                         f"qlora, not {mode}")
    if quantize_moe_experts and target_params:
        # peft 0.21's ParamWrapper puts a _LoraFactorsProxy (its baddbmm path, peft PR
        # #3577) on the expert each forward, but its _remove_parametrizations takes off
        # only a _LoraParameterProxy when another parametrisation (the bitsandbytes one)
        # sits below: the proxies pile up and the second step fails ("only Tensors of
        # floating point dtype can require gradients"), with or without Axolotl 0.19's
        # peft patch, on a real CPU run.
        raise UsageError("LoRA on quantised experts (--lora-target-parameters with "
                         "--quantize-moe-experts) fails from the second step with peft "
                         "0.21 (its ParamWrapper leaves a LoRA proxy on the quantised "
                         "expert each forward); plan the expert LoRA without "
                         "--quantize-moe-experts, or the quantised experts without expert "
                         "adapters")
    unfrozen = tuple(unfrozen_parameters or ())
    if unfrozen:
        if mode != "full":
            raise UsageError(f"--unfrozen-parameters picks what full fine-tuning trains; use "
                             f"it with --mode full, not {mode}")
        from qplan.planner.unfrozen import parse_pattern

        for pattern in unfrozen:
            parse_pattern(pattern)
    if sample_packing and mode not in TRAINING_MODES:
        raise UsageError(f"--sample-packing packs training sequences; use it with --mode "
                         f"{', '.join(TRAINING_MODES)}, not {mode}")
    for lever, on in (("--fused-ce", fused_ce is not None), ("--sample-packing", sample_packing)):
        if on and not kind.causal_lm_step:
            raise UsageError(f"{lever} is a lever of the causal-LM training step; --mode {mode} "
                             f"runs its trainer's own (TRL's); leave {lever} out")
    text = config.get_text_config()
    max_positions = getattr(text, "max_position_embeddings", None) or getattr(
        text, "n_positions", None
    )
    default_batch = batch is None
    batch = 1 if batch is None else batch
    if batch < 1 or batch > 1 << 20:
        raise UsageError(f"--batch must be between 1 and 1048576, not {batch}")
    if seq_len is None or seq_len == 0:
        seq_len = default_seq_len(mode, max_positions)
    if seq_len < 1 or seq_len > 1 << 24:
        raise UsageError(f"--seq-len must be between 1 and 16777216, not {seq_len}")
    if not 1 <= lora_r <= 65536:
        raise UsageError(f"--lora-r must be between 1 and 65536, not {lora_r}")
    if isinstance(lora_targets, str):
        lora_targets = [t.strip() for t in lora_targets.split(",") if t.strip()]
    targets = tuple(lora_targets) if lora_targets else ("all-linear",)
    if lora_target_regex is not None:
        if lora_targets:
            raise UsageError("give LoRA targets as names or as one regular expression, not both")
        try:
            re.compile(lora_target_regex)
        except re.error as exc:
            raise UsageError(
                f"LoRA target regex {lora_target_regex!r} does not compile ({exc}); fix it"
            ) from None
    size = _check_images(kind, images, image_size, train_vision, config, seq_len,
                         sample_packing=sample_packing)
    if lora_alpha is not None and not 1 <= lora_alpha <= 1 << 20:
        raise UsageError(f"--lora-alpha must be between 1 and 1048576, not {lora_alpha}")
    if not 0.0 <= lora_dropout < 1.0:
        raise UsageError(f"--lora-dropout must be in [0, 1), not {lora_dropout}")
    workload = Workload(
        mode=mode,
        batch=batch,
        seq_len=seq_len,
        kv_dtype=kv_dtype,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_targets=targets,
        lora_target_regex=lora_target_regex,
        lora_dropout=lora_dropout,
        gradient_checkpointing=gradient_checkpointing,
        gc_reentrant=gc_reentrant,
        optimizer=optimizer,
        attn=attn,
        fused_ce=fused_ce,
        activation_offloading=activation_offloading,
        sample_packing=sample_packing,
        unfrozen_parameters=unfrozen,
        liger_rms_norm=liger_rms_norm,
        liger_glu=liger_glu,
        liger_rope=liger_rope,
        liger_layer_norm=liger_layer_norm,
        images=images,
        image_size=size,
        train_vision=train_vision,
        quantize_moe_experts=quantize_moe_experts,
        lora_target_parameters=target_params,
        kbit_upcast=kbit_upcast,
        lora_mlp_kernel=lora_mlp_kernel,
        lora_qkv_kernel=lora_qkv_kernel,
        lora_o_kernel=lora_o_kernel,
        extra=extra,
    )
    if default_batch and kind.batch_multiple is not None:
        workload = replace(workload, batch=kind.batch_multiple(workload))
    return workload


MAX_IMAGES = 256
MAX_IMAGE_SIDE = 16384


def parse_image_size(value: int | str | Sequence[int] | None) -> tuple[int, int] | None:
    """``448``, ``"448"``, ``"448x640"`` (height x width) or ``(448, 640)``; a bad one is
    a one-line UsageError."""
    if value is None:
        return None
    parts: list[Any]
    if isinstance(value, bool):
        parts = []
    elif isinstance(value, int):
        parts = [value, value]
    elif isinstance(value, str):
        parts = value.lower().replace("*", "x").split("x")
        parts = parts * 2 if len(parts) == 1 else parts
    else:
        parts = list(value)
        parts = parts * 2 if len(parts) == 1 else parts
    try:
        sides = tuple(int(str(p).strip()) for p in parts)
    except ValueError:
        sides = ()
    if len(sides) != 2 or not all(1 <= side <= MAX_IMAGE_SIDE for side in sides):
        raise UsageError(
            f"--image-size {value!r} is not a size in pixels; write e.g. --image-size 448 "
            f"or --image-size 448x640 (height x width, each 1 to {MAX_IMAGE_SIDE})"
        )
    return (sides[0], sides[1])


def _check_images(kind: Any, images: Any, image_size: Any, train_vision: bool | None,
                  config: Any, seq_len: int, *, sample_packing: bool) -> tuple[int, int] | None:
    """Validate the image options against the mode and the model; returns the size."""
    from qplan.planner.workloads import IMAGE_MODES, TRAINING_MODES

    if isinstance(images, bool) or not isinstance(images, int) \
            or not 0 <= images <= MAX_IMAGES:
        raise UsageError(f"--images must be a whole number of images per sequence between 0 "
                         f"and {MAX_IMAGES}, not {images!r}")
    size = parse_image_size(image_size)
    if train_vision is not None and kind.name not in TRAINING_MODES:
        raise UsageError(f"--train-vision / --freeze-vision decide what trains; use them with "
                         f"--mode {', '.join(TRAINING_MODES)}, not {kind.name}")
    if not images:
        if size is not None:
            raise UsageError("--image-size sizes the images of --images N; give --images too")
        return None
    if not kind.takes_images:
        raise UsageError(f"--images feeds images through the step of --mode "
                         f"{', '.join(IMAGE_MODES)}; --mode {kind.name} plans text only, "
                         "leave --images out")
    if sample_packing:
        raise UsageError("--sample-packing is not planned with --images (Axolotl keeps "
                         "multimodal batches unpacked); leave --sample-packing out")
    from qplan.planner.vision import check_fits, image_layout

    check_fits(images, image_layout(config, size), seq_len)
    return size


def _mode_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options that are not make_workload's own: the mode's module takes them."""
    import inspect

    common = inspect.signature(make_workload).parameters
    return {k: v for k, v in options.items() if k not in common}


def _needs(package: str, mode: str) -> None:
    """A workload whose step runs a library (TRL) is planned only where it is installed."""
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise UsageError(f"--mode {mode} runs {package}'s trainer; pip install {package} "
                         f"(or qplan[{package}])")


def check_lora_targets(workload: Workload, inventory: Any, model_id: str) -> None:
    """Named LoRA targets must match a module, as peft requires (a name matches a module
    called so, or ending in ``.name``); said here in one line, before any trace."""
    targets = workload.target_modules
    if not workload.is_lora or isinstance(targets, str):
        return  # all-linear, or a regular expression peft matches itself
    modules = {t.module for t in inventory.tensors}
    if any(m == t or m.endswith("." + t) for t in targets for m in modules):
        return
    linear = sorted({t.module.rsplit(".", 1)[-1] for t in inventory.parameters
                     if t.module_type in ("Linear", "Conv1D")})
    raise UsageError(
        f"--lora-targets {','.join(targets)} matches no module of {model_id}; name some of "
        f"its linear layers ({', '.join(linear[:8])}) or use all-linear"
    )


def workload_dict(
    workload: Workload,
    compute: str,
    quant_storage: str,
    target: str,
    skip_modules: Sequence[str] | None = None,
    lora_excluded: Sequence[str] = (),
) -> dict:
    data = asdict(workload)
    data.pop("extra")
    data.update(workload.extra)
    if not workload.runs_step:
        data = {"mode": workload.mode}  # no step: none of the step's options apply
    data.update(compute_dtype=compute, quant_storage=quant_storage, target=target)
    if skip_modules is not None:
        # Kept so `qplan load --from-report` and the emitted snippets load what was planned.
        data["skip_modules"] = list(skip_modules)
    if workload.is_lora:
        data["lora_alpha"] = workload.alpha
        if lora_excluded:
            data["lora_exclude_modules"] = list(lora_excluded)
    return data


def _skip_weights_used_as_matrices(
    spec: ModelSpec,
    precisions: Sequence[str],
    meta: Any,
    inventory: Any,
    skip_modules: Sequence[str] | None,
    notes: list[str],
) -> tuple[list[str] | None, Any]:
    """Leave unquantised what the model cannot run quantised (planner/quantize_meta.py):
    the skip list becomes transformers' own defaults plus those modules, and the load
    kwargs carry it as llm_int8_skip_modules."""
    from qplan.planner.inventory import take_inventory
    from qplan.planner.quantize_meta import weights_used_as_matrices

    given = list(skip_modules) if skip_modules is not None else None
    if not any(PRECISIONS[p].quantized for p in precisions):
        return given, inventory
    # The first layers that hold every kind of layer are enough to probe (a periodic
    # stack without a trailing kind: its trace plan's low depth).
    plan = trace_plan(layer_signatures(inventory, spec.config), num_layers(spec.config))
    every_kind = plan.depths[0] if plan.depths and not plan.pattern.suffix_layers else None
    direct = weights_used_as_matrices(spec.config, spec.trust_remote_code, every_kind)
    if not direct:
        return given, inventory
    skips = sorted({*inventory.skip_modules, *direct})
    notes.append(
        f"bitsandbytes precisions leave {', '.join(direct)} unquantised: "
        f"{inventory.model_type}'s code uses their weight as a plain matrix, which a "
        "quantised load cannot run; the from_pretrained kwargs skip them "
        "(llm_int8_skip_modules)"
    )
    return skips, take_inventory(meta, skips)


def _checkpointing_the_model_supports(workload: Workload,
                                      meta: Any) -> tuple[Workload, list[str]]:
    """A training workload without activation checkpointing where the model's class has
    none (transformers' ``supports_gradient_checkpointing`` is False: CTRL, OpenAI GPT,
    XLM, ...): ``gradient_checkpointing_enable`` raises for it, so a run that fits trains
    without it. Planned that way, with a warning saying so."""
    if not (workload.is_training and workload.gradient_checkpointing):
        return workload, []
    if getattr(meta, "supports_gradient_checkpointing", True):
        return workload, []
    name = type(meta).__name__
    return replace(workload, gradient_checkpointing=False), [
        f"{name} does not support activation checkpointing (transformers refuses to turn "
        "it on): planned without it, as the model trains"
    ]


def _lora_exclusions(meta: Any, workload: Workload, notes: list[str]) -> tuple[str, ...]:
    """What ``all-linear`` leaves out because peft refuses it for this architecture."""
    if not workload.is_lora or workload.target_modules != "all-linear":
        return ()
    from qplan.planner.training_setup import peft_refused_targets

    refused = peft_refused_targets(meta)
    if refused:
        notes.append(
            f"LoRA all-linear leaves out {', '.join(refused)}: peft refuses or cannot adapt "
            f"them on {meta.config.model_type} models (exclude_modules)"
        )
    return refused


def _image_report(config: Any, meta: Any, workload: Workload,
                  notes: list[str]) -> dict[str, Any]:
    """The report's image fields (per sequence) and the note on where the layout comes
    from; for a training mode on a vision-language model, whether its tower trains."""
    from qplan.planner.vision import image_layout, vision_module_prefixes

    found: dict[str, Any] = {}
    tower = vision_module_prefixes(meta)
    if workload.is_training and tower:
        found["vision_frozen"] = workload.vision_frozen
        if workload.is_lora and workload.vision_frozen:
            from qplan.planner.training_setup import lora_config

            found["lora_exclude_regex"] = lora_config(workload, meta).exclude_modules
        if workload.vision_frozen:
            how = "frozen: no adapters or gradients there (--train-vision to train them)"
        elif workload.is_lora:
            how = ("left to the LoRA targets: adapters wherever they match "
                   "(--freeze-vision to exclude them)")
        else:
            how = "trained with the language model (--freeze-vision to freeze them)"
        notes.append(f"vision tower and projector ({', '.join(tower)}) {how}")
    if not workload.images:
        return found
    layout = image_layout(config, workload.image_size)
    notes.append(f"images: {workload.images} per sequence; {layout.note}")
    return {
        **found,
        "image_tokens_per_image": layout.tokens,
        "image_tokens": workload.images * layout.tokens,
        "image_pixels": list(layout.size),
    }


# transformers and bitsandbytes at ERROR for the whole plan, as the command line holds them
# (qplan/cli.py): their loggers' levels are then set twice per plan, not around each of
# its hundreds of meta builds and traces (each setLevel clears every logger's cache); the
# libraries' warnings at qplan's own calls are ignored too.
@quiet_plan()
# The collector at the command line's thresholds for the whole plan, not only around each
# trace: between traces (derived steps, meta builds, records of prepared models) CPython's
# own thresholds ran a young collection every 700 objects and a full one, walking every
# model the plan keeps, every hundred young ones: in one process, falcon-mamba-7b's DPO plan
# spent 3.4 s in collections against 1.7 s, Nemotron-H-56B's 2.3 s against 0.3 s. The
# caller's thresholds are back when the plan returns. estimate_axolotl and measure_workload
# plan through this function, so they hold them too.
@rare_collections()
def estimate(
    model: str | ModelSpec,
    *,
    gpu: str | GpuTarget = "auto",
    num_gpus: int | None = None,
    mode: str = "inference",
    precisions: str | Sequence[str] | None = None,
    headroom: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    skip_modules: Sequence[str] | None = None,
    quant_storage: str = "uint8",
    target: str = "cuda",
    solve: str | None = None,
    strategy: str | None = None,
    **workload_options: Any,
) -> Report:
    """Plan ``model`` on ``gpu`` for a workload; see ``qplan estimate --help`` for the options.

    ``strategy``: training across GPUs with this strategy (planner/parallel.py STRATEGIES)
    instead of the simplest that fits; on one GPU it is planned at world size 1.

    ``workload_options``: batch, seq_len, kv_dtype, lora_r, lora_alpha, lora_targets,
    lora_target_regex, lora_dropout, gradient_checkpointing, gc_reentrant, optimizer, attn,
    fused_ce, activation_offloading, sample_packing, unfrozen_parameters, liger_rms_norm,
    liger_glu, liger_rope, liger_layer_norm, quantize_moe_experts, lora_target_parameters,
    kbit_upcast, lora_mlp_kernel, lora_qkv_kernel, lora_o_kernel.
    ``target="cpu"`` predicts what the same workload holds on a CPU (what ``qplan measure``
    checks without a GPU).
    """
    from qplan.loaders.plan_workers import Plans
    from qplan.loaders.trace_cache import cached as cached_tracer
    from qplan.planner.components import trace_components
    from qplan.planner.derived_double_quant import deriving as deriving_double_quant
    from qplan.planner.derived_traces import deriving, reference_row
    from qplan.planner.families import text_class_note
    from qplan.planner.inventory import build_meta_model, model_class_for, take_inventory
    from qplan.planner.kernel_fallbacks import fallback_note

    _choice(mode, MODES, "mode")
    _choice(strategy, STRATEGIES, "multi-GPU strategy")
    # The mode's own options, checked before anything is resolved; how the weights train
    # decides the precisions (a preference mode trains by its adapter option).
    kind_of(mode).parse_options(_mode_options(workload_options))
    tuning = kind_of(mode).tuning_of(workload_options)
    if solve is not None:
        solve = solve.replace("-", "_")
        _choice(solve, ("batch", "seq_len"), "--solve variable")
    names, explicit = parse_precisions(precisions, stored_ok=True)
    allowed = MODE_PRECISIONS.get(tuning) if tuning is not None else None
    enter_step("resolving the model")
    spec = resolve(model, revision, trust_remote_code)
    check_config(spec.config, spec.config_path or spec.id)
    stored = stored_quantization(spec)
    if stored is not None:
        names = stored_plan.candidates(stored, spec.id, tuning or mode, names, explicit,
                                       asked=mode)
        allowed = None
        quant_storage = stored.quant_storage or quant_storage
    elif explicit and any(PRECISIONS[n].stored_only for n in names):
        raise UsageError(
            f"{', '.join(n for n in names if PRECISIONS[n].stored_only)} is planned only for "
            f"checkpoints stored in that format; {spec.id} is not; choose from "
            f"{', '.join(REQUESTABLE)}"
        )
    if stored is None and tuning == "lora":  # full and qlora: MODE_PRECISIONS below
        untrainable = [n for n in names if not PRECISIONS[n].trainable(tuning)]
        if explicit and untrainable:
            raise UsageError(
                f"--mode {mode} cannot train on {', '.join(untrainable)} weights (peft has no "
                f"LoRA layer for them); drop them from --precisions"
            )
        names = [n for n in names if n not in untrainable]
    if allowed is not None:
        dropped = [n for n in names if n not in allowed]
        if explicit and dropped:
            raise UsageError(
                f"--mode {mode} plans only {', '.join(allowed)}; drop {', '.join(dropped)} "
                "from --precisions"
            )
        names = [n for n in names if n in allowed]
    room = parse_headroom(headroom)
    enter_step("resolving the GPU")
    gpu_target = resolve_target(gpu, num_gpus)
    if stored is None and not explicit:
        names = _with_gpu_rows(names, tuning, gpu_target)
    if any(workload_options.get(k) for k in LORA_KERNEL_OPTIONS):
        names = _lora_kernel_bases(names, explicit or stored is not None,
                                   workload_options.get("kbit_upcast", True))
    enter_step("building the model on the meta device")
    config_dtype = _dtype_name(getattr(spec.config, "dtype", None))
    _, architecture = model_class_for(spec.config, spec.trust_remote_code)
    meta = build_meta_model(copy.deepcopy(spec.config), spec.trust_remote_code)
    report_skips = skip_modules
    if stored is not None:
        skip_modules = stored_plan.skip_modules(stored, meta)
        report_skips = None  # the checkpoint's own list: its config carries it
    if stored is not None:
        stored = stored_plan.resolve_layout(stored, meta)
    inventory = replace(take_inventory(meta, skip_modules), stored=stored)
    enter_step("checking the workload options")
    if workload_options.get("attn") is None:
        # No --attn: what from_pretrained picks, SDPA where the class supports it and eager
        # where it does not (gpt-oss), read off the model transformers just built.
        picked = getattr(meta.config, "_attn_implementation", None)
        workload_options = {**workload_options, "attn": "eager" if picked == "eager" else "sdpa"}
    workload = make_workload(mode, spec.config, **workload_options)
    check_text_step(meta, workload)
    workload, plan_warnings = _checkpointing_the_model_supports(workload, meta)
    check_lora_targets(workload, inventory, spec.id)
    notes = list(spec.notes)
    text_note = text_class_note(spec.config)
    if text_note is not None:
        notes.append(text_note)
    if workload.runs_step:
        # Optional kernel packages' functions (mamba-ssm, ...): traced on their PyTorch path.
        kernel_note = fallback_note(meta, inventory.model_type)
        if kernel_note is not None:
            notes.append(kernel_note)
    if workload.liger_rope or workload.liger_layer_norm:
        from qplan.planner.liger_kernels import check_liger

        notes.extend(check_liger(getattr(meta.config, "model_type", None),
                                 workload.liger_rope, workload.liger_layer_norm))
    if stored is None:
        # A pre-quantised checkpoint keeps its own skip list; a bnb plan leaves out what the
        # model cannot run quantised, and the report and kwargs carry that list.
        skip_modules, inventory = _skip_weights_used_as_matrices(
            spec, names, meta, inventory, skip_modules, notes
        )
        report_skips = skip_modules
    lora_excluded = _lora_exclusions(meta, workload, notes)
    if workload.lora_mlp_kernel or workload.lora_qkv_kernel or workload.lora_o_kernel:
        from qplan.planner.lora_kernels import lora_kernel_note

        notes.append(lora_kernel_note(meta, workload))
    image_report = _image_report(spec.config, meta, workload, notes)
    inventory = replace(inventory, moe_experts=workload.quantize_moe_experts)
    budget = budget_for(gpu_target, room)
    if budget.headroom_bytes >= gpu_target.memory_bytes:
        raise UsageError(
            f"headroom {headroom!r} is as large as {gpu_target.name}'s whole memory; "
            "use e.g. --headroom 5% or --headroom 1GiB"
        )
    compute = compute_dtype_for(gpu_target)
    multi = _multi_gpu(
        gpu_target,
        room,
        num_gpus,
        spec,
        inventory,
        meta,
        workload,
        compute,
        quant_storage,
        skip_modules,
        strategy,
    )
    if multi is not None:
        gpu_target = replace(gpu_target, count=len(multi.budgets))
        if strategy is not None and len(multi.budgets) == 1:
            notes.append(f"{strategy} planned on 1 GPU (world size 1), as the run would shard "
                         "over one process; give the GPUs it runs on with --num-gpus N or "
                         "--gpu Nx<GPU>")
        # Mixed devices (--gpu auto): the figures are shown against the smallest one.
        budget = min(multi.budgets, key=lambda b: b.usable_bytes)

    # Computed once for every plan: which depths to trace this model at.
    depth_plan = trace_plan(
        layer_signatures(inventory, spec.config), num_layers(spec.config)
    ) if workload.runs_step else None
    # One config's traces, each run once: the same step comes back for other candidates.
    # bitsandbytes candidates' inference steps are derived from the plain row's
    # (planner/derived_traces.py), under the on-disk cache.
    # Double-quantised 4-bit rows' training steps are derived from the single-quantised
    # row's (planner/derived_double_quant.py).
    tracer = shared_traces(cached_tracer(deriving(deriving_double_quant(trace_components))))

    def make_plan(precision: str, wl: Workload):
        enter_step(f"planning {wl.mode} at {precision}, batch {wl.batch}, seq {wl.seq_len}")
        return workload_components(
            inventory,
            wl,
            precision,
            compute,
            quant_storage,
            config=spec.config,
            gpu_architecture=gpu_target.architecture,
            trust_remote_code=spec.trust_remote_code,
            skip_modules=list(skip_modules) if skip_modules is not None else None,
            target=target,
            tracer=tracer,
            depth_plan=depth_plan,
        )

    def plan_key(precision: str, wl: Workload) -> tuple | None:
        # Candidates of one trace group run the same step: trace one of each group.
        return (trace_group(precision), wl) if wl.runs_step else None

    def plan_group(precision: str, wl: Workload) -> Any:
        # What one plan worker makes together. Training steps of one workload: its rows
        # run the same ops outside their layers' weights (the meta-op memo answers them
        # once per process), and a double-quantised 4-bit row's step is derived from its
        # single-quantised row's as that one is recorded (planner/derived_double_quant.py).
        # On Nemotron-H-56B's DPO plan that took 62 s of CPU to 47 (by trace group: each
        # row's prepared model reused, each worker meeting each workload afresh). An
        # inference step: its plain row at that workload (the rows derived from its
        # recorded step).
        if wl.is_training:
            return ("step", wl)
        row = reference_row(precision, compute)
        return trace_group(precision) if row is None else (row, wl)

    def plan_size(precision: str, wl: Workload) -> int:
        # What a plan costs grows with its sequence (a Mamba scan runs token by token; a
        # larger batch runs the same ops on meta): the longest probes go out first.
        return wl.seq_len

    plans = Plans(make_plan, plan_key, plan_group, size=plan_size)
    try:
        plan_for = plans.get

        def plan_one(precision: str):
            plan = plan_for(precision, workload)
            if multi is None:
                return plan.weights, plan.components, plan.peak_allocated_bytes
            busiest = multi.strategy(precision, plan).busiest
            parts = {k: v for k, v in busiest.components.items() if k != "cuda_context"}
            return plan.weights, parts, plan.peak_allocated_bytes

        plans.make_ahead([(precision, workload) for precision in names])
        decision = decide(
            names,
            gpu_target,
            budget,
            plan_one,
            explicit=explicit,
            compute_dtype=compute,
            fits_for=None if multi is None else lambda p: multi.found[p].fits,
            strategy_for=None if multi is None else lambda p: multi.found[p].name,
            quant_storage=quant_storage,
            skip_modules=report_skips,
            stored_first=stored.precision if stored is not None else None,
        )
        if stored is not None:
            decision = _stored_decision(decision, stored, gpu_target)
        if workload.activation_offloading:
            # Beside the GPU: the pinned host memory the offloaded activations take.
            decision = replace(decision, candidates=tuple(
                replace(c, host_bytes=plan_for(c.precision, workload).host_bytes)
                for c in decision.candidates
            ))
        strategy = _chosen_strategy(multi, decision)
        if strategy is not None and strategy.device_map and decision.recommendation is not None:
            # The planned split, as from_pretrained takes it: what `qplan load` passes too.
            rec = decision.recommendation
            quantized = PRECISIONS[rec.precision].method.max_memory_fraction()
            kwargs = {**rec.load_kwargs, "device_map": dict(strategy.device_map)}
            if strategy.max_memory:
                kwargs["max_memory"] = {
                    str(k): v
                    for k, v in from_pretrained_max_memory(strategy.max_memory, quantized).items()
                }
            decision = replace(decision, recommendation=replace(rec, load_kwargs=kwargs))
        warnings = [*plan_warnings, *decision.warnings]
        if stored is None:
            warnings.extend(unquantized_warning(inventory, names))
        on_disk = _stored_bytes(spec)
        warnings.extend(_stored_mismatch(on_disk, decision, stored, config_dtype))
        solutions: list[Solution] = []
        variables = [solve] if solve else []
        if decision.recommendation is None and workload.runs_step and not variables:
            variables = ["batch", "seq_len"]
        if variables:
            if not workload.runs_step:
                raise UsageError(f"--solve needs a workload: use --mode {', '.join(STEP_MODES)}")
            order = choosable(names, gpu_target, explicit)
            limit = budget.available_bytes - budget.headroom_bytes
            # The advice's changed workloads go with the searches' first round.
            tries = advice_plans(decision, workload, order)

            def make_round(pairs: Sequence[tuple[str, Workload]]) -> None:
                plans.make_ahead([*pairs, *tries])
                tries.clear()

            plans_ahead([(precision, variable) for variable in variables for precision in order],
                        workload, plans.known, make_round, budget.cuda_context_bytes, limit,
                        spec.config)
            plans.make_ahead(tries)
            for variable in variables:
                for precision in order:
                    solutions.append(
                        solve_one(
                            precision,
                            variable,
                            workload,
                            plan_for,
                            budget.cuda_context_bytes,
                            limit,
                            spec.config,
                        )
                    )
            warnings.extend(
                advice_when_nothing_fits(decision, workload, plan_for, budget, gpu_target, order)
            )
        return Report(
            model=ModelInfo(
                id=spec.id,
                source=spec.source,
                model_type=inventory.model_type,
                architecture=architecture,
                parameters=inventory.num_parameters,
                dtype=config_dtype,
                revision=spec.revision,
                config_path=spec.config_path,
                quantization=_quantization_info(stored, inventory, gpu_target),
                stored_bytes=on_disk.bytes if on_disk is not None else None,
            ),
            gpu=GpuInfo(
                name=gpu_target.name,
                count=gpu_target.count,
                memory_bytes=gpu_target.memory_bytes,
                source=gpu_target.source,
                compute_capability=gpu_target.compute_capability,
                bf16=gpu_target.bf16,
                architecture=gpu_target.architecture,
                free_bytes=gpu_target.free_bytes,
                cuda_context_bytes=budget.cuda_context_bytes,
                headroom_bytes=budget.headroom_bytes,
                usable_bytes=budget.usable_bytes,
            ),
            workload={**workload_dict(workload, compute, quant_storage, target, report_skips,
                                      lora_excluded), **image_report},
            candidates=decision.candidates,
            recommendation=decision.recommendation,
            warnings=tuple(warnings),
            solutions=tuple(solutions),
            notes=(*notes, *_stored_notes(stored, gpu_target)),
            versions=_versions(),
            devices=strategy.devices if strategy is not None else (),
            strategy=strategy,
        )
    finally:
        # The plan workers, if any were forked, end with the estimate.
        plans.close()


def stored_quantization(spec: ModelSpec) -> Any:
    """The checkpoint's own quantisation (config.json, or ModelOpt's hf_quant_config.json
    that model_source folds into the config), None for a plain checkpoint."""
    from qplan.planner.quant import read_checkpoint

    return read_checkpoint(getattr(spec.config, "quantization_config", None))


def _stored_decision(decision: Decision, stored: Any, gpu: GpuTarget) -> Decision:
    """Candidate notes and kwargs for a pre-quantised checkpoint: which of stored /
    dequantised transformers gives ``gpu``, and the kwargs that load the chosen one."""
    from qplan.planner.quant import method_named

    runs, notes = stored_plan.gpu_notes(stored, gpu)
    candidates = tuple(
        replace(c, notes=(*c.notes, *notes)) if c.precision == stored.precision else c
        for c in decision.candidates
    )
    rec = decision.recommendation
    if rec is not None and rec.precision == stored.dequantized:
        kwargs = method_named(stored.method).dequantize_kwargs(
            stored, str(rec.load_kwargs.get("dtype", "bfloat16")))
        why = "" if runs else " (the stored format does not run on this GPU)"
        rec = replace(rec, load_kwargs={**rec.load_kwargs, **kwargs},
                      reason=f"dequantised to {rec.precision} at load{why}: {rec.reason}")
    elif rec is not None:
        rec = replace(rec, reason=f"as stored ({stored.quant_method}): {rec.reason}")
    return replace(decision, candidates=candidates, recommendation=rec)


def _stored_bytes(spec: ModelSpec) -> Any:
    from qplan.loaders.stored_bytes import stored_bytes_of

    return stored_bytes_of(spec)


# Planned and stored weights may differ by serialisation details (bitsandbytes' packed
# quant-state JSON, non-persistent buffers); beyond this share the layout is unexplained.
STORED_TOLERANCE = 0.01


def _stored_mismatch(on_disk: Any, decision: Decision, stored: Any,
                     config_dtype: str | None) -> list[str]:
    """A warning when the checkpoint's safetensors disagree with the plan of the candidate
    that loads it as stored (its own format, or the config dtype for plain checkpoints)."""
    if on_disk is None:
        return []
    from qplan.planner.precision import find_precision

    reference = stored.precision if stored is not None else find_precision(
        "none", full_dtype=config_dtype or "")
    candidate = next((c for c in decision.candidates if c.precision == reference), None)
    if candidate is None or on_disk.bytes == 0:
        return []
    gap = candidate.weights_bytes - on_disk.bytes
    if abs(gap) <= STORED_TOLERANCE * on_disk.bytes:
        return []
    return [
        f"planned {candidate.precision} weights ({candidate.weights_bytes} B) differ from the "
        f"{on_disk.bytes} B the checkpoint's safetensors hold ({on_disk.tensors} tensors, "
        f"{100 * gap / on_disk.bytes:+.1f}%) beyond what the format explains: the checkpoint "
        "may use a layout qplan does not know; the planned figure is the one used"
    ]


def _stored_notes(stored: Any, gpu: GpuTarget) -> tuple[str, ...]:
    if stored is None:
        return ()
    bits = f"{stored.bits}-bit " if stored.bits else ""
    head = (f"stored quantised: {bits}{stored.quant_method} (from {stored.source}); planned "
            "as stored" + (f" or dequantised to {stored.dequantized}" if stored.dequantized
                           else ""))
    return (head, *stored_plan.gpu_notes(stored, gpu)[1])


def _quantization_info(stored: Any, inventory: Any, gpu: GpuTarget) -> dict | None:
    if stored is None:
        return None
    from qplan.planner.precision import PRECISIONS as TABLE

    method = TABLE[stored.precision].method
    settings = QuantSettings(stored=stored)
    kept = sorted({t.module_type for t in inventory.parameters
                   if not method.replaces(t, settings)})
    runs, notes = stored_plan.gpu_notes(stored, gpu)
    return {
        **stored.as_dict(),
        "unquantized_modules": list(inventory.skip_modules),
        "unquantized_module_types": kept,
        "stays_quantized_on_gpu": runs,
        "gpu_note": notes[0] if notes else None,
    }


def _multi_gpu(
    target: GpuTarget,
    room: Headroom,
    num_gpus: int | None,
    spec: ModelSpec,
    inventory: Any,
    meta: Any,
    workload: Workload,
    compute: str,
    quant_storage: str,
    skip_modules: Sequence[str] | None,
    strategy: str | None = None,
) -> Any:
    """The multi-GPU planner when the target has several GPUs, or when training names its
    ``strategy`` (then even on one); None otherwise."""
    from qplan.planner.multi_gpu import MultiGpuPlanner, device_budgets

    devices = None
    if target.source == "nvml" and num_gpus is None:
        from qplan.errors import QplanError
        from qplan.loaders.gpus import auto_devices

        try:
            devices = auto_devices()  # every visible GPU, each with its own free memory
        except QplanError:
            devices = None
        if devices is not None and len(devices) <= 1:
            devices = None
    budgets = device_budgets(target, room, devices)
    if strategy is not None and not workload.is_training:
        raise UsageError(f"strategy {strategy} shards training; use it with a training mode, "
                         f"not {workload.mode}")
    if len(budgets) <= 1 and strategy is None:
        return None
    return MultiGpuPlanner(
        config=spec.config,
        inventory=inventory,
        meta=meta,
        workload=workload,
        budgets=budgets,
        gpu_name=target.name,
        compute_dtype=compute,
        quant_storage=quant_storage,
        skip_modules=list(skip_modules) if skip_modules is not None else None,
        trust_remote_code=spec.trust_remote_code,
        strategies=(strategy,) if strategy is not None else STRATEGIES,
    )


def _chosen_strategy(multi: Any, decision: Decision) -> Any:
    """The strategy of the recommendation, else of the smallest candidate (what comes
    closest), so the report shows how far off the GPUs are."""
    if multi is None or not multi.found:
        return None
    if decision.recommendation is not None:
        return multi.found.get(decision.recommendation.precision)
    smallest = min(
        (c for c in decision.candidates if c.precision in multi.found), key=lambda c: c.total_bytes
    )
    return multi.found[smallest.precision]


def measure_workload(
    model: str | ModelSpec,
    *,
    precision: str = "bf16",
    mode: str = "inference",
    layers: int | None = None,
    device: str | None = None,
    gpu: str | GpuTarget = "80GiB",
    revision: str | None = None,
    trust_remote_code: bool = False,
    **workload_options: Any,
) -> Report:
    """Predict, then run the workload for real on random weights here and compare.

    ``layers`` keeps the first N decoder layers (to measure a big model on a small
    machine); the prediction is made for the same shrunk model and the same device.
    """
    import torch

    from qplan.loaders.measure import measure, shrink

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    _choice(device, ("cpu", "cuda"), "--device")
    parse_precisions(precision)
    spec = resolve(model, revision, trust_remote_code)
    small = replace(spec, config=shrink(spec.config, layers))
    report = estimate(
        small, gpu=gpu, mode=mode, precisions=precision, target=device, **workload_options
    )
    candidate = report.candidate(precision)
    attn = report.workload.get("attn", workload_options.get("attn"))
    workload = make_workload(mode, small.config, **{**workload_options, "attn": attn})
    if device == "cpu":
        from qplan.loaders.host_memory import check_host_room

        check_host_room(
            candidate.peak_allocated_bytes,
            candidate.weights_bytes,
            f"measuring {spec.id} ({mode}, {precision}) on CPU",
            "pass --layers N to keep only the first N decoder layers",
        )
    enter_step(f"measuring {mode} at {precision} on {device}")
    skips = report.workload.get("skip_modules")
    measured = measure(small.config, workload, precision, candidate.compute_dtype, device=device,
                       skip_modules=list(skips) if skips else None)
    predicted = candidate.peak_allocated_bytes
    block = {
        "device": device,
        "precision": precision,
        "layers": measured.layers,
        "peak_bytes": measured.peak_bytes,
        "predicted_peak_bytes": predicted,
        "error_pct": 100.0 * (predicted - measured.peak_bytes) / measured.peak_bytes,
        "components": measured.components,
        "predicted_components": {
            k: v for k, v in candidate.components.items() if k != "cuda_context"
        },
        "reserved_bytes": measured.reserved_bytes,
        "nvml_used_bytes": measured.nvml_used_bytes,
        "predicted_total_bytes": candidate.total_bytes,
    }
    if workload.activation_offloading:
        block["host_bytes"] = measured.host_bytes
        block["predicted_host_bytes"] = candidate.host_bytes
    return replace(report, measured=block)


def estimate_axolotl(
    path: str, *, model: str | ModelSpec | None = None, gpu: str | GpuTarget = "auto",
    **options: Any,
) -> Report:
    """Plan an Axolotl YAML: its model, workload and GPU limit, with ``options`` (the
    estimate keyword arguments a user sets) winning over the file. The report lists every
    key of the file (``report.axolotl``) and warns about each key that changes memory in
    a way qplan does not model."""
    from qplan.loaders.axolotl import read_axolotl

    plan_file = read_axolotl(path)
    if gpu == "auto" and plan_file.gpu:
        gpu = plan_file.gpu
    kwargs = {**plan_file.estimate_kwargs, **options}
    target: str | ModelSpec = model or plan_file.model
    extra_warnings: tuple[str, ...] = ()
    if "images" in plan_file.estimate_kwargs and "images" not in options:
        # The YAML's processor asks for images; a model whose images qplan does not lay
        # out is planned on text, with a warning, rather than refused.
        from qplan.planner.vision import takes_images

        target = resolve(target, kwargs.get("revision"), bool(kwargs.get("trust_remote_code")))
        if not takes_images(target.config):
            kwargs.pop("images")
            kwargs.pop("image_size", None)
            extra_warnings = (
                f"processor_type: qplan does not lay out {target.config.model_type}'s image "
                "inputs; planned on text only (not modelled: images)",)
    if plan_file.liger_rope_unset and "liger_rope" not in options:
        from qplan.planner.liger_kernels import AXOLOTL_ROPE_DEFAULT, ROPE_REFUSED

        target = resolve(target, kwargs.get("revision"), bool(kwargs.get("trust_remote_code")))
        model_type = target.config.model_type
        if model_type in AXOLOTL_ROPE_DEFAULT:
            extra_warnings += (
                f"liger_rope: Axolotl's Liger plugin turns Liger's RoPE on for {model_type} "
                f"when liger_rope is unset ({ROPE_REFUSED[model_type]}); planned with "
                "transformers' RoPE (set liger_rope: false to run what is planned)",)
    target, kwargs, kernel_notes, kernel_warnings = _axolotl_lora_kernels(
        plan_file, target, kwargs, options, gpu)
    extra_warnings += kernel_warnings
    keys = plan_file.keys
    try:
        report = _estimate_axolotl_kernels(plan_file, target, gpu, kwargs, options)
    except ExpertDropoutError:
        # Axolotl patches peft's ParamWrapper to build fused-expert adapters without
        # dropout and keeps it on the other LoRA layers (loaders/adapter.py); qplan's
        # trace has no such patch, so the file is planned without dropout anywhere.
        if "lora_dropout" in options or not kwargs.get("lora_dropout"):
            raise
        report = _estimate_axolotl_kernels(plan_file, target, gpu,
                                           {**kwargs, "lora_dropout": 0.0}, options)
        keys = keys.with_not_modelled(
            "lora_dropout",
            "dropout on the non-expert LoRA layers (Axolotl drops it on fused expert "
            "adapters only; planned with lora_dropout 0 everywhere)",
        ) if keys is not None else None
    return replace(
        report,
        axolotl=keys.as_dict() if keys is not None else None,
        warnings=report.warnings + (keys.warnings if keys is not None else ()) + extra_warnings,
        notes=report.notes + tuple(n for n in plan_file.notes
                                   if not (extra_warnings and n.startswith("processor_type:")))
        + kernel_notes,
    )


# Gemma 4 unified: patch_self_attn_lora skips the QKV/O rewrite without fused_attn_kernel
# (axolotl/monkeypatch/lora_kernels.py:283-299); the MLP kernel still applies.
_QKV_O_SKIPPED_UNFUSED = ("gemma4_unified", "gemma4_unified_text")
_TURN_OFF = "lora_mlp_kernel: false, lora_qkv_kernel: false, lora_o_kernel: false"


def _axolotl_lora_kernels(
    plan_file: Any, target: str | ModelSpec, kwargs: dict[str, Any], options: dict[str, Any],
    gpu: str | GpuTarget,
) -> tuple[str | ModelSpec, dict[str, Any], tuple[str, ...], tuple[str, ...]]:
    """The LoRA kernels of an Axolotl YAML (set true, or turned on by Axolotl as
    ``read_axolotl`` found), after what Axolotl decides from the model and the GPU count:
    off for a model type its model_support marks unsupported (normalize_config), off when
    auto-enabled on more than one GPU under FSDP1 (refused when set), QKV/O skipped on
    Gemma 4 unified without fused_attn_kernel. ``options`` (the user's) win over the file.
    Returns (target, kwargs, notes, warnings)."""
    from qplan.loaders.axolotl import (
        LORA_KERNEL_KEYS,
        LORA_KERNELS_UNSUPPORTED,
        lora_kernels_fsdp1_multi_gpu,
    )

    from_file = [k for k in LORA_KERNEL_KEYS if kwargs.get(k) and k not in options]
    if not from_file:
        return target, kwargs, (), ()
    auto = plan_file.lora_kernels_auto
    if auto and options.get("mode") not in (None, "lora", "qlora"):
        # --mode overrides the file's adapter: Axolotl's rule is about LoRA runs.
        return target, {k: v for k, v in kwargs.items() if k not in from_file}, (), ()
    target = resolve(target, kwargs.get("revision"), bool(kwargs.get("trust_remote_code")))
    model_type = str(getattr(target.config, "model_type", ""))
    names = ", ".join(from_file)
    why_off = None
    if model_type in LORA_KERNELS_UNSUPPORTED:
        why_off = (f"Axolotl 0.19's model support marks them unsupported for {model_type} "
                   f"({LORA_KERNELS_UNSUPPORTED[model_type]}) and normalize_config turns "
                   "them off")
    elif plan_file.fsdp1_config:
        n_gpu = resolve_target(gpu, kwargs.get("num_gpus")).count
        if lora_kernels_fsdp1_multi_gpu(True, n_gpu):
            if not auto:
                # check_multigpu_lora_kernels (axolotl/utils/schemas/config.py:1929-1947).
                raise UsageError(
                    f"axolotl config {plan_file.keys.path if plan_file.keys else ''}: "
                    f"{names} on {n_gpu} GPUs with FSDP1 (fsdp_config without fsdp_version: "
                    "2): Axolotl 0.19 refuses it; set fsdp_version: 2 or the kernel keys false"
                )
            why_off = (f"Axolotl 0.19 does not turn them on for {n_gpu} GPUs under FSDP1 "
                       "(fsdp_config without a top-level fsdp_version: 2)")
    if why_off is not None:
        kwargs = {k: v for k, v in kwargs.items() if k not in from_file}
        if auto:
            return target, kwargs, (
                f"LoRA kernels: {why_off}; planned without them",), ()
        return target, kwargs, (), (
            f"axolotl keys {names}: {why_off}; planned without them",)
    notes: list[str] = []
    warnings: list[str] = []
    if model_type in _QKV_O_SKIPPED_UNFUSED and not plan_file.fused_attn_kernel:
        skipped = [k for k in ("lora_qkv_kernel", "lora_o_kernel") if k in from_file]
        if skipped:
            kwargs = {k: v for k, v in kwargs.items() if k not in skipped}
            notes.append(f"{', '.join(skipped)}: Axolotl 0.19 skips the QKV/O rewrite on "
                         f"{model_type} without fused_attn_kernel: true; planned without "
                         "them")
    if auto:
        notes.append(
            "LoRA kernels: Axolotl 0.19 turns lora_mlp_kernel, lora_qkv_kernel and "
            "lora_o_kernel on for a LoRA / QLoRA YAML that leaves them unset "
            "(check_auto_enable_lora_kernels), so the plan has them; set "
            f"{_TURN_OFF} to train without them"
            + ("" if plan_file.lora_embeddings_targeted else
               " (its lora_embedding_kernel, on too, changes nothing here: the "
               "embeddings carry no LoRA)"))
        if plan_file.lora_embeddings_targeted:
            warnings.append(
                "lora_embedding_kernel: Axolotl 0.19 turns it on with the others and it "
                "runs the LoRA embeddings through its fused kernel: not modelled, the plan "
                "is made without it (set lora_embedding_kernel: false to run what is planned)")
    return target, kwargs, tuple(notes), tuple(warnings)


def _estimate_axolotl_kernels(plan_file: Any, target: str | ModelSpec, gpu: str | GpuTarget,
                              kwargs: dict[str, Any], options: dict[str, Any]) -> Report:
    """``estimate``, with a LoRA-kernel refusal on auto-enabled kernels naming the YAML fix:
    Axolotl fails there too (an attention it cannot rewrite, an activation its MLP kernel
    does not run), and the YAML never asked for them."""
    from qplan.planner.lora_kernels import LoraKernelError

    try:
        return estimate(target, gpu=gpu, **kwargs)
    except LoraKernelError as exc:
        if not plan_file.lora_kernels_auto or any(k in options for k in
                                                  ("lora_mlp_kernel", "lora_qkv_kernel",
                                                   "lora_o_kernel")):
            raise
        why = re.sub(r"; plan without .*$", "", str(exc))
        raise LoraKernelError(
            f"Axolotl 0.19 turns its LoRA kernels on for this YAML, which leaves them unset, "
            f"and fails: {why}; set {_TURN_OFF} in the YAML") from None
