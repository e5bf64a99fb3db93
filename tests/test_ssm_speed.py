"""The hot path of a state-space model's trace (a Mamba scan runs its ops once per token and
layer) is sped up without changing a figure: the reports of tiny random Mamba, FalconMamba
and Nemotron-H (hybrid) models equal the reference path's (``QPLAN_REUSE=0``: no meta-op
memo, no shared traces or models), component for component; the tracker's phase and part
peaks are the ones its events give; and the garbage collector's thresholds, raised while a
trace runs (planner/collector.py), change nothing."""

from __future__ import annotations

import gc

import pytest
import torch
from tiny_models import make_config

from qplan.api import estimate
from qplan.planner import live_tensors, reuse
from qplan.planner.collector import TRACE_GC_THRESHOLDS, rare_collections
from qplan.planner.spec import ModelSpec
from qplan.report import report_json

# Mamba (4 layers: traced at 2 and 4), FalconMamba (6 layers: at 2 and 4, extrapolated)
# and Nemotron-H (its hybrid pattern traced whole).
MODELS = {
    "mamba": dict(num_hidden_layers=4),
    "falcon_mamba": dict(num_hidden_layers=6),
    "nemotron_h": dict(layers_block_type=["mamba", "attention", "mlp", "mamba"]),
}
# Inference (prefill and decoding), a LoRA step (checkpointed backward, the optimizer) and
# a preference step (two forwards: chosen and rejected).
CASES = [(arch, mode) for arch in MODELS for mode in ("inference", "lora")] + [
    ("falcon_mamba", "dpo"), ("nemotron_h", "dpo")]


@pytest.fixture(autouse=True)
def _no_disk_cache(monkeypatch):
    monkeypatch.setenv("QPLAN_CACHE", "0")


def _spec(arch: str) -> ModelSpec:
    return ModelSpec(id=f"tiny-{arch}", config=make_config(arch, **MODELS[arch]),
                     source="path")


def _report(arch: str, mode: str) -> str:
    return report_json(estimate(_spec(arch), gpu="4090", mode=mode, seq_len=24,
                                precisions="bf16,nf4"))


@pytest.mark.parametrize(("arch", "mode"), CASES)
def test_ssm_reports_equal_the_reference_path(arch, mode):
    fast = _report(arch, mode)
    with reuse.disabled():
        reference = _report(arch, mode)
    assert '"candidates": []' not in fast
    assert fast == reference


def test_phase_and_part_peaks_follow_the_events():
    tracker = live_tensors.LiveTensorTracker()
    kept = []
    with tracker:
        tracker.phase, tracker.segment = "forward", ("embed",)
        kept.append(torch.empty(100, device="meta", dtype=torch.uint8))
        tracker.segment = ("block0-top", "block0-bottom")
        kept.append(torch.empty(1000, device="meta", dtype=torch.uint8))
        dropped = torch.empty(24, device="meta", dtype=torch.float32)  # 96 bytes
        del dropped
        tracker.phase, tracker.segment = "backward", ("block0-top",)
        kept.append(torch.empty(10, device="meta", dtype=torch.uint8))
        tracker.segment = ()
        kept.append(torch.empty(1, device="meta", dtype=torch.uint8))
    assert tracker.phase_peaks == {
        "forward": 1196, "forward:embed": 100, "forward:block0-top": 1196,
        "forward:block0-bottom": 1196, "backward": 1111, "backward:block0-top": 1110,
    }
    assert (tracker.peak, tracker.current) == (1196, 1111)
    # Every storage is rounded to 512 bytes on its own, as the CUDA allocator does.
    # (512 + 1024 + 512 at the raw peak, then 512 + 1024 + 512 + 512 at the end.)
    assert (tracker.peak_allocated, tracker.current_allocated) == (2560, 2560)
    snapshots = tracker.phase_snapshots()
    assert sorted(s.nbytes for s in snapshots["forward:block0-top"].storages) == [96, 100, 1000]
    assert sorted(s.nbytes for s in snapshots["backward"].storages) == [1, 10, 100, 1000]
    assert snapshots["backward"].peak_allocated_bytes == 2560
    assert snapshots["forward"].peak_allocated_bytes == 2048


def test_rare_collections_restores_the_thresholds():
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        with rare_collections():
            assert gc.get_threshold() == TRACE_GC_THRESHOLDS
        assert gc.get_threshold() == (700, 10, 10)
        gc.set_threshold(0, 10, 10)  # turned off: left off
        with rare_collections():
            assert gc.get_threshold()[0] == 0
    finally:
        gc.set_threshold(*before)


def test_a_plan_holds_the_trace_thresholds_between_its_traces(monkeypatch):
    # qplan.api.estimate raises them for the whole plan (its derived steps and meta builds
    # between the traces too), as the command line does, and gives the caller's back.
    import qplan.api as api

    seen = []
    original = api.decide

    def decide(*args, **kwargs):
        seen.append(gc.get_threshold())
        return original(*args, **kwargs)

    monkeypatch.setattr(api, "decide", decide)
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        _report("mamba", "inference")
        assert gc.get_threshold() == (700, 10, 10)
    finally:
        gc.set_threshold(*before)
    assert seen == [TRACE_GC_THRESHOLDS]


# A young collection every 20 allocations, a full one every 80.
OFTEN = (20, 2, 2)


def test_no_counted_storage_is_freed_by_a_collection(monkeypatch):
    # A collection at (nearly) every allocation, against the raised thresholds: the same
    # figures, and no counted storage ever freed inside a collection, so the collector's
    # timing cannot move a peak.
    collecting = [False]
    freed_in_collection = []

    def watch(phase, info):
        collecting[0] = phase == "start"

    original = live_tensors.LiveTensorTracker._release

    def release(self, key, serial):
        if collecting[0] and key in self._live:
            freed_in_collection.append(serial)
        original(self, key, serial)

    monkeypatch.setattr(live_tensors.LiveTensorTracker, "_release", release)
    monkeypatch.setattr("qplan.planner.collector.TRACE_GC_THRESHOLDS", OFTEN)
    before = gc.get_threshold()
    # What torch and transformers imported is left out of the collections (they would
    # walk it each time): the trace's own objects are what a collection could free.
    gc.freeze()
    gc.callbacks.append(watch)
    try:
        gc.set_threshold(*OFTEN)
        often = _report("falcon_mamba", "lora")
    finally:
        gc.callbacks.remove(watch)
        gc.set_threshold(*before)
        gc.unfreeze()
    monkeypatch.undo()
    assert not freed_in_collection
    assert often == _report("falcon_mamba", "lora")
