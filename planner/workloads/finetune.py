"""Supervised fine-tuning with transformers' Trainer: LoRA, QLoRA (LoRA on a 4-bit base)
and full fine-tuning (planner/steps.py: run_training)."""

from __future__ import annotations

from typing import Any

from qplan.planner.workloads.kind import WorkloadKind, fixed

DEFAULT_TRAINING_SEQ = 2048


def prepare(model: Any, workload: Any, quantized: bool, **setup: Any) -> Any:
    """peft and checkpointing (planner/training_setup.py); ``setup``: its keyword options
    (a pre-quantised checkpoint's stored_method and packed_modules)."""
    from qplan.planner.training_setup import prepare_for_training

    return prepare_for_training(model, workload, quantized, **setup)


def _train(model: Any, workload: Any, tracker: Any, seen: Any) -> None:
    from qplan.planner.steps import run_training

    run_training(model, workload, tracker, seen)


KINDS = tuple(
    WorkloadKind(name=name, summary=summary, tuning=fixed(name), step=_train,
                 default_seq_len=DEFAULT_TRAINING_SEQ, prepare=prepare, takes_images=True)
    for name, summary in (
        ("lora", "LoRA"), ("qlora", "LoRA on 4-bit"), ("full", "full fine-tuning"),
    )
)
