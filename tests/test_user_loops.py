"""Predictions against the loops users run (tests/user_loops.py), not qplan's step code:
``model.generate`` for inference and transformers' ``Trainer`` for training, on CPU with
tiny random models, each peak within 2% of the plan for ``target="cpu"``."""

from __future__ import annotations

import pytest
from transformers import AutoConfig
from user_loops import (
    generate_peak,
    lora_model,
    record_counted_scans,
    record_repeats,
    trainer_peak,
)

from qplan.api import estimate
from qplan.loaders.measure import random_model

TOLERANCE = 0.02
# Two layers each; gemma3 and the Mistral-style model with one sliding-window layer (window
# 16) and one global layer, at a context six times the window.
ARCHS = {
    "llama": {},
    "qwen2": {},
    "gemma3": dict(num_hidden_layers=2, sliding_window=16,
                   layer_types=["sliding_attention", "full_attention"]),
    "mixtral": {},
    "deepseek_v3": dict(num_hidden_layers=2, first_k_dense_replace=1),
}
SWA = {
    "gemma3": ARCHS["gemma3"],
    "mistral": dict(model_type="mistral", architectures=["MistralForCausalLM"],
                    sliding_window=16),
}
BATCH, SEQ = 2, 96
# (mode, precision, gradient checkpointing): full fine-tuning without peft, LoRA on a bf16
# base, QLoRA on nf4 (bitsandbytes runs 4-bit on CPU).
TRAINING = [("full", "bf16", True), ("lora", "bf16", False), ("qlora", "nf4", True)]

pytestmark = pytest.mark.usefixtures("one_thread")


def plan(folder, mode, precision, **options):
    report = estimate(str(folder), gpu="80GiB", mode=mode, precisions=precision,
                      target="cpu", batch=BATCH, seq_len=SEQ, **options)
    return report.candidate(precision)


def sliding_layers(config) -> int:
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return sum(1 for kind in layer_types if kind == "sliding_attention")
    return config.num_hidden_layers


def assert_close(predicted: int, measured: int, what) -> None:
    error = (predicted - measured) / measured
    assert abs(error) <= TOLERANCE, (what, predicted, measured, f"{error:+.2%}")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_generate_peak(tiny_model_dir, arch):
    folder = tiny_model_dir(arch, **ARCHS[arch])
    config = AutoConfig.from_pretrained(folder)
    predicted = plan(folder, "inference", "bf16")
    model = random_model(config, "bf16", "bfloat16", "cpu", str(folder))
    measured = generate_peak(model, BATCH, SEQ)
    assert_close(predicted.peak_allocated_bytes, measured.peak_bytes, arch)
    assert predicted.components["kv_cache"] == measured.kv_cache_bytes


# Caches other than a decoder's DynamicCache: BART's causal decoder (its depth is
# decoder_layers, not num_hidden_layers) and RWKV's own recurrent state.
OTHER_CACHES = ("bart", "rwkv")


@pytest.mark.parametrize("arch", OTHER_CACHES)
def test_generate_peak_other_caches(tiny_model_dir, arch):
    folder = tiny_model_dir(arch)
    config = AutoConfig.from_pretrained(folder)
    predicted = plan(folder, "inference", "bf16")
    model = random_model(config, "bf16", "bfloat16", "cpu", str(folder))
    measured = generate_peak(model, BATCH, SEQ)
    assert_close(predicted.peak_allocated_bytes, measured.peak_bytes, arch)
    if measured.kv_cache_bytes:  # RWKV's state is no Cache for generate_peak to read
        assert predicted.components["kv_cache"] == measured.kv_cache_bytes
    else:
        assert predicted.components["kv_cache"] > 0


@pytest.mark.parametrize("arch", list(SWA))
def test_sliding_window_cache_after_the_prefill(tiny_model_dir, arch):
    """The prefill holds every layer's full keys and values (a sliding layer's cache is a
    window-sized view of them); decoding then leaves sliding layers with their window
    only. The peak is the prefill's, several decoded tokens later too."""
    overrides = SWA[arch]
    folder = tiny_model_dir(arch if arch != "mistral" else "llama", **overrides)
    config = AutoConfig.from_pretrained(folder)
    predicted = plan(folder, "inference", "bf16")
    model = random_model(config, "bf16", "bfloat16", "cpu", str(folder))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * BATCH * config.num_key_value_heads * head_dim * 2  # K and V, bf16
    full = per_token * SEQ * config.num_hidden_layers
    bookkeeping = 8 * sliding_layers(config)  # each sliding layer's window, a 0-d int64
    prefill = generate_peak(model, BATCH, SEQ, new_tokens=1)
    assert predicted.components["kv_cache"] == prefill.kv_cache_bytes == full + bookkeeping
    decoded = generate_peak(model, BATCH, SEQ, new_tokens=4)
    window = config.sliding_window
    sliding = sliding_layers(config)
    assert sliding >= 1
    # After decoding 4 tokens (the last one is not fed back), a sliding layer keeps
    # window tokens; a global one the prompt and 3 decoded tokens.
    global_layers = config.num_hidden_layers - sliding
    assert decoded.kv_cache_bytes == \
        per_token * (sliding * window + global_layers * (SEQ + 3)) + bookkeeping
    assert_close(predicted.peak_allocated_bytes, decoded.peak_bytes, arch)


