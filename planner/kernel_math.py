"""Shared by the GPU-kernel levers that qplan runs in PyTorch (planner/liger_kernels.py,
lora_kernels.py, fused_ce.py): whether a tensor is the trace's meta tensor, and a block
in which a kernel's arithmetic runs outside the live-tensor tracker (a fused GPU kernel
allocates nothing beyond the buffers its Python wrapper creates, which stay tracked)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes


def is_meta(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "meta"


class KernelMath:
    """Run a kernel's arithmetic outside the tracker: a GPU kernel allocates nothing."""

    def __enter__(self) -> None:
        self._modes = _disable_current_modes()
        self._modes.__enter__()
        self._grad = torch.no_grad()
        self._grad.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._grad.__exit__(*exc)
        self._modes.__exit__(*exc)
