"""A stack that ends in layers breaking its period (Nemotron-H-56B: a block of 11 from layer
0, but its last layer is an MLP where the block has attention) is read as prefix, blocks,
partial block and suffix, and traced shallow with the real stack's last layers kept
(planner/depths.py). The extrapolation must equal a whole-model trace, and no other model's
depth plan may change."""

from __future__ import annotations

import copy
import glob
import json
import os

import pytest
from tiny_models import make_config

from qplan.api import make_workload
from qplan.planner.components import _with_layers, workload_components
from qplan.planner.depths import (
    HOMOGENEOUS,
    LayerPattern,
    TracePlan,
    _layer_keys,
    _periodic_plan,
    kept_layers,
    layer_signatures,
    num_layers,
    segment_keys,
    trace_plan,
)
from qplan.planner.inventory import build_meta_model, take_inventory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_CONFIGS = "/work/shared/model-configs"
NEMOTRON_H_56B = "nvidia__Nemotron-H-56B-Base-8K.json"

# A tiny Nemotron-H: 6 blocks of (mamba, attention, mlp), a partial block (mamba), then an
# MLP where the block has attention. 20 layers, read as (s=0, p=3, r=1, t=1).
TINY_KINDS = ["mamba", "attention", "mlp"] * 6 + ["mamba", "mlp"]


def _signatures(pattern: str) -> list[tuple]:
    """One signature per character: equal characters are equal layers."""
    return [(kind,) for kind in pattern]


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        # Nemotron-H-56B's shape: 10 blocks of 11, a partial block of 7, an odd last layer.
        ("abcdefghijk" * 10 + "abcdefg" + "x", TracePlan(LayerPattern(0, 11, 1), (30, 41))),
        ("a" * 30 + "b", TracePlan(LayerPattern(0, 1, 1), (3, 5))),  # one odd last layer
        ("ab" * 10 + "b", TracePlan(LayerPattern(0, 2, 1), (5, 7))),
        # A prefix, blocks and a suffix of two layers.
        ("p" + "ab" * 12 + "xy", TracePlan(LayerPattern(1, 2, 2), (7, 9))),
        # No suffix: the readings without one, as before (tests/test_depths.py).
        ("ab" * 12 + "a", TracePlan(LayerPattern(0, 2), (5, 7))),
        ("ddd" + "m" * 58, TracePlan(LayerPattern(3, 1), (5, 7))),
        # A suffix reading no shallower than the prefix reading is not taken.
        ("abcabd" + "a" * 10, TracePlan(LayerPattern(6, 1), (8, 10))),
    ],
)
def test_a_suffix_reading_is_taken_only_where_it_traces_shallower(pattern, expected):
    plan = trace_plan(_signatures(pattern), len(pattern))
    assert plan == expected
    periodic = _periodic_plan(_layer_keys(_signatures(pattern)), len(pattern))
    if plan.pattern.suffix_layers:
        assert periodic.depths is None or plan.depths[1] < periodic.depths[1]
    else:
        assert plan == periodic
    # Both traces keep every kind of layer, each block layer twice in the low one.
    s, p, t = plan.pattern.prefix_layers, plan.pattern.period, plan.pattern.suffix_layers
    low, high = plan.depths
    for layers in (low, high):
        kept = "".join(pattern[i] for i in kept_layers(len(pattern), layers, t))
        assert set(kept) == set(pattern)
        assert kept[layers - t:] == pattern[len(pattern) - t:]  # the real last layers
    low_kept = "".join(pattern[i] for i in kept_layers(len(pattern), low, t))
    assert all(low_kept.count(kind) >= 2 for kind in pattern[s:s + p])


def test_the_truncated_config_keeps_the_last_layers_and_renumbers_index_lists():
    assert kept_layers(10, 5, 1) == [0, 1, 2, 3, 9]
    assert kept_layers(10, 5) == [0, 1, 2, 3, 4]
    config = make_config("llama", num_hidden_layers=10, num_kv_shared_layers=3,
                         moe_layers=[1, 4, 9], no_rope_layers=[1, 1, 1, 0] * 2 + [0, 1])
    shallow = _with_layers(config, 5, suffix=1)
    assert shallow.num_hidden_layers == 5
    assert shallow.no_rope_layers == [1, 1, 1, 0, 1]
    assert shallow.moe_layers == [1, 4]  # layer 9 is the fifth kept
    assert shallow.num_kv_shared_layers == 1  # of layers 7, 8, 9 only 9 is kept
    # Without a suffix, the first layers, as before.
    first = _with_layers(config, 5)
    assert (first.no_rope_layers, first.moe_layers, first.num_kv_shared_layers) == \
        ([1, 1, 1, 0, 1], [1, 4], 0)
    nemotron = make_config("nemotron_h", layers_block_type=TINY_KINDS)
    kinds = list(nemotron.layers_block_type)  # as the config names them
    assert _with_layers(nemotron, 8, suffix=1).layers_block_type == kinds[:7] + kinds[-1:]
    assert num_layers(_with_layers(nemotron, 8, suffix=1)) == 8


