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


# --- RoPE and LayerNorm (Axolotl's liger_rope / liger_layer_norm) ----------------------

ROPE_LN = dict(liger_rope=True, liger_layer_norm=True)
VLM_SHAPE = dict(batch=2, seq_len=96, images=2, lora_r=8)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _same_loss_and_gradients(model, run, **kernels) -> dict[str, int]:
    """transformers' loss and gradients, then Liger's kernels swapped in: the same."""
    from qplan.planner.liger_kernels import apply_liger_kernels

    reference = run()
    reference.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    counts = apply_liger_kernels(model, False, False, **kernels)
    loss = run()
    loss.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=0)
    got = _grads(model)
    assert got.keys() == expected.keys()
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    return counts


@pytest.mark.parametrize(("arch", "attentions"), [("llama", 2), ("qwen2", 2), ("gemma", 2),
                                                  ("gemma3", 20), ("mixtral", 2)])
def test_rope_computes_transformers_loss_and_gradients(arch, attentions):
    """liger_rotary_pos_emb in place of each family's apply_rotary_pos_emb (rotated in
    place, the backward too); these decoders have no LayerNorm, so none is swapped."""
    from tiny_models import make_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(arch, "float32"), dtype=torch.float32)
    model.gradient_checkpointing_enable()  # the recompute calls Liger's RoPE again
    model.train()
    ids = torch.randint(0, 1000, (2, 40))
    counts = _same_loss_and_gradients(model, lambda: model(input_ids=ids, labels=ids).loss,
                                      rope=True, layer_norm=True)
    assert counts == {"rms_norm": 0, "swiglu": 0, "rope": attentions, "layer_norm": 0}


def _gemma3_vlm_batch(config):
    tokens = config.mm_tokens_per_image
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.image_token_index, (2, 48), generator=generator)
    ids[:, 1:1 + tokens] = config.image_token_index
    side = config.vision_config.image_size
    pixels = torch.rand((2, 3, side, side), generator=generator)
    labels = ids.masked_fill(ids == config.image_token_index, -100)
    return dict(input_ids=ids, pixel_values=pixels, labels=labels,
                token_type_ids=(ids == config.image_token_index).long())


def test_layer_norm_computes_transformers_loss_and_gradients():
    """Gemma 3's vision-language model: Liger's gemma3 patch rebinds nn.LayerNorm (SigLIP's
    two per layer and the post-layernorm) and the text model's RoPE."""
    from tiny_models import make_config
    from transformers import AutoModelForImageTextToText

    config = make_config("gemma3_vlm", "float32")
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    batch = _gemma3_vlm_batch(config)
    counts = _same_loss_and_gradients(model, lambda: model(**batch).loss, rope=True,
                                      layer_norm=True)
    assert counts == {"rms_norm": 0, "swiglu": 0, "rope": 2, "layer_norm": 5}


@pytest.mark.parametrize(("mode", "precision"), [("lora", "bf16"), ("full", "bf16"),
                                                 ("qlora", "nf4")])
def test_rope_against_a_real_step(tiny_model_dir, mode, precision):
    """Llama with Liger's RoPE (and the LayerNorm flag, which changes nothing on a Llama:
    the plan says so): peak and components exact against the real CPU step."""
    folder = tiny_model_dir("llama")
    config = AutoConfig.from_pretrained(folder)
    options = dict(SHAPE, **ROPE_LN)
    report = estimate(str(folder), gpu="80GiB", mode=mode, precisions=precision,
                      target="cpu", **options)
    predicted = report.candidate(precision)
    measured = measure(config, make_workload(mode, config, **options), precision,
                       predicted.compute_dtype)
    assert predicted.peak_allocated_bytes == measured.peak_bytes
    assert predicted.components == {**measured.components,
                                    "cuda_context": predicted.components["cuda_context"]}
    assert any("liger_layer_norm" in note and "llama" in note for note in report.notes)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_layer_norm_against_a_real_step_with_images(tiny_model_dir, mode):
    """Gemma 3 with images: SigLIP's LayerNorms as Liger's (trained under full fine-tuning:
    float32 partial weight and bias gradients), with RoPE, RMSNorm and GeGLU flags."""
    folder = tiny_model_dir("gemma3_vlm")
    config = AutoConfig.from_pretrained(folder)
    for options in (dict(VLM_SHAPE, liger_layer_norm=True),
                    dict(VLM_SHAPE, **ROPE_LN, **LIGER)):
        predicted = estimate(str(folder), gpu="80GiB", mode=mode, precisions="bf16",
                             target="cpu", **options).candidate("bf16")
        measured = measure(config, make_workload(mode, config, **options), "bf16",
                           predicted.compute_dtype)
        assert predicted.peak_allocated_bytes == measured.peak_bytes, options
        assert predicted.components == {**measured.components,
                                        "cuda_context": predicted.components["cuda_context"]}