@pytest.mark.parametrize(("arch", "mode", "precision", "gc"), [
    (arch, *case) for arch in ARCHS for case in TRAINING
    # LoRA on a bf16 base is QLoRA's loop without bitsandbytes: two architectures suffice.
    if case[0] != "lora" or arch in ("llama", "mixtral")
])
def test_trainer_peak(tiny_model_dir, arch, mode, precision, gc):
    """Trainer's defaults (fused AdamW, max_grad_norm 1.0, no autocast), two steps."""
    folder = tiny_model_dir(arch, **ARCHS[arch])
    config = AutoConfig.from_pretrained(folder)
    predicted = plan(folder, mode, precision, gradient_checkpointing=gc, lora_r=8)
    model = random_model(config, precision, "bfloat16", "cpu", str(folder))
    if mode != "full":
        model = lora_model(model, r=8, quantized=precision == "nf4")
    measured = trainer_peak(model, BATCH, SEQ, bf16=False, gradient_checkpointing=gc)
    assert_close(predicted.peak_allocated_bytes, measured.peak_bytes, (arch, mode))


@pytest.mark.parametrize(("arch", "gc"), [("llama", True), ("llama", False), ("qwen2", True)])
def test_trainer_peak_of_derived_double_quant_plans(tiny_model_dir, arch, gc):
    """QLoRA at nf4-dq, whose step is derived from nf4's recorded one
    (planner/derived_double_quant.py), against transformers' Trainer on a model
    bitsandbytes double-quantised (qwen2: biased layers, cast on the first forward)."""
    folder = tiny_model_dir(arch, **ARCHS[arch])
    config = AutoConfig.from_pretrained(folder)
    predicted = plan(folder, "qlora", "nf4-dq", gradient_checkpointing=gc, lora_r=8)
    model = lora_model(random_model(config, "nf4-dq", "bfloat16", "cpu", str(folder)), r=8,
                       quantized=True)
    measured = trainer_peak(model, BATCH, SEQ, bf16=False, gradient_checkpointing=gc)
    print(f"{arch} qlora nf4-dq gc={gc}: predicted {predicted.peak_allocated_bytes} "
          f"measured {measured.peak_bytes}")
    assert_close(predicted.peak_allocated_bytes, measured.peak_bytes, (arch, "nf4-dq", gc))


def test_trainer_peak_int8_moe_lora(tiny_model_dir):
    """LLM.int8 LoRA on a Mixtral (experts stay bf16 under bitsandbytes, upcast by peft's
    k-bit preparation, run through torch's _grouped_mm): transformers' Trainer."""
    folder = tiny_model_dir("mixtral")
    config = AutoConfig.from_pretrained(folder)
    predicted = plan(folder, "lora", "int8", gradient_checkpointing=True, lora_r=8,
                     lora_dropout=0.0)
    model = lora_model(random_model(config, "int8", "bfloat16", "cpu", str(folder)), r=8,
                       quantized=True)
    measured = trainer_peak(model, BATCH, SEQ, bf16=False, gradient_checkpointing=True)
    assert_close(predicted.peak_allocated_bytes, measured.peak_bytes, "mixtral int8 lora")


def test_trainer_peak_with_axolotls_lora_kernels(tiny_model_dir):
    """Axolotl's LoRA_MLP / LoRA_QKV / LoRA_O (as planner/lora_kernels.py runs them) put
    into a peft model, trained by transformers' Trainer."""
    from qplan.planner.lora_kernels import apply_lora_kernels

    folder = tiny_model_dir("llama")
    config = AutoConfig.from_pretrained(folder)
    predicted = plan(folder, "lora", "bf16", gradient_checkpointing=False, lora_r=8,
                     lora_dropout=0.0, lora_mlp_kernel=True, lora_qkv_kernel=True,
                     lora_o_kernel=True)
    model = lora_model(random_model(config, "bf16", "bfloat16", "cpu", str(folder)), r=8,
                       quantized=False)
    apply_lora_kernels(model, True, True, True)
    measured = trainer_peak(model, BATCH, SEQ, bf16=False, gradient_checkpointing=False)
    assert_close(predicted.peak_allocated_bytes, measured.peak_bytes, "lora kernels")


