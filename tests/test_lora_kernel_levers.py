"""Axolotl's LoRA kernels (lora_mlp_kernel / lora_qkv_kernel / lora_o_kernel).

Axolotl's LoRA_MLP / LoRA_QKV / LoRA_O autograd Functions need a GPU where they call
Triton (the SwiGLU / GeGLU activations) or bitsandbytes' CUDA dequantisation:
planner/lora_kernels.py runs their PyTorch code (what they allocate, save and write in
place) with those parts' arithmetic in PyTorch; checked here for peft's own loss and
gradients and for the trace against real CPU steps of LoRA and QLoRA.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
import yaml
from transformers import AutoConfig
from typer.testing import CliRunner

from qplan.api import estimate, make_workload
from qplan.cli import app
from qplan.errors import UsageError
from qplan.loaders.axolotl import read_axolotl
from qplan.loaders.measure import measure
from qplan.planner.emit import emit_axolotl, estimate_kwargs_of
from qplan.report import load_schema

KERNELS = dict(lora_mlp_kernel=True, lora_qkv_kernel=True, lora_o_kernel=True)
KERNEL_FLAGS = ["--lora-mlp-kernel", "--lora-qkv-kernel", "--lora-o-kernel"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _write(tmp_path, text, name="config.yml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _peft_tiny(arch, dropout=0.0):
    from peft import LoraConfig, get_peft_model
    from tiny_models import make_config
    from transformers import AutoModelForCausalLM

    if arch == "qwen3":  # its q_norm / k_norm attention: Axolotl's second QKV rewrite
        config = AutoConfig.for_model("qwen3", vocab_size=1000, hidden_size=96,
                                      intermediate_size=200, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=24, max_position_embeddings=256)
    else:
        config = make_config(arch, "float32")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random B (not peft's zeros) so every LoRA gradient is non-trivial.
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                        lora_dropout=dropout, init_lora_weights=False)
    return get_peft_model(model, config)


@pytest.mark.parametrize(("arch", "patched"), [("llama", (2, 2, 2)), ("qwen2", (2, 2, 2)),
                                               ("qwen3", (2, 2, 2))])
def test_kernels_compute_peft_loss_and_gradients(arch, patched):
    """The Functions' forward and hand-written backward against peft's LoRA layers."""
    from qplan.planner.lora_kernels import apply_lora_kernels

    model = _peft_tiny(arch)
    model.train()
    ids = torch.randint(0, 1000, (2, 24))
    reference = model(input_ids=ids, labels=ids).loss
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    done = apply_lora_kernels(model, True, True, True)
    assert (done.mlp, done.qkv, done.o) == patched and done.skipped == ()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.allclose(loss, reference, rtol=1e-6)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param.grad, expected[name], rtol=1e-4, atol=1e-6), name


def test_a_group_not_all_adapted_keeps_peft():
    """Axolotl's can_patch_* checks: Q/K/V needs all three adapted, the MLP all three."""
    from peft import LoraConfig, get_peft_model
    from tiny_models import make_config
    from transformers import AutoModelForCausalLM

    from qplan.planner.lora_kernels import apply_lora_kernels

    model = AutoModelForCausalLM.from_config(make_config("llama", "float32"))
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj",
                                                                  "o_proj", "up_proj"]))
    done = apply_lora_kernels(model, True, True, True)
    assert (done.mlp, done.qkv, done.o) == (0, 0, 2)
    assert set(done.skipped) == {"mlp", "qkv"}


STEPS = [
    # (mode, precision, options): the peak in the layers' backward (a small vocabulary),
    # with and without checkpointing, with LoRA dropout (its own X_drop saved).
    ("lora", "bf16", dict(seq_len=128)),
    ("lora", "bf16", dict(seq_len=64, gradient_checkpointing=False, lora_dropout=0.1)),
    ("qlora", "nf4", dict(seq_len=128, kbit_upcast=False)),
    ("qlora", "nf4-dq", dict(seq_len=64, gradient_checkpointing=False, kbit_upcast=False)),
]
GEMMA_STEP = ("qlora", "nf4", dict(seq_len=64, gradient_checkpointing=False,
                                   kbit_upcast=False))


@pytest.mark.parametrize(("arch", "mode", "precision", "options"),
                         [("llama", *step) for step in STEPS] + [("gemma", *GEMMA_STEP)])
