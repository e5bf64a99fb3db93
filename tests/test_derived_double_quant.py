"""Training steps of the double-quantised 4-bit rows derived from the single-quantised
row's recorded step (planner/derived_double_quant.py) equal the traced steps, component
for component, phase peak for phase peak: tiny random models of several families (biased
layers, Conv1D, experts, Mamba and hybrid stacks), the training modes (QLoRA, LoRA on
4-bit weights, DPO, KTO, ORPO, GRPO with its generation), one-token and longer steps, at
full depth and at a shallow depth that is extrapolated. And where a step would hold what
differs between the rows in ways the derivation does not splice, it is traced."""

from __future__ import annotations

import pytest
from tiny_models import make_config

from qplan.api import make_workload
from qplan.planner import derived_double_quant as ddq
from qplan.planner import meta_models
from qplan.planner.components import trace_components
from qplan.planner.depths import HOMOGENEOUS
from qplan.planner.live_tensors import LiveTensorTracker

OPTIONS = dict(quant_storage="uint8", skip_modules=None, trust_remote_code=False,
               target="cuda")

CASES = [
    ("llama", "qlora", ((1, 37), (1, 1))),
    ("qwen2", "lora", ((2, 16),)),  # biased layers: the first forward casts the bias
    ("gpt2", "kto", ((1, 37),)),  # Conv1D layers
    ("mixtral", "dpo", ((1, 1), (2, 16))),
    ("nemotron_h", "orpo", ((1, 37),)),
    ("falcon_mamba", "qlora", ((1, 37),)),
    ("llama", "grpo", ((8, 16), (8, 1))),  # generation: one-token forwards (gemv_4bit)
]


def _traced_rows(tracer):
    """The rows ``tracer`` was asked to trace, in order."""
    asked: list[str] = []

    def spy(config, workload, precision, compute_dtype, **options):
        asked.append(precision)
        return tracer(config, workload, precision, compute_dtype, **options)

    return spy, asked


@pytest.mark.parametrize("name,mode,shapes", CASES)
def test_derived_training_steps_equal_traced_ones(name, mode, shapes):
    config = make_config(name)
    for batch, seq in shapes:
        workload = make_workload(mode, config, batch=batch, seq_len=seq)
        for layers in (None, 2):
            options = dict(OPTIONS)
            if layers is not None:
                options.update(layers=layers, pattern=HOMOGENEOUS)
            for precision in ("nf4-dq", "fp4-dq"):
                traced = trace_components(config, workload, precision, "bfloat16", **options)
                meta_models.clear()
                spy, asked = _traced_rows(trace_components)
                derived = ddq.deriving(spy)(config, workload, precision, "bfloat16", **options)
                # Derived, not traced: only the single-quantised row ran.
                assert asked == [ddq.single_quant_row(precision)], (name, mode, precision)
                assert derived == traced, (name, mode, precision, batch, seq, layers)


def test_single_quantised_rows():
    assert ddq.single_quant_row("nf4-dq") == "nf4"
    assert ddq.single_quant_row("fp4-dq") == "fp4"
    assert all(ddq.single_quant_row(p) is None for p in ("nf4", "fp4", "int8", "bf16"))
    assert ddq.records("nf4") and ddq.records("fp4") and not ddq.records("int8")


def test_a_copy_of_a_4bit_weight_is_not_derived():
    """A frozen copy of the 4-bit policy (``ref_model=copy``) would hold quant states of
    each row's own layout: such a workload is not derived, and a step that copies or
    moves a quant state while it is recorded leaves nothing to derive from."""
    import contextlib
    import copy

    from bitsandbytes.nn import Params4bit

    from qplan.planner.components import step_model

    config = make_config("llama")
    workload = make_workload("dpo", config, batch=1, seq_len=16, ref_model="copy")
    assert not ddq.derivable(workload, {})
    model, _ = step_model(config, workload, "nf4", "bfloat16")
    weight = next(p for p in model.parameters() if isinstance(p, Params4bit))
    for touch in (lambda: copy.deepcopy(weight), lambda: weight.quant_state.to("meta")):
        recorder = ddq.DequantRecorder()
        tracker = recorder.tracker(None)
        # A Params4bit does not deep-copy on meta: what counts is that it was asked to.
        with recorder.watching(model), tracker, contextlib.suppress(RuntimeError):
            touch()
        recorder.finish(ddq.StepTensors())
        assert recorder.recording is not None
        assert recorder.recording.problem == "the step copies a 4-bit weight"


def test_a_long_log_is_not_kept(monkeypatch):
    monkeypatch.setattr(ddq, "MAX_EVENTS", 10)
    config = make_config("llama")
    workload = make_workload("qlora", config, batch=1, seq_len=16)
    spy, asked = _traced_rows(trace_components)
    traced = trace_components(config, workload, "nf4-dq", "bfloat16", **OPTIONS)
    assert ddq.deriving(spy)(config, workload, "nf4-dq", "bfloat16", **OPTIONS) == traced
    assert asked == ["nf4", "nf4-dq"]


def test_the_recording_of_a_step_counts_to_its_peaks():
    """The recorded log, counted again, is the traced step (the derivation's premise),
    and it marks the absmax reads of both optimizer steps' backward, the second one's in
    the copy the repeated step counts (planner/repeated_steps.py)."""
    config = make_config("llama")
    workload = make_workload("qlora", config, batch=1, seq_len=16)
    recorder = ddq.DequantRecorder()
    traced = trace_components(config, workload, "nf4", "bfloat16", recorder=recorder,
                              **OPTIONS)
    recording = recorder.recording
    assert recording is not None and recording.problem == ""
    again = LiveTensorTracker()
    again.count_log(recording.events)
    assert (again.peak_allocated, again.phase_peaks) == (traced.peak_bytes, traced.phase_peaks)
    # 2 layers x 7 projections, dequantised by each backward; the forward runs
    # bitsandbytes' fused 4-bit matmul, which reads the absmax in its kernel.
    assert [c.function for c in recording.calls] == ["dequantize_4bit"] * 28
    for call in recording.calls:
        made = recording.events[call.at]
        assert made[1] > 0 and made[2] == "backward"
