"""Inference across GPUs: the device map is accelerate's own, with exact module sizes."""

from __future__ import annotations

import copy

import pytest
from tiny_models import make_config

from qplan.planner.budget import Budget
from qplan.planner.device_map import add_quant_state_buffers, decoder_layers, plan_device_map
from qplan.planner.inventory import build_meta_model, take_inventory
from qplan.planner.quantize_meta import quantize_meta_model
from qplan.planner.weights import weight_bytes

MIB = 1024**2


def _model(arch: str, precision: str, **overrides):
    config = make_config(arch, **overrides)
    model = build_meta_model(copy.deepcopy(config))
    inventory = take_inventory(model)
    return quantize_meta_model(model, inventory, precision, "bfloat16"), inventory


def _budgets(available: int, count: int) -> list[Budget]:
    return [
        Budget(
            memory_bytes=available,
            available_bytes=available,
            cuda_context_bytes=0,
            headroom_bytes=0,
        )
    ] * count


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("precision", ["bf16", "int8", "nf4", "nf4-dq", "fp4"])
def test_module_sizes_equal_planned_weight_bytes(arch, precision):
    from accelerate.utils import compute_module_sizes

    model, inventory = _model(arch, precision)
    add_quant_state_buffers(model)
    planned = weight_bytes(inventory, precision, compute_dtype="bfloat16")
    assert compute_module_sizes(model)[""] == planned.bytes


@pytest.mark.parametrize("precision", ["bf16", "nf4"])
def test_device_map_equals_accelerate_given_the_same_max_memory(precision):
    from accelerate.utils import infer_auto_device_map

    model, _ = _model("llama", precision, num_hidden_layers=6)
    components = {
        "kv_cache": 6 * 4096,
        "activations": 20_000,
        "logits": 30_000,
        "transients": 1000,
        "allocator": 500,
    }
    plan = plan_device_map(model, _budgets(450_000, 3), components)
    assert len({d for d in plan.device_map.values()}) > 1, "the test must spread layers"
    # The same model (quant state as buffers) and max_memory through accelerate directly.
    again = infer_auto_device_map(
        model,
        max_memory=dict(plan.max_memory),
        no_split_module_classes=list(model._no_split_modules),
    )
    assert dict(again) == plan.device_map
    if precision == "bf16":
        # Unquantised: identical to accelerate on a plain meta model (no qplan buffers).
        plain, _ = _model("llama", precision, num_hidden_layers=6)
        assert (
            dict(
                infer_auto_device_map(
                    plain,
                    max_memory=dict(plan.max_memory),
                    no_split_module_classes=list(plain._no_split_modules),
                )
            )
            == plan.device_map
        )


def test_every_gpu_keeps_its_layers_kv_and_stays_within_budget():
    model, inventory = _model("llama", "bf16", num_hidden_layers=6)
    kv = 6 * 8192
    components = {
        "kv_cache": kv,
        "activations": 20_000,
        "logits": 30_000,
        "transients": 1000,
        "allocator": 500,
    }
    plan = plan_device_map(model, _budgets(700_000, 3), components)
    assert plan.fits
    gpus = [d for d in plan.devices if d.device.startswith("cuda")]
    assert (
        sum(d.components.get("weights", 0) for d in gpus) == weight_bytes(inventory, "bf16").bytes
    )
    assert sum(d.components.get("kv_cache", 0) for d in gpus) == kv
    assert sum(1 for d in gpus if d.components.get("logits")) == 1
    assert all(d.total_bytes <= d.limit_bytes for d in gpus)
    assert len(decoder_layers(model)) == 6


def test_too_little_gpu_memory_offloads_to_cpu():
    model, _ = _model("llama", "bf16", num_hidden_layers=6)
    plan = plan_device_map(model, _budgets(200_000, 2), {"activations": 10_000})
    assert plan.offloaded and not plan.fits
    assert any(d.device == "cpu" for d in plan.devices)


def test_estimate_on_two_gpus_reports_the_device_plan(tiny_model_dir):
    from qplan.api import estimate
    from qplan.loading import report_from_dict
    from qplan.report import report_dict

    report = estimate(
        str(tiny_model_dir("llama")), gpu="2x A100-80GB", mode="inference", precisions="bf16,nf4"
    )
    assert report.gpu.count == 2
    assert report.strategy is not None and report.strategy.name == "device_map"
    assert report.strategy.fits and report.devices
    assert [c.strategy for c in report.candidates] == ["device_map", "device_map"]
    data = report_dict(report)
    jsonschema = pytest.importorskip("jsonschema")
    from qplan.report import load_schema

    jsonschema.validate(data, load_schema())
    assert report_from_dict(data).strategy == report.strategy


def test_one_gpu_reports_have_no_strategy(tiny_model_dir):
    from qplan.api import estimate
    from qplan.report import report_dict

    report = estimate(
        str(tiny_model_dir("llama")), gpu="A100-80GB", mode="inference", precisions="bf16"
    )
    assert report.strategy is None and report.devices == ()
    data = report_dict(report)
    assert "strategy" not in data and "strategy" not in data["candidates"][0]


def test_loading_uses_the_planned_map_with_compensated_max_memory(tiny_model_dir):
    from qplan.api import estimate
    from qplan.loaders.loading import device_map_for
    from qplan.planner.device_map import BNB_MAX_MEMORY_FRACTION

    report = estimate(
        str(tiny_model_dir("llama")), gpu="2xA100-80GB", mode="load", precisions="nf4"
    )
    device_map, max_memory = device_map_for(report, "cuda")
    assert device_map == report.strategy.device_map
    planned = report.strategy.max_memory
    assert max_memory[0] == int(planned["0"] / BNB_MAX_MEMORY_FRACTION)
    assert max_memory["cpu"] == int(planned["cpu"] / BNB_MAX_MEMORY_FRACTION)


def test_emitted_transformers_snippet_carries_the_planned_split(tiny_model_dir):
    """--emit transformers for several GPUs writes the planned device map, not "auto"."""
    from qplan.api import estimate
    from qplan.planner.emit import emit_transformers

    report = estimate(str(tiny_model_dir("llama")), gpu="2x 1GiB", mode="inference",
                      precisions="bf16", headroom="0")
    assert report.strategy is not None and report.strategy.device_map
    snippet = emit_transformers(report)
    assert "device_map=device_map" in snippet and '"auto"' not in snippet
    namespace: dict = {}
    exec(snippet.split("model = AutoModelForCausalLM")[0].split("import torch")[1]
         .replace("from transformers import AutoModelForCausalLM, BitsAndBytesConfig", ""),
         {"torch": __import__("torch")}, namespace)
    assert namespace["device_map"] == dict(report.strategy.device_map)
    assert report.recommendation.load_kwargs["device_map"] == dict(report.strategy.device_map)
