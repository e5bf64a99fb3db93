"""The patches a training run applies after loading; shared by the planner and `qplan load`.

The same function prepares the meta model the planner traces and the real model qplan
loads, so what is estimated is what is loaded:

* LoRA / QLoRA: for a k-bit base, peft's ``prepare_model_for_kbit_training`` (freezes the
  base, casts every non-4-bit 16-bit parameter to float32: embeddings, norms, untied
  lm_head, biases); then LoRA through peft (adapters in float32, peft's default);
  ``all-linear`` without the modules peft refuses for the architecture.
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

from typing import Any

from torch import nn

from qplan.errors import UsageError
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

    exclude = None
    if workload.target_modules == "all-linear" and model is not None:
        exclude = list(peft_refused_targets(model)) or None
    return LoraConfig(
        r=workload.lora_r,
        lora_alpha=workload.alpha,
        lora_dropout=workload.lora_dropout,
        target_modules=workload.target_modules,
        exclude_modules=exclude,
        task_type="CAUSAL_LM",
    )


def prepare_for_training(model: nn.Module, workload: Workload, quantized: bool) -> nn.Module:
    """Apply the training patches of ``workload`` to a loaded (or meta) model."""
    gc = workload.gradient_checkpointing
    # With activation offloading the Trainer's own checkpointing is off: the layers are
    # wrapped instead (below); peft's k-bit preparation still turns it on, as in Axolotl.
    hf_gc = gc and not workload.activation_offloading
    kwargs = gc_kwargs(workload)
    if workload.is_lora:
        from peft import get_peft_model, prepare_model_for_kbit_training

        if quantized:
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs=kwargs
            )
        else:
            model.requires_grad_(False)
            if hf_gc:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        try:
            model = get_peft_model(model, lora_config(workload, model))
        except ValueError as exc:  # peft's NoMatchingPeftModuleError and its kin
            if "not found in the base model" not in str(exc) and "matched" not in str(exc):
                raise
            raise UsageError(
                f"LoRA targets {workload.target_modules!r} match no module of the model; "
                "name modules it has (e.g. q_proj,v_proj) or use all-linear"
            ) from None
    else:
        model.requires_grad_(True)
        if workload.unfrozen_parameters:
            from qplan.planner.unfrozen import freeze_except

            freeze_except(model, workload.unfrozen_parameters)
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
