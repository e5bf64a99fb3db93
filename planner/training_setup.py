"""The patches a training run applies after loading; shared by the planner and `qplan load`.

The same function prepares the meta model the planner traces and the real model qplan
loads, so what is estimated is what is loaded:

* LoRA / QLoRA: for a k-bit base, peft's ``prepare_model_for_kbit_training`` (freezes the
  base, casts every non-4-bit 16-bit parameter to float32: embeddings, norms, untied
  lm_head, biases), except with Axolotl's quantised experts, where Axolotl skips it; then
  LoRA through peft (adapters in float32, peft's default); ``all-linear`` without the
  modules peft refuses for the architecture; ``target_parameters`` when asked.
* Gradient checkpointing when asked, reentrant or not as the workload says (transformers'
  own ``gradient_checkpointing_enable``, so torch.utils.checkpoint runs as in the real
  step); ``use_cache=False``.
* Full fine-tuning: every parameter trainable, or those Axolotl's ``unfrozen_parameters``
  patterns name (planner/unfrozen.py).
* Activation offloading (Axolotl's ``activation_offloading``, planner/offload.py):
  transformers' checkpointing left off (still on for a k-bit base, through peft's
  preparation as Axolotl calls it), every decoder layer wrapped in torch's non-reentrant
  checkpoint wrapper after the adapters are added.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qplan.errors import ExpertDropoutError, UsageError
from qplan.planner.vision import vision_module_prefixes
from qplan.planner.workload import Workload


def gc_kwargs(workload: Workload) -> dict[str, bool]:
    """The ``gradient_checkpointing_kwargs`` the run passes: reentrant checkpointing runs
    each layer's forward under no_grad and keeps only its inputs; non-reentrant keeps
    what autograd saves minus what its saved-tensor hooks can drop (not plain attributes
    such as bitsandbytes LLM.int8's ``ctx.tensors``)."""
    return {"use_reentrant": workload.gc_reentrant}


def _not_a_plain_linear(module: nn.Module) -> bool:
    """An nn.Linear subclass with its own forward (Llama 4's router returns scores and
    logits): peft's LoRA layer adds x @ A @ B to the base output, which it is not."""
    cls = type(module)
    return (
        isinstance(module, nn.Linear)
        and cls.forward is not nn.Linear.forward
        # bitsandbytes' quantised Linears compute the same map, and peft adapts them.
        and not cls.__module__.startswith("bitsandbytes.")
    )


def peft_refused_targets(model: nn.Module) -> tuple[str, ...]:
    """Names of Linear modules ``all-linear`` would pick that peft refuses to adapt on
    this architecture (out_proj of Mamba-based models), asked of peft's own check, and
    Linear subclasses whose forward is not a linear map (peft's LoRA forward fails)."""
    try:
        from peft.tuners.lora import LoraConfig
        from peft.tuners.tuners_utils import _check_lora_target_modules_mamba as check
    except ImportError:  # a peft without per-architecture rules refuses nothing
        return ()
    from transformers.pytorch_utils import Conv1D

    probe = LoraConfig(target_modules="all-linear")
    refused = set()
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if not isinstance(module, (nn.Linear, Conv1D)) or leaf in refused:
            continue
        if _not_a_plain_linear(module):
            refused.add(leaf)
            continue
        try:
            check(probe, model, leaf)
        except ValueError:
            refused.add(leaf)
    return tuple(sorted(refused))


def lora_config(workload: Workload, model: nn.Module | None = None) -> Any:
    """The workload's LoraConfig; ``all-linear`` leaves out what peft refuses for
    ``model``'s architecture (exclude_modules, which peft applies before its check)."""
    from peft import LoraConfig

    exclude: str | list[str] | None = None
    if workload.target_modules == "all-linear" and model is not None:
        exclude = list(peft_refused_targets(model)) or None
    extra: dict[str, Any] = {}
    if workload.lora_target_parameters:
        extra["target_parameters"] = target_parameters(workload.lora_target_parameters, model)
        if model is not None:
            # The parametrisations' holders (``experts.parametrizations.down_proj``) end in
            # a target module's name; they are not layers (Axolotl's peft patch skips them).
            from torch.nn.utils.parametrize import ParametrizationList

            holders = [name for name, module in model.named_modules()
                       if isinstance(module, ParametrizationList)]
            if holders:
                exclude = [*(exclude or []), *holders]
    if model is not None and workload.vision_frozen:
        exclude = _with_vision_excluded(exclude, vision_module_prefixes(model))
    return LoraConfig(
        r=workload.lora_r,
        lora_alpha=workload.alpha,
        lora_dropout=workload.lora_dropout,
        target_modules=workload.target_modules,
        exclude_modules=exclude,
        task_type="CAUSAL_LM",
        **extra,
    )


def _with_vision_excluded(exclude: list[str] | None,
                          prefixes: tuple[str, ...]) -> str | list[str] | None:
    """peft's exclude_modules with everything under the vision tower and projector added:
    one regular expression (peft's re.fullmatch on each module's full name) that also
    keeps the refused leaf names."""
    if not prefixes:
        return exclude
    parts = [rf"{re.escape(prefix)}(\..+)?" for prefix in prefixes]
    if exclude:
        parts.append(rf"(.+\.)?({'|'.join(re.escape(name) for name in exclude)})")
    return "|".join(f"(?:{part})" for part in parts)


def freeze_vision(model: nn.Module) -> None:
    """Full fine-tuning with the vision tower and projector frozen (Axolotl's
    ``freeze_mm_modules``)."""
    for prefix in vision_module_prefixes(model):
        model.get_submodule(prefix).requires_grad_(False)


# Fused parameters that stand for unfused names a target list may give (Axolotl's peft
# patch adds the fused one when the module has no parameter of the given name).
UNFUSED_TO_FUSED = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def target_parameters(targets: Sequence[str], model: nn.Module | None) -> list[str]:
    """peft's ``target_parameters`` for ``targets`` (suffixes such as
    ``mlp.experts.gate_up_proj``), as Axolotl hands them over: peft matches a plain
    parameter by suffix itself, but a parametrised one (a quantised expert) only by its
    full name, so each suffix is expanded to the full names of the parametrised modules
    holding it (Axolotl's patch of peft's _inject_parameters does the same), an unfused
    gate/up name to the fused parameter where only that exists."""
    out = list(targets)
    if model is None:
        return out
    for module_name, module in model.named_modules():
        if not hasattr(module, "parametrizations"):
            continue
        for target in targets:
            path, _, leaf = target.rpartition(".")
            if path and not (module_name == path or module_name.endswith("." + path)):
                continue
            if leaf not in module.parametrizations and leaf in UNFUSED_TO_FUSED:
                leaf = UNFUSED_TO_FUSED[leaf]
            full = f"{module_name}.{leaf}"
            if leaf in module.parametrizations and full not in out:
                out.append(full)
    return out


# Streaming multiprocessors a CUDA plan assumes for Liger's RMSNorm / LayerNorm backward
# (one float32 row of partial weight (and bias) gradients each): H100/H200 SXM.
PLANNED_SMS = 132


def prepare_for_training(
    model: nn.Module,
    workload: Workload,
    quantized: bool,
    *,
    stored_method: str | None = None,
    packed_modules: Sequence[str] = (),
    target: str = "cpu",
) -> nn.Module:
    """Apply the training patches of ``workload`` to a loaded (or meta) model.

    ``stored_method``: the meta model stands in for a checkpoint of this quantisation
    method (``quant_method``: "gptq", "awq") whose packed layers have no meta kernels; the
    Linears named in ``packed_modules`` hold their dequantised weights. peft's k-bit
    preparation is applied as it is to the real model (it reads ``quantization_method``).
    ``target``: the device the step runs on (cuda, cpu), where a kernel's buffers depend
    on it (Liger's RMSNorm backward).
    """
    if (workload.liger_rms_norm or workload.liger_glu or workload.liger_rope
            or workload.liger_layer_norm):
        from qplan.planner.liger_kernels import DEFAULT_SMS, apply_liger_kernels

        apply_liger_kernels(model, workload.liger_rms_norm, workload.liger_glu,
                            sms=PLANNED_SMS if target == "cuda" else DEFAULT_SMS,
                            rope=workload.liger_rope, layer_norm=workload.liger_layer_norm)
    gc = workload.gradient_checkpointing
    # With activation offloading the Trainer's own checkpointing is off: the layers are
    # wrapped instead (below); peft's k-bit preparation still turns it on, as in Axolotl.
    hf_gc = gc and not workload.activation_offloading
    kwargs = gc_kwargs(workload)
    if workload.is_lora:
        from peft import get_peft_model, prepare_model_for_kbit_training

        # Axolotl skips peft's k-bit preparation once its experts are quantised (its
        # loader's _prepare_model_for_quantization: a parametrised expert would dequantise
        # on access), so nothing is upcast to float32.
        if (quantized or stored_method is not None) and not workload.quantize_moe_experts:
            stand_ins = _packed_stand_ins(model, stored_method, packed_modules)
            load_dtype = _embedding_dtype(model)
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs=kwargs
            )
            stand_ins.restore()
            if not workload.kbit_upcast and load_dtype is not None:
                cast_back_like_axolotl(model, load_dtype)
            if hf_gc and stored_method is not None:
                # peft enables checkpointing only for the methods it lists (gptq, not awq);
                # the run's own gradient_checkpointing=True does it for the others.
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            model.requires_grad_(False)
            if hf_gc:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        try:
            model = get_peft_model(model, lora_config(workload, model))
        except ValueError as exc:  # peft's NoMatchingPeftModuleError and its kin
            if "ParamWrapper does not work with lora_dropout" in str(exc):
                # peft adapts fused MoE expert tensors with lora.ParamWrapper, which has no
                # dropout: the user's own get_peft_model refuses the same config.
                raise ExpertDropoutError(
                    f"peft cannot apply LoRA dropout {workload.lora_dropout} to this model's "
                    "fused expert parameters (lora.ParamWrapper has no dropout); plan with "
                    "--lora-dropout 0 (lora_dropout: 0 in the YAML), or name attention "
                    "targets (--lora-targets q_proj,k_proj,v_proj,o_proj)"
                ) from None
            if "not found in the base model" not in str(exc) and "matched" not in str(exc):
                raise
            raise UsageError(
                f"LoRA targets {workload.target_modules!r} match no module of the model; "
                "name modules it has (e.g. q_proj,v_proj) or use all-linear"
            ) from None
        if workload.lora_mlp_kernel or workload.lora_qkv_kernel or workload.lora_o_kernel:
            from qplan.planner.lora_kernels import apply_lora_kernels

            # After get_peft_model, as Axolotl's post-load patch (apply_lora_kernel_patches).
            apply_lora_kernels(model, workload.lora_mlp_kernel, workload.lora_qkv_kernel,
                               workload.lora_o_kernel)
    else:
        model.requires_grad_(True)
        if workload.unfrozen_parameters:
            from qplan.planner.unfrozen import freeze_except

            freeze_except(model, workload.unfrozen_parameters)
        if workload.vision_frozen:
            freeze_vision(model)
        if hf_gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if workload.activation_offloading:
        from qplan.planner.offload import wrap_layers_for_checkpointing

        wrap_layers_for_checkpointing(model)
    config = getattr(model, "config", None)
    if config is not None:
        config.use_cache = False
    model.train()
    return model


