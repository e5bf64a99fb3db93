"""Pre-quantised checkpoints are planned in their stored format.

Each method is checked against a real measurement: a real ``from_pretrained`` of a tiny
checkpoint on CPU where the backend loads there (bitsandbytes, MXFP4/FP8 dequantised),
transformers' own replacement modules (FP8Linear / FP8Experts) where it does not, and
published safetensors totals of real checkpoints (cited per test).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import transformers

from qplan.api import estimate
from qplan.errors import UsageError
from qplan.loaders.resident import resident_bytes
from qplan.planner.inventory import build_meta_model, take_inventory
from qplan.planner.quant import read_checkpoint
from qplan.planner.weights import weight_bytes
from qplan.report import report_dict

GIB = 1024**3


def _within(value: float, published: float, pct: float = 0.5) -> bool:
    return abs(value - published) <= published * pct / 100


# ----------------------------------------------------------------- bitsandbytes, stored


@pytest.fixture(scope="module")
def bnb_checkpoint(tiny_model_dir, tmp_path_factory):
    """A tiny llama that bitsandbytes quantised (nf4, double quant, bf16 storage) and saved."""
    source = tiny_model_dir("llama")
    quant = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        source, dtype=torch.bfloat16, quantization_config=quant, device_map="cpu")
    folder = tmp_path_factory.mktemp("tiny-llama-bnb4")
    model.save_pretrained(folder)
    return folder


def test_bnb_4bit_checkpoint_plans_its_own_settings(bnb_checkpoint):
    report = estimate(str(bnb_checkpoint), gpu="24GiB", mode="load")
    assert [c.precision for c in report.candidates] == ["nf4-dq"]
    assert report.workload["quant_storage"] == "bfloat16"  # the checkpoint's, not uint8
    rec = report.recommendation
    quant = rec.load_kwargs["quantization_config"]
    assert quant["bnb_4bit_quant_storage"] == "bfloat16" and quant["bnb_4bit_use_double_quant"]
    planned = report.candidate("nf4-dq").weights_bytes
    # As stored (no kwargs) and with the recommended kwargs, the real load is the plan.
    as_stored = transformers.AutoModelForCausalLM.from_pretrained(bnb_checkpoint,
                                                                  device_map="cpu")
    assert resident_bytes(as_stored).bytes == planned
    typed = {k: getattr(torch, v) if k.endswith(("_dtype", "_storage")) else v
             for k, v in quant.items()}
    with_kwargs = transformers.AutoModelForCausalLM.from_pretrained(
        bnb_checkpoint, dtype=torch.bfloat16, device_map="cpu",
        quantization_config=transformers.BitsAndBytesConfig(**typed))
    assert resident_bytes(with_kwargs).bytes == planned
    data = report_dict(report)
    assert data["model"]["quantization"]["method"] == "bitsandbytes"
    assert data["model"]["quantization"]["bits"] == 4


def test_bnb_checkpoint_refuses_other_precisions(bnb_checkpoint):
    with pytest.raises(UsageError, match="loads only as nf4-dq"):
        estimate(str(bnb_checkpoint), gpu="24GiB", mode="load", precisions="int8")


def test_unsloth_bnb_4bit_qlora_on_4090():
    """Published: unsloth/llama-3-8b-Instruct-bnb-4bit's model.safetensors is 5.70 GB
    (shared/model-configs/SOURCES.md)."""
    report = estimate("unsloth/llama-3-8b-Instruct-bnb-4bit", gpu="4090", mode="qlora")
    rec = report.recommendation
    assert rec is not None and rec.precision == "nf4-dq"
    assert rec.load_kwargs["quantization_config"] == {
        "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8",
    }
    assert _within(report.candidate("nf4-dq").weights_bytes, 5.70e9)


# ----------------------------------------------------------------- MXFP4 (gpt-oss)


@pytest.mark.parametrize("gpu", ["4090", "H100"])
def test_gpt_oss_fits_and_keeps_mxfp4(gpu):
    """Published: openai/gpt-oss-20b stores about 13.8 GB (13.76 GB of safetensors)."""
    report = estimate("openai/gpt-oss-20b", gpu=gpu, mode="inference", seq_len=1024, attn="eager")
    rec = report.recommendation
    assert rec is not None and rec.precision == "mxfp4"
    assert report.candidate("mxfp4").fits
    assert _within(report.candidate("mxfp4").weights_bytes, 13.76e9)
    quant = report_dict(report)["model"]["quantization"]
    assert quant["stays_quantized_on_gpu"] is True and "stay MXFP4" in quant["gpu_note"]
    assert quant["dequantizes_to"] == "bf16"
    assert any("stay MXFP4" in note for note in report.notes)


def test_gpt_oss_dequantised_on_a_gpu_without_mxfp4_kernels():
    report = estimate("openai/gpt-oss-20b", gpu="A100-80GB", mode="load", attn="eager")
    assert report.recommendation.precision == "mxfp4"  # 8.0 >= 7.5
    old = estimate("openai/gpt-oss-20b", gpu="v100-32gb", mode="load", headroom="0",
                   attn="eager")
    quant = report_dict(old)["model"]["quantization"]
    assert quant["stays_quantized_on_gpu"] is False and "dequantises" in quant["gpu_note"]
    assert "mxfp4" not in [c.precision for c in old.candidates if c.fits and
                           old.recommendation and c.precision == old.recommendation.precision]


def test_gpt_oss_cannot_qlora_but_can_lora_dequantised():
    with pytest.raises(UsageError, match="cannot train this format"):
        estimate("openai/gpt-oss-20b", gpu="H100", mode="qlora", attn="eager")
    lora = estimate("openai/gpt-oss-20b", gpu="H100", mode="lora", seq_len=256,
                    attn="eager")
    assert [c.precision for c in lora.candidates] == ["bf16"]
    assert lora.recommendation.load_kwargs["quantization_config"] == {
        "quant_method": "mxfp4", "dequantize": True}


@pytest.mark.parametrize(("mode", "what"), [
    ("lora", "--mode lora"), ("full", "--mode full"), ("dpo", r"--mode dpo \(adapter=lora\)")])
def test_a_format_no_tuning_trains_says_so_in_one_line(mode, what):
    """ModelOpt FP8 loads for inference only: no tuning trains it, so the message offers
    inference or the unquantised checkpoint (it once indexed an empty list of tunings)."""
    with pytest.raises(UsageError, match=rf"{what} cannot train this format: .* plan --mode "
                                         "inference, or train from the unquantised checkpoint"):
        estimate("nvidia/Llama-3.1-70B-Instruct-FP8", gpu="4090", mode=mode)


def test_mxfp4_dequantised_plan_equals_a_real_cpu_load(tmp_path):
    """On CPU without kernels transformers dequantises MXFP4 to bf16: the bf16 candidate's
    weights equal that real load of a tiny gpt-oss checkpoint."""
    config = transformers.AutoConfig.from_pretrained(_catalog_path("openai__gpt-oss-20b.json"))
    config.num_hidden_layers, config.layer_types = 2, config.layer_types[:2]
    config.hidden_size, config.intermediate_size, config.num_local_experts = 64, 64, 4
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 16
    config.vocab_size, config.num_experts_per_tok = 256, 2
    config.pad_token_id, config.eos_token_id = 0, 1
    qc = config.quantization_config
    del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    config.quantization_config = qc
    config.save_pretrained(tmp_path)
    report = estimate(str(tmp_path), gpu="24GiB", mode="load", attn="eager")
    assert [c.precision for c in report.candidates] == ["mxfp4", "bf16"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.bfloat16, device_map="cpu",
        quantization_config=transformers.Mxfp4Config(dequantize=True))
    assert resident_bytes(loaded).bytes == report.candidate("bf16").weights_bytes


def _catalog_path(name: str) -> str:
    from qplan.profiles import data_dir

    return str(data_dir("models").joinpath(name))


# ----------------------------------------------------------------- AWQ / FP8 sizes


def test_awq_size_matches_the_published_safetensors():
    """Published: Qwen/Qwen3-32B-AWQ's safetensors headers sum to 18.00 GB (GiB) in 1603
    tensors (shared/model-configs/SOURCES.md)."""
    report = estimate("Qwen/Qwen3-32B-AWQ", gpu="H100", mode="load")
    assert [c.precision for c in report.candidates] == ["awq"]
    assert _within(report.candidate("awq").weights_bytes, 18.00 * GIB)
    assert report.recommendation.load_kwargs == {"dtype": "float16"}
    with pytest.raises(UsageError, match="does not re-quantise"):
        estimate("Qwen/Qwen3-32B-AWQ", gpu="H100", mode="load", precisions="nf4")


_TORCH_BYTES = {"float8_e4m3fn": 1, "bfloat16": 2, "float32": 4}


@pytest.mark.parametrize("name", ["qwen3-8b-fp8", "qwen3-30b-a3b-thinking-2507-fp8",
                                  "minimax-m2.7-fp8"])
def test_fp8_size_matches_the_published_safetensors(name):
    """Three fine-grained FP8 checkpoints (128x128 block scales; dense, Qwen3-MoE and
    MiniMax-M2's fused experts), planned as stored, within 0.5% of their published
    safetensors bytes. Published: a report listing every tensor of the checkpoint (name,
    shape, dtype) and its config (tests/data/fp8-published/<name>/tensors.json, with the
    source); the listing's sums are checked against the report's own totals (tensor count,
    parameter count, GiB). MiniMax-M2's byte total is also published as a number:
    230,121,630,720 B by hf-mem (alvarobartt/hf-mem README.md @ 05188b10497f), the sum of
    its safetensors headers, equal to the M2.7 listing's (the two share a layout; neither
    stores the MTP modules the config names, and transformers builds none).

    The remaining difference is accounted for to the byte: tensors the checkpoint stores in
    one dtype and transformers holds in another (Qwen's bf16 ``weight_scale_inv``, held as
    float32 by transformers' FP8Linear / FP8Experts; MiniMax's float32 router gate and
    correction bias, built in bf16), and the rotary tables transformers creates that no
    checkpoint stores. Planned − published: Qwen3-8B +848,384 B (+0.009%), Qwen3-30B-A3B
    +3,650,048 B (+0.012%), MiniMax −97,549,056 B (−0.042%)."""
    import json
    import math

    folder = _DATA / "fp8-published" / name
    published = json.loads((folder / "tensors.json").read_text())
    rows = published["tensors"]
    for row in rows:
        row["numel"] = row["count"] * math.prod(row["shape"])
    stored = sum(row["numel"] * _TORCH_BYTES[row["dtype"]] for row in rows)
    # The transcription is the report's: its totals, summed back from the rows.
    assert sum(row["count"] for row in rows) == published["tensors_count"]
    assert sum(row["numel"] for row in rows) == published["parameters"]
    assert round(stored / GIB, 2) == published["tensor_gib"]
    assert stored == published.get("total_bytes", stored)

    report = estimate(str(folder), gpu="H100", mode="load")
    assert [c.precision for c in report.candidates] == ["fp8", "bf16"]
    planned = report.candidate("fp8").weights_bytes
    assert _within(planned, stored)

    config = transformers.AutoConfig.from_pretrained(folder)
    del config.quantization_config
    config.num_hidden_layers = 1
    with torch.device("meta"):
        plain = transformers.AutoModelForCausalLM.from_config(config)
    persistent = plain.state_dict()
    rotary = sum(b.numel() * b.element_size() for n, b in plain.named_buffers()
                 if n not in persistent)
    recast = sum(row["numel"] * (_TORCH_BYTES[row["loaded_as"]] - _TORCH_BYTES[row["dtype"]])
                 for row in rows if "loaded_as" in row)
    assert planned == stored + recast + rotary


def _fp8_inventory(config):
    stored = read_checkpoint(config.quantization_config)
    meta = build_meta_model(copy.deepcopy(config))
    return replace(take_inventory(meta), stored=stored), stored


def _transformers_fp8_bytes(config) -> int:
    """Bytes of every tensor transformers' own FP8 replacement modules hold, on meta."""
    from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear
    from transformers.quantizers.base import HfQuantizer

    model = build_meta_model(copy.deepcopy(config))
    qc = transformers.FineGrainedFP8Config(
        weight_block_size=config.quantization_config["weight_block_size"])
    skips = HfQuantizer.get_modules_to_not_convert(model, None, model._keep_in_fp32_modules)
    replace_with_fp8_linear(model, modules_to_not_convert=skips, quantization_config=qc,
                            pre_quantized=True)
    total = 0
    for module in model.modules():
        if type(module).__name__.startswith("FP8") or "FP8" in type(module).__mro__[1].__name__:
            total += sum(p.numel() * p.element_size()
                         for p in module.parameters(recurse=False) if p.dtype in (
                             torch.float8_e4m3fn, torch.float32))
    return total