def test_trainer_peak_with_liger_rope_and_norms(tiny_model_dir):
    """Liger's RoPE, RMSNorm and SwiGLU (planner/liger_kernels.py) on a model that
    transformers' Trainer fine-tunes in full."""
    from qplan.planner.liger_kernels import DEFAULT_SMS, apply_liger_kernels

    folder = tiny_model_dir("llama")
    config = AutoConfig.from_pretrained(folder)
    predicted = plan(folder, "full", "bf16", gradient_checkpointing=True,
                     liger_rms_norm=True, liger_glu=True, liger_rope=True)
    model = random_model(config, "bf16", "bfloat16", "cpu", str(folder))
    apply_liger_kernels(model, True, True, sms=DEFAULT_SMS, rope=True)
    measured = trainer_peak(model, BATCH, SEQ, bf16=False, gradient_checkpointing=True)
    assert_close(predicted.peak_allocated_bytes, measured.peak_bytes, "liger")


# The bitsandbytes inference plans are derived from the bf16 step (planner/derived_traces.py),
# not traced: the real generate on a bitsandbytes-quantised model (bnb runs LLM.int8 and
# 4-bit layers on CPU) against the derived plan.
@pytest.mark.parametrize("precision", ["int8", "nf4", "nf4-dq"])
def test_generate_peak_of_derived_bitsandbytes_plans(tiny_model_dir, monkeypatch, precision):
    from qplan.planner import derived_traces

    derived = []
    real_derive = derived_traces.derive
    monkeypatch.setattr(derived_traces, "derive",
                        lambda *a, **k: derived.append(1) or real_derive(*a, **k))
    folder = tiny_model_dir("llama")
    config = AutoConfig.from_pretrained(folder)
    predicted = plan(folder, "inference", precision)
    assert derived, "the plan was traced, not derived"
    model = random_model(config, precision, "bfloat16", "cpu", str(folder))
    measured = generate_peak(model, BATCH, SEQ)
    assert_close(predicted.peak_allocated_bytes, measured.peak_bytes, precision)
    assert predicted.components["kv_cache"] == measured.kv_cache_bytes


@pytest.mark.parametrize(("mode", "precision"), [("qlora", "nf4"), ("full", "bf16")])
def test_trainer_peak_on_a_reused_prepared_model(tiny_model_dir, monkeypatch, mode, precision):
    """A plan at another batch size runs its step on the model the first plan prepared
    (planner/prepared_models.py, as --solve's probes do): against Trainer at that batch."""
    from qplan.planner import meta_models

    folder = tiny_model_dir("llama")
    config = AutoConfig.from_pretrained(folder)
    meta_models.clear()
    estimate(str(folder), gpu="80GiB", mode=mode, precisions=precision, target="cpu",
             batch=1, seq_len=SEQ, gradient_checkpointing=True, lora_r=8)
    taken = []
    real_take = meta_models.take
    monkeypatch.setattr(meta_models, "take",
                        lambda key: taken.append(real_take(key)) or taken[-1])
    predicted = estimate(str(folder), gpu="80GiB", mode=mode, precisions=precision,
                         target="cpu", batch=BATCH, seq_len=SEQ, gradient_checkpointing=True,
                         lora_r=8).candidate(precision)
    # A reused model comes back as (model, inventory, record); CHANGES_THE_MODEL or None
    # means the step was prepared afresh.
    assert any(isinstance(found, tuple) for found in taken), "the prepared model was not reused"
    model = random_model(config, precision, "bfloat16", "cpu", str(folder))
    if mode != "full":
        model = lora_model(model, r=8, quantized=True)
    measured = trainer_peak(model, BATCH, SEQ, bf16=False, gradient_checkpointing=True)
    assert_close(predicted.peak_allocated_bytes, measured.peak_bytes, mode)


# The second optimizer step's forward and backward are counted from the first's log
# (planner/repeated_steps.py), not run: Trainer's two real steps against such plans.
# qwen2 and falcon_mamba: biased 4-bit layers, whose first step casts each bias (planner/
# quant: first_forward_casts) and whose second step is counted without those casts.
@pytest.mark.parametrize(("arch", "mode", "precision", "gc"),
                         [("llama", "qlora", "nf4", True), ("llama", "lora", "bf16", False),
                          ("llama", "full", "bf16", False), ("llama", "lora", "int8", True),
                          ("qwen2", "qlora", "nf4", True), ("qwen2", "qlora", "nf4", False),
                          ("falcon_mamba", "qlora", "nf4", True)])
