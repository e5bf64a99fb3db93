"""The workload registry: one module per workload (planner/workloads/kind.py says what a
module declares). Everything that depends on the workload asks here."""

from __future__ import annotations

from qplan.errors import UsageError
from qplan.planner.workloads import dpo, finetune, grpo, inference, kto, orpo, simpo
from qplan.planner.workloads.kind import WorkloadKind, WorkloadOption

# Registry order is --mode's order (and the schema's enum).
MODULES = (inference, finetune, dpo, kto, orpo, simpo, grpo)
WORKLOADS: dict[str, WorkloadKind] = {
    kind.name: kind for module in MODULES for kind in module.KINDS
}
MODES = tuple(WORKLOADS)
TRAINING_MODES = tuple(name for name, kind in WORKLOADS.items() if kind.training)
# The modes that trace a step (all but load).
STEP_MODES = tuple(name for name, kind in WORKLOADS.items() if kind.runs_step)
# The modes whose step feeds images to a vision-language model (--images).
IMAGE_MODES = tuple(name for name, kind in WORKLOADS.items() if kind.takes_images)
# Axolotl's ``rl:`` value -> the workload.
AXOLOTL_RL = {rl: kind.name for kind in WORKLOADS.values() for rl in kind.axolotl_rl}


def kind_of(mode: str) -> WorkloadKind:
    kind = WORKLOADS.get(mode)
    if kind is None:
        raise UsageError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    return kind


def option_names() -> tuple[str, ...]:
    """Every workload option some kind takes (the CLI's --option, the report's keys)."""
    seen: dict[str, None] = {}
    for kind in WORKLOADS.values():
        for option in kind.options:
            seen.setdefault(option.name)
    return tuple(seen)


def modes_help() -> str:
    return ", ".join(f"{name} ({kind.summary})" for name, kind in WORKLOADS.items())


__all__ = ["AXOLOTL_RL", "IMAGE_MODES", "MODES", "STEP_MODES", "TRAINING_MODES", "WORKLOADS",
           "WorkloadKind", "WorkloadOption", "kind_of", "modes_help", "option_names"]
