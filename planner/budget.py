"""How much of a GPU a workload may use: device memory, CUDA context, headroom.

The CUDA context is what a PyTorch process holds on the device before its first tensor:
driver context, the kernels CUDA loads lazily (CUDA_MODULE_LOADING=LAZY, the default since
CUDA 11.7 / torch 1.13) and cuBLAS/cuDNN handles. PyTorch PR 86509 measured 287,047,680 B
with lazy loading on an A100 (666,632,192 B eager); field reports put a PyTorch process at
300-500 MB depending on GPU and driver, larger on Hopper and Blackwell whose cuBLAS
workspaces are 32 MiB per handle instead of about 8 MiB. The defaults below sit at the upper
end of what was reported per generation, so plans err on the safe side.

Headroom is memory deliberately left free (fragmentation, other processes, the display on a
desktop GPU). Default: 5% of the device, which is 1.2 GiB on a 24 GiB card and 4 GiB on an
80 GiB one.
"""

from __future__ import annotations

from dataclasses import dataclass

from qplan.planner.gpu import MIB, GpuTarget

CUDA_CONTEXT_BYTES: dict[str, int] = {
    "volta": 350 * MIB,
    "turing": 350 * MIB,
    "ampere": 450 * MIB,
    "ada": 450 * MIB,
    "hopper": 550 * MIB,
    "blackwell": 600 * MIB,
}
# A size alone ("--gpu 24GiB") says nothing of the generation: assume a recent one.
CUDA_CONTEXT_DEFAULT = 500 * MIB
DEFAULT_HEADROOM_FRACTION = 0.05


@dataclass(frozen=True)
class Headroom:
    """Memory to leave free: a fraction of the device, or a fixed number of bytes."""

    fraction: float | None = DEFAULT_HEADROOM_FRACTION
    bytes: int | None = None

    def of(self, memory_bytes: int) -> int:
        if self.bytes is not None:
            return self.bytes
        return int(memory_bytes * (self.fraction or 0.0))

    def describe(self) -> str:
        if self.bytes is not None:
            return f"{self.bytes} bytes"
        return f"{(self.fraction or 0.0) * 100:g}%"


@dataclass(frozen=True)
class Budget:
    """Per-device memory a plan may fill."""

    memory_bytes: int  # device total
    available_bytes: int  # what this process can have: NVML free when measured, else total
    cuda_context_bytes: int
    headroom_bytes: int

    @property
    def usable_bytes(self) -> int:
        """Memory for the workload's tensors: available minus context and headroom."""
        return self.available_bytes - self.cuda_context_bytes - self.headroom_bytes


def cuda_context_bytes(gpu: GpuTarget) -> int:
    return CUDA_CONTEXT_BYTES.get(gpu.architecture or "", CUDA_CONTEXT_DEFAULT)


def budget_for(gpu: GpuTarget, headroom: Headroom | None = None) -> Budget:
    headroom = headroom or Headroom()
    available = gpu.free_bytes if gpu.free_bytes is not None else gpu.memory_bytes
    return Budget(
        memory_bytes=gpu.memory_bytes,
        available_bytes=available,
        cuda_context_bytes=cuda_context_bytes(gpu),
        headroom_bytes=headroom.of(gpu.memory_bytes),
    )
