"""The Mamba selective scan's repeated iterations counted from their log
(planner/recurrent_scan.py) leave every event of the tracker as the real loop makes it: the
same serials, sizes, phases, tags and releases in the same order, so the same peaks; plans
equal the reference path's (``QPLAN_REUSE=0``) component for component; and the stand-in is
taken only for the transformers source it mirrors."""

from __future__ import annotations

import contextlib

import pytest
import torch
from tiny_models import make_config

from qplan.api import estimate
from qplan.planner import recurrent_scan, reuse
from qplan.planner.live_tensors import LiveTensorTracker
from qplan.planner.spec import ModelSpec
from qplan.report import report_json


@pytest.fixture(autouse=True)
def _no_disk_cache(monkeypatch):
    monkeypatch.setenv("QPLAN_CACHE", "0")


def _meta_model(arch: str):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(make_config(arch), dtype=torch.bfloat16)


def _events(model, counted: bool, grad: bool, tokens: int = 40):
    tracker = LiveTensorTracker()
    ids = torch.zeros(2, tokens, dtype=torch.long, device="meta")
    scans = recurrent_scan.counted_scans() if counted else contextlib.nullcontext()
    with scans, tracker, torch.set_grad_enabled(grad):
        tracker.phase = "forward"
        out = model(ids).logits
        if grad:
            tracker.phase = "backward"
            out.float().sum().backward()
        del out
    return (list(tracker._events), dict(tracker.phase_peaks), tracker.peak,
            tracker.peak_allocated)


@pytest.mark.parametrize("arch", ["mamba", "falcon_mamba"])
def test_counted_iterations_log_the_real_loops_events(arch, monkeypatch):
    templates = []
    original = recurrent_scan._iteration

    def spy(*args, **kwargs):
        found = original(*args, **kwargs)
        templates.append(found)
        return found

    monkeypatch.setattr(recurrent_scan, "_iteration", spy)
    model = _meta_model(arch)
    _events(model, counted=False, grad=False)  # one-time work (lazy imports) out of the way
    counted = _events(model, counted=True, grad=False)
    real = _events(model, counted=False, grad=False)
    # Every layer's scan found its repeating iteration (2 per layer: the second and third).
    assert len(templates) == 2 * model.config.num_hidden_layers
    assert all(t is not None for t in templates)
    assert counted == real


@pytest.mark.parametrize("arch", ["mamba", "falcon_mamba"])
def test_a_recorded_graph_runs_every_iteration(arch, monkeypatch):
    # With autograd recording, an iteration keeps what its ops save: nothing is counted
    # from a log, and the events are the real loop's.
    calls = []
    monkeypatch.setattr(recurrent_scan, "_iteration",
                        lambda *a, **k: calls.append(a) or None)
    model = _meta_model(arch)
    _events(model, counted=False, grad=True)
    counted = _events(model, counted=True, grad=True)
    assert not calls
    assert counted == _events(model, counted=False, grad=True)


def test_only_the_source_it_mirrors_is_stood_in():
    from transformers.models.falcon_mamba import modeling_falcon_mamba

    assert recurrent_scan._stand_in(modeling_falcon_mamba.mamba_selective_scan) is not None

    def mamba_selective_scan(hidden_states, *args, **kwargs):  # another implementation
        return hidden_states

    assert recurrent_scan._stand_in(mamba_selective_scan) is None
    with reuse.disabled(), recurrent_scan.counted_scans():
        assert modeling_falcon_mamba.mamba_selective_scan.__module__.startswith("transformers")


@pytest.mark.parametrize(("mode", "precisions"), [("inference", "bf16,nf4"), ("qlora", "nf4")])
def test_plans_equal_the_reference_path(mode, precisions):
    spec = ModelSpec(id="tiny-falcon-mamba", config=make_config("falcon_mamba",
                                                               num_hidden_layers=6),
                     source="path")

    def plan() -> str:
        return report_json(estimate(spec, gpu="4090", mode=mode, seq_len=40,
                                    precisions=precisions))

    fast = plan()
    with reuse.disabled():
        reference = plan()
    assert '"candidates": []' not in fast
    assert fast == reference
