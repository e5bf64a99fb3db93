"""Training across GPUs: checked against DeepSpeed's estimators, FSDP2's own sharding and
accelerate's config classes."""

from __future__ import annotations

import copy

import pytest
from tiny_models import make_config

from qplan.planner.budget import Budget
from qplan.planner.device_map import decoder_layers
from qplan.planner.inventory import build_meta_model, take_inventory
from qplan.planner.parallel import (
    TrainingInput,
    ds_zero2,
    ds_zero3,
    param_layout,
    plan_training,
)

GIB = 1024**3


@pytest.fixture(scope="module")
def deepspeed_estimators():
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    except Exception as exc:  # ImportError, or its accelerator probe failing
        pytest.skip(
            f"deepspeed is not importable here ({type(exc).__name__}); "
            "pip install deepspeed to compare with its estimators"
        )
    return estimate_zero2_model_states_mem_needs, estimate_zero3_model_states_mem_needs


@pytest.mark.parametrize("params", [7_241_732_096, 70_553_706_496, 1_000_003])
@pytest.mark.parametrize("gpus", [1, 3, 8])
@pytest.mark.parametrize("offload", [False, True])
def test_zero_model_states_equal_deepspeeds_estimates(deepspeed_estimators, params, gpus, offload):
    zero2, zero3 = deepspeed_estimators
    largest = 1_050_673_152
    assert ds_zero2(params, gpus, offload) == zero2(
        params, num_gpus_per_node=gpus, cpu_offload=offload
    )
    cpu, gpu, _ = zero3(
        params, largest, num_gpus_per_node=gpus, cpu_offload=offload, cpu_offload_params=offload
    )
    assert ds_zero3(params, largest, gpus, offload, offload) == (cpu, gpu)
    cpu, gpu, _ = zero3(
        params, largest, num_gpus_per_node=gpus, cpu_offload=True, cpu_offload_params=False
    )
    assert ds_zero3(params, largest, gpus, True, False) == (cpu, gpu)


def _layout(arch: str, precision: str = "bf16", quant_storage: str = "uint8", **overrides):
    model = build_meta_model(copy.deepcopy(make_config(arch, **overrides)))
    inventory = take_inventory(model)
    return model, param_layout(
        inventory, precision, "bfloat16", quant_storage, decoder_layers(model)
    )


@pytest.mark.parametrize("ranks", [2, 3, 7])
def test_fsdp_shards_equal_fully_shard_on_a_fake_process_group(ranks):
    import torch.distributed as dist

    try:
        from torch.distributed.fsdp import fully_shard
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError as exc:
        pytest.skip(f"FSDP2 or the fake process group is missing from this torch ({exc})")
    model, layout = _layout("llama")
    layers = decoder_layers(model)  # before sharding renames the classes (FSDP<Name>)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=ranks)
    try:
        for name in layers:
            fully_shard(model.get_submodule(name))
        fully_shard(model)
        allocated = 0
        for state_module in [*[model.get_submodule(n) for n in layers], model]:
            group = state_module._get_fsdp_state()._fsdp_param_group
            for fsdp_param in group.fsdp_params:
                # What every rank allocates: the padded shard (rank 0 also holds the most).
                padded = fsdp_param.padded_sharded_param_size.numel()
                itemsize = fsdp_param.sharded_param.element_size()
                assert fsdp_param.sharded_param._local_tensor.numel() <= padded
                allocated += padded * itemsize
    finally:
        dist.destroy_process_group()
    assert allocated == layout.shard_bytes(ranks)
    assert layout.shard_bytes(1) == layout.param_bytes


def test_fsdp_qlora_layout_shards_the_packed_weights_in_the_compute_dtype():
    _, uint8 = _layout("llama", "nf4", "uint8")
    _, bf16 = _layout("llama", "nf4", "bfloat16")
    assert {p.itemsize for p in bf16.params} == {2}
    # Same bytes up to the packing's rounding, but every tensor one dtype (flat-shardable).
    assert abs(bf16.param_bytes - uint8.param_bytes) < 64 * len(bf16.params)


def _budgets(available: int, count: int) -> list[Budget]:
    return [
        Budget(
            memory_bytes=available,
            available_bytes=available,
            cuda_context_bytes=0,
            headroom_bytes=0,
        )
    ] * count


def _input(layout) -> TrainingInput:
    params = layout.param_bytes
    components = {
        "weights": params,
        "gradients": params,
        "optimizer_states": 2 * params,
        "logits": 10_000,
        "activations": 5_000,
        "transients": 100,
        "allocator": 1_000,
    }
    return TrainingInput(
        components=components,
        layout=layout,
        fsdp_layout=layout,
        lora=False,
        trainable_params=layout.num_params,
    )


