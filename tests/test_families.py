"""Real Hub configs of every architecture family qplan meets, planned in every mode.

State-space (falcon-mamba), hybrid Mamba-2/attention (Nemotron-H), MoE (Mixtral, Qwen3-MoE,
Phi-3.5-MoE, Llama 4), multi-head latent attention (DeepSeek-V2-Lite), vision-language
(llava, Qwen2.5-VL, Gemma 3) and sliding-window (Mistral, Gemma 3) models, each cut to
its first 2 layers (or the first of each kind) and planned at a short sequence so the
suite stays fast: every mode plans every candidate. The precisions are one per distinct
trace (fp4 traces like nf4, fp16 like bf16), so every code path a candidate takes is run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from tiny_models import depth_with_every_layer_kind

from qplan.api import estimate, resolve
from qplan.planner.components import _with_layers, num_layers

CONFIGS = Path(__file__).parent / "data" / "model-configs"
FAMILIES = sorted(p.stem for p in CONFIGS.glob("*.json"))
PRECISIONS = {
    "load": None,  # every candidate; a load is not traced
    "inference": "bf16,int8,nf4-dq",
    "lora": "bf16,int8",
    "qlora": "nf4",
    "full": "bf16",
}
# The supervised modes; the preference modes (planner/workloads/dpo.py, ...) are tested
# against TRL's trainers in tests/test_preference.py.
MODES = tuple(PRECISIONS)


@pytest.fixture(scope="module")
def shrunk():
    cache = {}

    def get(name: str):
        if name not in cache:
            spec = resolve(str(CONFIGS / f"{name}.json"), None, False)
            small = _with_layers(spec.config, depth_with_every_layer_kind(spec.config))
            cache[name] = dataclasses.replace(spec, config=small)
        return cache[name]

    return get


def test_the_families_are_all_there():
    assert len(FAMILIES) == 11


# Llama 4 Scout plans its text class, Llama4ForCausalLM, while transformers'
# Llama4ForConditionalGeneration cannot run a forward (tests/test_llama4_text.py).


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_plans_in_every_mode(shrunk, name, mode):
    spec = shrunk(name)
    assert num_layers(spec.config) == depth_with_every_layer_kind(spec.config) <= 8
    report = estimate(spec, gpu="80GB", mode=mode, precisions=PRECISIONS[mode], batch=1,
                      seq_len=32, lora_r=8)
    assert report.candidates
    for candidate in report.candidates:
        assert candidate.weights_bytes > 0
        assert candidate.total_bytes >= candidate.weights_bytes
        if mode != "load":
            assert candidate.peak_allocated_bytes >= candidate.weights_bytes
        if mode in ("lora", "qlora"):
            assert candidate.components["adapters"] > 0
