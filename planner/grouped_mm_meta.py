"""MoE experts through torch's ``_grouped_mm`` on meta, whatever their dtype, as a real run.

transformers sends every expert matmul to ``torch._grouped_mm`` (CUDA from compute
capability 8.0, CPU from torch 2.9), whose autograd computes only the gradients asked for.
torch's meta kernel still checks for bf16 operands, although the real kernels take float32
and float16 too (through a loop of one mm per expert); a stand-in for that check lets the
trace run the real op, with the real kernels' layout checks. This module stands in for a
torch kernel: planner/components.py counts its frames as torch's when it decides whether a
failure came from the model's own code (expert matrices too narrow for the 16-byte row
alignment fail on the GPU too).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch

from qplan.planner.patching import swapped

# Since torch 2.9 ATen's _grouped_mm takes float32 and float16 too, on CPU and CUDA alike
# (a loop of one mm per expert where its grouped GEMM kernels do not apply); its meta
# kernel still checks for bf16.
_GROUPED_MM_ANY_FLOAT = (2, 9)
_GROUPED_MM_LOOP_DTYPES = (torch.float32, torch.float16)


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


@contextlib.contextmanager
def grouped_mm_as_run() -> Iterator[None]:
    """MoE experts go through torch's _grouped_mm whatever their dtype, as transformers
    sends them on CUDA (compute capability 8.0+) and on CPU (torch 2.9+): bf16 experts,
    float32 ones after k-bit preparation, and the float32 that Axolotl's int8 experts
    dequantise to. Its autograd computes only the gradients asked for (the input's, for
    frozen experts); transformers' fallback op, which the trace took for every dtype but
    bf16 before torch's meta kernel took them, always makes a gradient of the whole
    expert weight. Older torch keeps the fallback for those dtypes, as transformers does
    on CPU."""
    from torch import _meta_registrations as meta_registrations
    from transformers.integrations import moe

    original = moe._can_use_grouped_mm
    any_float = _torch_version() >= _GROUPED_MM_ANY_FLOAT and all(
        hasattr(meta_registrations, name)
        for name in ("_meta_grouped_mm_common", "_create_grouped_mm_output_tensor"))

    def can_use(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> bool:
        if weight.device.type == "meta":
            return weight.dtype == torch.bfloat16 or (
                any_float and weight.dtype in _GROUPED_MM_LOOP_DTYPES)
        return original(input, weight, offs)

    swaps: list[tuple[Any, str, Any]] = [(moe, "_can_use_grouped_mm", can_use)]
    if any_float:
        common = meta_registrations._meta_grouped_mm_common
        swaps.append((meta_registrations, "_meta_grouped_mm_common",
                      _grouped_mm_meta_any_float(common, meta_registrations)))
    with swapped(*swaps):
        yield


def _grouped_mm_meta_any_float(original: Any, registrations: ModuleType) -> Any:
    """torch's meta kernel of _grouped_mm with the real kernels' dtype check: float32 or
    float16 operands of one dtype get the real kernels' layout checks (rows aligned to 16
    bytes, the same test the bf16 path runs) and the same output tensor; anything else
    goes to torch's own meta kernel."""

    def common(mat_a: torch.Tensor, mat_b: torch.Tensor, scale_a: Any, scale_b: Any,
               offs: Any = None, bias: Any = None, scale_result: Any = None,
               out_dtype: Any = None, use_fast_accum: bool = False) -> torch.Tensor:
        if not (scale_a is None and scale_b is None and bias is None
                and mat_a.dtype == mat_b.dtype and mat_a.dtype in _GROUPED_MM_LOOP_DTYPES
                and out_dtype in (None, mat_a.dtype)):
            return original(mat_a, mat_b, scale_a, scale_b, offs, bias, scale_result,
                            out_dtype, use_fast_accum)
        for name, mat in (("mat_a", mat_a), ("mat_b", mat_b)):
            torch._check(mat.dim() in (2, 3), lambda: "Multiplicands must be 2D or 3D")
            _check_grouped_mm_rows(name, mat)
        if mat_a.dim() == 3 or mat_b.dim() == 3:
            torch._check(mat_a.size(-1) == mat_b.size(-2),
                         lambda: "contraction dimension of mat_a and mat_b must match")
        if mat_a.dim() == 2 or mat_b.dim() == 2:
            torch._check(offs is not None and offs.dim() == 1 and offs.dtype == torch.int32,
                         lambda: "Offsets tensor must be a 1D int32 tensor")
        return registrations._create_grouped_mm_output_tensor(mat_a, mat_b, offs, None)

    return common


def _check_grouped_mm_rows(name: str, mat: torch.Tensor) -> None:
    """The grouped GEMM layout test (torch's ``check_valid_strides``): one of the last two
    dimensions contiguous, the other's stride a multiple of 16 bytes."""
    end = mat.dim() - 1
    alignment = 16 // mat.element_size()
    stride = mat.stride()
    if stride[end - 1] == 1 and stride[end] >= max(1, mat.shape[end - 1]):
        torch._check(stride[end] % alignment == 0, lambda: (
            f"Expected {name} stride along {end} dim to be multiple of 16 bytes, "
            f"got {stride[end]}."))
    elif stride[end] == 1 and stride[end - 1] >= max(1, mat.shape[end]):
        torch._check(stride[end - 1] % alignment == 0, lambda: (
            f"Expected {name} stride along {end - 1} dim to be multiple of 16 bytes, "
            f"got {stride[end - 1]}."))
    else:
        torch._check(False, lambda: (
            f"Invalid strides/sizes, got {stride} for strides and {mat.shape} for sizes."))
