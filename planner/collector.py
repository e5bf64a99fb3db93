"""The cyclic garbage collector while the planner traces a step."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

# (allocations before a young collection, young collections before a middle one, middle
# ones before a full one); CPython's defaults are (700, 10, 10). qplan/cli.py sets the same
# for a whole command, qplan.api.estimate for a whole plan. A young collection walks every
# young object still alive, and a trace's objects mostly live a while (a Mamba layer's
# per-token tensors and their graph, freed in its backward): at 100,000 most were walked
# young, then again in the middle generation. At a million, falcon-mamba-7b's full
# fine-tuning plan spent 2.2 s in collections instead of 5.4-5.9 s, its DPO plan 16.6 s
# instead of 20.7 s, for more garbage waiting between collections (peak RSS 1.2 -> 1.7 GB
# and 3.2 -> 3.8 GB). That garbage was mostly finished trackers, kept by a reference cycle
# (planner/live_tensors.py: ``_released``), which reference counting now frees at once.
TRACE_GC_THRESHOLDS = (1_000_000, 50, 100)


@contextlib.contextmanager
def rare_collections() -> Iterator[None]:
    """Run the block with the cyclic garbage collector's thresholds raised.

    A trace makes millions of short-lived objects (tensors, autograd nodes, event tuples;
    a Mamba scan a few per token and layer), and at CPython's default thresholds about a
    fifth of a Mamba trace's CPU time went to collections walking them and all that torch
    and transformers imported. The figures do not depend on the collector: the tracker
    counts a storage freed when its reference count drops, never in a collection
    (tests/test_ssm_speed.py checks both that and equal components with a collection every
    few allocations). A collector turned off (threshold 0) is left off; the thresholds
    are restored afterwards."""
    before = gc.get_threshold()
    if before[0] == 0:
        yield
        return
    gc.set_threshold(*(max(old, new) for old, new in zip(before, TRACE_GC_THRESHOLDS,
                                                          strict=True)))
    try:
        yield
    finally:
        gc.set_threshold(*before)
