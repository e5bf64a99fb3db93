"""transformers' own registry of generative architectures, planned in every mode.

bench/arch_matrix.py runs every model_type transformers registers with a causal-LM or
image-text-to-text class and commits the table (bench/arch_matrix.md); this runs the same
function on one model_type of each family, so the suite stays fast: each mode plans, or
gets a one-line refusal that says why, never a crash.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))

from arch_matrix import MODES, plan_model_type, registry_model_types

# dense, state-space, hybrid Mamba/attention, MoE, multi-head latent attention,
# vision-language, an encoder family whose registered causal class is planned, the causal
# decoder of an encoder-decoder family (BART), a class without activation checkpointing
# (CTRL) and a vision model that has no text-only step (BLIP, refused).
SUBSET = ("llama", "mamba2", "zamba2", "qwen3_moe", "deepseek_v2", "paligemma", "bert",
          "bart", "ctrl", "blip")


def test_the_registry_is_transformers_own():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = registry_model_types()
    assert set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) <= set(types)
    assert set(SUBSET) <= set(types)


@pytest.mark.parametrize("model_type", SUBSET)
def test_registry_subset_plans_or_refuses_in_every_mode(model_type):
    row = plan_model_type(model_type, timeout_s=120)
    for mode in MODES:
        assert row[mode] == "ok" or row[mode].startswith("refused: "), (mode, row[mode])


def test_the_committed_matrix_has_no_crash():
    path = Path(__file__).parents[1] / "bench" / "arch_matrix.md"
    if not path.exists():
        pytest.skip("bench/arch_matrix.md not written yet: run python bench/arch_matrix.py")
    table = path.read_text()
    assert "| crashed | 0 |" in table
    assert "CRASH" not in table.split("| model_type |", 1)[1]
