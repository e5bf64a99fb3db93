"""Axolotl's MoE levers: quantize_moe_experts (the fused 3-D experts quantised by
bitsandbytes, planner/moe_experts.py) and lora_target_parameters (peft's
target_parameters: lora.ParamWrapper on the expert tensors).

Checked against bitsandbytes' own quantisation of a tiny Mixtral's experts on CPU (bytes
and tensors) and against real LoRA / QLoRA steps of the loaded model.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from qplan.api import estimate, make_workload
from qplan.loaders.measure import measure, random_model
from qplan.planner.precision import PRECISIONS

SHAPE = dict(batch=2, seq_len=16, lora_r=4)
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def _storages(model) -> int:
    """Unique storages of a real model: parameters, buffers, and the quant state the
    parametrisations hold."""
    from qplan.planner.moe_experts import parametrization_state
    from qplan.planner.steps import _quant_tensors

    seen: dict[int, int] = {}
    tensors = [*model.parameters(), *model.buffers()]
    for param in model.parameters():
        tensors.extend(_quant_tensors(param))
    for module in model.modules():
        tensors.extend(parametrization_state(module))
    for t in tensors:
        storage = t.untyped_storage()
        seen[id(storage)] = storage.nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("precision", ["nf4", "int8"])
def test_expert_weights_are_bitsandbytes_bytes(tiny_model_dir, precision):
    """The planned weights equal the storages of a real bnb load whose experts bitsandbytes
    then quantised as Axolotl's load patch does (replace_parameter_4bit / row-wise int8)."""
    folder = tiny_model_dir("mixtral")
    config = AutoConfig.from_pretrained(folder)
    mode = "qlora" if PRECISIONS[precision].is_4bit else "lora"
    report = estimate(str(folder), gpu="80GiB", mode=mode, precisions=precision,
                      target="cpu", quantize_moe_experts=True, **SHAPE)
    plain = estimate(str(folder), gpu="80GiB", mode=mode, precisions=precision,
                     target="cpu", **SHAPE)
    model = random_model(config, precision, "bfloat16", "cpu", str(folder),
                         moe_experts=True)
    planned = report.candidate(precision).weights_bytes
    assert planned == _storages(model)
    experts = model.model.layers[0].mlp.experts
    packed = experts.parametrizations.gate_up_proj.original
    assert packed.dtype in (torch.uint8, torch.int8)
    # 4 x 400 x 96 bf16 experts: 76,800 bytes packed at 4 bits, 153,600 at int8.
    assert packed.numel() == (76_800 if precision == "nf4" else 153_600)
    assert planned < plain.candidate(precision).weights_bytes
    assert not any("does not quantise" in w for w in report.warnings)


@pytest.mark.parametrize(("precision", "params", "quantize"), [
    ("nf4", (), True), ("bf16", EXPERTS, False),
    # Experts that reach torch's _grouped_mm in float32: Axolotl's int8 experts dequantise
    # to it, and k-bit preparation casts unquantised experts to it.
    ("int8", (), True), ("int8", (), False), ("nf4", (), False),
])
def test_expert_levers_against_a_real_step(tiny_model_dir, precision, params, quantize):
    """QLoRA on quantised experts (with and without expert adapters), LoRA on int8 layers
    with and without int8 experts, QLoRA on float32 experts, and LoRA on bf16 experts
    through target_parameters: the traced step equals the real one."""
    folder = tiny_model_dir("mixtral")
    config = AutoConfig.from_pretrained(folder)
    mode = "qlora" if precision == "nf4" else "lora"
    options = dict(SHAPE, lora_targets="q_proj,v_proj", lora_target_parameters=params,
                   quantize_moe_experts=quantize)
    predicted = estimate(str(folder), gpu="80GiB", mode=mode, precisions=precision,
                         target="cpu", **options).candidate(precision)
    workload = make_workload(mode, config, **options)
    measured = measure(config, workload, precision, predicted.compute_dtype,
                       weights_dir=str(folder))
    assert predicted.peak_allocated_bytes == measured.peak_bytes
    assert predicted.components == {**measured.components,
                                    "cuda_context": predicted.components["cuda_context"]}


