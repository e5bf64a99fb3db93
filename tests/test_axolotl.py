"""Reading Axolotl YAML into estimate kwargs."""

from __future__ import annotations

import pytest

from qplan.errors import ConfigError
from qplan.loaders.axolotl import read_axolotl

# Shaped like Axolotl's examples/llama-3/qlora.yml.
QLORA_YAML = """\
base_model: NousResearch/Meta-Llama-3-8B
model_type: AutoModelForCausalLM
tokenizer_type: AutoTokenizer

load_in_8bit: false
load_in_4bit: true
strict: false

datasets:
  - path: mhenrichsen/alpaca_2k_test
    type: alpaca
dataset_prepared_path:
val_set_size: 0.05
output_dir: ./outputs/qlora-out

adapter: qlora
lora_model_dir:

sequence_len: 4096
sample_packing: false
pad_to_sequence_len: true

lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_modules:
lora_target_linear: true
lora_fan_in_fan_out:

wandb_project:
gradient_accumulation_steps: 4
micro_batch_size: 2
num_epochs: 4
optimizer: paged_adamw_32bit
lr_scheduler: cosine
learning_rate: 0.0002

train_on_inputs: false
group_by_length: false
bf16: auto
fp16:
tf32: false

gradient_checkpointing: true
logging_steps: 1
flash_attention: true
gpu_memory_limit: 20GiB

warmup_steps: 10
evals_per_epoch: 4
saves_per_epoch: 1
deepspeed:
weight_decay: 0.0
fsdp:
special_tokens:
  pad_token: "<|end_of_text|>"
"""


def _write(tmp_path, text, name="config.yml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_realistic_qlora_config(tmp_path):
    plan = read_axolotl(_write(tmp_path, QLORA_YAML))
    assert plan.model == "NousResearch/Meta-Llama-3-8B"
    assert plan.estimate_kwargs == {
        "mode": "qlora",
        # Axolotl's QLoRA defaults: nf4, double quantisation, bf16 quant storage.
        "precisions": "nf4-dq",
        "quant_storage": "bfloat16",
        "seq_len": 4096,
        "batch": 2,
        "gradient_checkpointing": True,
        # Axolotl's normalize_config: use_reentrant true when nothing else decides.
        "gc_reentrant": True,
        "optimizer": "adamw",
        "attn": "flash_attention_2",
        "lora_r": 32,
        "lora_alpha": 16,
        "lora_targets": ("all-linear",),
        "lora_dropout": 0.05,
        # Axolotl casts norms and embeddings back to bf16 after peft's k-bit preparation.
        "kbit_upcast": False,
        # Axolotl 0.19 turns its LoRA kernels on for a QLoRA YAML that leaves them unset.
        "lora_mlp_kernel": True,
        "lora_qkv_kernel": True,
        "lora_o_kernel": True,
    }
    assert plan.lora_kernels_auto
    assert plan.gpu_memory_limit == 20 * 2**30
    assert plan.gpu == "20480MiB"
    assert plan.notes == ()  # sample_packing: false changes nothing
    # Set keys that do not change the plan are listed; empty ones (fsdp:) are not.
    for key in (
        "datasets",
        "output_dir",
        "num_epochs",
        "learning_rate",
        "special_tokens",
        "gradient_accumulation_steps",
        "val_set_size",
        "model_type",
    ):
        assert key in plan.unused_keys
    for key in ("fsdp", "deepspeed", "lora_model_dir", "base_model", "lora_r", "bf16"):
        assert key not in plan.unused_keys


def test_bnb_config_kwargs_override_the_defaults(tmp_path):
    text = QLORA_YAML + (
        "bnb_config_kwargs:\n  bnb_4bit_quant_type: fp4\n  bnb_4bit_use_double_quant: false\n"
        "  bnb_4bit_quant_storage: uint8\n"
    )
    kwargs = read_axolotl(_write(tmp_path, text)).estimate_kwargs
    assert kwargs["precisions"] == "fp4"
    assert kwargs["quant_storage"] == "uint8"


def test_int_memory_limit_is_gib(tmp_path):
    plan = read_axolotl(_write(tmp_path, QLORA_YAML.replace("20GiB", "24")))
    assert plan.gpu_memory_limit == 24 * 2**30


LORA_8BIT_YAML = """\
base_model: m/x
adapter: lora
load_in_8bit: true
lora_r: 8
lora_target_modules: [q_proj, v_proj]
optimizer: adamw_bnb_8bit
sdp_attention: true
"""


def test_lora_8bit_and_full(tmp_path):
    lora = read_axolotl(_write(tmp_path, LORA_8BIT_YAML, "lora.yml")).estimate_kwargs
    assert lora["mode"] == "lora" and lora["precisions"] == "int8"
    assert lora["lora_targets"] == ("q_proj", "v_proj")
    assert lora["optimizer"] == "adamw_8bit" and lora["attn"] == "sdpa"
    full = read_axolotl(_write(tmp_path, "base_model: m/x\nfp16: true\n", "full.yml"))
    assert full.estimate_kwargs["mode"] == "full"
    assert full.estimate_kwargs["precisions"] == "fp16"
    assert full.gpu_memory_limit is None and full.gpu is None


def test_sharding_gets_a_note(tmp_path):
    # The DeepSpeed config next to the YAML picks the strategy (tests/test_axolotl_sharding.py).
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2}}')
    plan = read_axolotl(_write(tmp_path, "base_model: m/x\nbf16: true\ndeepspeed: ds.json\n"))
    assert "deepspeed" in plan.keys.read
    assert plan.estimate_kwargs["strategy"] == "zero2"
    assert any("ZeRO-2" in n and "ds.json" in n for n in plan.notes)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("base_model: [unclosed\n", "not valid YAML"),
        ("adapter: qlora\nload_in_4bit: true\n", "no base_model"),
        ("- a\n- b\n", "mapping"),
        ("base_model: m/x\nadapter: qlora\n", "load_in_4bit"),
        ("base_model: m/x\nadapter: lora\nload_in_4bit: true\n", "qlora"),
        ("base_model: m/x\noptimizer: lion_8bit\n", "lion_8bit"),
        ("base_model: m/x\nadapter: ia3\n", "ia3"),
        ("base_model: m/x\nsequence_len: -1\n", "sequence_len"),
        ("base_model: m/x\ngpu_memory_limit: lots\n", "gpu_memory_limit"),
    ],
)
def test_errors_are_one_line_config_errors(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match) as info:
        read_axolotl(_write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        read_axolotl(tmp_path / "nope.yml")
