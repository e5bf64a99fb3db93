"""Inference steps of the bitsandbytes candidates derived from the plain row's recorded step
(planner/derived_traces.py) equal the traced steps, component for component: for tiny
random models of several families and the catalog's architectures (shrunk), every
bitsandbytes precision, a few workloads (one token included: 4-bit's inference kernel),
at full depth and at the shallow depths that are extrapolated, on both targets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import TINY_CONFIGS, depth_with_every_layer_kind, make_config

from qplan.api import make_workload
from qplan.planner import derived_traces, reuse
from qplan.planner.components import trace_components, workload_components
from qplan.planner.inventory import build_meta_model, take_inventory
from qplan.planner.precision import PRECISIONS

BNB = ("int8", "fp4", "nf4", "fp4-dq", "nf4-dq")
WORKLOADS = ((1, 1), (2, 37), (1, 70))
OPTIONS = dict(quant_storage="uint8", skip_modules=None, trust_remote_code=False)


def _tiny(model_type: str, **values):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, **values)
    config.dtype = "bfloat16"
    return config


SMALL = dict(vocab_size=1000, hidden_size=96, intermediate_size=200, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
# Families beyond tests/tiny_models.py's: sliding windows (Mistral, Gemma 2 alternating
# with global layers), fused projections (Phi-3), per-head norms (Qwen3), experts
# that are no nn.Linear (Qwen3-MoE).
EXTRA = {
    "qwen3": lambda: _tiny("qwen3", head_dim=24, **SMALL),
    "mistral": lambda: _tiny("mistral", sliding_window=32, **SMALL),
    "gemma2": lambda: _tiny("gemma2", head_dim=24, sliding_window=32,
                            **{**SMALL, "num_hidden_layers": 4}),
    "phi3": lambda: _tiny("phi3", pad_token_id=0, **SMALL),
    "qwen3_moe": lambda: _tiny("qwen3_moe", head_dim=24, num_experts=4, num_experts_per_tok=2,
                               moe_intermediate_size=64, **SMALL),
}
TINY = ("llama", "qwen2", "gemma", "gpt2", "opt", "gemma3", "deepseek_v3", "mixtral", "phimoe")


def _catalog_configs() -> dict[str, object]:
    """One catalog model per architecture, cut to its first two layers (a hybrid stack to
    its first layer of each kind: Nemotron-H's cache needs an attention layer)."""
    from transformers import AutoConfig

    from qplan.loaders.measure import shrink
    from qplan.profiles import data_dir

    found: dict[str, object] = {}
    for path in sorted(data_dir("models").glob("*.json")):
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or "model_type" not in data or \
                "quantization_config" in data:
            continue
        if data["model_type"] in found:
            continue
        config = AutoConfig.for_model(**{k: v for k, v in data.items()
                                         if k not in ("transformers_version",)})
        found[data["model_type"]] = shrink(config, depth_with_every_layer_kind(config))
    return found


# Catalog architectures whose steps are traced, not derived, by design: falcon-mamba asks
# whether it is quantised (test_models_that_ask_whether_they_are_quantised_are_traced).
TRACED_NOT_DERIVED = {"falcon_mamba"}


def _config(name: str):
    if name in TINY_CONFIGS:
        return make_config(name)
    if name in EXTRA:
        return EXTRA[name]()
    return _catalog_configs()[name.removeprefix("catalog:")]


def _spy(monkeypatch) -> list[bool]:
    """Whether each derivation asked for gave a step (True) or fell back (False)."""
    answers: list[bool] = []
    real = derived_traces.derive

    def derive(*args, **kwargs):
        found = real(*args, **kwargs)
        answers.append(found is not None)
        return found

    monkeypatch.setattr(derived_traces, "derive", derive)
    return answers


def _compare(config, target: str, layers: int | None, monkeypatch) -> list[bool]:
    answers = _spy(monkeypatch)
    options = dict(OPTIONS, target=target)
    if layers is not None:
        options["layers"] = layers
    for index, (batch, seq_len) in enumerate(WORKLOADS):
        workload = make_workload("inference", config, batch=batch, seq_len=seq_len)
        tracer = derived_traces.deriving(trace_components)
        # The plain row asked for first, or last (its step is then recorded on demand).
        for precision in ("bf16", *BNB) if index % 2 == 0 else (*BNB, "bf16"):
            derived = tracer(config, workload, precision, "bfloat16", **options)
            traced = trace_components(config, workload, precision, "bfloat16", **options)
            assert derived == traced, (precision, batch, seq_len, target, layers)
    return answers


@pytest.mark.parametrize("name", [*TINY, *EXTRA])
@pytest.mark.parametrize("target", ["cuda", "cpu"])
def test_derived_steps_equal_the_traced_ones(name, target, monkeypatch):
    config = _config(name)
    answers = _compare(config, target, None, monkeypatch)
    answers += _compare(config, target, 1, monkeypatch)
    # Every one of these families is derivable: a fallback would only hide a regression.
    assert answers and all(answers), name


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(_catalog_configs()))
def test_catalog_architectures_derive_equal_steps(model_type, monkeypatch):
    config = _config(f"catalog:{model_type}")
    answers = _compare(config, "cuda", None, monkeypatch)
    if model_type in TRACED_NOT_DERIVED:
        assert not any(answers), model_type
    else:
        assert answers and all(answers), model_type