def test_segment_keys_name_the_suffix_and_the_block_tops_alike_at_every_depth():
    pattern = LayerPattern(0, 3, 1)

    def named(depth: int) -> dict[str, int]:
        return {key: index for index in range(depth)
                for key in segment_keys(index, depth, pattern) if not key.endswith("middle")}

    assert segment_keys(19, 20, pattern) == ("suffix0",)
    assert segment_keys(18, 20, pattern) == ("block0-top",)  # the partial block
    assert segment_keys(17, 20, pattern) == ("block2-top",)
    assert segment_keys(3, 20, pattern) == ("block0-middle",)
    shallow, deeper, whole = named(8), named(11), named(20)
    assert set(shallow) == set(deeper) == set(whole)
    # Each part is the same layer of the stack at every depth, counted from the end for
    # the tops and the suffix, from the start for the bottoms.
    for key in whole:
        if key.endswith("bottom"):
            assert shallow[key] == deeper[key] == whole[key]
        else:
            assert 8 - shallow[key] == 11 - deeper[key] == 20 - whole[key]


@pytest.fixture(scope="module")
def tiny_nemotron_h():
    config = make_config("nemotron_h", layers_block_type=TINY_KINDS)
    inventory = take_inventory(build_meta_model(copy.deepcopy(config)))
    plan = trace_plan(layer_signatures(inventory, config), num_layers(config))
    return config, inventory, plan


@pytest.mark.parametrize("seq_len", [32, 64])
@pytest.mark.parametrize("mode", ["inference", "lora", "full"])
def test_the_extrapolated_suffix_stack_equals_its_whole_trace(tiny_nemotron_h, mode, seq_len):
    config, inventory, plan = tiny_nemotron_h
    assert plan == TracePlan(LayerPattern(0, 3, 1), (8, 11))
    workload = make_workload(mode, config, batch=1, seq_len=seq_len)

    def planned(depth_plan: TracePlan):
        return workload_components(inventory, workload, "bf16", "bfloat16", config=config,
                                   depth_plan=depth_plan)

    extrapolated = planned(plan)
    whole = planned(TracePlan(HOMOGENEOUS, None))
    assert extrapolated.traced_layers == (8, 11) and whole.traced_layers == (20,)
    assert extrapolated.components == whole.components
    assert extrapolated.peak_allocated_bytes == whole.peak_allocated_bytes
    # The suffix layer's part of each phase is extrapolated on its own line.
    assert any(key.endswith(":suffix0") for key in extrapolated.phase_peaks)


def test_the_suffix_traces_are_the_same_on_the_reference_path(tiny_nemotron_h):
    from qplan.planner import reuse

    config, inventory, plan = tiny_nemotron_h
    workload = make_workload("lora", config, batch=1, seq_len=32)

    def planned():
        return workload_components(inventory, workload, "bf16", "bfloat16", config=config,
                                   depth_plan=plan)

    fast = planned()
    with reuse.disabled():
        reference = planned()
    assert fast.components == reference.components
    assert fast.peak_allocated_bytes == reference.peak_allocated_bytes
    assert fast.phase_peaks == reference.phase_peaks


def _config_paths() -> list[str]:
    """The shared configs (where this machine has them) and the catalog's, less the files
    beside them that are not a model's config (a checkpoint's hf_quant_config.json)."""
    shared = sorted(glob.glob(os.path.join(SHARED_CONFIGS, "*.json")))
    catalog = sorted(glob.glob(os.path.join(ROOT, "profiles", "models", "*__*.json")))
    paths = []
    for path in shared + catalog:
        with open(path) as handle:
            if "model_type" in json.load(handle):
                paths.append(path)
    return paths


def test_only_nemotron_h_reads_a_suffix_among_the_real_configs():
    # The catalog holds Nemotron-H-56B too: the test runs where the shared configs are not.
    from qplan.api import resolve

    suffixed = {}
    for path in _config_paths():
        spec = resolve(path, None, False)
        inventory = take_inventory(build_meta_model(copy.deepcopy(spec.config)))
        signatures = layer_signatures(inventory, spec.config)
        depth = num_layers(spec.config)
        plan = trace_plan(signatures, depth)
        if signatures is None:
            continue
        if plan != _periodic_plan(_layer_keys(signatures), depth):
            suffixed[os.path.basename(path)] = plan
    assert suffixed == {NEMOTRON_H_56B: TracePlan(LayerPattern(0, 11, 1), (30, 41))}
