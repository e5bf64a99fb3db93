"""Axolotl's DeepSpeed / FSDP keys pick the multi-GPU strategy the YAML asks for
(loaders/axolotl_sharding.py), planned by planner/parallel.py exactly as an explicit
strategy: the per-GPU bytes and host RAM equal those of the same strategy in the planner's
own list of options (the planner itself is checked against DeepSpeed's estimators and FSDP2
in tests/test_parallel.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from qplan.api import estimate, estimate_axolotl
from qplan.cli import app
from qplan.errors import ConfigError
from qplan.loaders.axolotl import read_axolotl
from qplan.loaders.axolotl_sharding import AXOLOTL_DEEPSPEED, ZeroConfig, zero_config_of

DEEPSPEED_CONFIGS = Path(__file__).parent / "data" / "axolotl-examples" / "deepspeed_configs"
BASE = "base_model: {model}\nbf16: true\nsequence_len: 32\nmicro_batch_size: 2\n"


def _write(tmp_path, text, name="config.yml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", sorted(AXOLOTL_DEEPSPEED))
def test_axolotl_deepspeed_table_is_what_the_files_say(name, tmp_path):
    """The table of Axolotl's deepspeed_configs equals each file's own zero_optimization."""
    read, source = zero_config_of(str(DEEPSPEED_CONFIGS / name), tmp_path / "x.yml")
    assert read == AXOLOTL_DEEPSPEED[name] and source.endswith(name)


@pytest.mark.parametrize(
    ("keys", "strategy", "unmodelled"),
    [
        ("deepspeed: deepspeed_configs/zero3_bf16.json\n", "zero3", None),
        ("deepspeed: deepspeed_configs/zero3_bf16_cpuoffload_all.json\n", "zero3+offload", None),
        ("deepspeed: deepspeed_configs/zero3_bf16_cpuoffload_params.json\n", "zero3+offload",
         "parameters"),
        ("deepspeed: deepspeed_configs/zero2.json\n", "zero2+offload", None),
        ("deepspeed: deepspeed_configs/zero1.json\n", "zero2", "ZeRO-1"),
        ("fsdp:\n  - full_shard\n  - auto_wrap\nfsdp_config:\n  fsdp_offload_params: true\n",
         "fsdp+offload", None),
        ("fsdp_version: 2\nfsdp_config:\n  offload_params: false\n"
         "  reshard_after_forward: true\n", "fsdp", None),
        ("fsdp_version: 2\nfsdp_config:\n  offload_params: true\n", "fsdp+offload", None),
        ("fsdp:\n  - shard_grad_op\n  - auto_wrap\n", "fsdp", "SHARD_GRAD_OP"),
        ("fsdp_version: 2\nfsdp_config:\n  reshard_after_forward: false\n", "fsdp",
         "reshard_after_forward"),
        ("ddp: true\n", "ddp", None),
        ("deepspeed:\nfsdp:\nfsdp_config:\n", None, None),
    ],
)
def test_each_key_picks_its_strategy(tmp_path, keys, strategy, unmodelled):
    plan = read_axolotl(_write(tmp_path, BASE.format(model="m/x") + keys))
    assert plan.estimate_kwargs.get("strategy") == strategy
    if unmodelled is None:
        assert set(yaml.safe_load(keys)) <= set(plan.keys.read)
    if unmodelled is not None:
        assert any(unmodelled in what for what in plan.keys.not_modelled.values())


def test_a_deepspeed_json_next_to_the_yaml_is_read(tmp_path):
    config = {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"},
                                    "offload_optimizer": {"device": "cpu"}}}
    (tmp_path / "zero2.json").write_text(json.dumps(config))  # its content, not its name
    plan = read_axolotl(_write(tmp_path, BASE.format(model="m/x") + "deepspeed: zero2.json\n"))
    assert plan.estimate_kwargs["strategy"] == "zero3+offload"
    assert any(str(tmp_path / "zero2.json") in n for n in plan.notes)


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ("deepspeed: my_ds.json\n", "neither next to the YAML"),
        ("deepspeed: zero3.json\nfsdp_version: 2\nfsdp_config:\n  offload_params: true\n",
         "both deepspeed and FSDP"),
    ],
)
def test_bad_sharding_keys_are_one_line_errors(tmp_path, keys, match):
    with pytest.raises(ConfigError, match=match) as info:
        read_axolotl(_write(tmp_path, BASE.format(model="m/x") + keys))
    assert "\n" not in str(info.value)


def test_zero_stage_of_an_inline_config(tmp_path):
    assert zero_config_of({"zero_optimization": {"stage": 2}}, tmp_path / "x.yml")[0] == \
        ZeroConfig(2)


@pytest.mark.parametrize(
    ("keys", "strategy", "mode"),
    [
        ("deepspeed: deepspeed_configs/zero3_bf16.json\n", "zero3", "full"),
        ("deepspeed: deepspeed_configs/zero3_bf16_cpuoffload_all.json\n", "zero3+offload",
         "full"),
        ("deepspeed: deepspeed_configs/zero2.json\n", "zero2+offload", "full"),
        ("fsdp_version: 2\nfsdp_config:\n  offload_params: true\n", "fsdp+offload", "full"),
        ("adapter: lora\nlora_r: 8\nlora_target_linear: true\nfsdp_version: 2\n"
         "fsdp_config:\n  offload_params: false\n", "fsdp", "lora"),
    ],
)
def test_per_gpu_bytes_are_the_planners_for_that_strategy(tiny_model_dir, tmp_path, keys,
                                                          strategy, mode):
    """The YAML's strategy gets the bytes the planner computes for it among its options."""
    model = str(tiny_model_dir("llama"))
    report = estimate_axolotl(str(_write(tmp_path, BASE.format(model=model) + keys)),
                              gpu="80GiB", num_gpus=2, precisions="bf16")
    assert report.strategy.name == strategy
    assert [o.name for o in report.strategy.options] == [strategy]
    # The LoRA YAML leaves the kernels unset: Axolotl 0.19 turns them on (FSDP2 allows it).
    lora = {"lora_r": 8, "lora_targets": ("all-linear",), "lora_mlp_kernel": True,
            "lora_qkv_kernel": True, "lora_o_kernel": True} if mode == "lora" else {}
    free = estimate(model, gpu="80GiB", num_gpus=2, mode=mode, precisions="bf16", batch=2,
                    seq_len=32, gradient_checkpointing=False, **lora)
    option = next(o for o in free.strategy.options if o.name == strategy)
    mine = report.strategy.options[0]
    assert (mine.per_gpu_bytes, mine.cpu_bytes) == (option.per_gpu_bytes, option.cpu_bytes)
    gpus = [d for d in report.devices if d.device.startswith("cuda")]
    assert len(gpus) == 2 and max(d.total_bytes for d in gpus) == option.per_gpu_bytes
    host = sum(d.total_bytes for d in report.devices if d.device == "cpu")
    assert host == option.cpu_bytes and (host > 0) == strategy.endswith("+offload")


