"""A finished tracker and its log are freed when the last caller lets go of the tracker, by
reference counting, not left to the cyclic garbage collector.

The weak references a tracker keeps to the storages it counts call back into it when a
storage is freed. Those callbacks hold the tracker weakly (planner/live_tensors.py:
``_released``): held strongly, every trace left a cycle (tracker -> weak references ->
callbacks -> tracker) that kept its whole log alive until a collection found it; on
falcon-mamba-7b's DPO plan, 9.6 million objects and 4.4 GB at the peak instead of 1.1 GB."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from tiny_models import make_config
from torch.utils._python_dispatch import _disable_current_modes

from qplan.api import estimate
from qplan.planner.live_tensors import LiveTensorTracker
from qplan.planner.spec import ModelSpec


@pytest.fixture
def collector_off():
    """The cyclic collector off: what is freed is freed by reference counting alone."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _trackers() -> list[LiveTensorTracker]:
    return [o for o in gc.get_objects() if isinstance(o, LiveTensorTracker)]


def test_a_tracker_outlived_by_its_storages_is_freed_when_let_go(collector_off):
    tracker = LiveTensorTracker()
    tracker.phase = "forward"
    with tracker:
        kept = [torch.empty(64 * (k + 1), dtype=torch.uint8, device="meta") for k in range(3)]
        grouped = [torch.empty(32, dtype=torch.uint8, device="meta") for _ in range(2)]
    serials = [tracker.serial_of(t) for t in grouped]
    for tensor in grouped:
        tracker.let_go(tensor)
    with _disable_current_modes():
        owner = torch.empty(0, device="meta")
    tracker.attach_group(owner, serials, [32, 32])
    # While the tracker lives, a storage freed is logged as released.
    before = len(tracker._events)
    released = kept.pop()
    serial = tracker.serial_of(released)
    del released
    assert [(s, n) for s, n, _, _ in tracker._events[before:]] == [(serial, -192)]
    assert tracker.current == 64 + 128 + 2 * 32

    alive = weakref.ref(tracker)
    del tracker
    # Storages (and a group's owner) outliving it keep no reference to it.
    assert alive() is None
    del kept, owner, grouped  # their callbacks find no tracker: nothing happens


def test_a_host_copy_outliving_its_tracker_keeps_no_reference_to_it(collector_off):
    tracker = LiveTensorTracker()
    tracker.on_host = True
    with tracker:
        copy = torch.empty(128, dtype=torch.uint8)
    tracker.on_host = False
    assert tracker.host_current == 128
    alive = weakref.ref(tracker)
    del tracker
    assert alive() is None
    del copy


@pytest.mark.parametrize(("arch", "overrides", "mode"), [
    ("llama", {}, "lora"),
    # The Mamba scan's counted tokens: a group of storages one tensor stands for.
    ("falcon_mamba", {"num_hidden_layers": 6}, "dpo"),
])
def test_a_plan_leaves_no_tracker_for_the_collector(collector_off, monkeypatch, arch,
                                                     overrides, mode):
    monkeypatch.setenv("QPLAN_CACHE", "0")
    monkeypatch.setenv("QPLAN_WORKERS", "1")
    spec = ModelSpec(id=f"tiny-{arch}", config=make_config(arch, **overrides), source="path")
    # Trackers another test of this process still holds are not this plan's.
    before = {id(t) for t in _trackers()}
    report = estimate(spec, gpu="4090", mode=mode, seq_len=24, precisions="bf16,nf4,nf4-dq")
    assert report.candidates
    # Every tracker of every traced, recorded and derived step is gone already.
    assert [t for t in _trackers() if id(t) not in before] == []
