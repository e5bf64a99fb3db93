"""A short property-based fuzz of ``qplan estimate`` (the long one is bench/fuzz.py): real
catalog configs shrunk and mutated, command lines at and past their limits. No traceback,
no hang, stdout always the report or the error JSON, a failure always one line with exit
1 or 2 (never an unexpected exit 3)."""

from __future__ import annotations

import pytest

pytest.importorskip("hypothesis")
pytest.importorskip("jsonschema")

from fuzz_inputs import check, command, config_text, seed_files, shrink
from hypothesis import HealthCheck, Phase, given, seed, settings

SEEDS = seed_files()


@seed(9)
@settings(max_examples=25, deadline=None, database=None, phases=[Phase.generate],
          suppress_health_check=list(HealthCheck))
@given(config=config_text(SEEDS), args=command(fast=True))
def test_fuzzed_configs_and_options(tmp_path_factory, config, args):
    name, text = config
    outcome = check(text, args, tmp_path_factory.mktemp("fuzz"), bound_s=60)
    assert not outcome.problems, (name, args, outcome.problems, text[:500])


def test_shrink_keeps_layer_patterns_and_rotary_sections_consistent():
    """Nemotron-H takes its depth from its pattern string: the shrunk one keeps a layer of
    each kind; Qwen2-VL's rotary sections must add up to half the (tiny) head."""
    hybrid = shrink({"num_hidden_layers": 8, "hybrid_override_pattern": "M-M-M-M*",
                     "mtp_layers": list(range(8))})
    assert hybrid["num_hidden_layers"] == 3
    assert hybrid["hybrid_override_pattern"] == "M-*"
    assert hybrid["mtp_layers"] == [0, 1, 7]
    vl = shrink({"hidden_size": 3584, "num_attention_heads": 28, "num_hidden_layers": 28,
                 "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}})
    head_dim = vl["hidden_size"] // vl["num_attention_heads"]
    assert sum(vl["rope_scaling"]["mrope_section"]) * 2 == head_dim
