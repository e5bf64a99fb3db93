"""Axolotl 0.19 turns its LoRA kernels on for a LoRA / QLoRA YAML that leaves them unset
(``check_auto_enable_lora_kernels``, axolotl/utils/schemas/config.py:1974-2083), so
``qplan estimate --axolotl`` plans them there, as the run has them.

The rule's expected outcomes below are what Axolotl 0.19.0's own ``validate_config``
returned for these YAMLs (its schema run on them with one GPU, torch 2.13; recorded, since
Axolotl is not a dependency of qplan): all four kernel keys true, or left unset.
"""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from qplan.api import estimate, estimate_axolotl
from qplan.errors import ConfigError, UsageError
from qplan.loaders.axolotl import lora_kernels_auto_enabled, read_axolotl

KERNELS = dict(lora_mlp_kernel=True, lora_qkv_kernel=True, lora_o_kernel=True)
BASE = "base_model: m/x\nbf16: true\n"
LORA = BASE + "adapter: lora\nlora_r: 8\nlora_alpha: 16\nlora_target_linear: true\n"
QLORA = BASE + "adapter: qlora\nload_in_4bit: true\nlora_r: 8\nlora_target_linear: true\n"

pytestmark = pytest.mark.usefixtures("one_thread")


def _write(tmp_path, text, name="config.yml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "auto"), [
    (LORA, True),
    (QLORA, True),
    (LORA + "lora_dropout: 0.05\n", True),  # the kernels run dropout in 0.19
    # adapter: lora with load_in_8bit: the kernels refuse an 8-bit base (:1995).
    (BASE + "adapter: lora\nload_in_8bit: true\n", False),
    (LORA + "rl: dpo\n", False),  # rl trainers are left alone (:1978)
    (LORA + "lora_mlp_kernel: false\n", False),  # any key set stops it, for all (:1994)
    (LORA + "lora_embedding_kernel: false\n", False),
    (LORA + "trust_remote_code: true\n", False),  # (:2001)
    (LORA + "nvfp4_merge_aware: true\n", False),  # (:1981)
    (BASE, False),  # full fine-tuning
])
def test_the_rule_on_yamls(tmp_path, text, auto):
    import yaml

    assert lora_kernels_auto_enabled(yaml.safe_load(text)) is auto
    plan = read_axolotl(_write(tmp_path, text))
    assert plan.lora_kernels_auto is auto
    on = {k: plan.estimate_kwargs.get(k, False) for k in KERNELS}
    assert on == dict.fromkeys(KERNELS, auto)


def test_explicit_false_keeps_the_rest_off(tmp_path):
    """One key set false: Axolotl leaves the others unset (off), so qplan plans none."""
    plan = read_axolotl(_write(tmp_path, LORA + "lora_mlp_kernel: false\n"
                                                "lora_qkv_kernel: true\n"))
    assert not plan.lora_kernels_auto
    assert plan.estimate_kwargs.get("lora_qkv_kernel") is True
    assert "lora_mlp_kernel" not in plan.estimate_kwargs
    assert "lora_o_kernel" not in plan.estimate_kwargs


def test_explicit_kernels_with_trust_remote_code_refused(tmp_path):
    """check_lora_kernels_trust_remote_code (validation.py:686) refuses the file."""
    with pytest.raises(ConfigError, match="trust_remote_code"):
        read_axolotl(_write(tmp_path, LORA + "lora_mlp_kernel: true\n"
                                             "trust_remote_code: true\n"))


