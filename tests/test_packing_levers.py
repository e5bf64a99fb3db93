"""Axolotl's sample packing (issue 12): the micro-batch in one row, position ids restarting.

sdpa and eager are traced and measured on CPU (transformers builds a block-diagonal mask
from the packed position ids); flash attention's varlen path needs CUDA and is planned from
flash-attn's documented allocations (planner/attention.py).
"""

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
from qplan.report import load_schema

SHAPE = dict(batch=2, seq_len=32, lora_r=8)


def _write(tmp_path, text, name="config.yml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(("attn", "checkpointing"), [("sdpa", True), ("eager", False)])
def test_packing_against_a_real_step(tiny_model_dir, attn, checkpointing):
    folder = tiny_model_dir("llama")
    config = AutoConfig.from_pretrained(folder)
    options = dict(SHAPE, sample_packing=True, attn=attn,
                   gradient_checkpointing=checkpointing)
    predicted = estimate(str(folder), gpu="80GiB", mode="lora", precisions="bf16",
                         target="cpu", **options).candidate("bf16")
    measured = measure(config, make_workload("lora", config, **options), "bf16",
                       predicted.compute_dtype)
    assert predicted.peak_allocated_bytes == measured.peak_bytes
    assert predicted.components == {**measured.components,
                                    "cuda_context": predicted.components["cuda_context"]}
    unpacked = estimate(str(folder), gpu="80GiB", mode="lora", precisions="bf16",
                        target="cpu", **dict(options, sample_packing=False)).candidate("bf16")
    # The same tokens and logits; attention over one row of 64 sees a 64 x 64 mask (and,
    # eager, 64 x 64 scores) instead of two 32 x 32 blocks.
    assert unpacked.components["logits"] == predicted.components["logits"]
    assert predicted.components["activations"] > unpacked.components["activations"]


def test_packed_row_is_two_sequences():
    """transformers reads restarting position ids as packing: each half of the packed row
    gives the logits of that sequence alone (the plan's row is a real packed batch)."""
    from tiny_models import make_config
    from transformers import AutoModelForCausalLM

    from qplan.planner.steps import packed_position_ids

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config("llama", "float32"),
                                             dtype=torch.float32, attn_implementation="sdpa")
    workload = make_workload("lora", model.config, **SHAPE, sample_packing=True)
    ids = torch.randint(0, 1000, (2, 32))
    position_ids = packed_position_ids(workload, torch.device("cpu"))
    with torch.no_grad():
        # Without a cache, as a training step runs (transformers reads packing only then).
        packed = model(input_ids=ids.reshape(1, 64), position_ids=position_ids,
                       use_cache=False).logits
        apart = model(input_ids=ids).logits
    assert torch.allclose(packed.reshape(2, 32, -1), apart, atol=1e-5)


def test_flash_varlen_is_planned(tiny_model_dir):
    """Flash attention on a packed row takes the varlen path: the same logits and nearly
    the same activations as two rows (contiguous q/k/v copies, padded varlen buffers)."""
    folder = str(tiny_model_dir("llama"))
    options = dict(SHAPE, attn="flash_attention_2")
    packed = estimate(folder, gpu="80GiB", mode="lora", precisions="bf16",
                      sample_packing=True, **options).candidate("bf16")
    rows = estimate(folder, gpu="80GiB", mode="lora", precisions="bf16",
                    **options).candidate("bf16")
    assert packed.components["logits"] == rows.components["logits"]
    assert rows.peak_allocated_bytes <= packed.peak_allocated_bytes
    assert packed.peak_allocated_bytes < rows.peak_allocated_bytes * 1.01


def test_packing_keys_round_trip_and_schema(tiny_model_dir, tmp_path):
    plan = read_axolotl(_write(tmp_path, "base_model: m/x\nbf16: true\nsample_packing: true\n"
                                         "flash_attention: true\n"))
    assert plan.estimate_kwargs["sample_packing"] is True
    assert "sample_packing" in plan.keys.read and not plan.keys.not_modelled
    off = read_axolotl(_write(tmp_path, "base_model: m/x\nbf16: true\nsample_packing: false\n"))
    assert "sample_packing" not in off.estimate_kwargs
    folder = tiny_model_dir("llama")
    result = CliRunner().invoke(app, ["estimate", str(folder), "--gpu", "80GiB", "--mode",
                                      "lora", "--precisions", "bf16", "--batch", "2",
                                      "--seq-len", "32", "--sample-packing", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    jsonschema.validate(data, load_schema())
    assert data["workload"]["sample_packing"] is True
    report = estimate(str(folder), gpu="80GiB", mode="lora", precisions="bf16",
                      sample_packing=True, **SHAPE)
    text = emit_axolotl(report, "bf16")
    assert "sample_packing: true" in text
    assert read_axolotl(_write(tmp_path, text, "again.yml")).estimate_kwargs == \
        estimate_kwargs_of(report, "bf16")
    with pytest.raises(QplanError, match="--sample-packing"):
        estimate(str(folder), gpu="80GiB", mode="inference", sample_packing=True)
