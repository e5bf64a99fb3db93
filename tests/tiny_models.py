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
    # State-space and hybrid models: Mamba uses dt_proj's weight as a plain matrix (left
    # unquantised); falcon-mamba calls it as a module once marked quantised; Nemotron-H
    # mixes Mamba-2, attention and MLP layers (peft refuses LoRA on its out_proj).
    "mamba": dict(
        model_type="mamba", architectures=["MambaForCausalLM"], vocab_size=1000,
        hidden_size=64, num_hidden_layers=2, state_size=8, intermediate_size=128,
        time_step_rank=8, tie_word_embeddings=False,
    ),
    "falcon_mamba": dict(
        model_type="falcon_mamba", architectures=["FalconMambaForCausalLM"], vocab_size=1000,
        hidden_size=64, num_hidden_layers=2, state_size=8, intermediate_size=128,
        time_step_rank=8,
    ),
    "nemotron_h": dict(
        model_type="nemotron_h", architectures=["NemotronHForCausalLM"], vocab_size=1000,
        hidden_size=64, layers_block_type=["mamba", "attention", "mlp"], num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=128, mamba_num_heads=4,
        mamba_head_dim=16, ssm_state_size=8, n_groups=1, mamba_chunk_size=16,
        max_position_embeddings=256, tie_word_embeddings=False,
    ),
    # Llama 4 keeps its rotary table as a complex64 buffer.
    "llama4": dict(
        model_type="llama4", architectures=["Llama4ForConditionalGeneration"],
        text_config=dict(
            vocab_size=1000, hidden_size=64, intermediate_size=128, intermediate_size_mlp=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_local_experts=2, num_experts_per_tok=1, max_position_embeddings=256,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=56, patch_size=14, vision_output_dim=64, projector_input_dim=64,
            projector_output_dim=64,
        ),
    ),
    "llava": dict(
        model_type="llava", architectures=["LlavaForConditionalGeneration"],
        image_token_index=999,
        text_config=dict(
            model_type="llama", vocab_size=1000, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256,
        ),
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14,
            projection_dim=32,
        ),
    ),
    # Dynamic-resolution images: windowed and full attention blocks in the tower, 3-D
    # multimodal rotary positions (mrope sections sum to half the 16-wide heads).
    "qwen2_5_vl": dict(
        model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"],
        image_token_id=999, video_token_id=998, vision_start_token_id=997,
        vision_end_token_id=996,
        text_config=dict(
            vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
            fullatt_block_indexes=[1], window_size=56, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2,
        ),
    ),
    # Gemma 3's vision-language model: SigLIP at 112 px (8 x 8 patches of 14 px) pooled to
    # 16 tokens per image; one sliding-window layer and one global one.
    "gemma3_vlm": dict(
        model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"],
        image_token_index=999, boi_token_index=997, eoi_token_index=998,
        mm_tokens_per_image=16,
        text_config=dict(
            vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=32,
            layer_types=["sliding_attention", "full_attention"],
            max_position_embeddings=512,
        ),
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=2, image_size=112, patch_size=14,
            vision_use_head=False,
        ),
    ),
    # The Hub config names PhiMoEForCausalLM; transformers calls the class PhimoeForCausalLM.
    "phimoe": dict(
        model_type="phimoe", architectures=["PhiMoEForCausalLM"], vocab_size=1000,
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=256,
    ),
    # The causal-LM decoder of an encoder-decoder family: num_hidden_layers is the encoder's
    # depth (4), the class builds decoder_layers (2); generate's cache has one slot per
    # encoder layer.
    "bart": dict(
        model_type="bart", architectures=["BartForCausalLM"], vocab_size=1000, d_model=96,
        encoder_layers=4, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=200, decoder_ffn_dim=200,
        max_position_embeddings=256,
    ),
    # A model that keeps its own recurrent state (no Cache): generate makes none.
    "rwkv": dict(
        model_type="rwkv", architectures=["RwkvForCausalLM"], vocab_size=1000,
        hidden_size=96, attention_hidden_size=96, intermediate_size=200,
        num_hidden_layers=2, context_length=256,
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
    import transformers

    from qplan.planner.inventory import model_class_for

    torch.manual_seed(seed)
    config = make_config(arch, dtype, **overrides)
    factory, planned = model_class_for(config)
    named = getattr(transformers, (config.architectures or [""])[0], None)
    if named is not None and named.__name__ != planned:
        # The plan builds another class than the config names (Llama 4's text class): save
        # the named one, the checkpoint layout the Hub holds (vision tower included).
        model = named._from_config(config, dtype=getattr(torch, dtype))
    else:
        model = factory.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(folder)
    return folder


def depth_with_every_layer_kind(config) -> int:
    """2 layers, or the shortest prefix holding every layer kind of a hybrid pattern
    (Nemotron-H starts with Mamba and MLP layers; its first attention layer comes later,
    and transformers' cache needs one): the depth a real config is cut to in the tests."""
    kinds = getattr(config.get_text_config(), "layers_block_type", None)
    if not isinstance(kinds, list):
        return 2
    return max(2, *(kinds.index(kind) + 1 for kind in set(kinds)))

