"""Axolotl's memory levers (issue 12): every key accounted for, reentrant checkpointing,
torchao's low-bit AdamW, regex LoRA targets; each lever against a real CPU step."""

from __future__ import annotations

import json

import jsonschema
import pytest
from transformers import AutoConfig
from typer.testing import CliRunner

from qplan.api import estimate, estimate_axolotl, make_workload
from qplan.cli import app
from qplan.errors import QplanError
from qplan.loaders.axolotl import read_axolotl
from qplan.loaders.measure import measure
from qplan.planner.emit import emit_axolotl, estimate_kwargs_of
from qplan.report import load_schema, report_dict

SHAPE = dict(batch=2, seq_len=32, lora_r=8)

KEYS_YAML = """\
base_model: {model}
adapter: lora
lora_r: 8
lora_target_linear: true
sequence_len: 32
micro_batch_size: 2
bf16: true
gradient_checkpointing: true
attn_implementation: flash_attention_3
sample_packing: false
tensor_parallel_size: 2
tiled_mlp: true
learning_rate: 0.0002
datasets:
  - path: some/data
    type: alpaca
fsdp:
a_key_nobody_knows: 3
"""


def _write(tmp_path, text, name="config.yml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(predicted: int, measured: int) -> float:
    return (predicted - measured) / measured


def test_every_key_is_read_not_modelled_ignored_or_unknown(tmp_path):
    plan = read_axolotl(_write(tmp_path, KEYS_YAML.format(model="m/x")))
    keys = plan.keys
    assert set(keys.read) >= {"base_model", "adapter", "lora_r", "sequence_len",
                              "attn_implementation", "gradient_checkpointing"}
    # false or left empty asks for nothing: planned without it, as the file says
    assert {"sample_packing", "fsdp"} <= set(keys.read)
    assert set(keys.not_modelled) == {"tensor_parallel_size", "tiled_mlp"}
    assert {"learning_rate", "datasets"} <= set(keys.ignored)
    assert keys.unknown == ("a_key_nobody_knows",)
    every = (*keys.read, *keys.not_modelled, *keys.ignored, *keys.unknown)
    assert sorted(every) == sorted(yaml_keys(KEYS_YAML)) and len(every) == len(set(every))
    assert all(key in warning for key, warning in zip(keys.not_modelled, keys.warnings,
                                                        strict=True))
    # FlashAttention 3 keeps what FlashAttention 2 keeps.
    assert plan.estimate_kwargs["attn"] == "flash_attention_2"


def yaml_keys(text: str) -> list[str]:
    import yaml

    return list(yaml.safe_load(text))


@pytest.mark.parametrize(("value", "attn"), [("flash", "flash_attention_2"), ("sdpa", "sdpa")])
def test_attention_key(tmp_path, value, attn):
    plan = read_axolotl(_write(tmp_path, f"base_model: m/x\nbf16: true\nattention: {value}\n"))
    assert plan.estimate_kwargs["attn"] == attn and "attention" in plan.keys.read


def test_unknown_attention_is_a_warning_planned_as_sdpa(tmp_path):
    plan = read_axolotl(_write(tmp_path, "base_model: m/x\nbf16: true\n"
                                         "attn_implementation: flex_attention\n"))
    assert plan.estimate_kwargs["attn"] == "sdpa"
    assert "flex_attention" in plan.keys.not_modelled["attn_implementation"]


def test_report_and_table_list_the_keys(tiny_model_dir, tmp_path):
    config = _write(tmp_path, KEYS_YAML.format(model=tiny_model_dir("llama")))
    runner = CliRunner()
    result = runner.invoke(app, ["estimate", "--axolotl", str(config), "--gpu", "4090",
                                 "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    jsonschema.validate(report, load_schema())
    block = report["axolotl"]
    assert [k["key"] for k in block["not_modelled"]] == ["tensor_parallel_size", "tiled_mlp"]
    assert block["unknown"] == ["a_key_nobody_knows"]
    assert any("tiled_mlp" in w for w in report["warnings"])
    assert report["workload"]["attn"] == "flash_attention_2"
    table = runner.invoke(app, ["estimate", "--axolotl", str(config), "--gpu", "4090"])
    assert table.exit_code == 0, table.output
    for text in ("not modelled: 2", "tensor_parallel_size", "unknown (not read): 1",
                 "a_key_nobody_knows", "ignored (no memory)", "read:"):
        assert text in table.stdout, text


@pytest.mark.parametrize(
    ("extra", "reentrant"),
    [
        ("", True),  # Axolotl's normalize_config default
        ("gradient_checkpointing_kwargs:\n  use_reentrant: false\n", False),
        ("gradient_checkpointing_kwargs:\n  use_reentrant: true\n", True),
        ("gradient_checkpointing_kwargs: {}\n", False),  # transformers' default then
        ("unfrozen_parameters: ['lm_head.*']\n", None),  # Axolotl leaves it to transformers
    ],
)
def test_reentrant_checkpointing_as_axolotl_decides(tmp_path, extra, reentrant):
    text = "base_model: m/x\nbf16: true\ngradient_checkpointing: true\n" + extra
    kwargs = read_axolotl(_write(tmp_path, text)).estimate_kwargs
    assert kwargs.get("gc_reentrant") == reentrant


@pytest.mark.parametrize(("precision", "mode"), [("int8", "lora"), ("nf4", "qlora")])
def test_reentrant_and_not_against_real_steps(tiny_model_dir, precision, mode):
    """torch.utils.checkpoint both ways, predicted on meta against a real CPU step: exact.

    LLM.int8 keeps its input in ``ctx.tensors``, which non-reentrant checkpointing cannot
    free, so there reentrant holds fewer activations; 4-bit layers save through autograd.
    """
    folder = tiny_model_dir("llama")
    config = AutoConfig.from_pretrained(folder)
    activations = {}
    modes = (True, False) if precision == "int8" else (True,)
    for reentrant in modes:
        options = dict(SHAPE, gc_reentrant=reentrant)
        predicted = estimate(str(folder), gpu="80GiB", mode=mode, precisions=precision,
                             target="cpu", **options).candidate(precision)
        measured = measure(config, make_workload(mode, config, **options), precision,
                           predicted.compute_dtype)
        assert predicted.peak_allocated_bytes == measured.peak_bytes, reentrant
        assert predicted.components == {**measured.components,
                                        "cuda_context": predicted.components["cuda_context"]}
        activations[reentrant] = measured.components["activations"]
    if precision == "int8":
        assert activations[True] < activations[False]


@pytest.mark.parametrize("optimizer", ["adamw_torch_8bit", "adamw_torch_4bit"])
def test_torchao_low_bit_adamw_against_a_real_step(tiny_model_dir, optimizer):
    """torchao's own AdamW8bit / AdamW4bit (its update run eagerly): states exact."""
    pytest.importorskip("torchao")
    folder = tiny_model_dir("llama")
    config = AutoConfig.from_pretrained(folder)
    options = dict(SHAPE, optimizer=optimizer)
    predicted = estimate(str(folder), gpu="80GiB", mode="full", precisions="bf16",
                         target="cpu", **options).candidate("bf16")
    measured = measure(config, make_workload("full", config, **options), "bf16",
                       predicted.compute_dtype)
    assert predicted.components["optimizer_states"] == measured.components["optimizer_states"]
    assert abs(_error(predicted.peak_allocated_bytes, measured.peak_bytes)) <= 0.02
    adamw = estimate(str(folder), gpu="80GiB", mode="full", precisions="bf16", target="cpu",
                     **SHAPE).candidate("bf16")
    # Parameters under 4096 values (norms) keep bf16 states, as with AdamW.
    assert predicted.components["optimizer_states"] < adamw.components["optimizer_states"]


REGEX = r".*layers\.1\.self_attn\.(q|v)_proj"


def test_regex_targets_follow_peft(tiny_model_dir, tmp_path):
    """A string lora_target_modules is a regex peft full-matches against module names."""
    folder = tiny_model_dir("llama")
    text = (f"base_model: {folder}\nadapter: lora\nbf16: true\nlora_r: 8\n"
            f"lora_target_modules: '{REGEX}'\n"
            "sequence_len: 32\nmicro_batch_size: 2\n")
    config_path = _write(tmp_path, text)
    assert read_axolotl(config_path).estimate_kwargs["lora_target_regex"] == REGEX
    report = estimate_axolotl(str(config_path), gpu="80GiB", precisions="bf16", target="cpu")
    candidate = report.candidate("bf16")
    config = AutoConfig.from_pretrained(folder)
    # Only layer 1's q_proj (96 -> 96) and v_proj (96 -> 48): r * (in + out) fp32 each.
    assert candidate.components["adapters"] == 4 * 8 * ((96 + 96) + (96 + 48))
    workload = make_workload("lora", config, lora_target_regex=REGEX, **SHAPE)
    measured = measure(config, workload, "bf16", candidate.compute_dtype)
    assert measured.components["adapters"] == candidate.components["adapters"]
    # Round trip: the emitted YAML reads back as the same plan.
    emitted = read_axolotl(_write(tmp_path, emit_axolotl(report, "bf16"), "again.yml"))
    assert emitted.estimate_kwargs == estimate_kwargs_of(report, "bf16")


def test_regex_matching_nothing_is_a_one_line_error(tiny_model_dir):
    with pytest.raises(QplanError, match="match no module") as info:
        estimate(str(tiny_model_dir("llama")), gpu="80GiB", mode="lora", precisions="bf16",
                 lora_target_regex="nothing_here", **{"batch": 1, "seq_len": 8})
    assert "\n" not in str(info.value)
    with pytest.raises(QplanError, match="does not compile"):
        estimate(str(tiny_model_dir("llama")), gpu="80GiB", mode="lora", precisions="bf16",
                 lora_target_regex="(", batch=1, seq_len=8)


def test_reentrant_and_torchao_round_trip_through_emit(tiny_model_dir, tmp_path):
    report = estimate(str(tiny_model_dir("llama")), gpu="80GiB", mode="lora",
                      precisions="int8", gc_reentrant=True, optimizer="adamw_torch_4bit",
                      **SHAPE)
    assert report_dict(report)["workload"]["gc_reentrant"] is True
    text = emit_axolotl(report, "int8")
    assert "use_reentrant: true" in text and "optimizer: \"adamw_torch_4bit\"" in text
    again = read_axolotl(_write(tmp_path, text))
    assert again.estimate_kwargs == estimate_kwargs_of(report, "int8")


@pytest.mark.parametrize("kind", ["liger", "cce"])
def test_fused_ce_computes_transformers_loss_and_gradients(kind):
    """The fused losses are real: the same loss and gradients as the model's own loss."""
    import torch
    from tiny_models import make_config
    from transformers import AutoModelForCausalLM

    from qplan.planner.fused_ce import fused_ce_loss

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config("llama", "float32", vocab_size=3000),
                                             dtype=torch.float32)
    ids = torch.randint(0, 3000, (2, 24))
    reference = model(input_ids=ids, labels=ids).loss
    reference.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss = fused_ce_loss(model, ids, kind)
    loss.backward()
    assert torch.allclose(loss, reference, rtol=1e-5)
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, expected[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("kind", ["liger", "cce"])
def test_fused_ce_against_a_real_step(tiny_model_dir, kind):
    """No logits: the meta trace against a real CPU step of the same loss, exact."""
    folder = tiny_model_dir("llama", vocab_size=6000)
    config = AutoConfig.from_pretrained(folder)
    options = dict(SHAPE, fused_ce=kind)
    predicted = estimate(str(folder), gpu="80GiB", mode="lora", precisions="bf16",
                         target="cpu", **options).candidate("bf16")
    measured = measure(config, make_workload("lora", config, **options), "bf16",
                       predicted.compute_dtype)
    assert predicted.peak_allocated_bytes == measured.peak_bytes
    assert predicted.components["logits"] == measured.components["logits"]
    unfused = estimate(str(folder), gpu="80GiB", mode="lora", precisions="bf16", target="cpu",
                       **SHAPE).candidate("bf16")
    assert unfused.components["logits"] > 0
    assert predicted.components["logits"] < unfused.components["logits"] / 4
    assert predicted.peak_allocated_bytes < unfused.peak_allocated_bytes


@pytest.mark.parametrize(
    ("extra", "fused"),
    [
        ("plugins:\n  - axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin\n", "cce"),
        ("plugins:\n  - axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin\n"
         "cut_cross_entropy: false\n", None),
        ("plugins:\n  - axolotl.integrations.liger.LigerPlugin\n"
         "liger_fused_linear_cross_entropy: true\nliger_rms_norm: true\n", "liger"),
    ],
)
def test_fused_ce_keys(tmp_path, extra, fused):
    plan = read_axolotl(_write(tmp_path, "base_model: m/x\nbf16: true\n" + extra))
    assert plan.estimate_kwargs.get("fused_ce") == fused
    assert "plugins" in plan.keys.read
    assert set(plan.keys.not_modelled) <= {"liger_rms_norm"}


def test_unknown_plugin_is_not_modelled(tmp_path):
    plan = read_axolotl(_write(tmp_path, "base_model: m/x\nbf16: true\nplugins:\n"
                                         "  - some.Plugin\n"))
    assert "some.Plugin" in plan.keys.not_modelled["plugins"]


@pytest.mark.parametrize("kind", ["cce", "liger"])
def test_fused_ce_round_trips_through_emit_axolotl(tiny_model_dir, tmp_path, kind):
    report = estimate(str(tiny_model_dir("llama")), gpu="80GiB", mode="qlora",
                      precisions="nf4", fused_ce=kind, **SHAPE)
    assert report.candidate("nf4").components["logits"] < 2**20
    again = read_axolotl(_write(tmp_path, emit_axolotl(report, "nf4")))
    assert again.estimate_kwargs == estimate_kwargs_of(report, "nf4")
    assert again.keys.not_modelled == {}
