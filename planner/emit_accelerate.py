"""``--emit accelerate``: the ``accelerate launch`` config YAML for a training plan's strategy.

Pure text generation from the report. Mixed precision follows what was planned: DDP and
FSDP train the weights in the dtype they were loaded in, as the single-GPU trace does
(no autocast, so ``mixed_precision: "no"``); DeepSpeed is planned with its own bf16/fp16
mixed-precision accounting, so it gets the candidate's 16-bit dtype.
"""

from __future__ import annotations

from typing import Any

import yaml

from qplan.errors import UsageError
from qplan.planner.emit import chosen_precision, workload_of

DISTRIBUTED_TYPES = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}


def _mixed_precision(strategy: str, dtype: str) -> str:
    if not strategy.startswith("zero"):
        return "no"
    return {"bfloat16": "bf16", "float16": "fp16"}.get(dtype, "no")


def accelerate_settings(report: Any, precision: str | None = None) -> dict[str, Any]:
    """The accelerate config keys of the plan, in the order they are written."""
    workload = workload_of(report)
    if not workload.is_training:
        raise UsageError(
            f"--emit accelerate is for training plans (--mode lora, qlora or full), not mode "
            f"{workload.mode}; inference across GPUs loads with the device map (--emit "
            "transformers)"
        )
    precision = chosen_precision(report, precision)
    candidate = report.candidate(precision)
    strategy = report.strategy
    name = strategy.name if strategy is not None else "single"
    kind = name.split("+")[0]
    offload = name.endswith("+offload")
    out: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": DISTRIBUTED_TYPES.get(kind, "NO"),
        "mixed_precision": _mixed_precision(kind, str(candidate.compute_dtype)),
        "num_machines": 1,
        "num_processes": report.gpu.count if strategy is not None else 1,
        "machine_rank": 0,
        "rdzv_backend": "static",
        "same_network": True,
        "main_training_function": "main",
        "use_cpu": False,
        "debug": False,
    }
    if kind == "fsdp":
        out["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": strategy.layer_class if strategy else None,
            "fsdp_reshard_after_forward": True,
            "fsdp_offload_params": offload,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_cpu_ram_efficient_loading": True,
            # Checkpointing is the model's own (gradient_checkpointing_enable), as traced.
            "fsdp_activation_checkpointing": False,
        }
    elif kind.startswith("zero"):
        stage = 3 if kind == "zero3" else 2
        out["deepspeed_config"] = {
            "zero_stage": stage,
            "offload_optimizer_device": "cpu" if offload else "none",
            "offload_param_device": "cpu" if offload and stage == 3 else "none",
            "zero3_init_flag": stage == 3,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0,
        }
        if stage == 3:
            out["deepspeed_config"]["zero3_save_16bit_model"] = True
    return out


def emit_accelerate(report: Any, precision: str | None = None) -> str:
    """The YAML ``accelerate launch --config_file`` reads, with a comment naming the plan."""
    settings = accelerate_settings(report, precision)
    strategy = report.strategy.name if report.strategy is not None else "single GPU"
    head = (
        f"# qplan plan: {report.model.id} on {settings['num_processes']} x "
        f"{report.gpu.name}, strategy {strategy}\n"
    )
    return head + yaml.safe_dump(settings, sort_keys=False)
