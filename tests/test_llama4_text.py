"""Llama 4 on transformers 5.24: its ConditionalGeneration class fails on every forward,
so qplan plans the text class ``AutoModelForCausalLM`` loads from the same checkpoint.

The checkpoint is a tiny random Llama4ForConditionalGeneration saved as the Hub holds it
(vision tower and projector included, tests/tiny_models.py). Everything is checked against
real CPU runs: the named class failing in users' loops, what ``from_pretrained`` keeps,
``model.generate`` and transformers' ``Trainer`` (with peft) peaks within 2%.
"""

from __future__ import annotations

import pytest
import torch
from test_weights_exact import inventory_of, real_load
from transformers import AutoConfig, AutoModelForCausalLM, Llama4ForConditionalGeneration
from user_loops import generate_peak, trainer_peak

from qplan.api import estimate
from qplan.errors import QplanError
from qplan.loaders.measure import random_model
from qplan.loaders.resident import resident_bytes
from qplan.planner.families import _BROKEN_TEXT_STEP, model_class
from qplan.planner.weights import weight_bytes

TOLERANCE = 0.02
BATCH, SEQ = 2, 96
NAMED = "Llama4ForConditionalGeneration"
# Checkpoint keys the text class leaves unloaded ("unexpected" in from_pretrained's report).
VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tiny_models import save_tiny_model

    return save_tiny_model("llama4", tmp_path_factory.mktemp("tiny-llama4-hub"))


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, 8), generator=torch.Generator().manual_seed(0))


def _fails_on_image_outputs(run) -> bool:
    try:
        run()
    except AttributeError as exc:
        assert "image_outputs" in str(exc), exc
        return True
    return False


def test_the_named_class_fails_in_users_loops_exactly_while_qplan_falls_back(folder):
    """generate, a forward with labels and a peft LoRA Trainer step all fail in
    Llama4ForConditionalGeneration.forward (``image_outputs=outputs.image_outputs`` on its
    language model's MoeCausalLMOutputWithPast); qplan's fallback is on exactly then."""
    from peft import LoraConfig, get_peft_model

    model = Llama4ForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16)
    ids = _ids(model.config.get_text_config().vocab_size)
    broken = _BROKEN_TEXT_STEP[NAMED](NAMED)
    assert _fails_on_image_outputs(lambda: model(input_ids=ids, labels=ids)) is broken
    assert _fails_on_image_outputs(
        lambda: model.generate(ids, max_new_tokens=2, do_sample=False)) is broken
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert _fails_on_image_outputs(
        lambda: trainer_peak(lora, BATCH, 8, bf16=False, gradient_checkpointing=False)
    ) is broken
    chosen = model_class(AutoConfig.from_pretrained(folder))
    expected = ("AutoModelForCausalLM", "Llama4ForCausalLM") if broken else \
        ("AutoModelForImageTextToText", NAMED)
    assert (chosen.auto_class, chosen.name) == expected


def test_plans_what_auto_model_for_causal_lm_loads(folder):
    """The text class on the text sub-config; every text weight of the checkpoint loads,
    only the vision tower and projector are left out; the report says so."""
    model, info = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, output_loading_info=True)
    assert type(model).__name__ == "Llama4ForCausalLM"
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert info["unexpected_keys"]
    assert all(key.startswith(VISION_PREFIXES) for key in info["unexpected_keys"])
    report = estimate(str(folder), gpu="80GiB", mode="inference", precisions="bf16",
                      target="cpu", batch=1, seq_len=16)
    assert report.model.architecture == "Llama4ForCausalLM"
    assert any("vision tower and projector are not loaded" in note for note in report.notes)


@pytest.mark.parametrize("precision", ["bf16", "int8", "nf4", "nf4-dq"])
def test_weights_equal_a_real_load(folder, precision):
    measured = resident_bytes(real_load(folder, precision, "bfloat16"))
    predicted = weight_bytes(inventory_of(folder), precision, compute_dtype="bfloat16")
    assert predicted.bytes == measured.bytes
    assert predicted.storages == measured.storages
    report = estimate(str(folder), gpu="80GiB", mode="load", precisions=precision)
    assert report.candidate(precision).weights_bytes == measured.bytes


def _close(predicted: int, measured: int, what) -> None:
    error = (predicted - measured) / measured
    assert abs(error) <= TOLERANCE, (what, predicted, measured, f"{error:+.2%}")