def test_fp8_layers_equal_transformers_fp8_modules():
    """Qwen/Qwen3-32B-FP8: its weights are transformers' FP8Linear tensors (fp8 weight and
    float32 128x128 block scales) plus the bf16 rest, to the byte, on two of its layers.
    (Whole FP8 checkpoints against their published sizes: above; per-tensor FP8 against a
    checkpoint ModelOpt wrote: below.)"""
    config = transformers.AutoConfig.from_pretrained(_catalog_path("Qwen__Qwen3-32B-FP8.json"))
    config.num_hidden_layers = 2
    inventory, _ = _fp8_inventory(config)
    ours = weight_bytes(inventory, "fp8")
    assert ours.quantized_bytes + ours.quant_state_bytes == _transformers_fp8_bytes(config)
    report = estimate("Qwen/Qwen3-32B-FP8", gpu="H100", mode="load")
    assert [c.precision for c in report.candidates] == ["fp8", "bf16"]
    assert report.recommendation.precision == "fp8"


def test_fp8_moe_experts_follow_transformers(tiny_model_dir):
    config = transformers.AutoConfig.from_pretrained(tiny_model_dir("mixtral"))
    config.quantization_config = {"quant_method": "fp8", "weight_block_size": [16, 16],
                                  "activation_scheme": "dynamic"}
    inventory, _ = _fp8_inventory(config)
    ours = weight_bytes(inventory, "fp8")
    assert ours.quantized_bytes + ours.quant_state_bytes == _transformers_fp8_bytes(config)


