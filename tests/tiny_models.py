"""Tiny random models of several architectures, saved to disk once per test session.

Sizes are deliberately awkward (not multiples of 64, some layers over 256 absmax blocks) so
every rounding rule of the bitsandbytes layout is exercised.
"""

from __future__ import annotations

from typing import Any

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=1000,
        hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    ),
    "qwen2": dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=1000,
        hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    ),
    "gemma": dict(
        model_type="gemma", architectures=["GemmaForCausalLM"], vocab_size=1000,
        hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=24, max_position_embeddings=256,
    ),
    "gpt2": dict(
        model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=1000, n_embd=96,
        n_layer=2, n_head=4, n_positions=256,
    ),
    "opt": dict(
        model_type="opt", architectures=["OPTForCausalLM"], vocab_size=1000, hidden_size=96,
        ffn_dim=200, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
        word_embed_proj_dim=96,
    ),
    # Five sliding-window layers to one global one, windows shorter than the test sequences:
    # layer kinds that 2- and 4-layer traces alone would never see.
    "gemma3": dict(
        model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], vocab_size=1000,
        hidden_size=96, intermediate_size=200, num_hidden_layers=20, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, sliding_window=32, max_position_embeddings=1024,
    ),
    # Multi-head latent attention (values narrower than keys) and a dense prefix before the
    # MoE layers.
    "deepseek_v3": dict(
        model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], vocab_size=1000,
        hidden_size=96, intermediate_size=200, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, first_k_dense_replace=2, n_routed_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=64, n_group=1, topk_group=1,
        q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, max_position_embeddings=1024,
    ),
    "mixtral": dict(
        model_type="mixtral", architectures=["MixtralForCausalLM"], vocab_size=1000,
        hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=256,
    ),
}


def make_config(arch: str, dtype: str = "bfloat16", **overrides: Any):
    from transformers import AutoConfig

    values = {**TINY_CONFIGS[arch], **overrides}
    model_type = values.pop("model_type")
    config = AutoConfig.for_model(model_type, **values)
    config.dtype = dtype
    return config


def save_tiny_model(arch: str, folder, dtype: str = "bfloat16", seed: int = 0, **overrides):
    """Build a random model from the tiny config and save it (weights + config.json)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = make_config(arch, dtype, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(folder)
    return folder
