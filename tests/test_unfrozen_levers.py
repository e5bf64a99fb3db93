"""Axolotl's unfrozen_parameters (issue 12): full fine-tuning of the named parameters only."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from transformers import AutoConfig
from typer.testing import CliRunner

from qplan.api import estimate, make_workload
from qplan.cli import app
from qplan.errors import QplanError
from qplan.loaders.axolotl import read_axolotl
from qplan.loaders.measure import measure
from qplan.planner.emit import emit_axolotl, estimate_kwargs_of
from qplan.planner.unfrozen import freeze_except, parse_pattern
from qplan.report import load_schema

SHAPE = dict(batch=2, seq_len=32)
PATTERNS = ("lm_head", r"model.layers.1.mlp.(gate|up)_proj")


def _write(tmp_path, text, name="config.yml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("patterns", [PATTERNS, ("model.embed_tokens.weight[:500]",)])
def test_unfrozen_against_a_real_step(tiny_model_dir, patterns):
    """Gradients and AdamW states only for what the patterns match: exact on CPU."""
    folder = tiny_model_dir("llama")
    config = AutoConfig.from_pretrained(folder)
    options = dict(SHAPE, unfrozen_parameters=patterns)
    predicted = estimate(str(folder), gpu="80GiB", mode="full", precisions="bf16",
                         target="cpu", **options).candidate("bf16")
    measured = measure(config, make_workload("full", config, **options), "bf16",
                       predicted.compute_dtype)
    assert predicted.peak_allocated_bytes == measured.peak_bytes
    assert predicted.components == {**measured.components,
                                    "cuda_context": predicted.components["cuda_context"]}
    everything = estimate(str(folder), gpu="80GiB", mode="full", precisions="bf16",
                          target="cpu", **SHAPE).candidate("bf16")
    assert predicted.components["optimizer_states"] < everything.components["optimizer_states"]
    if patterns == PATTERNS:
        # lm_head 1000 x 96, gate and up 200 x 96: two bf16 AdamW states each and fused
        # AdamW's float32 step count per parameter.
        assert predicted.components["optimizer_states"] == \
            2 * 2 * (1000 * 96 + 2 * 200 * 96) + 3 * 4


def test_patterns_follow_axolotl():
    """Periods are literal, matching starts at the name's start, ranges zero other rows."""
    assert parse_pattern("model.layers.1.mlp").match("model.layers.1.mlp.up_proj.weight")
    assert not parse_pattern("model.layers.1.mlp").match("model.layers.1Xmlp.up_proj.weight")
    assert not parse_pattern("layers.1").match("model.layers.1.mlp.up_proj.weight")
    assert parse_pattern(".+layers.1").match("model.layers.1.mlp.up_proj.weight")
    assert parse_pattern("x[:32]").rows == (0, 32) and parse_pattern("x[3]").rows == (3, 4)
    from tiny_models import make_config
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(make_config("llama", "float32"),
                                             dtype=torch.float32)
    freeze_except(model, ["model.embed_tokens.weight[10:20]"])
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        ["model.embed_tokens.weight"]
    ids = torch.arange(0, 40)[None]
    model(input_ids=ids, labels=ids).loss.backward()
    grad = model.model.embed_tokens.weight.grad
    assert grad[10:20].abs().sum() > 0
    assert grad[:10].abs().sum() == 0 and grad[20:].abs().sum() == 0
    with pytest.raises(QplanError, match="match no parameter"):
        freeze_except(model, ["nothing"])


def test_unfrozen_keys_round_trip(tiny_model_dir, tmp_path):
    plan = read_axolotl(_write(tmp_path, "base_model: m/x\nbf16: true\nunfrozen_parameters:\n"
                                         "  - lm_head\n  - model.norm\n"))
    assert plan.estimate_kwargs["unfrozen_parameters"] == ("lm_head", "model.norm")
    assert "unfrozen_parameters" in plan.keys.read
    lora = read_axolotl(_write(tmp_path, "base_model: m/x\nbf16: true\nadapter: lora\n"
                                         "unfrozen_parameters: [lm_head]\n"))
    assert "unfrozen_parameters" in lora.keys.not_modelled
    folder = tiny_model_dir("llama")
    runner = CliRunner()
    result = runner.invoke(app, ["estimate", str(folder), "--gpu", "80GiB", "--mode", "full",
                                 "--precisions", "bf16", "--batch", "2", "--seq-len", "32",
                                 "--unfrozen-parameters", "lm_head",
                                 "--unfrozen-parameters", "model.norm", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    jsonschema.validate(data, load_schema())
    assert data["workload"]["unfrozen_parameters"] == ["lm_head", "model.norm"]
    report = estimate(str(folder), gpu="80GiB", mode="full", precisions="bf16",
                      unfrozen_parameters=PATTERNS, **SHAPE)
    again = read_axolotl(_write(tmp_path, emit_axolotl(report, "bf16"), "again.yml"))
    assert again.estimate_kwargs == estimate_kwargs_of(report, "bf16")
    bad = runner.invoke(app, ["estimate", str(folder), "--gpu", "80GiB", "--mode", "full",
                              "--precisions", "bf16", "--unfrozen-parameters", "nothing"])
    assert bad.exit_code == 2 and "match no parameter" in bad.stderr
    assert "Traceback" not in bad.output
    with pytest.raises(QplanError, match="--mode full"):
        estimate(str(folder), gpu="80GiB", mode="lora", unfrozen_parameters=("lm_head",))
