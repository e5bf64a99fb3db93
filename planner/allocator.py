"""What PyTorch's CUDA caching allocator reserves for a set of live tensors.

``torch.cuda.max_memory_allocated`` counts requests rounded to 512 bytes; NVML sees the
segments the allocator reserved from the driver. The allocator (c10/cuda/CUDACachingAllocator)
serves requests of at most 1 MiB from 2 MiB segments, requests under 10 MiB from 20 MiB
segments, and rounds larger requests up to a multiple of 2 MiB, one segment each. Segments
are split, so many small tensors share one. For tensors allocated one after another and never
freed (loading weights), the reserve is close to the per-pool totals rounded up to whole
segments; that is what this models.
"""

from __future__ import annotations

from collections.abc import Iterable
from math import ceil

from qplan.planner.precision import alloc_size

MIB = 1024**2
SMALL_REQUEST = 1 * MIB
SMALL_SEGMENT = 2 * MIB
LARGE_REQUEST_MIN_OWN_SEGMENT = 10 * MIB
MID_SEGMENT = 20 * MIB
LARGE_ROUND = 2 * MIB


def reserved_for(sizes: Iterable[int]) -> int:
    """Bytes of segments the allocator holds for live tensors of the given byte sizes."""
    small = mid = large = 0
    for size in sizes:
        rounded = alloc_size(size)
        if rounded == 0:
            continue
        if rounded <= SMALL_REQUEST:
            small += rounded
        elif rounded < LARGE_REQUEST_MIN_OWN_SEGMENT:
            mid += rounded
        else:
            large += ceil(rounded / LARGE_ROUND) * LARGE_ROUND
    return (
        ceil(small / SMALL_SEGMENT) * SMALL_SEGMENT
        + ceil(mid / MID_SEGMENT) * MID_SEGMENT
        + large
    )
