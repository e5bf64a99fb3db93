"""Predicted weight bytes equal the unique storages of real bitsandbytes loads, to the byte."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

from qplan.loaders.resident import resident_bytes
from qplan.planner.inventory import build_meta_model, take_inventory
from qplan.planner.precision import PRECISION_NAMES
from qplan.planner.weights import weight_bytes

ARCHS = ("llama", "qwen2", "gemma", "gpt2", "opt", "mixtral")


def real_load(folder, precision: str, compute_dtype: str, quant_storage: str = "uint8",
              skip_modules=None):
    compute = getattr(torch, compute_dtype)
    full = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision in full:
        return AutoModelForCausalLM.from_pretrained(
            folder, dtype=full[precision], device_map="cpu"
        )
    if precision == "int8":
        quant = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    else:
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=precision.split("-")[0],
            bnb_4bit_use_double_quant=precision.endswith("-dq"),
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=getattr(torch, quant_storage),
            llm_int8_skip_modules=skip_modules,
        )
    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=compute, quantization_config=quant, device_map="cpu"
    )


def inventory_of(folder, skip_modules=None):
    config = AutoConfig.from_pretrained(folder)
    return take_inventory(build_meta_model(config), skip_modules)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("precision", PRECISION_NAMES)
def test_weight_bytes_equal_real_load(tiny_model_dir, arch, precision):
    folder = tiny_model_dir(arch)
    inventory = inventory_of(folder)
    for compute_dtype in ("bfloat16", "float16"):
        predicted = weight_bytes(inventory, precision, compute_dtype=compute_dtype)
        measured = resident_bytes(real_load(folder, precision, compute_dtype))
        assert predicted.bytes == measured.bytes, (arch, precision, compute_dtype)
        assert predicted.allocated_bytes == measured.allocated_bytes
        assert predicted.storages == measured.storages


@pytest.mark.parametrize("quant_storage", ["bfloat16", "float32"])
def test_quant_storage_changes_packing_exactly(tiny_model_dir, quant_storage):
    folder = tiny_model_dir("llama")
    inventory = inventory_of(folder)
    predicted = weight_bytes(inventory, "nf4-dq", quant_storage=quant_storage)
    measured = resident_bytes(real_load(folder, "nf4-dq", "bfloat16", quant_storage))
    assert predicted.bytes == measured.bytes


def test_skip_modules_replace_default_skips(tiny_model_dir):
    folder = tiny_model_dir("llama")
    skips = ["mlp.down_proj"]
    inventory = inventory_of(folder, skips)
    # With skips given explicitly, lm_head is quantised too (as in transformers).
    assert any(t.name == "lm_head.weight" and t.quantizable for t in inventory.tensors)
    predicted = weight_bytes(inventory, "nf4", compute_dtype="bfloat16")
    measured = resident_bytes(real_load(folder, "nf4", "bfloat16", skip_modules=skips))
    assert predicted.bytes == measured.bytes


def test_tied_embeddings_counted_once(tiny_model_dir):
    inventory = inventory_of(tiny_model_dir("qwen2"))
    embed = next(t for t in inventory.tensors if t.name == "model.embed_tokens.weight")
    assert embed.tied_names == ("lm_head.weight",)
    assert not embed.quantizable
    assert not any(t.name == "lm_head.weight" for t in inventory.tensors)


def test_moe_experts_stay_unquantized(tiny_model_dir):
    """transformers 5.x fuses Mixtral experts into 3-D parameters: bnb cannot touch them."""
    inventory = inventory_of(tiny_model_dir("mixtral"))
    experts = [t for t in inventory.tensors if ".experts." in t.name]
    assert experts and all(len(t.shape) == 3 and not t.quantizable for t in experts)


def test_meta_build_allocates_nothing(tiny_model_dir):
    config = AutoConfig.from_pretrained(tiny_model_dir("llama"))
    model = build_meta_model(config)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(b.device.type == "meta" for b in model.buffers())


def test_llama2_70b_inventory_is_meta_only():
    """The catalog's Llama-2-70B builds on meta: its published 68,976,648,192 parameters,
    and no real storage (a real build would need 138 GB)."""
    import copy
    import resource

    from qplan.loaders.model_source import resolve_model

    spec = resolve_model("meta-llama/Llama-2-70b-hf")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    model = build_meta_model(copy.deepcopy(spec.config))
    inventory = take_inventory(model)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert inventory.num_parameters == 68_976_648_192
    assert all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])
    assert grown_mib < 200, f"the meta build grew the process by {grown_mib:.0f} MiB"