def _plan(folder, mode: str, precision: str, **options):
    return estimate(str(folder), gpu="80GiB", mode=mode, precisions=precision,
                    target="cpu", batch=BATCH, seq_len=SEQ, **options)


def test_generate_peak(folder):
    predicted = _plan(folder, "inference", "bf16").candidate("bf16")
    model = random_model(AutoConfig.from_pretrained(folder), "bf16", "bfloat16", "cpu",
                         str(folder))
    measured = generate_peak(model, BATCH, SEQ)
    _close(predicted.peak_allocated_bytes, measured.peak_bytes, "generate")
    assert predicted.components["kv_cache"] == measured.kv_cache_bytes


@pytest.mark.parametrize(("mode", "precision", "gc"), [
    ("full", "bf16", True), ("lora", "bf16", False), ("qlora", "nf4", True),
])
def test_trainer_peak(folder, mode, precision, gc):
    """Trainer's defaults, two steps; LoRA as the plan configures peft: all-linear less
    the router (an nn.Linear returning a tuple, which peft's LoRA forward cannot adapt)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    report = _plan(folder, mode, precision, gradient_checkpointing=gc, lora_r=8)
    predicted = report.candidate(precision)
    model = random_model(AutoConfig.from_pretrained(folder), precision, "bfloat16", "cpu",
                         str(folder))
    if mode != "full":
        excluded = report.workload["lora_exclude_modules"]
        assert excluded == ["router"]
        if precision == "nf4":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(model, LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
            exclude_modules=excluded, task_type="CAUSAL_LM"))
    measured = trainer_peak(model, BATCH, SEQ, bf16=False, gradient_checkpointing=gc)
    _close(predicted.peak_allocated_bytes, measured.peak_bytes, (mode, precision))


def test_images_stay_refused(folder):
    with pytest.raises(QplanError) as caught:
        estimate(str(folder), gpu="80GiB", mode="inference", precisions="bf16", images=1)
    assert "\n" not in str(caught.value)


# TRL's preference loops: PAIRS pairs of PROMPT + COMPLETION words (tests/test_preference.py).
PAIRS, PROMPT, COMPLETION = 2, 40, 55
PREF_SEQ = PROMPT + COMPLETION + 1  # TRL appends EOS to each completion


def _run_trl(mode: str, model) -> None:
    from preference_loops import dpo_peak, grpo_peak, kto_peak

    if mode == "dpo":
        dpo_peak(model, PAIRS, PROMPT, COMPLETION, gradient_checkpointing=False, steps=1)
    elif mode == "kto":
        kto_peak(model, PAIRS, PROMPT, COMPLETION, gradient_checkpointing=False, steps=1)
    else:
        grpo_peak(model, 2, 8, 4, num_generations=2, gradient_checkpointing=False, steps=1)


@pytest.mark.parametrize("mode", ["dpo", "kto", "grpo"])
def test_trl_fused_head_trainers_fail_and_are_refused(folder, mode):
    """TRL's fused LM head runs Llama4ForCausalLM.base_model, the model itself (its
    base_model_prefix, language_model, names no attribute): the real trainer fails reading
    last_hidden_state, and qplan refuses in one line instead of planning it."""
    pytest.importorskip("trl")
    from qplan.errors import ModelCodeError

    model = random_model(AutoConfig.from_pretrained(folder), "bf16", "bfloat16", "cpu",
                         str(folder))
    with pytest.raises(AttributeError, match="last_hidden_state"):
        _run_trl(mode, model)
    with pytest.raises(ModelCodeError, match="fused LM head") as caught:
        estimate(str(folder), gpu="80GiB", mode=mode, precisions="bf16", target="cpu",
                 adapter="full")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("mode", ["orpo", "simpo"])
def test_concatenated_forward_trainers_peak(folder, mode):
    """ORPO and SimPO compute the full logits through the model's own forward: they run,
    and the plan is within 2% of the real trainer."""
    pytest.importorskip("trl")
    from preference_loops import concatenated_peak

    predicted = estimate(str(folder), gpu="80GiB", mode=mode, precisions="bf16",
                         target="cpu", batch=PAIRS, seq_len=PREF_SEQ, adapter="full",
                         gradient_checkpointing=True).candidate("bf16")
    model = random_model(AutoConfig.from_pretrained(folder), "bf16", "bfloat16", "cpu",
                         str(folder))
    measured = concatenated_peak(mode, model, PAIRS, PROMPT, COMPLETION,
                                 gradient_checkpointing=True)
    _close(predicted.peak_allocated_bytes, measured.peak_bytes, mode)