def test_kernels_against_a_real_step(tiny_model_dir, arch, mode, precision, options):
    """Gemma: its GELU MLP through Axolotl's GeGLU kernel."""
    folder = tiny_model_dir(arch, vocab_size=64)
    config = AutoConfig.from_pretrained(folder)
    shape = dict(batch=2, lora_r=8, **options)
    predicted = estimate(str(folder), gpu="80GiB", mode=mode, precisions=precision,
                         target="cpu", **shape, **KERNELS).candidate(precision)
    measured = measure(config, make_workload(mode, config, **shape, **KERNELS), precision,
                       predicted.compute_dtype)
    assert predicted.peak_allocated_bytes == measured.peak_bytes
    assert predicted.components == {**measured.components,
                                    "cuda_context": predicted.components["cuda_context"]}
    plain = estimate(str(folder), gpu="80GiB", mode=mode, precisions=precision,
                     target="cpu", **shape).candidate(precision)
    # Saved: X (and X_drop), gate and up and the adapters cast to bf16, never the
    # activation or peft's per-projection intermediates: less than peft keeps.
    assert predicted.peak_allocated_bytes < plain.peak_allocated_bytes
    if not options.get("gradient_checkpointing", True):
        assert predicted.components["activations"] < plain.components["activations"]


def test_peft_upcast_fails_a_real_kernel_step(tiny_model_dir):
    """Why a 4-bit base needs --no-kbit-upcast: peft's float32 norms feed the kernels
    float32 inputs, and the matmul with the dequantised bf16 weight fails on a real step."""
    folder = tiny_model_dir("llama", vocab_size=64)
    config = AutoConfig.from_pretrained(folder)
    workload = make_workload("qlora", config, batch=1, seq_len=16, lora_r=8, **KERNELS)
    with pytest.raises(RuntimeError, match="same dtype"):
        measure(config, workload, "nf4", "bfloat16")
    with pytest.raises(UsageError, match="--no-kbit-upcast"):
        estimate(str(folder), gpu="80GiB", mode="qlora", precisions="nf4", **KERNELS)


@pytest.mark.parametrize(("arch", "mode", "precisions", "kernels", "words"), [
    ("llama", "lora", "int8", KERNELS, "8-bit LoRA base"),
    ("llama", "full", "bf16", KERNELS, "use them with --mode lora or qlora"),
    # Attention classes Axolotl cannot rewrite (its assertion fails the run).
    ("gpt2", "lora", "bf16", KERNELS, "Original QKV code not found"),
    # Llama 4 is planned as the text class transformers 5.24 runs (llama4_text), whose
    # attention Axolotl does not import either way.
    ("llama4", "lora", "bf16", KERNELS, "could not import attention class"),
    # Axolotl's get_layers finds no model.layers on GPT-2 (NotImplementedError).
    ("gpt2", "lora", "bf16", dict(lora_mlp_kernel=True), "no decoder layers"),
])
def test_refused_where_axolotl_refuses(tiny_model_dir, arch, mode, precisions, kernels,
                                       words):
    with pytest.raises(UsageError, match=words):
        estimate(str(tiny_model_dir(arch)), gpu="80GiB", mode=mode,
                 precisions=precisions, **kernels)