# ----------------------------------------------------------------- stored bytes


def test_stored_bytes_read_from_safetensors_headers(bnb_checkpoint, tiny_model_dir, tmp_path):
    import json
    import shutil

    from qplan.loaders.stored_bytes import local_stored_bytes

    report = report_dict(estimate(str(bnb_checkpoint), gpu="24GiB", mode="load"))
    on_disk = local_stored_bytes(bnb_checkpoint)
    assert report["model"]["stored_bytes"] == on_disk.bytes > 0
    assert not [w for w in report["warnings"] if "safetensors" in w]
    # A config that does not describe its weights: the stored check says so.
    folder = tmp_path / "mismatch"
    shutil.copytree(tiny_model_dir("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] *= 2
    (folder / "config.json").write_text(json.dumps(config))
    warned = estimate(str(folder), gpu="24GiB", mode="load")
    assert any("safetensors hold" in w for w in warned.warnings)


def test_hub_stored_bytes_honour_offline(monkeypatch):
    import huggingface_hub

    from qplan.loaders.stored_bytes import hub_stored_bytes

    def no_network(*args, **kwargs):
        raise AssertionError("reached the Hub while offline")

    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_stored_bytes("openai/gpt-oss-20b", None) is None


# ----------------------------------------------------------------- FP8 on the fly


def test_fp8_on_the_fly_between_bf16_and_int8(tiny_model_dir):
    """Named in --precisions, FP8 is planned with transformers' FP8Linear layout and picked
    after bf16 and before int8 on compute capability 8.9+; not on an A100 (8.0)."""
    folder = str(tiny_model_dir("llama"))
    config = transformers.AutoConfig.from_pretrained(folder)
    config.quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128],
                                  "activation_scheme": "dynamic"}
    inventory = take_inventory(build_meta_model(copy.deepcopy(config)))
    planned = weight_bytes(inventory, "fp8")
    assert planned.quantized_bytes + planned.quant_state_bytes == _transformers_fp8_bytes(config)
    report = estimate(folder, gpu="H100", mode="load", precisions="bf16,fp8,int8",
                      headroom="0")
    assert [c.precision for c in report.candidates] == ["bf16", "int8", "fp8"]
    from qplan.planner.decide import choosable

    gpu = report.gpu
    from qplan.api import resolve_target

    assert choosable(["bf16", "int8", "fp8"], resolve_target("H100", None), True) == [
        "bf16", "fp8", "int8"]
    assert choosable(["bf16", "int8", "fp8"], resolve_target("A100-80GB", None), True) == [
        "bf16", "int8"]
    assert gpu.compute_capability == "9.0"
    kwargs = estimate(folder, gpu="H100", mode="load", precisions="fp8").recommendation
    assert kwargs.load_kwargs["quantization_config"]["quant_method"] == "fp8"


