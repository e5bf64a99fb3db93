"""Emitted configs run (transformers, peft) and round-trip (Axolotl)."""

from __future__ import annotations

import pytest
import yaml

from qplan.api import estimate
from qplan.errors import UsageError
from qplan.loaders.axolotl import read_axolotl
from qplan.loaders.resident import resident_bytes
from qplan.planner.emit import (
    emit_axolotl,
    emit_peft,
    emit_transformers,
    estimate_kwargs_of,
    workload_of,
)


def _run_transformers(report, precision=None):
    code = emit_transformers(report, precision)
    assert 'device_map={"": 0}' in code
    # Run it on CPU: the only change is where the model goes.
    namespace: dict = {}
    exec(code.replace('device_map={"": 0}', 'device_map="cpu"'), namespace)
    return namespace["model"], code


@pytest.mark.parametrize("precision", ["bf16", "int8", "nf4-dq", "fp4"])
def test_transformers_snippet_loads_the_plan(tiny_model_dir, precision):
    folder = str(tiny_model_dir("llama"))
    report = estimate(folder, gpu="A100-80GB", mode="load")
    model, code = _run_transformers(report, precision)
    assert "import torch" in code and "AutoModelForCausalLM.from_pretrained(" in code
    assert resident_bytes(model).bytes == report.candidate(precision).weights_bytes


def test_transformers_snippet_uses_fp16_compute_on_t4(tiny_model_dir):
    report = estimate(str(tiny_model_dir("llama")), gpu="T4", mode="load")
    code = emit_transformers(report, "nf4")
    assert "bnb_4bit_compute_dtype=torch.float16" in code
    assert "dtype=torch.float16" in code


def test_peft_snippet_runs_on_the_loaded_model(tiny_model_dir):
    folder = str(tiny_model_dir("llama"))
    report = estimate(
        folder,
        gpu="A100-80GB",
        mode="qlora",
        lora_r=8,
        lora_targets=["q_proj", "v_proj"],
        precisions="nf4-dq",
    )
    model, _ = _run_transformers(report)
    code = emit_peft(report)
    assert "prepare_model_for_kbit_training(" in code
    assert 'gradient_checkpointing_kwargs={"use_reentrant": False}' in code
    namespace = {"model": model}
    exec(code, namespace)
    peft_model = namespace["model"]
    trainable, _ = peft_model.get_nb_trainable_parameters()
    # r * (in + out) for q_proj (96->96) and v_proj (96->48) in each of 2 layers.
    assert trainable == 2 * 8 * ((96 + 96) + (96 + 48))
    assert peft_model.base_model.model.is_gradient_checkpointing
    assert peft_model.config.use_cache is False


def test_peft_snippet_unquantised_lora(tiny_model_dir):
    folder = str(tiny_model_dir("llama"))
    report = estimate(folder, gpu="A100-80GB", mode="lora", precisions="bf16")
    model, _ = _run_transformers(report)
    code = emit_peft(report)
    assert "prepare_model_for_kbit_training" not in code
    namespace = {"model": model}
    exec(code, namespace)
    assert namespace["model"].get_nb_trainable_parameters()[0] > 0


def test_peft_needs_a_lora_plan(tiny_model_dir):
    report = estimate(str(tiny_model_dir("llama")), gpu="A100-80GB", mode="load")
    with pytest.raises(UsageError, match="LoRA"):
        emit_peft(report)


# LoRA on a k-bit base is planned with Axolotl's dtypes (norms and embeddings cast back
# after peft's k-bit preparation: --no-kbit-upcast), which is what the YAML reads back as.
ROUND_TRIPS = [
    dict(mode="qlora", precisions="nf4-dq", lora_r=32, lora_alpha=16, batch=2, seq_len=128,
         kbit_upcast=False),
    dict(mode="qlora", precisions="fp4", quant_storage="bfloat16", lora_dropout=0.05,
         kbit_upcast=False),
    dict(
        mode="lora",
        precisions="bf16",
        lora_targets=["q_proj", "v_proj"],
        optimizer="paged_adamw_8bit",
        attn="eager",
        gradient_checkpointing=False,
    ),
    dict(mode="lora", precisions="int8", optimizer="adamw_8bit", kbit_upcast=False),
    dict(mode="full", precisions="bf16", optimizer="adafactor", batch=4),
    dict(mode="full", precisions="fp32", optimizer="sgd", attn="flash_attention_2"),
]


