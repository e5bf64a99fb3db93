"""The precision table: every candidate qplan plans, and the method module that stores it.

Each row names a quantisation method (``planner/quant/``) and that method's settings for
the row (bits, quant type, double quantisation, or the plain dtype). The rest of qplan asks
the row (and through it the method) rather than testing precision names:

* ``preference``: lower is chosen first among candidates that fit;
* ``default_choice``: whether the recommendation may pick it when the user names no list;
* ``requires``: a ``GpuTarget`` capability the row needs to run natively ("bf16");
* ``fallback_for``: the row it stands in for on GPUs without that row's capability.

Byte layouts per method live in the method modules; ``alloc_size`` here is the CUDA
caching allocator's rounding, shared by every method.
"""

from __future__ import annotations

from dataclasses import dataclass

from qplan.planner.quant import QuantMethod, method_named
from qplan.planner.quant.bnb import (  # noqa: F401  (re-exported: older imports)
    BNB_4BIT_BLOCKSIZE,
    BNB_NESTED_BLOCKSIZE,
    four_bit_layer_tensors,
    int8_layer_tensors,
)

# The CUDA caching allocator rounds every allocation up to this many bytes.
ALLOC_ROUND = 512

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
    method_name: str = "none"  # key of the method module in planner.quant
    quant_type: str | None = None  # the method's own variant ("nf4" | "fp4" | "int8")
    double_quant: bool = False
    full_dtype: str | None = None  # for unquantised candidates: the dtype of every weight
    preference: int = 0  # lower is picked first among candidates that fit
    default_choice: bool = False  # the recommendation may pick it unasked
    requires: str | None = None  # GpuTarget capability needed natively ("bf16", "fp8")
    fallback_for: str | None = None  # the row this one replaces where that row's GPU lacks
    stored_only: bool = False  # only for checkpoints already stored in this format
    on_request: bool = False  # planned for any checkpoint, but only when named
    min_cc: tuple[int, int] | None = None  # compute capability its kernels need
    # A candidate (and a default choice) only on GPUs known to meet ``min_cc``: on the
    # others, and on size-only targets, it is planned only when named.
    where_supported: bool = False

    @property
    def method(self) -> QuantMethod:
        return method_named(self.method_name)

    @property
    def quantized(self) -> bool:
        """Whether the method replaces Linear layers."""
        return self.method.quantizes

    @property
    def is_4bit(self) -> bool:
        return self.quantized and self.bits == 4

    @property
    def trace_key(self) -> tuple:
        """Rows with the same key store and compute alike (fp4 / nf4 differ only in the
        quant map's values), so one trace serves them all."""
        return (self.method_name, self.bits, self.double_quant, self.full_dtype)

    def trainable(self, mode: str) -> bool:
        """Whether ``mode`` ("lora", "qlora", "full") can train on top of this row."""
        if mode == "qlora":
            return self.is_4bit and "lora" in self.method.trainable
        return mode in self.method.trainable


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp32", 32, full_dtype="float32", preference=0),
        Precision("bf16", 16, full_dtype="bfloat16", preference=1, default_choice=True,
                  requires="bf16"),
        Precision("fp16", 16, full_dtype="float16", preference=2, default_choice=True,
                  fallback_for="bf16"),
        Precision("int8", 8, "bitsandbytes", quant_type="int8", preference=10,
                  default_choice=True),
        Precision("fp4", 4, "bitsandbytes", quant_type="fp4", preference=12),
        Precision("nf4", 4, "bitsandbytes", quant_type="nf4", preference=11,
                  default_choice=True),
        Precision("fp4-dq", 4, "bitsandbytes", quant_type="fp4", double_quant=True,
                  preference=14),
        Precision("nf4-dq", 4, "bitsandbytes", quant_type="nf4", double_quant=True,
                  preference=13, default_choice=True),
        # Formats planned only for checkpoints stored in them (``stored_only``).
        Precision("mxfp4", 4, "mxfp4", preference=20, stored_only=True, min_cc=(7, 5)),
        # On the fly (FineGrainedFP8Config) on compute capability 8.9+, or as stored by FP8
        # checkpoints: after bf16, before int8.
        Precision("fp8", 8, "fp8", preference=5, min_cc=(8, 9), where_supported=True),
        Precision("gptq", 4, "gptq", preference=21, stored_only=True),
        Precision("awq", 4, "awq", preference=22, stored_only=True),
        # compressed-tensors checkpoints: FP8, INT8 W8A8, W4A16, NVFP4 (bits per checkpoint).
        Precision("ct", 4, "compressed-tensors", preference=23, stored_only=True),
    )
}
# What any checkpoint can be planned at on any GPU (quantised on the fly or plain dtypes).
PRECISION_NAMES: tuple[str, ...] = tuple(
    n for n, p in PRECISIONS.items() if not (p.stored_only or p.on_request or p.where_supported)
)
# What --precisions accepts for any checkpoint.
REQUESTABLE: tuple[str, ...] = tuple(n for n, p in PRECISIONS.items() if not p.stored_only)


def default_candidates(compute_capability: str | None) -> tuple[str, ...]:
    """The rows planned when the user names none, in table order: ``PRECISION_NAMES`` plus
    the rows the GPU's compute capability runs (``where_supported``; none when unknown)."""
    from qplan.planner.quant.checkpoint_helpers import cc_tuple

    have = cc_tuple(compute_capability)
    return tuple(
        n for n, p in PRECISIONS.items()
        if n in PRECISION_NAMES or (
            p.where_supported and have is not None and p.min_cc is not None and have >= p.min_cc)
    )


def default_choice(precision: str, compute_capability: str | None) -> bool:
    """Whether the recommendation may pick ``precision`` unasked on this GPU."""
    prec = PRECISIONS[precision]
    return prec.default_choice or (
        prec.where_supported and precision in default_candidates(compute_capability))


def trace_group(precision: str) -> tuple:
    """What a traced step of ``precision`` depends on: candidates with the same group run
    the same step, op for op, so one trace serves them all. fp4 and nf4 store and compute
    alike (only the quant map's values differ); everything else traces on its own."""
    return PRECISIONS[precision].trace_key


def find_precision(method_name: str, **fields: object) -> str | None:
    """The row of ``method_name`` whose fields equal ``fields`` (None when there is none)."""
    for prec in PRECISIONS.values():
        if prec.method_name == method_name and all(
            getattr(prec, k) == v for k, v in fields.items()
        ):
            return prec.name
    return None


def alloc_size(nbytes: int) -> int:
    """Bytes the CUDA caching allocator hands out for a request of ``nbytes``."""
    if nbytes <= 0:
        return 0
    # Integer ceiling: asked for every storage a trace counts, and exact at any size.
    return -(-nbytes // ALLOC_ROUND) * ALLOC_ROUND

