"""Bytes a model's weights occupy at each precision, as its method and transformers store them.

Counts unique storages: tied weights once, buffers included, every tensor a replaced
layer stores (per its method module: absmax, quant maps, offsets, SCB, scales) as its own
allocation. The total equals the sum of unique tensor storages of a real
``from_pretrained`` load to the byte; ``allocated_bytes`` is the same set of tensors after
the CUDA allocator's 512-byte rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

from qplan.errors import UsageError
from qplan.planner.allocator import reserved_for
from qplan.planner.inventory import Inventory, TensorInfo
from qplan.planner.precision import DTYPE_BYTES, PRECISIONS, Precision, alloc_size
from qplan.planner.quant import QuantSettings

COMPUTE_DTYPES = ("bfloat16", "float16")
QUANT_STORAGE_DTYPES = ("uint8", "float16", "bfloat16", "float32")


@dataclass(frozen=True)
class WeightBytes:
    """The resident weights of one precision, split by what holds the bytes."""

    precision: str
    load_dtype: str  # dtype of everything bitsandbytes does not quantise
    bytes: int  # sum of unique tensor storages
    allocated_bytes: int  # each storage rounded up to the CUDA allocator's 512 bytes
    reserved_bytes: int  # segments the CUDA caching allocator holds for them
    quantized_bytes: int  # packed/int8 weights of quantised layers
    quant_state_bytes: int  # absmax, quant maps, offsets, nested statistics, SCB
    unquantized_bytes: int  # parameters left in load dtype (embeddings, norms, lm_head, biases)
    buffer_bytes: int
    quantized_layers: int
    storages: int  # number of separate tensors (allocations)
    largest_quantized_numel: int  # elements of the largest quantised weight (dequant transient)


def load_dtype_for(precision: Precision, compute_dtype: str) -> str:
    """The dtype ``from_pretrained`` is given: the precision's own, or the compute dtype."""
    return precision.method.load_dtype(precision, compute_dtype)


def param_dtype(t: TensorInfo, load_dtype: str) -> str:
    if t.kind == "buffer":
        return load_dtype if t.follows_load_dtype else t.build_dtype
    if load_dtype == "float16" and t.fp32_under_fp16:
        return "float32"
    if load_dtype == "bfloat16" and t.fp32_under_bf16:
        return "float32"
    return load_dtype


def method_biases(inventory: Inventory, prec: Precision, settings: QuantSettings
                  ) -> dict[str, str]:
    """Biases of replaced layers whose dtype the method sets (name -> dtype)."""
    dtype = prec.method.bias_dtype(prec, settings) if prec.quantized else None
    if dtype is None:
        return {}
    modules = {t.module for t in inventory.tensors if prec.method.replaces(t, settings)}
    return {t.name: dtype for t in inventory.tensors
            if t.kind == "parameter" and t.module in modules and t.name.endswith(".bias")}


def tensor_bytes(t: TensorInfo, dtype: str) -> int:
    return t.numel * DTYPE_BYTES[dtype]


def weight_bytes(
    inventory: Inventory,
    precision: str,
    *,
    compute_dtype: str = "bfloat16",
    quant_storage: str = "uint8",
) -> WeightBytes:
    """Resident bytes of ``inventory`` loaded at ``precision``.

    ``compute_dtype`` is the dtype given to from_pretrained for quantised loads (and
    bnb_4bit_compute_dtype); ``quant_storage`` is bnb_4bit_quant_storage.
    """
    key = (id(inventory), precision, compute_dtype, quant_storage)
    found = _COMPUTED.get(key)
    if found is not None and found[0] is inventory:
        return found[1]
    computed = _weight_bytes(inventory, precision, compute_dtype, quant_storage)
    if len(_COMPUTED) >= _MAX_COMPUTED:
        _COMPUTED.clear()
    # The inventory is kept with its figures, so its id cannot name another one meanwhile.
    _COMPUTED[key] = (inventory, computed)
    return computed


# One estimate asks for the same inventory's figures at each precision many times (every
# traced plan, the proxies of methods traced dequantised); an Inventory is frozen.
_COMPUTED: dict[tuple, tuple[Inventory, WeightBytes]] = {}
_MAX_COMPUTED = 256


def _weight_bytes(inventory: Inventory, precision: str, compute_dtype: str,
                  quant_storage: str) -> WeightBytes:
    if precision not in PRECISIONS:
        raise UsageError(
            f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}"
        )
    if compute_dtype not in COMPUTE_DTYPES:
        raise UsageError(f"compute dtype must be one of {COMPUTE_DTYPES}, not {compute_dtype!r}")
    if quant_storage not in QUANT_STORAGE_DTYPES:
        raise UsageError(
            f"quant storage must be one of {QUANT_STORAGE_DTYPES}, not {quant_storage!r}"
        )
    prec = PRECISIONS[precision]
    load_dtype = load_dtype_for(prec, compute_dtype)
    settings = QuantSettings(compute_dtype, quant_storage, stored=inventory.stored,
                             moe_experts=inventory.moe_experts)
    method = prec.method

    biases = method_biases(inventory, prec, settings)
    quantized = state = unquantized = buffers = 0
    layers = largest = 0
    sizes: list[int] = []
    for t in inventory.tensors:
        if prec.quantized and method.replaces(t, settings):
            layer = method.stored_tensors(prec, t, settings)
            quantized += layer[0]
            state += sum(layer[1:])
            sizes.extend(layer)
            layers += 1
            largest = max(largest, t.numel)
            continue
        size = tensor_bytes(t, biases.get(t.name) or param_dtype(t, load_dtype))
        if t.kind == "buffer":
            buffers += size
        else:
            unquantized += size
        sizes.append(size)
    return WeightBytes(
        precision=precision,
        load_dtype=load_dtype,
        bytes=sum(sizes),
        allocated_bytes=sum(alloc_size(s) for s in sizes),
        reserved_bytes=reserved_for(sizes),
        quantized_bytes=quantized,
        quant_state_bytes=state,
        unquantized_bytes=unquantized,
        buffer_bytes=buffers,
        quantized_layers=layers,
        storages=len(sizes),
        largest_quantized_numel=largest,
    )