# ----------------------------------------------------------------- compressed-tensors

_W4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}
_FP8 = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}
_INT8 = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
_NVFP4 = {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group",
          "group_size": 16}
_DYNAMIC = {"symmetric": True, "strategy": "token", "dynamic": True}


@pytest.mark.parametrize(("fmt", "weights", "acts"), [
    ("pack-quantized", _W4, None),  # W4A16
    ("float-quantized", _FP8, {**_DYNAMIC, "num_bits": 8, "type": "float"}),  # FP8
    ("int-quantized", _INT8, {**_DYNAMIC, "num_bits": 8, "type": "int"}),  # INT8 W8A8
    ("nvfp4-pack-quantized", _NVFP4, {**_NVFP4, "dynamic": "local"}),  # NVFP4
])
def test_compressed_tensors_equal_a_real_cpu_load(tmp_path, fmt, weights, acts):
    """A tiny checkpoint laid out by compressed-tensors' own compressor (as transformers'
    quantiser prepares the model) loads on CPU to exactly the planned bytes."""
    pytest.importorskip("compressed_tensors")
    from safetensors.torch import save_file
    from tiny_models import make_config
    from transformers.quantizers.quantizer_compressed_tensors import (
        CompressedTensorsHfQuantizer,
    )

    group = {"targets": ["Linear"], "weights": weights}
    if acts:
        group["input_activations"] = acts
    qc = {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
          "ignore": ["lm_head"], "config_groups": {"group_0": group}}
    config = make_config("llama", intermediate_size=192)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    quantizer = CompressedTensorsHfQuantizer(
        transformers.CompressedTensorsConfig.from_dict(qc), pre_quantized=True)
    quantizer.use_fp8_kernel = False
    quantizer._process_model_before_weight_loading(model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config.quantization_config = qc
    config.save_pretrained(tmp_path)

    report = estimate(str(tmp_path), gpu="24GiB", mode="load")
    assert [c.precision for c in report.candidates] == ["ct", "bf16"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    assert resident_bytes(loaded).bytes == report.candidate("ct").weights_bytes
    assert report_dict(report)["model"]["quantization"]["format"] == fmt
    assert not [w for w in report.warnings if "safetensors" in w]


def test_dequantised_candidate_snippet_and_load_kwargs(tmp_path):
    """The bf16 candidate of an MXFP4 checkpoint loads dequantised through the emitted
    snippet, to the planned bytes (real CPU load)."""
    from qplan.loaders.loading import load_kwargs
    from qplan.loading import report_from_dict
    from qplan.planner.emit import emit_transformers

    config = transformers.AutoConfig.from_pretrained(_catalog_path("openai__gpt-oss-20b.json"))
    config.num_hidden_layers, config.layer_types = 2, config.layer_types[:2]
    config.hidden_size, config.intermediate_size, config.num_local_experts = 64, 64, 4
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 16
    config.vocab_size, config.num_experts_per_tok = 256, 2
    config.pad_token_id, config.eos_token_id = 0, 1
    qc = config.quantization_config
    del config.quantization_config
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(
        tmp_path)
    config.quantization_config = qc
    config.save_pretrained(tmp_path)
    report = estimate(str(tmp_path), gpu="24GiB", mode="load", attn="eager")
    code = emit_transformers(report, "bf16").replace(f'"{tmp_path}"', repr(str(tmp_path)))
    namespace: dict = {}
    # gpt-oss has no SDPA path in transformers (sinks): the snippet's default attn is not
    # what this test checks.
    code = code.replace('attn_implementation="sdpa"', 'attn_implementation="eager"')
    exec(code.replace('device_map={"": 0}', 'device_map="cpu"'), namespace)
    assert resident_bytes(namespace["model"]).bytes == report.candidate("bf16").weights_bytes
    again = report_from_dict(report_dict(report))
    kwargs = load_kwargs(again, again.candidate("bf16"), "cpu")
    assert kwargs["quantization_config"].dequantize is True


def _fp8_quantizer_prepared(folder) -> torch.nn.Module:
    """The model from_pretrained(quantization_config=FineGrainedFP8Config()) builds before
    the weights arrive (transformers' own FineGrainedFP8HfQuantizer on the meta model),
    materialised on CPU: the CPU cannot run the real FP8 load (it needs CUDA / XPU)."""
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    config = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    quantizer = FineGrainedFP8HfQuantizer(transformers.FineGrainedFP8Config(),
                                          pre_quantized=False)
    quantizer._process_model_before_weight_loading(model)
    model = model.to_empty(device="cpu")
    model.tie_weights()
    return model


def test_fp8_is_a_default_candidate_on_compute_capability_8_9(tiny_model_dir):
    """Unasked, FP8 on the fly is planned on Ada / Hopper (8.9+) and not on an A100 or a
    size-only target; its weights equal the tensors transformers' FP8 quantiser gives the
    model, to the byte."""
    folder = str(tiny_model_dir("llama"))
    on_ada = estimate(folder, gpu="4090", mode="load")
    assert "fp8" in [c.precision for c in on_ada.candidates]
    prepared = _fp8_quantizer_prepared(folder)
    assert any(type(m).__name__ == "FP8Linear" for m in prepared.modules())
    assert resident_bytes(prepared).bytes == on_ada.candidate("fp8").weights_bytes
    for gpu in ("A100-80GB", "24GiB"):
        assert "fp8" not in [c.precision for c in estimate(folder, gpu=gpu, mode="load")
                             .candidates]
    # Training modes leave it out (peft has no LoRA layer for FP8Linear).
    assert "fp8" not in [c.precision for c in estimate(folder, gpu="4090", mode="lora",
                                                       seq_len=16).candidates]


def test_fp8_recommended_between_bf16_and_int8():
    """Llama-2-13b does not fit a 24 GB card in bf16: on an L4 / 4090 (8.9) the
    recommendation is FP8 with FineGrainedFP8Config kwargs; on an A10 (8.6), int8."""
    for gpu in ("L4", "4090"):
        rec = estimate("meta-llama/Llama-2-13b-hf", gpu=gpu, mode="load").recommendation
        assert rec.precision == "fp8"
        assert rec.load_kwargs == {"dtype": "bfloat16", "quantization_config": {
            "quant_method": "fp8", "weight_block_size": [128, 128],
            "activation_scheme": "dynamic"}}
    assert estimate("meta-llama/Llama-2-13b-hf", gpu="A10", mode="load").recommendation \
        .precision == "int8"


# ----------------------------------------------------------------- several GPUs, as stored


def test_stored_format_device_map_equals_accelerate_on_the_real_layers():
    """Placed over GPUs, a pre-quantised checkpoint weighs what it stores: module by module
    accelerate sizes the planner's meta model as it sizes the model transformers' own FP8
    quantiser prepares for the checkpoint (FP8Linear layers), and infer_auto_device_map
    splits both the same way."""
    from accelerate.utils import compute_module_sizes, infer_auto_device_map
    from tiny_models import make_config
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    from qplan.planner.quantize_meta import quantize_meta_model

    qc = {"quant_method": "fp8", "weight_block_size": [16, 16], "activation_scheme": "dynamic"}
    config = make_config("llama", num_hidden_layers=4)
    config.quantization_config = qc
    meta = build_meta_model(copy.deepcopy(config))
    inventory = replace(take_inventory(meta), stored=read_checkpoint(qc))
    ours = quantize_meta_model(meta, inventory, "fp8", "bfloat16")
    del config.quantization_config
    with torch.device("meta"):
        real = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    FineGrainedFP8HfQuantizer(transformers.FineGrainedFP8Config(weight_block_size=(16, 16)),
                              pre_quantized=True)._process_model_before_weight_loading(real)
    ours_sizes, real_sizes = compute_module_sizes(ours), compute_module_sizes(real)
    for name in ("", "model.embed_tokens", "lm_head",
                 *(f"model.layers.{i}" for i in range(4))):
        assert ours_sizes[name] == real_sizes[name], name
    assert ours_sizes[""] == weight_bytes(inventory, "fp8").bytes
    total = real_sizes[""]
    for share in (0.7, 0.8, 0.9):  # GPU 0 holds the embeddings and 1, 2 or 3 layers
        max_memory = {0: int(total * share), 1: total, "cpu": total}
        split = [infer_auto_device_map(m, max_memory=dict(max_memory),
                                       no_split_module_classes=["LlamaDecoderLayer"])
                 for m in (ours, real)]
        assert split[0] == split[1] and set(split[0].values()) == {0, 1}


def test_pre_quantised_checkpoints_placed_over_gpus_as_stored():
    """Qwen3-32B-AWQ (18.00 GiB stored) on two 4090s: the device map holds the stored
    bytes, no offload; LoRA on it plans over the two GPUs (GPTQ/AWQ packed weights)."""
    report = estimate("Qwen/Qwen3-32B-AWQ", gpu="4090", num_gpus=2, mode="inference",
                      seq_len=512)
    awq = report.candidate("awq")
    assert awq.fits and awq.strategy == "device_map"
    strategy = report_dict(report)["strategy"]
    placed = sum(d["components"].get("weights", 0) for d in strategy["devices"])
    assert placed == awq.weights_bytes
    lora = estimate("Qwen/Qwen3-32B-AWQ", gpu="4090", num_gpus=2, mode="lora", seq_len=128)
    assert [c.precision for c in lora.candidates] == ["awq"]


# ----------------------------------------------------------------- training on stored formats

_LORA_SHAPE = dict(batch=1, seq_len=32, lora_r=8)


def test_qlora_on_a_stored_bnb_checkpoint_matches_a_real_cpu_run(bnb_checkpoint):
    """LoRA on the stored nf4 checkpoint: the planned weights (after peft's k-bit
    preparation) and adapters equal a real CPU load prepared by peft, tensor for tensor."""
    from qplan.api import make_workload
    from qplan.planner.training_setup import prepare_for_training

    report = estimate(str(bnb_checkpoint), gpu="80GiB", mode="qlora", target="cpu",
                      **_LORA_SHAPE)
    planned = report.candidate("nf4-dq")
    model = transformers.AutoModelForCausalLM.from_pretrained(bnb_checkpoint, device_map="cpu")
    workload = make_workload("qlora", model.config, **_LORA_SHAPE)
    model = prepare_for_training(model, workload, True)
    assert any(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    assert planned.components["weights"] + planned.components["adapters"] == \
        resident_bytes(model).bytes


@pytest.mark.parametrize(("method", "cast"), [("awq", True), ("gptq", False)])
def test_lora_on_gptq_awq_follows_peft_kbit_preparation(tiny_model_dir, tmp_path, method, cast):
    """peft's prepare_model_for_kbit_training casts a quantised model's 16-bit parameters
    to float32, except for the methods it exempts (GPTQ); the packed layers' tensors are
    buffers it leaves alone. The planned LoRA weights are the stored layers plus what peft
    leaves of the rest of a real model loaded in float16 (its real preparation on CPU)."""
    import shutil

    from peft import prepare_model_for_kbit_training

    folder = tmp_path / method
    shutil.copytree(tiny_model_dir("llama"), folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    qc = {"quant_method": method, "bits": 4, "group_size": 32, "desc_act": False,
          "zero_point": True, "version": "gemm"}
    config.quantization_config = qc
    config.save_pretrained(folder)
    report = estimate(str(folder), gpu="80GiB", mode="lora", target="cpu", **_LORA_SHAPE)
    planned = report.candidate(method).components["weights"]

    real = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_model_dir("llama"), dtype=torch.float16, device_map="cpu")
    real.quantization_method = method
    real = prepare_model_for_kbit_training(real, use_gradient_checkpointing=False)
    stored = read_checkpoint(qc)
    inventory = replace(take_inventory(build_meta_model(copy.deepcopy(config))), stored=stored)
    packed = {t.name for t in inventory.tensors if t.kind == "parameter" and t.quantizable}
    assert packed and "lm_head.weight" not in packed
    rest = sum(p.numel() * p.element_size() for n, p in real.named_parameters()
               if n not in packed)
    rest += sum(b.numel() * b.element_size() for b in real.buffers())
    layers = weight_bytes(inventory, method)
    assert planned == layers.quantized_bytes + layers.quant_state_bytes + rest
    assert (real.lm_head.weight.dtype == torch.float32) is cast


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fbgemm_fp8_equals_transformers_fbgemm_layers(monkeypatch, arch):
    """FBGEMM FP8 checkpoints: the planned weights equal the tensors transformers' own
    FbgemmFp8HfQuantizer gives the model before the checkpoint's arrive (FbgemmFp8Linear:
    fp8 weight, float32 [out, 1] scale, float32 input_scale_ub, float32 bias), to the
    byte. The fbgemm-gpu kernels are CUDA-only; building the layers does not run them."""
    import transformers.integrations.fbgemm_fp8 as fbgemm
    from tiny_models import make_config
    from transformers.quantizers.quantizer_fbgemm_fp8 import FbgemmFp8HfQuantizer

    monkeypatch.setattr(fbgemm, "get_quantize_fp8_per_row", lambda: None)
    config = make_config(arch)
    with torch.device("meta"):
        real = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    FbgemmFp8HfQuantizer(transformers.FbgemmFp8Config(), pre_quantized=True) \
        ._process_model_before_weight_loading(real)
    assert any(type(m).__name__ == "FbgemmFp8Linear" for m in real.modules())
    real = real.to_empty(device="cpu")
    real.tie_weights()
    qc = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
          "modules_to_not_convert": ["lm_head"]}
    config.quantization_config = qc
    meta = build_meta_model(copy.deepcopy(config))
    inventory = replace(take_inventory(meta, ["lm_head"]), stored=read_checkpoint(qc))
    planned = weight_bytes(inventory, "fp8")
    measured = resident_bytes(real)
    assert (planned.bytes, planned.storages) == (measured.bytes, measured.storages)


# ----------------------------------------------------------------- checkpoints their packers wrote

_DATA = __import__("pathlib").Path(__file__).parent / "data"
_SAFETENSORS_BYTES = {"F8_E4M3": 1, "BF16": 2, "F16": 2, "F32": 4, "I32": 4, "U8": 1}


def _packer_checkpoint(name: str, tmp_path):
    """A checkpoint folder a format's own packer wrote (tests/data/<name>/make.py), without
    its weights: the configs copied to ``tmp_path``, and per tensor of the packer's
    safetensors header its byte size."""
    import json
    import math
    import shutil

    folder = _DATA / name
    for path in folder.glob("*.json"):
        if path.name != "model.safetensors.header.json":
            shutil.copy(path, tmp_path / path.name)
    header = json.loads((folder / "model.safetensors.header.json").read_text())
    header.pop("__metadata__")
    return {k: math.prod(v["shape"]) * _SAFETENSORS_BYTES[v["dtype"]] for k, v in header.items()}


def _check_against_packer(tmp_path, sizes, precision, leaves):
    """Every layer the method replaces stores what the packer's header lists for it
    (``leaves`` in the method's order), and the plan is the header's bytes plus the model's
    non-persistent buffers (rotary tables), which a checkpoint does not hold."""
    from qplan.planner.precision import PRECISIONS
    from qplan.planner.quant import QuantSettings

    report = estimate(str(tmp_path), gpu="H100", mode="load")
    assert report.candidates[0].precision == precision
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    stored = read_checkpoint(config.quantization_config)
    meta = build_meta_model(copy.deepcopy(config))
    skips = list(stored.not_converted) if stored.not_converted is not None else None
    inventory = replace(take_inventory(meta, skips), stored=stored)
    prec, settings = PRECISIONS[precision], QuantSettings(stored=stored)
    replaced = [t for t in inventory.tensors if prec.method.replaces(t, settings)]
    assert len(replaced) == sum(k.endswith("." + leaves[1]) for k in sizes)
    for t in replaced:
        expected = [sizes[f"{t.module}.{leaf}"] for leaf in leaves]
        assert list(prec.method.stored_tensors(prec, t, settings)) == expected, t.module
    del config.quantization_config
    plain = transformers.AutoModelForCausalLM.from_config(config)
    persistent = plain.state_dict()
    non_persistent = sum(b.numel() * b.element_size() for n, b in plain.named_buffers()
                         if n not in persistent)
    assert report.candidate(precision).weights_bytes == sum(sizes.values()) + non_persistent
    return report


def test_modelopt_fp8_equals_the_checkpoint_modelopt_wrote(tmp_path):
    """ModelOpt FP8 (nvidia/*-FP8): transformers has no loader, so the reference is a
    checkpoint NVIDIA ModelOpt 0.47's own exporter wrote for a tiny llama
    (tests/data/modelopt-fp8-tiny-llama): fp8 weight, 0-d float32 weight_scale and
    input_scale per Linear, embeddings and lm_head in bf16."""
    sizes = _packer_checkpoint("modelopt-fp8-tiny-llama", tmp_path)
    report = _check_against_packer(tmp_path, sizes, "fp8",
                                   ("weight", "weight_scale", "input_scale"))
    assert [c.precision for c in report.candidates] == ["fp8"]
    quant = report_dict(report)["model"]["quantization"]
    assert quant["method"] == "modelopt" and quant["transformers_loads_it"] is False
    assert quant["unquantized_modules"] == ["lm_head", "model.embed_tokens"]


def test_gptq_equals_the_checkpoint_gptqmodel_wrote(tmp_path):
    """GPTQ: a checkpoint GPTQModel 7.7's own packer wrote for a tiny float16 llama (4-bit,
    group size 32; tests/data/gptq-tiny-llama, by tests/data/make_gptqmodel_checkpoint.py):
    qweight, qzeros, scales and g_idx of every Linear, byte for byte (gptqmodel's kernels
    do not install in CI, so no real load)."""
    sizes = _packer_checkpoint("gptq-tiny-llama", tmp_path)
    report = _check_against_packer(tmp_path, sizes, "gptq",
                                   ("qweight", "qzeros", "scales", "g_idx"))
    assert [c.precision for c in report.candidates] == ["gptq"]
    assert not [w for w in report.warnings if "safetensors" in w]


@pytest.mark.parametrize(("group_size", "desc_act", "published_gb"), [
    (128, False, 3.90),  # branch main
    (64, True, 4.02),  # gptq-4bit-64g-actorder_True
    (32, True, 4.28),  # gptq-4bit-32g-actorder_True
])
def test_gptq_size_matches_published_checkpoints(tmp_path, group_size, desc_act, published_gb):
    """Published: TheBloke/Llama-2-7B-GPTQ's "Provided files" table (its model card,
    https://huggingface.co/TheBloke/Llama-2-7B-GPTQ; copied in YinanWusoymilk/hf-readme
    training_and_application/readme_files/TheBloke_Llama-2-7B-GPTQ.md @ 1ab39f24f8f9):
    4-bit, group size 128 without act order 3.90 GB; 64g with act order 4.02 GB; 32g with
    act order 4.28 GB, made with AutoGPTQ from meta-llama/Llama-2-7b-hf (config in the
    catalog). GPTQ's own packer (qweight, qzeros, scales, g_idx) within 0.5% of each."""
    import json
    from pathlib import Path

    config = json.loads(Path(_catalog_path("meta-llama__Llama-2-7b-hf.json")).read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4,
                                     "group_size": group_size, "desc_act": desc_act,
                                     "sym": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    report = estimate(str(tmp_path), gpu="H100", mode="load")
    assert [c.precision for c in report.candidates] == ["gptq"]
    assert _within(report.candidate("gptq").weights_bytes, published_gb * 1e9)


def test_awq_equals_the_checkpoint_gptqmodel_wrote(tmp_path):
    """AWQ (GEMM): a checkpoint GPTQModel 7.7's own AWQ packer wrote for a tiny llama
    (tests/data/awq-tiny-llama): qweight packed along the output, qzeros and scales of
    every Linear, byte for byte."""
    sizes = _packer_checkpoint("awq-tiny-llama", tmp_path)
    report = _check_against_packer(tmp_path, sizes, "awq", ("qweight", "qzeros", "scales"))
    assert [c.precision for c in report.candidates] == ["awq"]
