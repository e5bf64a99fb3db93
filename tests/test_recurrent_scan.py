"""The Mamba selective scan's repeated iterations counted from their log
(planner/recurrent_scan.py; with an autograd graph, planner/recurrent_scan_graph.py) leave
every event of the tracker as the real loop makes it: the same serials, sizes, phases, tags
and releases in the same order, so the same peaks; plans equal the reference path's
(``QPLAN_REUSE=0``) component for component; and the stand-in is taken only for the
transformers source it mirrors."""

from __future__ import annotations

import contextlib

import pytest
import torch
from tiny_models import make_config

from qplan.api import estimate
from qplan.planner import recurrent_scan, recurrent_scan_graph, reuse
from qplan.planner.live_tensors import LiveTensorTracker
from qplan.planner.spec import ModelSpec
from qplan.planner.steps import _cache_tensors
from qplan.report import report_json


@pytest.fixture(autouse=True)
def _no_disk_cache(monkeypatch):
    monkeypatch.setenv("QPLAN_CACHE", "0")


def _meta_model(arch: str, dtype: str = "bfloat16"):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(make_config(arch), dtype=getattr(torch, dtype))


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


def _graph_events(model, counted: bool, tokens: int):
    """A step's log with an autograd graph: forward, backward, every gradient new."""
    model.zero_grad(set_to_none=True)
    return _events(model, counted, grad=True, tokens=tokens)


def _spy_counted(monkeypatch) -> list[int]:
    """The counted nodes' backward runs, one entry each."""
    calls: list[int] = []
    original = recurrent_scan_graph._Run.backward

    def spy(self, kept, grad):
        calls.append(self.count)
        return original(self, kept, grad)

    monkeypatch.setattr(recurrent_scan_graph._Run, "backward", spy)
    return calls


@pytest.mark.parametrize("arch", ["mamba", "falcon_mamba"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("tokens", [recurrent_scan_graph.MIN_TOKENS, 40])
def test_counted_tokens_with_a_graph_log_the_real_loops_events(arch, dtype, checkpointing,
                                                               tokens, monkeypatch):
    # With autograd recording, the middle tokens are one counted node, forward and
    # backward: the log is the real loop's, serial for serial. bf16 casts the state before
    # its matmul (the cast is saved), fp32 saves the state itself; checkpointing drops
    # what the first forward saves and recomputes it in the backward.
    calls = _spy_counted(monkeypatch)
    model = _meta_model(arch, dtype)
    if checkpointing:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    real = _graph_events(model, counted=False, tokens=tokens)
    counted = _graph_events(model, counted=True, tokens=tokens)
    count = tokens - recurrent_scan_graph.FIRST - recurrent_scan_graph.LAST
    assert calls == [count] * model.config.num_hidden_layers
    assert counted == real


def test_too_few_tokens_with_a_graph_run_every_one(monkeypatch):
    calls = _spy_counted(monkeypatch)
    model = _meta_model("falcon_mamba")
    tokens = recurrent_scan_graph.MIN_TOKENS - 1
    counted = _graph_events(model, counted=True, tokens=tokens)
    assert not calls
    assert counted == _graph_events(model, counted=False, tokens=tokens)


def test_a_scan_that_stops_repeating_is_traced_again_with_every_token(monkeypatch):
    # A check failing after the counted node was made (here: every backward) traces the
    # step again on a new model with every token run, and the plan is the reference's.
    def refuse(self, kept, grad):
        raise recurrent_scan_graph.ScanNotRepeating

    monkeypatch.setattr(recurrent_scan_graph._Run, "backward", refuse)
    spec = ModelSpec(id="tiny-falcon-mamba", config=make_config("falcon_mamba",
                                                               num_hidden_layers=6),
                     source="path")

    def plan() -> str:
        return report_json(estimate(spec, gpu="4090", mode="lora", seq_len=40,
                                    precisions="bf16"))

    fast = plan()
    with reuse.disabled():
        reference = plan()
    assert '"candidates": []' not in fast
    assert fast == reference


def test_an_untracked_scan_runs_two_tokens_and_logs_nothing(monkeypatch):
    # GRPO fills its generation cache with one untracked forward: only the results'
    # layout is read, so two iterations run and the rest are fresh tensors.
    lengths = []
    original = recurrent_scan._loop

    def spy(*args):
        lengths.append(args[8])
        return original(*args)

    monkeypatch.setattr(recurrent_scan, "_loop", spy)
    model = _meta_model("falcon_mamba")
    ids = torch.zeros(2, 40, dtype=torch.long, device="meta")

    def run(counted: bool):
        tracker = LiveTensorTracker()
        scans = recurrent_scan.counted_scans() if counted else contextlib.nullcontext()
        with scans, tracker, torch.no_grad(), tracker.untracked():
            out = model(ids, use_cache=True)
        return (tracker._events, out.logits.shape, out.logits.stride(),
                [(t.shape, t.stride(), t.dtype) for t in _cache_tensors([out.cache])])

    real = run(counted=False)
    assert not lengths
    assert run(counted=True) == real
    assert real[0] == []
    assert lengths == [recurrent_scan.UNTRACKED_REAL] * model.config.num_hidden_layers


def test_only_the_source_it_mirrors_is_stood_in():
    from transformers.models.falcon_mamba import modeling_falcon_mamba

    assert recurrent_scan._stand_in(modeling_falcon_mamba.mamba_selective_scan) is not None

    def mamba_selective_scan(hidden_states, *args, **kwargs):  # another implementation
        return hidden_states

    assert recurrent_scan._stand_in(mamba_selective_scan) is None
    with reuse.disabled(), recurrent_scan.counted_scans():
        assert modeling_falcon_mamba.mamba_selective_scan.__module__.startswith("transformers")


@pytest.mark.parametrize(("mode", "precisions"), [
    ("inference", "bf16,nf4"), ("qlora", "nf4"), ("lora", "fp32,bf16,int8"), ("full", "bf16"),
    ("dpo", "int8"), ("grpo", "bf16"),
])
def test_plans_equal_the_reference_path(mode, precisions):
    spec = ModelSpec(id="tiny-falcon-mamba", config=make_config("falcon_mamba",
                                                               num_hidden_layers=6),
                     source="path")

    # GRPO: a short completion (its generation's untracked forward runs the scan too).
    options = {"max_completion_length": 24} if mode == "grpo" else {}

    def plan() -> str:
        return report_json(estimate(spec, gpu="4090", mode=mode, seq_len=40,
                                    precisions=precisions, **options))

    fast = plan()
    with reuse.disabled():
        reference = plan()
    assert '"candidates": []' not in fast
    assert fast == reference
