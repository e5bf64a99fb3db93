"""Liger's RMSNorm and SwiGLU kernels (Axolotl's liger_rms_norm / liger_glu_activation).

Their Triton kernels need a GPU: planner/liger_kernels.py runs liger-kernel's PyTorch code
around them (what it allocates, saves and writes in place) with the kernels' arithmetic in
PyTorch; checked here for the loss and gradients of transformers' own modules and for the
trace against a real CPU step.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from transformers import AutoConfig
from typer.testing import CliRunner

from qplan.api import estimate, make_workload
from qplan.cli import app
from qplan.loaders.axolotl import read_axolotl
from qplan.loaders.measure import measure
from qplan.planner.emit import emit_axolotl, estimate_kwargs_of
from qplan.report import load_schema

SHAPE = dict(batch=2, seq_len=32, lora_r=8)
LIGER = dict(liger_rms_norm=True, liger_glu=True)


def _write(tmp_path, text, name="config.yml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(("arch", "swapped"), [("llama", {"rms_norm": 5, "swiglu": 2}),
                                               ("gemma", {"rms_norm": 5, "swiglu": 0})])
def test_kernels_compute_transformers_loss_and_gradients(arch, swapped):
    """Llama-style and Gemma-style (1 + w, everything in float32) norms; Gemma's GeGLU MLP
    is not a SwiGLU and stays as it is."""
    from tiny_models import make_config
    from transformers import AutoModelForCausalLM

    from qplan.planner.liger_kernels import apply_liger_kernels

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(arch, "float32"), dtype=torch.float32)
    ids = torch.randint(0, 1000, (2, 24))
    reference = model(input_ids=ids, labels=ids).loss
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    assert apply_liger_kernels(model, True, True) == swapped
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.allclose(loss, reference, rtol=1e-6)
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, expected[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize(("mode", "precision"), [("lora", "bf16"), ("full", "bf16"),
                                                 ("qlora", "nf4")])
def test_kernels_against_a_real_step(tiny_model_dir, mode, precision):
    folder = tiny_model_dir("llama")
    config = AutoConfig.from_pretrained(folder)
    options = dict(SHAPE, **LIGER)
    predicted = estimate(str(folder), gpu="80GiB", mode=mode, precisions=precision,
                         target="cpu", **options).candidate(precision)
    measured = measure(config, make_workload(mode, config, **options), precision,
                       predicted.compute_dtype)
    assert predicted.peak_allocated_bytes == measured.peak_bytes
    assert predicted.components == {**measured.components,
                                    "cuda_context": predicted.components["cuda_context"]}
    plain = estimate(str(folder), gpu="80GiB", mode=mode, precisions=precision, target="cpu",
                     **SHAPE).candidate(precision)
    # The norms save their input and a float32 row statistic, the MLP its two projections:
    # never more than transformers' modules keep.
    assert predicted.components["activations"] <= plain.components["activations"]


def test_liger_keys_round_trip(tiny_model_dir, tmp_path):
    plan = read_axolotl(_write(tmp_path, "base_model: m/x\nbf16: true\nplugins:\n"
                                         "  - axolotl.integrations.liger.LigerPlugin\n"
                                         "liger_rms_norm: true\nliger_glu_activation: true\n"))
    assert plan.estimate_kwargs["liger_rms_norm"] and plan.estimate_kwargs["liger_glu"]
    assert not plan.keys.not_modelled
    folder = tiny_model_dir("llama")
    result = CliRunner().invoke(app, ["estimate", str(folder), "--gpu", "80GiB", "--mode",
                                      "qlora", "--precisions", "nf4", "--batch", "2",
                                      "--seq-len", "32", "--liger-rms-norm", "--liger-glu",
                                      "--fused-ce", "cce", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    jsonschema.validate(data, load_schema())
    assert data["workload"]["liger_rms_norm"] and data["workload"]["liger_glu"]
    report = estimate(str(folder), gpu="80GiB", mode="qlora", precisions="nf4",
                      fused_ce="cce", **LIGER, **SHAPE)
    text = emit_axolotl(report, "nf4")
    assert "axolotl.integrations.liger.LigerPlugin" in text and "CutCrossEntropyPlugin" in text
    again = read_axolotl(_write(tmp_path, text, "again.yml"))
    assert again.estimate_kwargs == estimate_kwargs_of(report, "nf4")
    assert again.keys.not_modelled == {}