@pytest.mark.parametrize("text", [LORA, QLORA])
def test_auto_plan_equals_the_explicit_flags(tiny_model_dir, tmp_path, text):
    """A YAML leaving the kernels unset plans what the same YAML with them true plans,
    and what the CLI's flags plan."""
    folder = str(tiny_model_dir("llama"))
    auto = estimate_axolotl(str(_write(tmp_path, text)), model=folder, gpu="80GiB",
                            batch=2, seq_len=32)
    explicit = estimate_axolotl(str(_write(tmp_path, text + "lora_mlp_kernel: true\n"
                                           "lora_qkv_kernel: true\nlora_o_kernel: true\n",
                                           "explicit.yml")),
                                model=folder, gpu="80GiB", batch=2, seq_len=32)
    # The CLI's flags on the workload of the same YAML with the kernels set false.
    off = read_axolotl(_write(tmp_path, text + "lora_mlp_kernel: false\n"
                              "lora_qkv_kernel: false\nlora_o_kernel: false\n", "off.yml"))
    flags = estimate(folder, gpu="80GiB", **{**off.estimate_kwargs, "batch": 2,
                                             "seq_len": 32, **KERNELS})
    for report in (auto, explicit):
        assert all(report.workload[k] is True for k in KERNELS)
    assert auto.candidates == explicit.candidates == flags.candidates
    assert any("turns lora_mlp_kernel, lora_qkv_kernel and lora_o_kernel on" in n
               and "lora_mlp_kernel: false" in n for n in auto.notes)
    # No embedding target: the auto-enabled embedding kernel changes nothing.
    assert any("changes nothing here" in n for n in auto.notes)
    assert not any("lora_embedding_kernel" in w for w in auto.warnings)
    without = estimate_axolotl(str(tmp_path / "off.yml"), model=folder, gpu="80GiB",
                               batch=2, seq_len=32)
    assert without.candidates != auto.candidates


def test_auto_kernels_where_axolotl_fails_name_the_yaml_fix(tiny_model_dir, tmp_path):
    """GPT-2's attention holds none of the code Axolotl rewrites: the auto-enabled
    kernels fail the run in Axolotl (its assertion), so the plan is refused, naming the
    keys to set false."""
    folder = str(tiny_model_dir("gpt2"))
    with pytest.raises(UsageError, match=r"turns its LoRA kernels on for this YAML.*"
                       r"Original QKV code not found.*lora_mlp_kernel: false"):
        estimate_axolotl(str(_write(tmp_path, LORA)), model=folder, gpu="80GiB",
                         batch=1, seq_len=16)
    # With them off, as the message says, it plans.
    report = estimate_axolotl(str(_write(tmp_path, LORA + "lora_mlp_kernel: false\n"
                                         "lora_qkv_kernel: false\nlora_o_kernel: false\n",
                                         "off.yml")), model=folder, gpu="80GiB", batch=1,
                              seq_len=16)
    assert report.workload["lora_mlp_kernel"] is False


def _tiny_muse_glimmer(folder):
    config = AutoConfig.for_model("muse_glimmer")
    text = config.get_text_config()
    for key, value in dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           vocab_size=512).items():
        setattr(text, key, value)
    if hasattr(text, "layer_types") and text.layer_types is not None:
        text.layer_types = text.layer_types[:2]
    config.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("explicit", [False, True])
def test_unsupported_model_type_planned_without_them(tmp_path, explicit):
    """MuseGlimmer's model support marks lora_kernels Unsupported; normalize_config sets
    the four keys false, auto-enabled or set in the YAML (utils/config/__init__.py:304-323),
    so the run trains without them and so does the plan."""
    folder = _tiny_muse_glimmer(tmp_path / "muse")
    text = LORA + ("lora_mlp_kernel: true\nlora_qkv_kernel: true\nlora_o_kernel: true\n"
                   if explicit else "")
    report = estimate_axolotl(str(_write(tmp_path, text)), model=folder, gpu="80GiB",
                              batch=1, seq_len=16)
    assert all(report.workload[k] is False for k in KERNELS)
    said = report.warnings if explicit else report.notes
    assert any("marks them unsupported for muse_glimmer" in line for line in said)


FSDP1 = "fsdp:\n  - full_shard\nfsdp_config:\n  fsdp_offload_params: false\n"


