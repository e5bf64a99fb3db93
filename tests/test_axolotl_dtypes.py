"""Axolotl's dtypes for LoRA on a k-bit base: after peft's prepare_model_for_kbit_training
(everything 16-bit and unquantised upcast to float32), Axolotl's loader casts every module
with "norm" in its name and its embedding modules back to the load dtype
(src/axolotl/loaders/model.py, _configure_embedding_dtypes / _convert_embedding_modules_dtype,
0.19.0), ``embeddings_skip_upcast`` or not. ``--no-kbit-upcast`` (what ``--axolotl`` plans)
does the same; checked on a real CPU load and against real steps."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from qplan.api import estimate, make_workload
from qplan.loaders.axolotl import read_axolotl
from qplan.loaders.measure import measure, random_model
from qplan.planner.training_setup import prepare_for_training

SHAPE = dict(batch=2, seq_len=32, lora_r=4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_norms_and_embeddings_back_in_bf16(tiny_model_dir, arch):
    """Untied (llama) and tied (qwen2) embeddings: norms, embed_tokens and lm_head in the
    load dtype; biases (qwen2's q/k/v) stay float32, adapters float32."""
    folder = tiny_model_dir(arch)
    config = AutoConfig.from_pretrained(folder)
    model = random_model(config, "nf4", "bfloat16", "cpu", str(folder))
    workload = make_workload("qlora", config, kbit_upcast=False, **SHAPE)
    model = prepare_for_training(model, workload, True)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if "norm" in n or "embed_tokens" in n
            or "lm_head" in n} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    biases = {d for n, d in dtypes.items() if n.endswith("proj.base_layer.bias")}
    assert biases == ({torch.float32} if arch == "qwen2" else set())


@pytest.mark.parametrize("precision", ["nf4", "int8"])
def test_cast_back_against_a_real_step(tiny_model_dir, precision):
    folder = tiny_model_dir("llama")
    config = AutoConfig.from_pretrained(folder)
    mode = "qlora" if precision == "nf4" else "lora"
    options = dict(SHAPE, kbit_upcast=False)
    predicted = estimate(str(folder), gpu="80GiB", mode=mode, precisions=precision,
                         target="cpu", **options).candidate(precision)
    measured = measure(config, make_workload(mode, config, **options), precision,
                       predicted.compute_dtype, weights_dir=str(folder))
    assert predicted.peak_allocated_bytes == measured.peak_bytes
    assert predicted.components == {**measured.components,
                                    "cuda_context": predicted.components["cuda_context"]}
    upcast = estimate(str(folder), gpu="80GiB", mode=mode, precisions=precision,
                      target="cpu", **SHAPE).candidate(precision)
    # Embeddings (1000 x 96 twice, untied), 5 norms of 96: 2 bytes a value fewer.
    assert upcast.weights_bytes - predicted.weights_bytes == 0  # weights as loaded
    assert (upcast.components["weights"] - predicted.components["weights"]
            == 2 * (2 * 1000 * 96 + 5 * 96))


def test_axolotl_yaml_plans_the_cast_back(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("base_model: m/x\nadapter: qlora\nload_in_4bit: true\n"
                    "embeddings_skip_upcast: true\n")
    plan = read_axolotl(path)
    assert plan.estimate_kwargs["kbit_upcast"] is False
    assert "embeddings_skip_upcast" in plan.keys.read and not plan.keys.not_modelled