def _write(tmp_path, text, name="config.yml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_moe_keys_round_trip(tiny_model_dir, tmp_path):
    """The YAML keys are read (no longer 'not modelled'), --emit axolotl writes them back,
    and the CLI options reach the JSON report, valid against the schema."""
    import json

    import jsonschema
    from typer.testing import CliRunner

    from qplan.cli import app
    from qplan.loaders.axolotl import read_axolotl
    from qplan.planner.emit import emit_axolotl, estimate_kwargs_of
    from qplan.report import load_schema

    plan = read_axolotl(_write(tmp_path, "base_model: m/x\nadapter: qlora\nload_in_4bit: true\n"
                                         "quantize_moe_experts: true\nlora_dropout: 0\n"
                                         "lora_target_modules: [q_proj, v_proj]\n"))
    assert plan.estimate_kwargs["quantize_moe_experts"] is True
    assert "quantize_moe_experts" in plan.keys.read and not plan.keys.not_modelled
    lora = read_axolotl(_write(tmp_path, "base_model: m/x\nadapter: lora\nbf16: true\n"
                                         "lora_dropout: 0\nlora_target_parameters:\n"
                                         "  - mlp.experts.gate_up_proj\n", "lora.yml"))
    assert lora.estimate_kwargs["lora_target_parameters"] == ("mlp.experts.gate_up_proj",)
    folder = tiny_model_dir("mixtral")
    result = CliRunner().invoke(app, ["estimate", str(folder), "--gpu", "80GiB", "--mode",
                                      "qlora", "--precisions", "nf4", "--batch", "2",
                                      "--seq-len", "16", "--lora-targets", "q_proj,v_proj",
                                      "--quantize-moe-experts", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    jsonschema.validate(data, load_schema())
    assert data["workload"]["quantize_moe_experts"] is True
    for mode, precision, options in (
        ("qlora", "nf4", dict(quantize_moe_experts=True, lora_targets="q_proj,v_proj")),
        ("lora", "bf16", dict(lora_target_parameters=EXPERTS, lora_targets="q_proj")),
    ):
        report = estimate(str(folder), gpu="80GiB", mode=mode, precisions=precision,
                          **SHAPE, **options)
        again = read_axolotl(_write(tmp_path, emit_axolotl(report, precision), "again.yml"))
        assert again.estimate_kwargs == estimate_kwargs_of(report, precision)
        assert again.keys.not_modelled == {}


def test_expert_lora_on_quantised_experts_is_refused(tiny_model_dir):
    from qplan.errors import UsageError

    folder = tiny_model_dir("mixtral")
    with pytest.raises(UsageError, match="fails from the second step"):
        estimate(str(folder), gpu="80GiB", mode="qlora", precisions="nf4",
                 quantize_moe_experts=True, lora_target_parameters=EXPERTS, **SHAPE)
    with pytest.raises(UsageError, match="--mode lora or qlora"):
        estimate(str(folder), gpu="80GiB", mode="full", precisions="bf16",
                 quantize_moe_experts=True, **SHAPE)


def test_peft_fails_on_lora_over_quantised_experts(tiny_model_dir):
    """Why the refusal above holds: a real two-step LoRA run on experts bitsandbytes
    quantised fails in peft 0.21 (its _LoraFactorsProxy stays on the expert). If this
    starts passing, peft fixed it and the refusal in make_workload can go."""
    from peft import LoraConfig, get_peft_model

    from qplan.planner.training_setup import target_parameters

    folder = tiny_model_dir("mixtral")
    config = AutoConfig.from_pretrained(folder)
    model = random_model(config, "nf4", "bfloat16", "cpu", str(folder), moe_experts=True)
    model.requires_grad_(False)
    lora = LoraConfig(r=4, target_modules=["q_proj"],
                      target_parameters=target_parameters(EXPERTS, model))
    model = get_peft_model(model, lora)
    model.train()
    ids = torch.randint(0, 1000, (1, 8))
    with pytest.raises(RuntimeError, match="floating point dtype can require gradients"):
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