def test_fsdp1_on_several_gpus_not_auto_enabled(tiny_model_dir, tmp_path):
    """More than one GPU with an FSDP1 fsdp_config: Axolotl leaves them off (:2053-2063);
    on one GPU, or with fsdp_version: 2 at the top level, it turns them on."""
    folder = str(tiny_model_dir("llama"))
    path = str(_write(tmp_path, LORA + FSDP1))
    several = estimate_axolotl(path, model=folder, gpu="80GiB", num_gpus=2, batch=1,
                               seq_len=16)
    assert all(several.workload[k] is False for k in KERNELS)
    assert any("does not turn them on for 2 GPUs under FSDP1" in n for n in several.notes)
    one = estimate_axolotl(path, model=folder, gpu="80GiB", batch=1, seq_len=16)
    assert all(one.workload[k] is True for k in KERNELS)
    fsdp2 = estimate_axolotl(str(_write(tmp_path, LORA + FSDP1 + "fsdp_version: 2\n",
                                        "v2.yml")), model=folder, gpu="80GiB", num_gpus=2,
                             batch=1, seq_len=16)
    assert all(fsdp2.workload[k] is True for k in KERNELS)
    # Set in the file: check_multigpu_lora_kernels refuses FSDP1 on several GPUs.
    with pytest.raises(UsageError, match="FSDP1"):
        estimate_axolotl(str(_write(tmp_path, LORA + FSDP1 + "lora_o_kernel: true\n",
                                    "set.yml")), model=folder, gpu="80GiB", num_gpus=2,
                         batch=1, seq_len=16)


def test_embedding_kernel_matters_only_on_lora_embeddings(tmp_path):
    """Axolotl's embedding kernel patches embed_tokens only when it carries LoRA
    (monkeypatch/lora_kernels.py:669-681): set with all-linear targets it changes
    nothing (read); with embed_tokens a target it is not modelled."""
    linear = read_axolotl(_write(tmp_path, LORA + "lora_mlp_kernel: true\n"
                                                  "lora_embedding_kernel: true\n"))
    assert "lora_embedding_kernel" in linear.keys.read
    assert "lora_embedding_kernel" not in linear.keys.not_modelled
    embeds = read_axolotl(_write(tmp_path, BASE + "adapter: lora\nlora_target_modules:\n"
                                 "  - q_proj\n  - embed_tokens\nlora_mlp_kernel: true\n"
                                 "lora_embedding_kernel: true\n", "emb.yml"))
    assert "lora_embedding_kernel" in embeds.keys.not_modelled
    auto = read_axolotl(_write(tmp_path, BASE + "adapter: lora\nlora_target_modules:\n"
                               "  - q_proj\n  - embed_tokens\n", "auto.yml"))
    assert auto.lora_kernels_auto and auto.lora_embeddings_targeted


def test_gemma4_unified_skips_qkv_o_without_fused_attention(tmp_path):
    """patch_self_attn_lora returns without rewriting Gemma 4 unified's attention unless
    fused_attn_kernel is on (monkeypatch/lora_kernels.py:283-299, "MLP/embedding kernels
    still apply"): planned with the MLP kernel only."""
    config = AutoConfig.for_model("gemma4_unified")
    text = config.get_text_config()
    for key, value in dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           vocab_size=512, num_kv_shared_layers=0,
                           per_layer_config={}).items():
        setattr(text, key, value)
    text.layer_types = ["sliding_attention", "full_attention"]
    config.save_pretrained(tmp_path / "g4u")
    report = estimate_axolotl(str(_write(tmp_path, LORA)), model=str(tmp_path / "g4u"),
                              gpu="80GiB", batch=1, seq_len=16)
    assert (report.workload["lora_mlp_kernel"], report.workload["lora_qkv_kernel"],
            report.workload["lora_o_kernel"]) == (True, False, False)
    assert any("skips the QKV/O rewrite on gemma4_unified" in n for n in report.notes)