def test_one_gpu_plans_the_strategy_at_world_size_one(tiny_model_dir, tmp_path):
    model = str(tiny_model_dir("llama"))
    path = _write(tmp_path, BASE.format(model=model)
                  + "deepspeed: deepspeed_configs/zero3_bf16_cpuoffload_all.json\n")
    report = estimate_axolotl(str(path), gpu="80GiB", precisions="bf16")
    assert report.strategy.name == "zero3+offload" and report.gpu.count == 1
    assert [d.device for d in report.devices] == ["cuda:0", "cpu"]
    assert any("world size 1" in n for n in report.notes)
    alone = estimate(model, gpu="80GiB", mode="full", precisions="bf16", batch=2, seq_len=32,
                     gradient_checkpointing=False, strategy="zero3+offload")
    assert alone.devices == report.devices


def test_cli_plans_the_yaml_strategy_per_gpu_with_host_ram(tiny_model_dir, tmp_path):
    model = str(tiny_model_dir("llama"))
    path = _write(tmp_path, BASE.format(model=model)
                  + "deepspeed: deepspeed_configs/zero3_bf16_cpuoffload_all.json\n")
    runner = CliRunner()
    result = runner.invoke(app, ["estimate", "--axolotl", str(path), "--gpu", "80GiB",
                                 "--num-gpus", "4", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["strategy"]["name"] == "zero3+offload"
    assert [d["device"] for d in report["devices"]] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3",
                                                        "cpu"]
    assert "deepspeed" in report["axolotl"]["read"]
    assert not any("deepspeed" in w for w in report["warnings"])
    table = runner.invoke(app, ["estimate", "--axolotl", str(path), "--gpu", "80GiB",
                                "--num-gpus", "4"])
    assert table.exit_code == 0, table.output
    assert "zero3+offload" in table.stdout


def test_a_strategy_needs_a_training_mode(tiny_model_dir):
    from qplan.errors import UsageError

    with pytest.raises(UsageError, match="training mode"):
        estimate(str(tiny_model_dir("llama")), gpu="80GiB", mode="inference",
                 strategy="zero3", seq_len=16)
    with pytest.raises(UsageError, match="strategy"):
        estimate(str(tiny_model_dir("llama")), gpu="80GiB", mode="full", strategy="zero9",
                 seq_len=16)


def test_deepspeed_optimizer_block_replaces_the_yamls_optimizer(tiny_model_dir, tmp_path):
    """Axolotl's zero1.json builds DeepSpeed's own AdamW: the YAML's optimizer is not the
    one that runs, so the plan takes AdamW's states (and says why)."""
    from qplan.loaders.axolotl import read_axolotl

    folder = str(tiny_model_dir("llama"))
    path = _write(tmp_path, BASE.format(model=folder)
                  + "optimizer: adamw_bnb_8bit\ndeepspeed: deepspeed_configs/zero1.json\n")
    plan = read_axolotl(path)
    assert plan.estimate_kwargs["optimizer"] == "adamw"
    assert any("replaces the YAML's optimizer" in note for note in plan.notes)
    plain = read_axolotl(_write(tmp_path, BASE.format(model=folder)
                                + "optimizer: adamw_bnb_8bit\n"
                                "deepspeed: deepspeed_configs/zero3_bf16.json\n", "b.yml"))
    assert plain.estimate_kwargs["optimizer"] == "adamw_8bit"