def test_trainer_peak_of_plans_whose_second_step_was_counted(tiny_model_dir, monkeypatch, arch,
                                                              mode, precision, gc):
    repeated = record_repeats(monkeypatch)
    folder = tiny_model_dir(arch)
    config = AutoConfig.from_pretrained(folder)
    report = estimate(str(folder), gpu="80GiB", mode=mode, precisions=precision,
                      target="cpu", batch=BATCH, seq_len=SEQ, gradient_checkpointing=gc,
                      lora_r=8)
    predicted = report.candidate(precision)
    assert repeated and all(repeated), "the second step was run, not counted"
    model = random_model(config, precision, "bfloat16", "cpu", str(folder))
    if mode != "full":
        model = lora_model(model, r=8, quantized=precision in ("nf4", "int8"),
                           exclude=report.workload.get("lora_exclude_modules"))
    measured = trainer_peak(model, BATCH, SEQ, bf16=False, gradient_checkpointing=gc)
    print(arch, mode, precision, predicted.peak_allocated_bytes, measured.peak_bytes,
          f"{(predicted.peak_allocated_bytes - measured.peak_bytes) / measured.peak_bytes:+.4%}")
    assert_close(predicted.peak_allocated_bytes, measured.peak_bytes, (mode, precision))


# State-space and hybrid models (Mamba-1's per-token scan, Nemotron-H's Mamba-2 chunks,
# attention and MLP layers), without mamba-ssm / causal-conv1d: the run their plans' note
# names (planner/kernel_fallbacks.py).
SSM_ARCHS = ("falcon_mamba", "nemotron_h")


@pytest.mark.parametrize("arch", SSM_ARCHS)
def test_state_space_models_against_generate_and_trainer(tiny_model_dir, monkeypatch, arch):
    counted = record_counted_scans(monkeypatch)
    folder = tiny_model_dir(arch)
    config = AutoConfig.from_pretrained(folder)
    report = estimate(str(folder), gpu="24GiB", mode="inference", precisions="bf16",
                      target="cpu", batch=BATCH, seq_len=SEQ)
    assert any("PyTorch code" in note for note in report.notes)
    model = random_model(config, "bf16", "bfloat16", "cpu", str(folder))
    measured = generate_peak(model, BATCH, SEQ)
    assert_close(report.candidate("bf16").peak_allocated_bytes, measured.peak_bytes, arch)
    assert_trainer_peaks(folder, config, (("full", "bf16", True), *TRAINING[1:]), arch)
    # Mamba-1's training plans counted their middle tokens (one node per scan).
    assert bool(counted) == (arch == "falcon_mamba")


def assert_trainer_peaks(folder, config, runs, what) -> None:
    """Each (mode, precision, checkpointing) of ``runs`` planned, then run by Trainer on
    the model the plan's kwargs describe."""
    for mode, precision, gc in runs:
        report = estimate(str(folder), gpu="24GiB", mode=mode, precisions=precision,
                          target="cpu", batch=BATCH, seq_len=SEQ, gradient_checkpointing=gc,
                          lora_r=8)
        model = random_model(config, precision, "bfloat16", "cpu", str(folder))
        if mode != "full":
            # The plan's lora_exclude_modules: peft refuses LoRA on Mamba's out_proj, and
            # an MoE router gets no adapters.
            model = lora_model(model, r=8, quantized=precision == "nf4",
                               exclude=report.workload.get("lora_exclude_modules"))
        measured = trainer_peak(model, BATCH, SEQ, bf16=False, gradient_checkpointing=gc)
        assert_close(report.candidate(precision).peak_allocated_bytes, measured.peak_bytes,
                     (what, mode))


# Phi-3.5-MoE's real config scales LongRoPE by a factor its rotary embedding picks from a
# position id's value (planner/longrope_scale.py); the tiny model runs past its
# original_max_position_embeddings (64 < SEQ), as the real one does past 4,096 tokens.
LONGROPE = dict(
    original_max_position_embeddings=64,
    rope_scaling={"type": "longrope", "long_factor": [1.5] * 8, "short_factor": [1.0] * 8,
                  "long_mscale": 1.2, "short_mscale": 1.1,
                  "original_max_position_embeddings": 64},
)


def test_longrope_phimoe_against_generate_and_trainer(tiny_model_dir):
    folder = tiny_model_dir("phimoe", **LONGROPE)
    config = AutoConfig.from_pretrained(folder)
    assert config.rope_parameters["rope_type"] == "longrope"
    model = random_model(config, "bf16", "bfloat16", "cpu", str(folder))
    measured = generate_peak(model, BATCH, SEQ)
    assert_close(plan(folder, "inference", "bf16").peak_allocated_bytes, measured.peak_bytes,
                 "inference")
    assert_trainer_peaks(folder, config, TRAINING, "longrope")