@pytest.mark.parametrize(("arch", "needle"), [("llama4", "Llama 4 RoPE"),
                                              ("qwen2_5_vl", "multimodal RoPE")])
def test_rope_liger_does_not_model_is_refused(tiny_model_dir, arch, needle):
    """Families whose liger_rope is another kernel: refused in one line, not planned wrong."""
    from test_cli import assert_one_line_error
    from test_cli import estimate as cli_estimate

    result = cli_estimate(str(tiny_model_dir(arch)), "--gpu", "80GiB", "--mode", "lora",
                          "--precisions", "bf16", "--seq-len", "64", "--liger-rope")
    assert_one_line_error(result, 2, needle)


def test_rope_and_layer_norm_are_training_kernels(tiny_model_dir):
    from qplan.errors import UsageError

    with pytest.raises(UsageError, match="--liger-rope / --liger-layer-norm"):
        estimate(str(tiny_model_dir("llama")), gpu="80GiB", mode="inference",
                 precisions="bf16", liger_rope=True)


@pytest.mark.parametrize(("keys", "arch", "mode", "precision", "flags", "options"), [
    ({"liger_rms_norm": "liger_rms_norm", "liger_glu_activation": "liger_glu"}, "llama",
     "qlora", "nf4", ["--seq-len", "32", "--liger-rms-norm", "--liger-glu", "--fused-ce", "cce"],
     dict(fused_ce="cce", **LIGER, **SHAPE)),
    ({"liger_rope": "liger_rope", "liger_layer_norm": "liger_layer_norm"}, "gemma3_vlm",
     "lora", "bf16", ["--seq-len", "96", "--images", "2", "--liger-rope", "--liger-layer-norm"],
     dict(**ROPE_LN, **VLM_SHAPE)),
])
def test_liger_keys_round_trip(tiny_model_dir, tmp_path, keys, arch, mode, precision, flags,
                               options):
    """Each Liger key is read from the YAML, set by its CLI flag (schema-valid JSON), and
    written back by --emit axolotl with the plugin, reading back as the same plan."""
    yaml_keys = "".join(f"{key}: true\n" for key in keys)
    plan = read_axolotl(_write(tmp_path, "base_model: m/x\nbf16: true\nplugins:\n"
                                         "  - axolotl.integrations.liger.LigerPlugin\n"
                                         + yaml_keys))
    assert all(plan.estimate_kwargs[kwarg] for kwarg in keys.values())
    assert not plan.keys.not_modelled
    folder = tiny_model_dir(arch)
    result = CliRunner().invoke(app, ["estimate", str(folder), "--gpu", "80GiB", "--mode",
                                      mode, "--precisions", precision, "--batch", "2", *flags,
                                      "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    jsonschema.validate(data, load_schema())
    assert all(data["workload"][kwarg] for kwarg in keys.values())
    report = estimate(str(folder), gpu="80GiB", mode=mode, precisions=precision, **options)
    text = emit_axolotl(report, precision)
    assert "axolotl.integrations.liger.LigerPlugin" in text
    if options.get("fused_ce") == "cce":
        assert "CutCrossEntropyPlugin" in text
    again = read_axolotl(_write(tmp_path, text, "again.yml"))
    assert again.estimate_kwargs == estimate_kwargs_of(report, precision)
    assert all(again.estimate_kwargs[kwarg] for kwarg in keys.values())
    assert again.keys.not_modelled == {}


@pytest.mark.parametrize(("mode", "precision"), [("qlora", "nf4"), ("full", "bf16")])
def test_rope_with_the_other_levers_against_a_real_step(tiny_model_dir, mode, precision):
    """Axolotl's Liger example (llama-3/fft-8b-liger-fsdp.yaml) turns RoPE, RMSNorm, SwiGLU
    and the fused cross-entropy on with sample packing; with activation offloading too
    (test_offload_levers' combination, whose QLoRA peak moves by 64 KiB with the cyclic
    garbage collector, RoPE or not): resident parts and host memory exact, peak within 2%."""
    folder = tiny_model_dir("llama", vocab_size=6000)
    config = AutoConfig.from_pretrained(folder)
    for extra in (dict(gc_reentrant=False), dict(activation_offloading=True, gc_reentrant=True)):
        options = dict(SHAPE, sample_packing=True, fused_ce="liger", liger_rope=True, **LIGER,
                       **extra)
        predicted = estimate(str(folder), gpu="80GiB", mode=mode, precisions=precision,
                             target="cpu", **options).candidate(precision)
        measured = measure(config, make_workload(mode, config, **options), precision,
                           predicted.compute_dtype)
        error = (predicted.peak_allocated_bytes - measured.peak_bytes) / measured.peak_bytes
        assert abs(error) <= 0.02, (extra, error)
        for name in ("weights", "adapters"):
            assert predicted.components[name] == measured.components[name], name
        assert predicted.host_bytes == measured.host_bytes
        if not extra.get("activation_offloading"):
            assert predicted.peak_allocated_bytes == measured.peak_bytes


def test_axolotl_qwen_vl_liger_rope_default_is_warned(tiny_model_dir, tmp_path):
    """Axolotl's plugin passes rope=True for Qwen-VL when liger_rope is unset (its multimodal
    RoPE kernel, not modelled): planned with transformers' RoPE and a warning; set to false,
    nothing to warn about; set to true, refused in one line."""
    from qplan.api import estimate_axolotl
    from qplan.errors import UsageError

    folder = tiny_model_dir("qwen2_5_vl")
    head = (f"base_model: {folder}\nbf16: true\nadapter: lora\nlora_r: 8\n"
            "lora_target_linear: true\nsequence_len: 64\nmicro_batch_size: 2\nplugins:\n"
            "  - axolotl.integrations.liger.LigerPlugin\nliger_rms_norm: true\n"
            # Axolotl's auto-enabled LoRA kernels find no Qwen-VL attention class to rewrite.
            "lora_mlp_kernel: false\nlora_qkv_kernel: false\nlora_o_kernel: false\n")
    report = estimate_axolotl(str(_write(tmp_path, head, "unset.yml")), gpu="80GiB",
                              precisions="bf16", target="cpu")
    assert any(w.startswith("liger_rope: Axolotl's Liger plugin turns Liger's RoPE on for "
                            "qwen2_5_vl") for w in report.warnings)
    off = estimate_axolotl(str(_write(tmp_path, head + "liger_rope: false\n", "off.yml")),
                           gpu="80GiB", precisions="bf16", target="cpu")
    assert not any("liger_rope" in w for w in off.warnings)
    assert off.candidate("bf16").peak_allocated_bytes == \
        report.candidate("bf16").peak_allocated_bytes
    with pytest.raises(UsageError, match="multimodal RoPE"):
        estimate_axolotl(str(_write(tmp_path, head + "liger_rope: true\n", "on.yml")),
                         gpu="80GiB", precisions="bf16", target="cpu")
    # A Llama under the same plugin: nothing to warn about.
    llama = head.replace(str(folder), str(tiny_model_dir("llama")))
    plain = estimate_axolotl(str(_write(tmp_path, llama, "llama.yml")), gpu="80GiB",
                             precisions="bf16", target="cpu")
    assert not any("liger_rope" in w for w in plain.warnings)