@pytest.mark.parametrize("options", ROUND_TRIPS)
def test_axolotl_round_trip(tiny_model_dir, tmp_path, options):
    folder = str(tiny_model_dir("llama"))
    report = estimate(folder, gpu="A100-80GB", **options)
    text = emit_axolotl(report)
    settings = yaml.safe_load(text)
    assert settings["base_model"] == folder
    path = tmp_path / "axolotl.yml"
    path.write_text(text)
    plan = read_axolotl(path)
    assert plan.model == folder
    assert plan.unused_keys == ("gradient_accumulation_steps",)
    assert plan.estimate_kwargs == estimate_kwargs_of(report)
    # The same plan: re-estimating from the YAML gives the same workload and candidate.
    again = estimate(plan.model, gpu="A100-80GB", **plan.estimate_kwargs)
    precision = report.recommendation.precision
    assert again.recommendation.precision == precision
    assert workload_of(again) == workload_of(report)
    assert again.candidate(precision) == report.candidate(precision)


def test_axolotl_qlora_yaml_keys(tiny_model_dir):
    report = estimate(
        str(tiny_model_dir("llama")), gpu="T4", mode="qlora", lora_r=8, precisions="nf4-dq"
    )
    settings = yaml.safe_load(emit_axolotl(report))
    assert settings["adapter"] == "qlora" and settings["load_in_4bit"] is True
    assert settings["bnb_config_kwargs"] == {
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_quant_storage": "uint8",
    }
    assert settings["lora_target_linear"] is True
    assert settings["fp16"] is True and settings["bf16"] is False  # T4: fp16 compute
    assert settings["optimizer"] == "adamw_torch_fused"
    assert settings["sdp_attention"] is True


def test_axolotl_needs_a_training_plan(tiny_model_dir):
    report = estimate(str(tiny_model_dir("llama")), gpu="A100-80GB", mode="inference")
    with pytest.raises(UsageError, match="training"):
        emit_axolotl(report)


def test_no_recommendation_needs_a_precision(tiny_model_dir):
    report = estimate(str(tiny_model_dir("llama")), gpu="1MiB", mode="load")
    with pytest.raises(UsageError, match="nothing fits"):
        emit_transformers(report)
    assert "from_pretrained" in emit_transformers(report, "bf16")


@pytest.mark.parametrize("strategy,mode", [
    ("ddp", "lora"), ("zero2", "full"), ("zero2+offload", "full"), ("zero3", "full"),
    ("zero3+offload", "lora"), ("fsdp", "full"), ("fsdp+offload", "lora"),
])
def test_axolotl_round_trip_across_gpus(tiny_model_dir, tmp_path, strategy, mode):
    """A plan across GPUs emits the DeepSpeed / FSDP / DDP keys of its strategy, and the
    YAML reads back as that strategy with the same per-GPU plan."""
    folder = str(tiny_model_dir("llama"))
    report = estimate(folder, gpu="A100-80GB", num_gpus=4, mode=mode, precisions="bf16",
                      strategy=strategy)
    text = emit_axolotl(report)
    assert f"# planned for 4 GPUs with {strategy}" in text
    path = tmp_path / "axolotl.yml"
    path.write_text(text)
    plan = read_axolotl(path)
    assert plan.estimate_kwargs == estimate_kwargs_of(report)
    assert plan.estimate_kwargs["strategy"] == strategy
    assert plan.unused_keys == ("gradient_accumulation_steps",)
    assert not plan.keys.not_modelled  # every strategy key is one qplan plans exactly
    again = estimate(plan.model, gpu="A100-80GB", num_gpus=4, **plan.estimate_kwargs)
    assert again.candidate("bf16") == report.candidate("bf16")
    assert again.strategy.name == report.strategy.name == strategy
    assert again.devices == report.devices


def test_axolotl_strategy_keys_name_axolotls_files(tiny_model_dir):
    folder = str(tiny_model_dir("llama"))
    zero3 = estimate(folder, gpu="A100-80GB", num_gpus=2, mode="full", precisions="bf16",
                     strategy="zero3")
    assert yaml.safe_load(emit_axolotl(zero3))["deepspeed"] == "deepspeed_configs/zero3_bf16.json"
    zero2 = yaml.safe_load(emit_axolotl(estimate(
        folder, gpu="A100-80GB", num_gpus=2, mode="full", precisions="bf16", strategy="zero2")))
    # Axolotl's zero2.json offloads the optimizer: plain ZeRO-2 is written inline.
    assert zero2["deepspeed"]["zero_optimization"]["stage"] == 2
    assert "offload_optimizer" not in zero2["deepspeed"]["zero_optimization"]
    fsdp = yaml.safe_load(emit_axolotl(estimate(
        folder, gpu="A100-80GB", num_gpus=2, mode="full", precisions="bf16", strategy="fsdp")))
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_config"]["transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    assert fsdp["fsdp_config"]["offload_params"] is False
    single = yaml.safe_load(emit_axolotl(estimate(folder, gpu="A100-80GB", mode="full",
                                                  precisions="bf16")))
    assert not {"deepspeed", "fsdp_version", "fsdp_config", "ddp"} & set(single)
