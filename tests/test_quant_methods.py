"""The quantisation method registry: the table drives choices, and kwargs round-trip.

The recommendation's JSON kwargs and the report's workload must load exactly what was
planned: a real ``from_pretrained`` with them has the planned bytes.
"""

from __future__ import annotations

import torch
import transformers

from qplan.api import MODE_PRECISIONS, estimate
from qplan.loaders.loading import load_kwargs
from qplan.loaders.resident import resident_bytes
from qplan.loading import report_from_dict
from qplan.planner.decide import AGGRESSIVENESS, DEFAULT_CHOICES
from qplan.planner.precision import PRECISION_NAMES, PRECISIONS
from qplan.report import report_dict

SKIPS = ["lm_head", "down_proj"]


def test_table_gives_the_documented_orders():
    plain = [p for p in AGGRESSIVENESS if p in PRECISION_NAMES]
    assert plain == ["fp32", "bf16", "fp16", "int8", "nf4", "fp4", "nf4-dq", "fp4-dq"]
    # FP8 (on compute capability 8.9+) sits between bf16 and int8.
    assert AGGRESSIVENESS.index("bf16") < AGGRESSIVENESS.index("fp8") < AGGRESSIVENESS.index(
        "int8")
    assert DEFAULT_CHOICES == ("bf16", "fp16", "int8", "nf4", "nf4-dq")
    # For any checkpoint (rows planned only for checkpoints stored in them aside).
    assert {m: tuple(n for n in names if not PRECISIONS[n].stored_only)
            for m, names in MODE_PRECISIONS.items()} == {
        "full": ("fp32", "bf16", "fp16"),
        "qlora": ("fp4", "nf4", "fp4-dq", "nf4-dq"),
    }
    # QLoRA also trains on 4-bit GPTQ / AWQ checkpoints (peft's GPTQ / AWQ LoRA layers).
    assert {"gptq", "awq"} <= set(MODE_PRECISIONS["qlora"])
    assert all(PRECISIONS[n].method.name == "bitsandbytes"
               for n in MODE_PRECISIONS["qlora"] if not PRECISIONS[n].stored_only)


def _json_config(fields: dict) -> transformers.BitsAndBytesConfig:
    typed = {
        k: getattr(torch, v) if k in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage") else v
        for k, v in fields.items()
    }
    return transformers.BitsAndBytesConfig(**typed)


def test_recommended_json_kwargs_load_what_was_planned(tiny_model_dir):
    """quant_storage and skip_modules shape the plan, so the JSON kwargs must carry them."""
    folder = str(tiny_model_dir("llama"))
    report = estimate(folder, gpu="24GiB", mode="load", precisions="nf4",
                      quant_storage="bfloat16", skip_modules=SKIPS)
    rec = report.recommendation
    quant = rec.load_kwargs["quantization_config"]
    assert quant["bnb_4bit_quant_storage"] == "bfloat16"
    assert quant["llm_int8_skip_modules"] == SKIPS
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=getattr(torch, rec.load_kwargs["dtype"]),
        quantization_config=_json_config(quant), device_map="cpu",
    )
    assert resident_bytes(model).bytes == report.candidate("nf4").weights_bytes
    # Without the skip list the plan (and the load) would differ: the list mattered.
    plain = estimate(folder, gpu="24GiB", mode="load", precisions="nf4", quant_storage="bfloat16")
    assert plain.candidate("nf4").weights_bytes != report.candidate("nf4").weights_bytes


def test_report_round_trip_keeps_skip_modules_and_storage(tiny_model_dir):
    folder = str(tiny_model_dir("llama"))
    report = estimate(folder, gpu="24GiB", mode="load", precisions="int8,nf4-dq",
                      quant_storage="bfloat16", skip_modules=SKIPS)
    data = report_dict(report)
    assert data["workload"]["skip_modules"] == SKIPS
    again = report_from_dict(data)
    for precision in ("int8", "nf4-dq"):
        kwargs = load_kwargs(again, again.candidate(precision), "cpu")
        config = kwargs["quantization_config"]
        assert config.llm_int8_skip_modules == SKIPS
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        assert resident_bytes(model).bytes == report.candidate(precision).weights_bytes
    assert load_kwargs(again, again.candidate("nf4-dq"), "cpu")[
        "quantization_config"].bnb_4bit_quant_storage == torch.bfloat16


def test_quantised_plan_keeps_stderr_clean(tiny_model_dir):
    """transformers imports torchao's quantiser (and so torchao) with any model class when
    torchao is installed; its platform chatter must not reach a plan's stderr."""
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "qplan", "estimate", str(tiny_model_dir("llama")), "--gpu",
         "24GiB", "--mode", "load", "--precisions", "nf4", "--json"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
