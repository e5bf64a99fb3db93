"""Axolotl's own example YAMLs (tests/data/axolotl-examples, SOURCES.md there), each planned
through ``qplan estimate --axolotl FILE --gpu H100 --json`` in-process, offline.

Every example's base model resolves offline (the catalog or tests/data/model-configs); the
plan runs on that model cut to 2 decoder layers at 64 tokens (1024 with images) so the suite
stays fast (bench/axolotl_examples.py plans them in full, bench/results/axolotl_examples.md).
Each one either plans, with every key of the file accounted for and each key qplan could not
model listed and warned about, or is refused in one deliberate line, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from qplan.api import resolve
from qplan.loaders.axolotl import READ_KEYS
from qplan.loaders.axolotl_keys import NOT_MODELLED
from qplan.report import load_schema

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))

from axolotl_examples import (
    EXAMPLES,
    base_model_of,
    config_at_hand,
    examples,
    run_example,
    shrunk_model,
    shrunk_seq_len,
)

PATHS = examples()
# Refused on purpose, with the reason's words: what Axolotl itself would hit, or a step
# qplan cannot trace (each is one line naming the fix).
REFUSED = {
    # peft has no IA3 planning in qplan: only lora, qlora or none.
    # Axolotl 0.19 has no ia3 adapter (load_adapter raises NotImplementedError).
    "llama-2/ia3.yml": "adapter 'ia3' is not one of Axolotl 0.19's built-in adapters",
    # Axolotl 0.19 turns the LoRA kernels on for this LoRA YAML (it leaves them unset)
    # and, before the model loads, finds no LlavaAttention to rewrite: the run fails
    # there (axolotl/monkeypatch/lora_kernels.py:229), before peft would match nothing
    # with its regex written for transformers 4's module names.
    "llava/lora-7b.yaml": "could not import attention class",
    # The same: transformers (5.16.1, Axolotl's pin, as 5.24) maps no causal-LM class to
    # qwen2_5_vl, so Axolotl looks for Qwen25VlAttention, which does not exist.
    "qwen2_5-vl/lora-7b.yaml": "could not import attention class",
    # lora_*_kernel with load_in_8bit: Axolotl 0.19's check_lora_kernels_8bit refuses it.
    "llama-3/lora-8b-kernels.yml": "8-bit LoRA base",
}


def test_the_examples_are_there():
    assert len(PATHS) == 37
    assert set(REFUSED) <= {str(p.relative_to(EXAMPLES)) for p in PATHS}


@pytest.mark.parametrize("path", PATHS, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_every_base_model_resolves_offline(path):
    """The YAML's own base_model (or its config in tests/data) is at hand offline."""
    base = base_model_of(path)
    spec = resolve(config_at_hand(base) or base, None, False)
    assert spec.source in ("catalog", "path")


@pytest.mark.parametrize("path", PATHS, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_example_plans_or_is_refused_in_one_line(path, tmp_path):
    name = str(path.relative_to(EXAMPLES))
    model = shrunk_model(base_model_of(path), tmp_path)
    run = run_example(path, "H100", model, ("--seq-len", str(shrunk_seq_len(path))))
    assert "Traceback" not in run.output
    if name in REFUSED:
        assert run.exit_code in (1, 2), run.output
        assert run.refusal is not None and REFUSED[name] in run.refusal, run.output
        return
    assert run.exit_code == 0, run.output
    report = run.report
    jsonschema.validate(report, load_schema())
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    block = report["axolotl"]
    unmodelled = [entry["key"] for entry in block["not_modelled"]]
    # Every key of the file is accounted for, once.
    every = [*block["read"], *unmodelled, *block["ignored"], *block["unknown"]]
    assert sorted(every) == sorted(raw), name
    # Axolotl's examples hold no key qplan has not classified.
    assert block["unknown"] == [], name
    # Each key that changes memory in a way qplan does not model, when the file sets it,
    # is listed and warned about by name.
    asked = {k for k, v in raw.items()
             if k in NOT_MODELLED and k not in READ_KEYS and v not in (None, False, "", [], {})}
    assert asked <= set(unmodelled), name
    for key in unmodelled:
        assert any(f"axolotl key {key}:" in w for w in report["warnings"]), key
    assert report["workload"]["seq_len"] == shrunk_seq_len(path)
