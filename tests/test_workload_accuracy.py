"""Predicted peaks (meta-device trace) against real steps on CPU, and exact resident parts.

The measurement loads random weights through from_pretrained with bitsandbytes, applies
the training patches and runs real steps; a live-tensor tracker takes the peak.
"""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from qplan.api import estimate, make_workload
from qplan.loaders.measure import measure, random_model
from qplan.loaders.resident import resident_bytes
from qplan.planner.training_setup import prepare_for_training

ARCHS = ("llama", "qwen2", "gpt2", "mixtral")
CASES = [
    ("inference", "bf16", True),
    ("inference", "nf4", True),
    ("full", "bf16", True),
    ("full", "bf16", False),
    ("lora", "bf16", True),
    ("lora", "bf16", False),
    ("lora", "int8", True),
    ("qlora", "nf4-dq", True),
    ("qlora", "nf4-dq", False),
]
SHAPE = dict(batch=2, seq_len=64, lora_r=8)


def predict(folder, mode, precision, gc):
    report = estimate(
        str(folder), gpu="80GiB", mode=mode, precisions=precision, target="cpu",
        gradient_checkpointing=gc, **SHAPE,
    )
    return report.candidate(precision)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("mode", "precision", "gc"), CASES)
def test_peak_within_5_percent_and_resident_parts_exact(tiny_model_dir, arch, mode, precision,
                                                        gc):
    folder = tiny_model_dir(arch)
    config = AutoConfig.from_pretrained(folder)
    predicted = predict(folder, mode, precision, gc)
    workload = make_workload(mode, config, gradient_checkpointing=gc, **SHAPE)
    measured = measure(config, workload, precision, predicted.compute_dtype)
    error = (predicted.peak_allocated_bytes - measured.peak_bytes) / measured.peak_bytes
    assert abs(error) <= 0.05, (arch, mode, precision, gc, f"{error:+.2%}")
    for part in ("weights", "adapters", "optimizer_states", "gradients", "kv_cache"):
        assert predicted.components[part] == measured.components[part], part


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_resident_training_state_matches_real_tensors(tiny_model_dir, arch):
    """Weights after peft's k-bit preparation and the LoRA adapters, against real tensors."""
    folder = tiny_model_dir(arch)
    config = AutoConfig.from_pretrained(folder)
    predicted = predict(folder, "qlora", "nf4-dq", True)
    workload = make_workload("qlora", config, **SHAPE)
    model = prepare_for_training(random_model(config, "nf4-dq", "bfloat16", "cpu"), workload,
                                 True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainable_peft, _ = model.get_nb_trainable_parameters()
    assert trainable == trainable_peft
    assert predicted.components["adapters"] == 4 * trainable_peft  # fp32 adapters
    assert predicted.components["weights"] + predicted.components["adapters"] == \
        resident_bytes(model).bytes


def test_kv_cache_is_exact_for_gqa(tiny_model_dir):
    """2 (K, V) x layers x batch x kv_heads x seq x head_dim x 2 bytes (bf16)."""
    folder = tiny_model_dir("llama")
    config = AutoConfig.from_pretrained(folder)
    predicted = predict(folder, "inference", "bf16", True)
    head_dim = config.hidden_size // config.num_attention_heads
    expected = 2 * config.num_hidden_layers * 2 * config.num_key_value_heads * 64 * head_dim * 2
    assert predicted.components["kv_cache"] == expected


def test_optimizer_states_follow_the_optimizer(tiny_model_dir):
    folder = tiny_model_dir("llama")
    adam = estimate(str(folder), gpu="80GiB", mode="lora", precisions="bf16", target="cpu",
                    **SHAPE).candidate("bf16")
    sgd = estimate(str(folder), gpu="80GiB", mode="lora", precisions="bf16", target="cpu",
                   optimizer="sgd", **SHAPE).candidate("bf16")
    assert adam.components["optimizer_states"] >= 2 * adam.components["adapters"]
    assert sgd.components["optimizer_states"] == 0
