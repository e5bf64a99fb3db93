"""The patches a training run applies after loading; shared by the planner and `qplan load`.

The same function prepares the meta model the planner traces and the real model qplan
loads, so what is estimated is what is loaded:

* LoRA / QLoRA: for a k-bit base, peft's ``prepare_model_for_kbit_training`` (freezes the
  base, casts every non-4-bit 16-bit parameter to float32: embeddings, norms, untied
  lm_head, biases); then LoRA through peft (adapters in float32, peft's default).
* Gradient checkpointing, non-reentrant, when asked; ``use_cache=False``.
* Full fine-tuning: every parameter trainable.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from qplan.planner.workload import Workload

GC_KWARGS = {"use_reentrant": False}


def lora_config(workload: Workload) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=workload.lora_r,
        lora_alpha=workload.alpha,
        lora_dropout=workload.lora_dropout,
        target_modules=workload.target_modules,
        task_type="CAUSAL_LM",
    )


def prepare_for_training(model: nn.Module, workload: Workload, quantized: bool) -> nn.Module:
    """Apply the training patches of ``workload`` to a loaded (or meta) model."""
    gc = workload.gradient_checkpointing
    if workload.is_lora:
        from peft import get_peft_model, prepare_model_for_kbit_training

        if quantized:
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs=GC_KWARGS
            )
        else:
            model.requires_grad_(False)
            if gc:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=GC_KWARGS)
        model = get_peft_model(model, lora_config(workload))
    else:
        model.requires_grad_(True)
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=GC_KWARGS)
    config = getattr(model, "config", None)
    if config is not None:
        config.use_cache = False
    model.train()
    return model
