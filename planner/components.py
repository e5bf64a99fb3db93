"""Memory components of a workload for one precision, apart from the CUDA context."""

from __future__ import annotations

from dataclasses import dataclass

from qplan.planner.inventory import Inventory
from qplan.planner.precision import DTYPE_BYTES, PRECISIONS, alloc_size
from qplan.planner.weights import WeightBytes, weight_bytes
from qplan.planner.workload import Workload


@dataclass(frozen=True)
class ComponentPlan:
    weights: WeightBytes
    components: dict[str, int]  # name -> bytes, CUDA context excluded
    peak_allocated_bytes: int


def load_components(
    inventory: Inventory, precision: str, compute_dtype: str, quant_storage: str = "uint8"
) -> ComponentPlan:
    """The weights resident on the device, as a load leaves them.

    While bitsandbytes quantises, each weight first lands on the device in the load dtype
    and is quantised there, so the peak holds the largest such weight on top of what is
    already loaded; the allocator keeps that block cached afterwards.
    """
    weights = weight_bytes(
        inventory, precision, compute_dtype=compute_dtype, quant_storage=quant_storage
    )
    transient = 0
    if PRECISIONS[precision].quantized:
        transient = alloc_size(weights.largest_quantized_numel * DTYPE_BYTES[compute_dtype])
    components = {
        "weights": weights.bytes,
        "transients": transient,
        "allocator": weights.reserved_bytes - weights.bytes,
    }
    return ComponentPlan(weights, components, weights.allocated_bytes + transient)


def workload_components(
    inventory: Inventory,
    workload: Workload,
    precision: str,
    compute_dtype: str,
    quant_storage: str = "uint8",
) -> ComponentPlan:
    return load_components(inventory, precision, compute_dtype, quant_storage)