# Axolotl's embedding modules by model type (src/axolotl/loaders/utils.py,
# get_linear_embedding_layers, 0.19.0); every other type: embed_tokens and lm_head.
AXOLOTL_EMBEDDING_MODULES: dict[str, tuple[str, ...]] = {
    "gpt_neox": ("embed_in", "embed_out"),
    "falcon": ("word_embeddings", "lm_head"),
    "nemotron_h": ("embeddings", "lm_head"),
    "bailing_hybrid": ("word_embeddings", "lm_head"),
}
AXOLOTL_DEFAULT_EMBEDDINGS = ("embed_tokens", "lm_head")


def _embedding_dtype(model: nn.Module) -> torch.dtype | None:
    """The load dtype, as the (never quantised) input embedding holds it."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if get is not None else None
    weight = getattr(embedding, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) else None


def cast_back_like_axolotl(model: nn.Module, dtype: torch.dtype) -> None:
    """What Axolotl's loader does after peft's k-bit preparation for a LoRA / QLoRA run
    (``_configure_embedding_dtypes`` -> ``_convert_embedding_modules_dtype``, 0.19.0,
    without FSDP): every module with "norm" in its name and every embedding module of
    its table (by name) goes back to the load dtype; biases, routers and other float32
    upcasts stay. ``embeddings_skip_upcast`` changes only the load-time copies."""
    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    embeddings = AXOLOTL_EMBEDDING_MODULES.get(model_type, AXOLOTL_DEFAULT_EMBEDDINGS)
    for name, module in model.named_modules():
        if "norm" in name:
            module.to(dtype)
        if any(m in name for m in embeddings) and hasattr(module, "weight"):
            module.to(dtype)


@dataclass(frozen=True)
class _StandIns:
    """The dequantised Linears standing in for packed layers, with their load dtypes."""

    modules: tuple[tuple[nn.Module, torch.dtype], ...]

    def restore(self) -> None:
        """Undo peft's float32 cast of the stand-in weights: the real packed layers keep
        their qweight / scales as buffers, which peft does not cast; and make each one
        compute as the packed kernels do, in their own dtype, returning the input's dtype
        (AWQ / GPTQ GEMM wrappers: ``x.half()`` in, ``out.to(input_dtype)`` out)."""
        for module, dtype in self.modules:
            module.weight.data = module.weight.data.to(dtype)
            module.register_forward_pre_hook(_input_to_weight_dtype)
            module.register_forward_hook(_output_to_input_dtype)


def _input_to_weight_dtype(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    x = args[0]
    module._qplan_input_dtype = x.dtype  # for the output: the hook sees the cast input
    return (x.to(module.weight.dtype), *args[1:]) if x.dtype != module.weight.dtype else args


def _output_to_input_dtype(module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
    dtype = module.__dict__.pop("_qplan_input_dtype", out.dtype)
    return out.to(dtype) if out.dtype != dtype else out


def _packed_stand_ins(model: nn.Module, stored_method: str | None,
                      packed_modules: Sequence[str]) -> _StandIns:
    if stored_method is None:
        return _StandIns(())
    # What from_pretrained sets on a model loaded from a quantised checkpoint.
    model.quantization_method = stored_method
    found = []
    for name in packed_modules:
        module = model.get_submodule(name)
        found.append((module, module.weight.dtype))
    return _StandIns(tuple(found))
