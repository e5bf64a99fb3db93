"""Precisions qplan plans for, and how bitsandbytes 0.50 stores one quantised Linear.

The storage layout is what a real ``from_pretrained(..., quantization_config=...)`` leaves
in memory, tensor by tensor, so that sums of these sizes equal sums of real storages:

* LLM.int8: the int8 weight [out, in] and ``SCB`` float32 [out].
* 4-bit (fp4 and nf4 store the same): the packed weight ``ceil(n / (2 * itemsize))``
  elements of ``quant_storage`` (uint8 by default), ``absmax`` float32 ``ceil(n / 64)``,
  and a per-layer 16-entry float32 quant map (``code``).
* 4-bit with double quantisation (``compress_statistics``): ``absmax`` becomes uint8,
  plus a 0-d float32 ``offset``, a nested float32 absmax of ``ceil(ceil(n / 64) / 256)``
  values and a nested 256-entry float32 quant map, all separate tensors per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

# The CUDA caching allocator rounds every allocation up to this many bytes.
ALLOC_ROUND = 512

# bitsandbytes 0.50 uses a blocksize of 64 for 4-bit quantisation on every backend.
BNB_4BIT_BLOCKSIZE = 64
# Double quantisation quantises absmax in blocks of 256.
BNB_NESTED_BLOCKSIZE = 256



def _dtype_sizes() -> dict[str, int]:
    """Bytes per element of every torch dtype, by name ("bfloat16", "complex64", ...):
    models keep buffers of any dtype (Llama 4's rotary table is complex64)."""
    import torch

    return {
        str(dtype).removeprefix("torch."): dtype.itemsize
        for dtype in vars(torch).values()
        if isinstance(dtype, torch.dtype)
    }


DTYPE_BYTES: dict[str, int] = _dtype_sizes()


@dataclass(frozen=True)
class Precision:
    """One candidate precision. ``weight_dtype`` is what quantised Linears become."""

    name: str
    bits: int
    quantized: bool  # bitsandbytes replaces Linear layers
    quant_type: str | None = None  # "nf4" | "fp4" | "int8"
    double_quant: bool = False
    full_dtype: str | None = None  # for unquantised candidates: the dtype of every weight

    @property
    def is_4bit(self) -> bool:
        return self.quant_type in ("nf4", "fp4")


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp32", 32, False, full_dtype="float32"),
        Precision("bf16", 16, False, full_dtype="bfloat16"),
        Precision("fp16", 16, False, full_dtype="float16"),
        Precision("int8", 8, True, quant_type="int8"),
        Precision("fp4", 4, True, quant_type="fp4"),
        Precision("nf4", 4, True, quant_type="nf4"),
        Precision("fp4-dq", 4, True, quant_type="fp4", double_quant=True),
        Precision("nf4-dq", 4, True, quant_type="nf4", double_quant=True),
    )
}
PRECISION_NAMES: tuple[str, ...] = tuple(PRECISIONS)


def trace_group(precision: str) -> tuple:
    """What a traced step of ``precision`` depends on: candidates with the same group run
    the same step, op for op, so one trace serves them all. fp4 and nf4 store and compute
    alike (only the quant map's values differ); everything else traces on its own."""
    prec = PRECISIONS[precision]
    return (prec.bits, prec.quantized, prec.double_quant, prec.full_dtype)


def alloc_size(nbytes: int) -> int:
    """Bytes the CUDA caching allocator hands out for a request of ``nbytes``."""
    if nbytes <= 0:
        return 0
    return ceil(nbytes / ALLOC_ROUND) * ALLOC_ROUND


def int8_layer_tensors(out_features: int, in_features: int) -> tuple[int, ...]:
    """Byte sizes of the tensors one LLM.int8 Linear stores (weight, SCB); bias excluded."""
    return (out_features * in_features, 4 * out_features)


def four_bit_layer_tensors(
    numel: int, *, double_quant: bool, quant_storage_bytes: int = 1
) -> tuple[int, ...]:
    """Byte sizes of the tensors one 4-bit Linear of ``numel`` weights stores; bias excluded.

    The packed weight holds two 4-bit values per byte, stored in elements of
    ``quant_storage`` (so a bf16 quant storage packs four values per element).
    """
    packed = ceil(numel / (2 * quant_storage_bytes)) * quant_storage_bytes
    blocks = ceil(numel / BNB_4BIT_BLOCKSIZE)
    code = 16 * 4
    if not double_quant:
        return (packed, 4 * blocks, code)
    nested_blocks = ceil(blocks / BNB_NESTED_BLOCKSIZE)
    # absmax (uint8), offset (0-d float32), nested absmax (float32), nested code, code
    return (packed, blocks, 4, 4 * nested_blocks, 256 * 4, code)


def quantized_layer_tensors(
    precision: Precision, out_features: int, in_features: int, quant_storage_bytes: int = 1
) -> tuple[int, ...]:
    """Byte sizes of every tensor a quantised Linear keeps for ``precision``."""
    if precision.quant_type == "int8":
        return int8_layer_tensors(out_features, in_features)
    return four_bit_layer_tensors(
        out_features * in_features,
        double_quant=precision.double_quant,
        quant_storage_bytes=quant_storage_bytes,
    )
