"""What the model will do on the GPU: the workload a plan is made for."""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("load", "inference", "lora", "qlora", "full")
TRAINING_MODES = ("lora", "qlora", "full")


@dataclass(frozen=True)
class Workload:
    """A workload. ``load`` is the weights resident on the device and nothing else."""

    mode: str = "load"

    @property
    def is_training(self) -> bool:
        return self.mode in TRAINING_MODES
