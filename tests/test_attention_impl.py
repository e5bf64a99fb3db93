"""``--attn`` builds the model with that attention implementation, and the trace counts what
it keeps: eager's materialised scores against a real CPU step, to the byte; flash-attention
2 from its documented memory (it cannot run on CPU)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from qplan.api import estimate, make_workload
from qplan.errors import ConfigError, DeviceError
from qplan.loaders.measure import measure
from qplan.planner.attention import check_attn_support

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = dict(batch=2, seq_len=64, lora_r=8, gradient_checkpointing=False)


def predicted(folder, mode, precision, attn, target="cpu"):
    report = estimate(str(folder), gpu="80GiB", mode=mode, precisions=precision,
                      target=target, attn=attn, **SHAPE)
    return report.candidate(precision)


@pytest.mark.parametrize(("mode", "precision"), [("lora", "bf16")])
def test_eager_keeps_the_scores_sdpa_does_not(tiny_model_dir, mode, precision):
    folder = tiny_model_dir("llama")
    config = AutoConfig.from_pretrained(folder)
    peaks = {}
    for attn in ("sdpa", "eager"):
        workload = make_workload(mode, config, attn=attn, **SHAPE)
        real = measure(config, workload, precision, "bfloat16",
                       weights_dir=str(folder)).peak_bytes
        plan = predicted(folder, mode, precision, attn).peak_allocated_bytes
        assert plan == real, (attn, plan, real)
        peaks[attn] = real
    # Eager's [batch, heads, seq, seq] scores (and their fp32 softmax) are what it adds.
    heads = config.num_attention_heads
    scores = SHAPE["batch"] * heads * SHAPE["seq_len"] ** 2 * 2
    assert peaks["eager"] - peaks["sdpa"] >= scores


def test_flash_attention_2_keeps_logsumexp_not_scores(tiny_model_dir):
    """FA2 without the package (transformers refuses to build it) is planned from its
    documented memory: below eager by more than the scores, and no more than SDPA's
    memory-efficient CUDA path, which keeps its own logsumexp and the expanded K/V."""
    folder = tiny_model_dir("llama")
    plans = {attn: predicted(folder, "lora", "bf16", attn, target="cuda")
             for attn in ("eager", "sdpa", "flash_attention_2")}
    flash = plans["flash_attention_2"].components["activations"]
    assert flash < plans["eager"].components["activations"]
    assert flash <= plans["sdpa"].components["activations"]


def test_flash_attention_2_is_refused_where_it_cannot_run(tiny_model_dir):
    folder = tiny_model_dir("llama")
    config = AutoConfig.from_pretrained(folder)
    workload = make_workload("inference", config, attn="flash_attention_2", **SHAPE)
    with pytest.raises(DeviceError, match="CUDA"):
        measure(config, workload, "bf16", "bfloat16")
    # A model class transformers does not let use flash attention (no _supports_flash_attn).
    with pytest.raises(ConfigError, match="does not support flash_attention_2"):
        check_attn_support(torch.nn.Linear(2, 2), "flash_attention_2")


def test_flash_attention_2_casts_float32_queries(tiny_model_dir):
    """After peft's k-bit preparation GPT-2's attention inputs are float32; transformers'
    flash path casts them to the compute dtype (the config dtype of a quantised model)
    before the kernel, as the plan does."""
    folder = tiny_model_dir("gpt2")
    flash = predicted(folder, "qlora", "nf4", "flash_attention_2", target="cuda")
    eager = predicted(folder, "qlora", "nf4", "eager", target="cuda")
    assert flash.components["activations"] < eager.components["activations"]
