"""What a multi-GPU plan puts on each device: shared by the inference and training planners."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DeviceUse:
    """One device's share of a plan.

    ``device`` is "cuda:N", "cpu" or "disk"; ``components`` has the same names as a
    candidate's (plus ``communication`` for collective buffers); ``limit_bytes`` is what
    the device may hold (available memory minus headroom), None where qplan does not know
    it (host RAM, disk).
    """

    device: str
    components: dict[str, int]
    total_bytes: int
    limit_bytes: int | None = None

    @property
    def fits(self) -> bool:
        return self.limit_bytes is None or self.total_bytes <= self.limit_bytes


@dataclass(frozen=True)
class StrategyOption:
    """One strategy tried for a candidate: its busiest GPU, its host memory, whether it fits."""

    name: str
    per_gpu_bytes: int
    cpu_bytes: int
    fits: bool


@dataclass(frozen=True)
class Strategy:
    """How a candidate spreads over several GPUs, and why this way.

    ``name``: ``device_map`` (inference: layers split across GPUs, accelerate's big-model
    dispatch), ``device_map+offload`` (some layers on CPU or disk), or a training strategy
    (``ddp``, ``fsdp``, ``zero2``, ``zero3``, with ``+offload`` variants).
    ``device_map``/``max_memory`` are what from_pretrained is given (inference only;
    max_memory keys are "0", "1", ..., "cpu", "disk" as strings, for JSON).
    """

    name: str
    reason: str
    fits: bool
    devices: tuple[DeviceUse, ...]
    options: tuple[StrategyOption, ...] = ()
    device_map: dict[str, int | str] | None = None
    max_memory: dict[str, int] | None = None
    offloaded: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)
    layer_class: str | None = None  # the decoder layer class (FSDP's wrap unit)

    @property
    def busiest(self) -> DeviceUse:
        """The GPU with the least room left (the one that decides whether the plan fits)."""
        gpus = [d for d in self.devices if d.device.startswith("cuda")]
        return min(gpus, key=lambda d: (d.limit_bytes or 0) - d.total_bytes)
