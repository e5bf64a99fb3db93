"""Architectures beyond the dense decoder: state-space and hybrid models, Llama 4, MoE
configs naming classes transformers spells differently, vision-language models, and the
families qplan refuses. Every plan is checked against a real CPU load or step of a tiny
random model; every refusal is one line without a traceback."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoConfig
from typer.testing import CliRunner

from qplan.api import estimate, measure_workload
from qplan.cli import app
from qplan.errors import ConfigError
from qplan.loading import load
from qplan.planner.components import _with_layers, num_layers
from qplan.planner.emit import emit_peft, emit_transformers
from qplan.planner.inventory import build_meta_model, take_inventory

SHAPE = dict(batch=1, seq_len=32, lora_r=8)


def _measured(folder, mode: str, precision: str):
    report = measure_workload(str(folder), precision=precision, mode=mode, device="cpu", **SHAPE)
    block = report.measured
    assert abs(block["error_pct"]) <= 1.0, block
    for part in ("weights", "adapters", "optimizer_states", "gradients"):
        assert block["components"][part] == block["predicted_components"][part], part
    return report


@pytest.mark.parametrize(
    ("model_type", "kwargs"),
    [
        ("falcon_mamba", {}),  # layer_types is a read-only property
        ("jamba", {}),  # layers_block_type and layer_types derived from the depth
        ("nemotron_h", {}),  # the depth is derived from layers_block_type
        ("llama4", {}),  # no_rope_layers per layer, moe_layers by index
        ("gemma3_text", {}),  # layer_types per layer
    ],
)
def test_truncating_layers_follows_every_config_kind(model_type, kwargs):
    config = AutoConfig.for_model(model_type, **kwargs)
    small = _with_layers(config, 2)
    assert num_layers(small) == 2
    text = small.get_text_config()
    for name in ("layer_types", "layers_block_type", "no_rope_layers"):
        value = getattr(text, name, None)
        if isinstance(value, list):
            assert len(value) == 2, name
    assert all(i < 2 for i in getattr(text, "moe_layers", None) or [])
    assert len(take_inventory(build_meta_model(small)).layers) == 2


def test_llama4_complex_rotary_buffer_is_counted_exactly(tiny_model_dir):
    """Llama 4's vision tower keeps its rotary table as a complex64 buffer: counted as a
    real load of the class the config names holds it. (qplan plans the text class while
    transformers 5.24's Llama4ForConditionalGeneration cannot run, tests/test_llama4_text.py;
    its load is measured exactly too.)"""
    import torch
    from accelerate import init_empty_weights
    from transformers import Llama4ForConditionalGeneration

    folder = tiny_model_dir("llama4")
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=True):
        named = Llama4ForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    complex_buffers = {t.name: t.numel * 8 for t in take_inventory(named).buffers
                       if t.build_dtype == "complex64"}
    assert complex_buffers
    real = Llama4ForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16)
    assert complex_buffers == {
        name: b.numel() * b.element_size() for name, b in real.named_buffers()
        if b.dtype == torch.complex64
    }
    for precision in ("bf16", "nf4"):
        loaded = load(str(folder), gpu="24GiB", precision=precision, device="cpu", mode="load")
        measured = loaded.report.measured
        assert measured["resident_bytes"] == measured["predicted_bytes"], precision


def test_falcon_mamba_runs_quantised_as_transformers_marks_it(tiny_model_dir):
    """A quantised load sets config._is_quantized, and falcon-mamba then calls dt_proj as a
    module: nothing to skip, and the trace takes the same path as the real step."""
    report = _measured(tiny_model_dir("falcon_mamba"), "inference", "nf4")
    assert "skip_modules" not in report.workload


def test_mamba_leaves_dt_proj_unquantised_and_says_so(tiny_model_dir):
    """Mamba uses dt_proj.weight as a plain matrix: a quantised dt_proj fails at the first
    forward. The plan skips it (and the real step with the plan's kwargs runs)."""
    report = _measured(tiny_model_dir("mamba"), "inference", "nf4")
    assert "dt_proj" in report.workload["skip_modules"]
    assert "lm_head" in report.workload["skip_modules"]  # transformers' default stays
    assert any("dt_proj" in note for note in report.notes)
    quant = report.recommendation.load_kwargs["quantization_config"]
    assert quant["llm_int8_skip_modules"] == report.workload["skip_modules"]
    script = emit_transformers(report, "nf4")
    assert f"llm_int8_skip_modules={json.dumps(report.workload['skip_modules'])}" in script


@pytest.mark.parametrize("arch", ["nemotron_h", "falcon_mamba"])
def test_lora_all_linear_leaves_out_what_peft_refuses(tiny_model_dir, arch):
    report = _measured(tiny_model_dir(arch), "qlora", "nf4")
    assert report.workload["lora_exclude_modules"] == ["out_proj"]
    assert 'exclude_modules=["out_proj"]' in emit_peft(report, "nf4")
    assert any("out_proj" in note and "peft" in note for note in report.notes)


def test_explicit_lora_targets_are_not_edited(tiny_model_dir):
    report = estimate(str(tiny_model_dir("nemotron_h")), gpu="24GiB", mode="lora",
                      precisions="bf16", lora_targets=["in_proj"], **SHAPE)
    assert "lora_exclude_modules" not in report.workload


def test_phimoe_config_resolves_by_model_type(tiny_model_dir, tmp_path):
    """microsoft/Phi-3.5-MoE-instruct's config names PhiMoEForCausalLM."""
    folder = tmp_path / "phimoe"
    shutil.copytree(tiny_model_dir("phimoe"), folder)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "architectures": ["PhiMoEForCausalLM"]}))
    loaded = load(str(folder), gpu="24GiB", precision="bf16", device="cpu", mode="load")
    report = loaded.report
    assert report.model.architecture == "PhimoeForCausalLM"
    assert any("PhiMoEForCausalLM" in note for note in report.notes)
    assert report.measured["resident_bytes"] == report.measured["predicted_bytes"]


@pytest.mark.parametrize("precision", ["bf16", "nf4"])
def test_vision_language_model_loads_with_its_own_class(tiny_model_dir, precision):
    loaded = load(str(tiny_model_dir("llava")), gpu="24GiB", precision=precision,
                  device="cpu", mode="load", random_weights=True)
    assert type(loaded.model).__name__ == "LlavaForConditionalGeneration"
    assert "AutoModelForImageTextToText.from_pretrained(" in emit_transformers(
        loaded.report, precision)
    measured = loaded.report.measured
    assert measured["resident_bytes"] == measured["predicted_bytes"]


def _write(tmp_path, raw: dict) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    return str(path)


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        ({"model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 64,
          "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128},
         "encoder-only model"),
        ({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "d_model": 64,
          "num_layers": 2, "num_heads": 4}, "encoder-decoder model"),
        ({"model_type": "llama", "architectures": ["LlamaForSequenceClassification"],
          "num_hidden_layers": 2}, "sequence-classification model"),
        ({"model_type": "vit"}, "vision model"),
    ],
)
def test_unsupported_families_get_a_one_line_refusal(tmp_path, raw, kind):
    result = CliRunner().invoke(app, ["estimate", _write(tmp_path, raw), "--gpu", "24GiB"])
    assert result.exit_code == ConfigError.exit_code
    text = result.output.strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    assert kind in text and "qplan plans causal LMs" in text