def test_simplest_fitting_strategy_is_chosen():
    _, layout = _layout("llama")
    data = _input(layout)
    roomy = plan_training(data, _budgets(64 * GIB, 4))
    assert roomy.name == "ddp" and roomy.fits
    names = [o.name for o in roomy.options]
    assert names[0] == "ddp"
    ddp = roomy.options[0].per_gpu_bytes
    # Less than a replica needs, more than a full shard: something sharded is chosen.
    tight = plan_training(data, _budgets(ddp - 1, 4))
    assert tight.name != "ddp" and tight.fits
    assert all(not o.fits for o in tight.options[: names.index(tight.name)])
    hopeless = plan_training(data, _budgets(1024, 4))
    assert not hopeless.fits


def test_emitted_accelerate_config_is_read_by_accelerate(tmp_path, tiny_model_dir):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    from qplan.api import estimate
    from qplan.planner.emit_accelerate import emit_accelerate

    report = estimate(
        str(tiny_model_dir("llama")), gpu="4x A100-80GB", mode="full", precisions="bf16", seq_len=64
    )
    assert report.strategy is not None and report.strategy.name == "ddp"
    path = tmp_path / "ddp.yaml"
    path.write_text(emit_accelerate(report))
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.distributed_type == DistributedType.MULTI_GPU
    assert config.num_processes == 4

    from dataclasses import replace

    for name, kind in (
        ("fsdp", DistributedType.FSDP),
        ("zero3+offload", DistributedType.DEEPSPEED),
    ):
        changed = replace(report, strategy=replace(report.strategy, name=name))
        path = tmp_path / f"{name}.yaml"
        path.write_text(emit_accelerate(changed))
        config = ClusterConfig.from_yaml_file(str(path))
        assert config.distributed_type == kind
        if kind == DistributedType.FSDP:
            assert config.fsdp_config["fsdp_version"] == 2
            assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
            assert config.mixed_precision == "no"
        else:
            assert config.deepspeed_config["zero_stage"] == 3
            assert config.deepspeed_config["offload_param_device"] == "cpu"
            assert config.mixed_precision == "bf16"


def _real_flat_states(optimizer: str, numel: int) -> int:
    """Bytes of every state tensor the real optimizer keeps for one 1-D float32 tensor of
    ``numel`` values (a ZeRO flat partition) after a step on CPU."""
    import torch

    from qplan.planner.steps import _optimizer_state_tensors, make_optimizer

    param = torch.nn.Parameter(torch.zeros(numel))
    param.grad = torch.zeros(numel)
    opt = make_optimizer([param], optimizer, torch.device("cpu"))
    opt.step()
    return sum(t.untyped_storage().nbytes() for t in _optimizer_state_tensors(opt))


def _eager(fn=None, **_):
    return fn if fn is not None else (lambda f: f)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit", "paged_adamw_8bit",
                                       "adamw_torch_8bit", "adamw_torch_4bit", "sgd",
                                       "adafactor"])
def test_flat_partition_states_equal_the_real_optimizers(optimizer, monkeypatch):
    """What each optimizer keeps over a flat fp32 partition, against the optimizer itself:
    below bitsandbytes'/torchao's 4,096-value threshold, a whole number of torchao blocks
    or not, and Adafactor, which cannot factor a 1-D tensor."""
    if optimizer.startswith("adamw_torch"):
        pytest.importorskip("torchao")
        # torchao makes its states eagerly, then compiles the update per shape: 40 s of
        # inductor on a cold cache for these seven sizes, the same states run eagerly.
        monkeypatch.setattr("torch.compile", _eager)
    from qplan.planner.zero_optimizer import FLAT_STATE_BYTES

    for numel in (1000, 4095, 4096, 5000, 100_000, 100_096, 131_072):
        assert FLAT_STATE_BYTES[optimizer](numel) == _real_flat_states(optimizer, numel), numel


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
@pytest.mark.parametrize("optimizer", ["adamw_8bit", "adafactor", "sgd"])
def test_zero_plans_the_runs_optimizer(tiny_model_dir, strategy, optimizer):
    """ZeRO with the Trainer's own optimizer: the per-GPU model states differ from AdamW's
    by exactly what the two real optimizers keep over the same flat partitions."""
    from qplan import estimate
    from qplan.planner.zero_optimizer import zero2_partitions, zero3_partitions

    folder = str(tiny_model_dir("llama"))

    def states(opt):
        report = estimate(folder, gpu="A100-80GB", num_gpus=4, mode="full",
                          precisions="bf16", strategy=strategy, optimizer=opt)
        return report, report.devices[0].components["model_states"]

    report, planned = states(optimizer)
    _, adamw = states("adamw")
    import transformers

    from qplan.planner.multi_gpu import _trainer_param_groups

    config = transformers.AutoConfig.from_pretrained(folder)
    model = build_meta_model(config)
    groups = _trainer_param_groups(model)
    assert sum(map(len, groups)) == len(list(model.parameters()))
    if strategy == "zero2":
        partitions = zero2_partitions([sum(g) for g in groups], 4)
    else:
        partitions = zero3_partitions(groups, 4, 0)
    real = sum(_real_flat_states(optimizer, n) - _real_flat_states("adamw", n)
               for n in partitions)
    assert planned - adamw == real
    assert any(optimizer in note for note in report.strategy.notes)
