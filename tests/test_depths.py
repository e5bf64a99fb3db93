"""Deep models are traced at two shallow depths and extrapolated: the depths must keep
every kind of layer, and the extrapolated peak must match a real run of the deep model."""

from __future__ import annotations

import copy

import pytest
from tiny_models import make_config
from transformers import AutoConfig

from qplan.api import estimate, make_workload
from qplan.loaders.measure import measure
from qplan.planner.depths import LayerPattern, layer_signatures, segment_keys, trace_plan
from qplan.planner.inventory import build_meta_model, take_inventory


def _signatures(pattern: str) -> list[tuple]:
    """One signature per character: equal characters are equal layers."""
    return [(kind,) for kind in pattern]


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        # The low trace holds every layer of the block at least twice (depths.py).
        ("a" * 32, (2, 4)),  # homogeneous: Llama, Qwen, Mistral
        ("ab" * 13, (4, 6)),  # Gemma 2 / gpt-oss: sliding and global alternate
        ("ab" * 12 + "a", (5, 7)),  # ... with an odd depth: the partial block is kept
        ("aaaaab" * 4 + "aa", (14, 20)),  # Gemma 3: 5 sliding to 1 global, 26 layers
        ("ddd" + "m" * 58, (5, 7)),  # DeepSeek-V3: dense prefix, then MoE layers
        ("a" * 4, None),  # shallow: traced whole
        ("abcabd" + "a" * 10, (8, 10)),  # an irregular prefix, then alike layers
        ("abcdabcdabcaabdc", None),  # no repeating structure: traced whole
    ],
)
def test_trace_depths_keep_every_kind_of_layer(pattern, expected):
    depths = trace_plan(_signatures(pattern), len(pattern)).depths
    assert depths == expected
    if depths is not None:
        low, high = depths
        # Both traces hold every kind of layer the model has.
        assert set(pattern[:low]) == set(pattern) == set(pattern[:high])
        # ... each block layer twice in the low one: its top there is not its first.
        low_counts = {kind: pattern[:low].count(kind) for kind in set(pattern)}
        repeating = set(pattern[low - 1:])
        assert all(low_counts[kind] >= 2 for kind in repeating), low_counts


def test_layer_signatures_read_the_config_and_the_module_tree():
    gemma3 = make_config("gemma3", num_hidden_layers=26)
    model = build_meta_model(copy.deepcopy(gemma3))
    signatures = layer_signatures(take_inventory(model), gemma3)
    assert signatures is not None and len(signatures) == gemma3.num_hidden_layers
    kinds = [signatures.index(s) for s in signatures]
    assert kinds[:6] == [0, 0, 0, 0, 0, 5]  # sliding x5, global
    assert trace_plan(signatures, gemma3.num_hidden_layers).depths == (14, 20)
    deepseek = make_config("deepseek_v3", num_hidden_layers=7)
    inventory = take_inventory(build_meta_model(copy.deepcopy(deepseek)))
    assert trace_plan(layer_signatures(inventory, deepseek), 7).depths == (4, 6)
    llama = make_config("llama", num_hidden_layers=9)
    inventory = take_inventory(build_meta_model(copy.deepcopy(llama)))
    assert trace_plan(layer_signatures(inventory, llama), 9).depths == (2, 4)


def test_segment_keys_name_the_same_moment_at_every_depth():
    # 2 dense layers, then MoE layers: the bottom and top MoE layers are named, the rest
    # lie between them.
    pattern = LayerPattern(prefix_layers=2, period=1)
    names = [segment_keys(i, 6, pattern) for i in range(6)]
    assert names == [("prefix0",), ("prefix1",), ("block0-bottom",), ("block0-middle",),
                     ("block0-middle",), ("block0-top",)]
    # One occurrence of a block's layer is both its top and its bottom.
    alternating = [segment_keys(i, 3, LayerPattern(0, 2)) for i in range(3)]
    assert alternating == [("block0-bottom",), ("block1-top", "block1-bottom"), ("block0-top",)]


SHAPE = dict(batch=1, seq_len=96, lora_r=8)
CASES = [
    ("inference", "bf16", True),
    ("lora", "bf16", False),
    ("qlora", "nf4", True),
    ("qlora", "nf4-dq", False),
    ("full", "bf16", True),
]


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "layers"), [("llama", 7), ("gemma3", 26), ("deepseek_v3", 7)])
@pytest.mark.parametrize(("mode", "precision", "gc"), CASES)
def test_extrapolated_peak_matches_the_deep_model(tiny_model_dir, arch, layers, mode,
                                                  precision, gc):
    """Predicted from two shallow traces, measured on the whole deep model (real weights,
    bitsandbytes and steps on CPU). The gemma3 sequences are longer than its window, so its
    sliding layers run with a materialised mask; deepseek_v3 has 2 dense layers, then MoE."""
    overrides = {"num_hidden_layers": layers}
    folder = tiny_model_dir(arch, **overrides)
    config = AutoConfig.from_pretrained(folder)
    predicted = estimate(
        str(folder), gpu="80GiB", mode=mode, precisions=precision, target="cpu",
        gradient_checkpointing=gc, **SHAPE,
    ).candidate(precision)
    workload = make_workload(mode, config, gradient_checkpointing=gc, **SHAPE)
    measured = measure(config, workload, precision, predicted.compute_dtype)
    error = (predicted.peak_allocated_bytes - measured.peak_bytes) / measured.peak_bytes
    assert abs(error) <= 0.01, f"{error:+.2%}"
    for part in ("weights", "adapters", "kv_cache"):
        assert predicted.components[part] == measured.components[part], part


