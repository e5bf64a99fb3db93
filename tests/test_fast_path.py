"""The fast path (meta-op memo, shared traces, the on-disk trace cache) never changes a
report: every report equals, byte for byte, the reference path's, which traces every
candidate from scratch (``QPLAN_REUSE=0``, no cache)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from tiny_models import make_config

from qplan.api import estimate, make_workload, resolve
from qplan.loaders.measure import shrink
from qplan.planner import meta_memo, reuse
from qplan.planner.spec import ModelSpec
from qplan.report import report_json

# Catalog models, shrunk to 6 layers (traced at 2 and 4, then extrapolated, as the full
# models are): every mode, on each of the catalog's architectures. The whole catalog x every
# mode runs in bench/estimate_speed.py --check (minutes; too slow for the suite).
CASES = (
    ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "load"),
    ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "inference"),
    ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "full"),
    ("Qwen/Qwen2.5-7B", "qlora"),
    ("Qwen/Qwen3-0.6B", "lora"),
)
# Fewer candidates where a case is slow; still one of each kind (16-bit, 8-bit, 4-bit).
PRECISIONS = {"lora": "bf16,int8,nf4-dq"}


def _spec(model: str) -> ModelSpec:
    from dataclasses import replace

    spec = resolve(model, None, False)
    return replace(spec, config=shrink(spec.config, 6))


def _tiny(arch: str) -> ModelSpec:
    return ModelSpec(id=f"tiny-{arch}", config=make_config(arch), source="path")


def _both(spec: ModelSpec, **options) -> tuple[str, str]:
    fast = report_json(estimate(spec, **options))
    with reuse.disabled():
        reference = report_json(estimate(spec, **options))
    return fast, reference


@pytest.fixture(autouse=True)
def _no_disk_cache(monkeypatch):
    monkeypatch.setenv("QPLAN_CACHE", "0")


@pytest.mark.parametrize(("model", "mode"), CASES)
def test_catalog_reports_equal_the_reference_path(model, mode):
    fast, reference = _both(_spec(model), gpu="4090", mode=mode, seq_len=32,
                            precisions=PRECISIONS.get(mode))
    assert fast == reference


@pytest.mark.parametrize(
    ("arch", "mode"), [("gemma3", "inference"), ("deepseek_v3", "qlora"), ("mixtral", "inference")]
)
def test_layer_patterns_and_experts_equal_the_reference_path(arch, mode):
    # Sliding/global layer patterns, dense-then-MoE prefixes and grouped experts.
    fast, reference = _both(_tiny(arch), gpu="4090", mode=mode, seq_len=48,
                            precisions="bf16,nf4" if mode == "inference" else None)
    assert fast == reference


def test_solved_limits_equal_the_reference_path():
    # A GPU too small for anything: the report solves batch and seq_len for every
    # candidate, dozens of traced steps at other workloads.
    spec = _spec("Qwen/Qwen3-0.6B")
    fast, reference = _both(spec, gpu="800MiB", mode="inference", seq_len=256,
                            precisions="bf16,nf4")
    assert '"solutions": []' not in fast
    assert fast == reference


def test_in_place_training_steps_equal_the_reference_path():
    # Phi-3.5-MoE's router samples with exponential_ while training (sparsemixer), peft
    # and the optimizer add into tensors in place: the memo answers those ops too.
    fast, reference = _both(_tiny("phimoe"), gpu="4090", mode="lora", seq_len=40,
                            precisions="bf16,nf4")
    assert fast == reference


def test_memo_replays_in_place_ops_but_not_view_changes():
    import torch

    from qplan.planner.live_tensors import LiveTensorTracker

    meta_memo.clear()
    rounds = []
    for _ in range(2):  # the second round is answered from the memo
        with LiveTensorTracker() as tracker:
            x = torch.empty(8, 6, device="meta", dtype=torch.bfloat16, requires_grad=True)
            y = x * 1
            version = y._version
            assert y.exponential_() is y  # the argument itself, as the kernel returns it
            assert y._version == version + 1  # autograd saw the write
            y.add_(torch.ones(6, device="meta", dtype=torch.bfloat16))  # broadcast in place
            out = torch.empty(8, 4, device="meta", dtype=torch.bfloat16)
            assert torch.mm(y.detach(), torch.empty(6, 4, device="meta", dtype=torch.bfloat16),
                            out=out) is out
            # A write that resizes its argument is never answered from the memo.
            small = torch.empty(0, device="meta", dtype=torch.bfloat16)
            torch.mm(y.detach(), torch.empty(6, 4, device="meta", dtype=torch.bfloat16),
                     out=small)
            assert small.shape == (8, 4)
            z = torch.empty(8, 1, device="meta").squeeze_()
            rounds.append((tracker.current, tracker.peak, y.shape, small.stride(), z.shape))
    assert rounds[0] == rounds[1]
    remembered: dict = {}
    for key, value in meta_memo._MEMO.items():
        remembered.setdefault(key[0], []).append(value)
    assert remembered[torch.ops.aten.exponential_.default] == [meta_memo._IN_PLACE]
    assert remembered[torch.ops.aten.add_.Tensor] == [meta_memo._IN_PLACE]
    # mm.out: into the right-sized tensor remembered, into the one it resized not.
    assert sorted(map(id, remembered[torch.ops.aten.mm.out])) == sorted(
        map(id, (meta_memo._IN_PLACE, meta_memo._UNCACHEABLE)))
    assert torch.ops.aten.squeeze_.default not in remembered


def test_memo_replays_new_storages_and_skips_aliases():
    import torch

    from qplan.planner.live_tensors import LiveTensorTracker

    meta_memo.clear()
    x = torch.empty(8, 6, device="meta", dtype=torch.bfloat16)
    sizes = []
    for _ in range(2):  # the second round is answered from the memo
        with LiveTensorTracker() as tracker:
            y = x.float() * 2  # functional: remembered
            z = y.t()  # a view of y: never remembered, shares y's storage
            assert z.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
            sizes.append((tracker.current, tracker.peak, y.dtype, y.shape, z.stride()))
            del y, z
    assert sizes[0] == sizes[1]
    assert any(key[0] is torch.ops.aten.mul.Tensor for key in meta_memo._MEMO)
    assert not any(key[0] is torch.ops.aten.t.default for key in meta_memo._MEMO)


def test_cache_never_changes_a_report(monkeypatch, tmp_path):
    spec = _spec("Qwen/Qwen3-0.6B")
    options = dict(gpu="4090", mode="qlora", seq_len=32, precisions="nf4")
    uncached = report_json(estimate(spec, **options))
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("QPLAN_CACHE", "1")
    cold = report_json(estimate(spec, **options))
    stored = list((tmp_path / "qplan" / "traces").glob("*.json"))
    assert stored

    def no_trace(*args, **kwargs):
        raise AssertionError("a warm cache must not trace")

    monkeypatch.setattr("qplan.planner.trace.trace", no_trace)
    warm = report_json(estimate(spec, **options))
    assert uncached == cold == warm
    # Another workload is another key: it traces (and would fail here).
    with pytest.raises(AssertionError, match="warm cache"):
        estimate(spec, **{**options, "seq_len": 16})


def test_unreadable_cache_entries_are_traced_again(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("QPLAN_CACHE", "1")
    spec = _spec("TinyLlama/TinyLlama-1.1B-Chat-v1.0")
    first = report_json(estimate(spec, gpu="4090", mode="inference", seq_len=64))
    for path in (tmp_path / "qplan" / "traces").glob("*.json"):
        path.write_text("{not json")
    again = report_json(estimate(spec, gpu="4090", mode="inference", seq_len=64))
    assert first == again


def test_bitsandbytes_import_leaves_the_compiler_out():
    code = (
        "import sys; from qplan.planner.bnb_import import import_bitsandbytes; "
        "bnb = import_bitsandbytes(); import torch; "
        "assert bnb is not None and torch.compile.__module__.startswith('torch'); "
        "print('torch._inductor.compile_fx' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


def test_inference_traces_share_one_build_and_repeat_no_trace(monkeypatch):
    # The default plan and --solve's probes run one meta model per precision and depth
    # (planner/meta_models.py); fp8, traced as its bf16 proxy, runs bf16's very trace.
    from qplan.planner import components, meta_models

    builds, traces = [], []
    real_build, real_trace = components.build_meta_model, components.trace_components
    monkeypatch.setattr(components, "build_meta_model",
                        lambda *a, **k: builds.append(1) or real_build(*a, **k))
    tracer = components.shared_traces(lambda *a, **k: traces.append(1) or real_trace(*a, **k))
    meta_models.clear()
    spec = _tiny("llama")
    options = dict(target="cuda", quant_storage="uint8", skip_modules=None,
                   trust_remote_code=False)
    outcomes = []
    for batch in (1, 3, 1):
        workload = make_workload("inference", spec.config, batch=batch, seq_len=24)
        outcomes.append(tracer(spec.config, workload, "bf16", "bfloat16", **options))
    assert len(builds) == 1 and len(traces) == 2
    assert outcomes[0] is outcomes[2]
    with reuse.disabled():
        reference = real_trace(spec.config, make_workload("inference", spec.config, batch=3,
                                                          seq_len=24), "bf16", "bfloat16",
                               **options)
    assert len(builds) == 2
    assert reference == outcomes[1]


def test_shared_traces_answer_the_proxy_row_equal_to_the_reference_path():
    # fp8 and mxfp4 are traced as bf16 (no meta kernels): one trace serves them and bf16.
    fast, reference = _both(_spec("Qwen/Qwen3-0.6B"), gpu="800MiB", mode="inference",
                            seq_len=128, precisions="bf16,fp8")
    assert '"solutions": []' not in fast
    assert fast == reference


def test_patch_holders_follow_every_change_of_sys_modules(monkeypatch):
    # The trace patches swap a transformers helper in every module that imported it by
    # name (planner/trace.py: modules_holding). Asked again with sys.modules unchanged,
    # the answer is the remembered one; a module imported, replaced or removed since is
    # looked at (or dropped) as before.
    import types

    from qplan.planner.trace import modules_holding

    def helper() -> None: ...

    def module(name: str, **attrs) -> types.ModuleType:
        made = types.ModuleType(name)
        for key, value in attrs.items():
            setattr(made, key, value)
        return made

    first = module("transformers.qplan_test_first", helper=helper)
    monkeypatch.setitem(sys.modules, first.__name__, first)
    assert modules_holding("transformers", "helper", helper) == [first]
    assert modules_holding("transformers", "helper", helper) == [first]
    second = module("transformers.qplan_test_second", helper=helper)
    monkeypatch.setitem(sys.modules, second.__name__, second)
    monkeypatch.setitem(sys.modules, "elsewhere.qplan_test", module("elsewhere", helper=helper))
    assert modules_holding("transformers", "helper", helper) == [first, second]
    # Replaced under the same name by a module that does not hold it.
    monkeypatch.setitem(sys.modules, first.__name__, module(first.__name__))
    assert modules_holding("transformers", "helper", helper) == [second]
    monkeypatch.delitem(sys.modules, second.__name__)
    assert modules_holding("transformers", "helper", helper) == []
    again = module(second.__name__, helper=helper)
    monkeypatch.setitem(sys.modules, second.__name__, again)
    assert modules_holding("transformers", "helper", helper) == [again]


@pytest.mark.parametrize(("mode", "precision"),
                         [("lora", "nf4"), ("lora", "int8"), ("full", "bf16")])
def test_training_solves_reuse_prepared_models_equal_to_the_reference_path(monkeypatch, mode,
                                                                           precision):
    # Nothing fits: the report solves batch and seq_len, each probe a training step of
    # the same preparation at another shape. The prepared model (adapters, k-bit
    # preparation, checkpointing) of the first probe serves the next ones; LLM.int8's
    # layers once their step's scratch (training flag, outlier columns) is put back.
    from qplan.planner import meta_models

    taken = []
    real_take = meta_models.take
    monkeypatch.setattr(meta_models, "take",
                        lambda key: taken.append(real_take(key)) or taken[-1])
    meta_models.clear()
    # LoRA on a 4-bit or 8-bit base (peft's k-bit preparation), full fine-tuning.
    fast, reference = _both(_spec("Qwen/Qwen3-0.6B"), gpu="800MiB", mode=mode, seq_len=32,
                            precisions=precision)
    assert '"solutions": []' not in fast
    # A reused model comes back as (model, inventory, record); CHANGES_THE_MODEL or None
    # means the step was prepared afresh.
    assert sum(isinstance(found, tuple) for found in taken) >= 4
    assert fast == reference


def test_a_step_that_changes_the_model_leaves_another_record():
    # What a meta training step does to a prepared model (an in-place update, gradients
    # set then cleared, its hooks removed) keeps the record; anything else changes it.
    import torch

    from qplan.planner.prepared_models import state_of

    def model() -> torch.nn.Module:
        with torch.device("meta"):
            return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))

    net = model()
    before = state_of(net)
    weight = net[0].weight
    with torch.no_grad():
        weight.add_(1.0)
    weight.grad = torch.empty_like(weight)
    weight.grad = None
    net[0].register_forward_hook(lambda *a: None).remove()
    net.train()
    assert state_of(net) == before

    changes = [
        lambda m: m[0].register_buffer("cached", torch.empty(4, device="meta")),
        lambda m: m[1].weight.requires_grad_(False),
        lambda m: setattr(m[0].weight, "grad", torch.empty(4, 4, device="meta")),
        lambda m: m[0].register_forward_pre_hook(lambda *a: None),
        lambda m: m.eval(),
        lambda m: setattr(m[1], "eps", 1e-3),
        lambda m: setattr(m[0], "weight", torch.nn.Parameter(torch.empty(4, 4, device="meta"))),
        # A plain tensor attribute (a layer caching a converted weight), then replaced.
        lambda m: setattr(m[0], "cached", torch.empty(4, device="meta")),
    ]
    with torch.device("meta"):
        held = torch.nn.Linear(4, 4)
    held.cached = torch.empty(2, device="meta")
    before = state_of(held)
    held.cached = torch.empty(2, device="meta")
    assert state_of(held) != before
    for change in changes:
        net = model()
        before = state_of(net)
        change(net)
        assert state_of(net) != before


def test_a_model_its_forward_changes_is_not_shared_between_traces():
    # Phi-3.5-MoE's LongRoPE keeps long_inv_freq on its rotary embedding after the first
    # forward: a shared meta model would let later traces skip making it, as no loaded
    # model's first forward does. The default plan and its searches, as the reference path.
    fast, reference = _both(_spec("microsoft/Phi-3.5-MoE-instruct"), gpu="8GiB",
                            mode="inference", seq_len=32)
    assert '"solutions": []' not in fast
    assert fast == reference