def test_models_that_ask_whether_they_are_quantised_are_traced(monkeypatch):
    # falcon-mamba calls dt_proj as a module once marked quantised (config._is_quantized):
    # its code runs otherwise, so nothing is derived; the traced steps are what it gets.
    config = _config("falcon_mamba")
    answers = _compare(config, "cuda", None, monkeypatch)
    assert not any(answers)
    recorder = derived_traces.Recorder()
    workload = make_workload("inference", config, batch=1, seq_len=8)
    trace_components(config, workload, "bf16", "bfloat16", target="cuda", recorder=recorder,
                     **OPTIONS)
    assert recorder.recording is not None
    assert "asks whether it is quantised" in recorder.recording.problem


def test_component_plans_equal_and_the_reference_path_derives_nothing(monkeypatch):
    config = make_config("llama", num_hidden_layers=6)
    meta = build_meta_model(config)
    inventory = take_inventory(meta, None)
    workload = make_workload("inference", config, batch=3, seq_len=40)
    answers = _spy(monkeypatch)
    for precision in ("bf16", *BNB):
        derived = workload_components(inventory, workload, precision, "bfloat16", config=config,
                                      gpu_architecture="ada",
                                      tracer=derived_traces.deriving(trace_components))
        traced = workload_components(inventory, workload, precision, "bfloat16", config=config,
                                     gpu_architecture="ada")
        assert derived == traced, precision
    assert answers and all(answers)
    answers.clear()
    with reuse.disabled():
        tracer = derived_traces.deriving(trace_components)
        for precision in ("bf16", "nf4"):
            tracer(config, workload, precision, "bfloat16", target="cuda", **OPTIONS)
    assert answers == []


def test_a_weight_read_outside_its_layer_stops_the_derivation(monkeypatch):
    # Code that reads a replaced Linear's weight outside its call (here: its dtype, as
    # flash attention's fp32 path does) would run otherwise on the quantised model.
    from transformers.models.llama import modeling_llama

    config = make_config("llama")
    workload = make_workload("inference", config, batch=1, seq_len=8)
    real = modeling_llama.LlamaMLP.forward

    def forward(self, x):
        assert self.down_proj.weight.dtype is not None
        return real(self, x)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", forward)
    answers = _spy(monkeypatch)
    tracer = derived_traces.deriving(trace_components)
    tracer(config, workload, "bf16", "bfloat16", target="cuda", **OPTIONS)
    for precision in ("int8", "nf4"):
        derived = tracer(config, workload, precision, "bfloat16", target="cuda", **OPTIONS)
        assert derived == trace_components(config, workload, precision, "bfloat16",
                                           target="cuda", **OPTIONS)
    # The recording names the problem, so no derivation is even tried.
    assert answers == []


def test_a_failing_plain_step_leaves_the_candidates_traced():
    # Only nf4 planned (--precisions nf4): the bf16 step is recorded on demand; where it
    # fails, nf4 is traced as without derivation, and bf16 raises where it is asked for.
    config = make_config("llama")
    workload = make_workload("inference", config, batch=1, seq_len=8)

    def tracer(config, workload, precision, compute_dtype, **options):
        if PRECISIONS[precision].full_dtype == "bfloat16":
            raise RuntimeError("the plain step fails")
        return trace_components(config, workload, precision, compute_dtype, **options)

    derived = derived_traces.deriving(tracer)
    for precision in ("nf4", "int8"):
        assert derived(config, workload, precision, "bfloat16", target="cuda", **OPTIONS) == \
            trace_components(config, workload, precision, "bfloat16", target="cuda", **OPTIONS)
    with pytest.raises(RuntimeError, match="plain step fails"):
        derived(config, workload, "bf16", "bfloat16", target="cuda", **OPTIONS)