def test_a_plan_deeper_than_the_model_traces_it_whole_with_the_same_figures():
    # An irregular prefix, then a short repeating block (Nemotron-H-56B's shape: 107 layers
    # before a block of 2, traced at 112 and 114 of 118): the two shallow traces would hold
    # more layers than the model, so it is traced whole, and every figure is the one the
    # extrapolation from those two depths gives.
    from qplan.planner.components import (
        CUBLAS_WORKSPACE_DEFAULT,
        FRAGMENTATION_ALLOWANCE,
        _extrapolate,
        trace_components,
        workload_components,
    )
    from qplan.planner.depths import num_layers

    kinds = ["attention", "mamba", "attention", "mlp", "attention"] + ["mamba", "mlp"] * 5
    config = make_config("nemotron_h", layers_block_type=kinds)
    inventory = take_inventory(build_meta_model(copy.deepcopy(config)))
    depth = num_layers(config)
    plan = trace_plan(layer_signatures(inventory, config), depth)
    assert plan.depths is not None and sum(plan.depths) > depth
    for mode in ("inference", "full"):
        workload = make_workload(mode, config, batch=1, seq_len=32)
        whole = workload_components(inventory, workload, "bf16", "bfloat16", config=config,
                                    depth_plan=plan)
        assert whole.traced_layers == (depth,)
        low, high = (trace_components(config, workload, "bf16", "bfloat16", layers=layers,
                                      pattern=plan.pattern) for layers in plan.depths)
        line = _extrapolate(low, high, plan.depths, depth)
        # What workload_components adds to a trace on CUDA: cuBLAS's workspace, and the
        # allocator's allowance on what churns.
        expected = dict(line.components)
        expected["transients"] += CUBLAS_WORKSPACE_DEFAULT
        churn = sum(expected[k] for k in ("activations", "logits", "transients", "gradients"))
        expected["allocator"] = int(churn * FRAGMENTATION_ALLOWANCE)
        assert whole.components == expected
        assert whole.peak_allocated_bytes == line.peak_bytes + CUBLAS_WORKSPACE_DEFAULT
        assert {k: v for k, v in line.phase_peaks.items() if ":" not in k} == {
            k: v for k, v in whole.phase_peaks.items() if ":" not in k}


def test_the_shallow_trace_holds_every_block_layer_twice():
    # gpt-oss alternates sliding and full attention layers. Its prefill holds more at layer
    # 0, the first sliding layer, than at any later one: traced with one block at the low
    # depth (2 and 4 layers), layer 0 was the top of its kind there and the line through
    # the two traces missed the whole model (228 MB over at 24 layers). With every block
    # layer twice in the low trace, the extrapolation equals the whole model's trace.
    from dataclasses import replace

    from qplan.api import resolve
    from qplan.loaders.measure import shrink
    from qplan.planner.components import workload_components
    from qplan.planner.depths import HOMOGENEOUS, TracePlan, num_layers

    spec = resolve("openai/gpt-oss-20b", None, False)
    config = replace(spec, config=shrink(spec.config, 12)).config
    inventory = take_inventory(build_meta_model(copy.deepcopy(config)))
    plan = trace_plan(layer_signatures(inventory, config), num_layers(config))
    assert plan == TracePlan(LayerPattern(0, 2), (4, 6))
    workload = make_workload("inference", config, batch=1, seq_len=1024)

    def planned(depth_plan: TracePlan):
        return workload_components(inventory, workload, "bf16", "bfloat16", config=config,
                                   depth_plan=depth_plan)

    whole = planned(TracePlan(HOMOGENEOUS, None))
    extrapolated = planned(plan)
    assert extrapolated.traced_layers == (4, 6) and whole.traced_layers == (12,)
    assert extrapolated.components == whole.components
    assert extrapolated.peak_allocated_bytes == whole.peak_allocated_bytes
    one_block = planned(TracePlan(plan.pattern, (2, 4)))
    assert one_block.peak_allocated_bytes > whole.peak_allocated_bytes


@pytest.mark.parametrize(("mode", "precision"), [("inference", "bf16"), ("lora", "bf16"),
                                                 ("qlora", "nf4"), ("full", "bf16")])
def test_a_list_of_layer_indices_is_read_as_which_layers_it_names(mode, precision):
    # Llama 4 Scout's moe_layers lists every layer by index (0..47): read entry by entry,
    # each layer looked unlike every other and the model was traced whole. As the layers
    # it names, the stack is no_rope_layers' block of 4, traced at 8 and 12 of 24 layers,
    # and the extrapolation equals the whole model's trace, component for component.
    from tiny_models import TINY_CONFIGS

    from qplan.planner.components import workload_components
    from qplan.planner.depths import HOMOGENEOUS, TracePlan, num_layers

    text = {**TINY_CONFIGS["llama4"]["text_config"], "num_hidden_layers": 24,
            "interleave_moe_layer_step": 1}
    config = make_config("llama4", text_config=text)
    assert config.text_config.moe_layers == list(range(24))
    inventory = take_inventory(build_meta_model(copy.deepcopy(config)))
    depth = num_layers(config)
    plan = trace_plan(layer_signatures(inventory, config), depth)
    assert plan == TracePlan(LayerPattern(0, 4), (8, 12))
    workload = make_workload(mode, config, batch=1, seq_len=48, lora_r=8)
    options = dict(config=config, target="cpu")
    extrapolated = workload_components(inventory, workload, precision, "bfloat16",
                                       depth_plan=plan, **options)
    whole = workload_components(inventory, workload, precision, "bfloat16",
                                depth_plan=TracePlan(HOMOGENEOUS, None), **options)
    assert extrapolated.traced_layers == (8, 12) and whole.traced_layers == (24,)
    assert extrapolated.components == whole.components
    assert extrapolated.peak_allocated_bytes == whole.peak_allocated_bytes
