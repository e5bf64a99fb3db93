"""GPU descriptions used by the planner: a profile from profiles/gpus and the target it becomes."""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
MIB = 1024**2


@dataclass(frozen=True)
class GpuProfile:
    """One shipped GPU profile (profiles/gpus/<key>.json)."""

    key: str  # file stem, e.g. "rtx-4090"
    name: str  # display name, e.g. "NVIDIA GeForce RTX 4090"
    aliases: tuple[str, ...]  # extra names users type: "4090", "rtx 4090", ...
    nvml_names: tuple[str, ...]  # names nvmlDeviceGetName reports, for `--gpu auto`
    memory_bytes: int  # total memory as NVML reports it where known
    memory_source: str  # where memory_bytes came from (NVML reading, spec sheet, ...)
    compute_capability: str  # "8.9"
    architecture: str  # "ampere", "ada", "hopper", "blackwell", "turing", "volta", ...
    bf16: bool
    fp8: bool
    bandwidth_gb_s: float  # memory bandwidth, GB/s (10^9)
    segment: str  # "consumer" | "workstation" | "datacenter"
    sources: tuple[str, ...]  # provenance of the other figures


@dataclass(frozen=True)
class GpuTarget:
    """What an estimate plans against: one or more identical devices of a given memory."""

    name: str
    count: int
    memory_bytes: int  # per device, total
    source: str  # "profile" | "nvml" | "size"
    compute_capability: str | None
    bf16: bool
    architecture: str | None = None
    free_bytes: int | None = None  # per device, from NVML when source == "nvml"
    profile_key: str | None = None