def test_lora_kernel_keys_round_trip(tiny_model_dir, tmp_path):
    plan = read_axolotl(_write(tmp_path, "base_model: m/x\nbf16: true\nadapter: qlora\n"
                                         "load_in_4bit: true\nlora_mlp_kernel: true\n"
                                         "lora_qkv_kernel: true\nlora_o_kernel: true\n"))
    assert all(plan.estimate_kwargs[k] is True for k in KERNELS)
    assert not plan.keys.not_modelled
    folder = tiny_model_dir("llama")
    result = CliRunner().invoke(app, ["estimate", str(folder), "--gpu", "80GiB", "--mode",
                                      "qlora", "--precisions", "nf4", "--batch", "2",
                                      "--seq-len", "32", "--no-kbit-upcast", *KERNEL_FLAGS,
                                      "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    jsonschema.validate(data, load_schema())
    assert all(data["workload"][k] is True for k in KERNELS)
    assert any("LoRA_MLP (SwiGLU) on 2 MLPs" in n for n in data["notes"])
    report = estimate(str(folder), gpu="80GiB", mode="qlora", precisions="nf4",
                      kbit_upcast=False, batch=2, seq_len=32, **KERNELS)
    text = emit_axolotl(report, "nf4")
    assert all(yaml.safe_load(text)[k] is True for k in KERNELS)
    again = read_axolotl(_write(tmp_path, text, "again.yml"))
    assert again.estimate_kwargs == estimate_kwargs_of(report, "nf4")
    assert again.keys.not_modelled == {}


def test_a_plan_without_kernels_emits_them_off(tiny_model_dir, tmp_path):
    """Axolotl 0.19 turns the kernels on for a LoRA YAML that leaves them unset; the
    emitted YAML says false so the run is the one planned."""
    report = estimate(str(tiny_model_dir("llama")), gpu="80GiB", mode="lora",
                      precisions="bf16", batch=1, seq_len=32)
    settings = yaml.safe_load(emit_axolotl(report, "bf16"))
    assert all(settings[k] is False for k in KERNELS)
    again = read_axolotl(_write(tmp_path, emit_axolotl(report, "bf16")))
    assert again.estimate_kwargs == estimate_kwargs_of(report, "bf16")


def test_kernels_in_trl_dpo(tiny_model_dir):
    """Axolotl patches the kernels into an rl run too (explicit keys): TRL's DPOTrainer,
    the reference pass with the adapter disabled (the kernels' A/B-less path). The plan
    is as far from the real run as without the kernels (TRL's loop holds the same few
    bytes the plan leaves out either way), well within 2%."""
    pytest.importorskip("trl")
    from preference_loops import dpo_peak
    from user_loops import lora_model

    from qplan.loaders.measure import random_model
    from qplan.planner.lora_kernels import apply_lora_kernels

    folder = tiny_model_dir("llama")
    config = AutoConfig.from_pretrained(folder)
    gaps = {}
    for kernels in (True, False):
        options = KERNELS if kernels else {}
        predicted = estimate(str(folder), gpu="80GiB", mode="dpo", precisions="bf16",
                             target="cpu", batch=2, seq_len=96, lora_r=8, adapter="lora",
                             gradient_checkpointing=False, **options).candidate("bf16")
        model = lora_model(random_model(config, "bf16", "bfloat16", "cpu", str(folder)), r=8,
                           quantized=False)
        if kernels:
            assert apply_lora_kernels(model, True, True, True).mlp == 2
        measured = dpo_peak(model, 2, 40, 55, loss_type="sigmoid", ref_model=None,
                            precompute=False, gradient_checkpointing=False)
        gaps[kernels] = predicted.peak_allocated_bytes - measured.peak_bytes
        assert abs(gaps[kernels]) <= 0.02 * measured.peak_bytes
    assert gaps[True] == gaps[False]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(("name", "act"), [("swiglu", "silu"), ("geglu", "gelu")])
def test_activations_match_axolotls_triton_kernels(monkeypatch, name, act, dtype):
    """Axolotl's own Triton activation kernels, run by Triton's CPU interpreter where
    both packages are installed (neither is a qplan dependency: skipped otherwise).
    Their wrappers allocate on "cuda" whatever the input, so the raw kernels are launched
    as the wrappers launch them. float16: bit for bit; float32: within an ulp (numpy's
    exp/erf in the interpreter). The interpreter cannot load bfloat16 (numpy has none)."""
    import importlib.util
    import sys
    import types

    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("axolotl") is None:
        pytest.skip("triton and axolotl are not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import triton

    from qplan.planner.lora_kernels import _glu_backward, _glu_forward

    # axolotl.kernels.op_registry imports Axolotl's logging (the whole package): a
    # stand-in registering nothing, as its own fallback does.
    registry = types.ModuleType("axolotl.kernels.op_registry")

    class _Unregistered:
        def __init__(self, fn):
            self.fn = fn

        def __call__(self, *args, **kwargs):
            return self.fn(*args, **kwargs)

        def register_fake(self, fn):
            return fn

    registry.register_kernel_op = lambda _name, mutates_args=(): _Unregistered
    monkeypatch.setitem(sys.modules, "axolotl.kernels.op_registry", registry)
    folder = importlib.util.find_spec("axolotl").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location(f"_axolotl_{name}",
                                                  f"{folder}/kernels/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    block = {"swiglu": "block_size", "geglu": "BLOCK_SIZE"}[name]
    torch.manual_seed(0)
    gate = torch.randn(2, 7, 37, dtype=dtype)
    up, grad = torch.randn_like(gate), torch.randn_like(gate)
    n = gate.numel()

    def grid(meta):
        return (triton.cdiv(n, 1024),)

    out = torch.empty_like(gate)
    getattr(module, f"_{name}_fwd_kernel")[grid](gate, up, out, n, **{block: 1024})
    theirs = (grad.clone(), gate.clone(), up.clone())
    getattr(module, f"_{name}_bwd_kernel")[grid](*theirs, n, **{block: 1024})
    ours = _glu_backward(grad.clone(), gate.clone(), up.clone(), act)
    pairs = [(out, _glu_forward(gate, up, act)), *zip(theirs, ours, strict=True)]
    for a, b in pairs:
        if dtype == torch.float16:
            assert torch.equal(a, b)
        else:
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
