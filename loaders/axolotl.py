"""Read an Axolotl training YAML into the model and the estimate keyword arguments it means.

Axolotl's own loader (``axolotl/loaders/model.py``) decides what these keys do, and it is
mirrored here:

* ``adapter: qlora`` with ``load_in_4bit`` quantises with nf4, double quantisation and
  bfloat16 quant storage unless ``bnb_config_kwargs`` says otherwise;
* ``adapter: lora`` with ``load_in_8bit`` is LLM.int8; 4-bit only happens with qlora;
* ``bf16`` / ``fp16`` pick the load dtype; no adapter means full fine-tuning;
* ``gpu_memory_limit`` (an int is GiB) caps each GPU, so it is used as the GPU size;
* a LoRA / QLoRA YAML that leaves the LoRA kernel keys unset gets the kernels, as Axolotl
  0.19 turns them on (``lora_kernels_auto_enabled``);
* ``deepspeed`` / ``fsdp`` / ``fsdp_config`` / ``fsdp_version`` / ``ddp`` name the multi-GPU
  strategy the run uses (``loaders/axolotl_sharding.py``), planned instead of qplan's choice.

Every key of the file is accounted for (``AxolotlPlan.keys``): read into the plan, changing
memory in a way qplan does not model (a warning names it), ignored as irrelevant to memory,
or unknown (``loaders/axolotl_keys.py`` holds the tables). ``unused_keys`` lists the set
keys that were not read.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qplan.errors import ConfigError
from qplan.loaders.axolotl_keys import NOT_MODELLED, classify_key
from qplan.loaders.axolotl_sharding import read_sharding
from qplan.planner.precision import PRECISIONS, find_precision

# Axolotl / HF TrainingArguments optimizer names -> qplan's (what their state costs).
OPTIMIZERS = {
    "adamw_torch": "adamw",
    "adamw_torch_fused": "adamw",
    "adamw_hf": "adamw",
    "adamw_apex_fused": "adamw",
    # Paged 32-bit AdamW keeps fp32 states like AdamW; paging only moves them under pressure.
    "paged_adamw_32bit": "adamw",
    "adamw_bnb_8bit": "adamw_8bit",
    "adamw_8bit": "adamw_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "sgd": "sgd",
    "adafactor": "adafactor",
    # torchao's low-bit AdamW (HF TrainingArguments' names for them).
    "adamw_torch_8bit": "adamw_torch_8bit",
    "adamw_torch_4bit": "adamw_torch_4bit",
}
ADAPTERS = {"lora": "lora", "qlora": "qlora"}
# attn_implementation -> qplan's attention (what the kernel keeps for backward).
ATTN_IMPLEMENTATIONS = {
    "flash_attention_2": "flash_attention_2",
    # FlashAttention 3 and the Hub kernels keep what FlashAttention 2 keeps: the output
    # and a float32 logsumexp per head and query.
    "flash_attention_3": "flash_attention_2",
    "kernels-community/flash-attn": "flash_attention_2",
    "kernels-community/flash-attn3": "flash_attention_2",
    "kernels-community/vllm-flash-attn3": "flash_attention_2",
    "sdpa": "sdpa",
    "eager": "eager",
}
# Axolotl's newer ``attention:`` key (e.g. ``attention: flash``) -> attn_implementation.
ATTENTION_KEY = {"flash": "flash_attention_2", "fa2": "flash_attention_2",
                 "fa3": "flash_attention_3", "sdpa": "sdpa", "eager": "eager"}
# Axolotl plugins qplan plans (what they do to memory); any other plugin is not modelled.
CCE_PLUGIN = "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"
LIGER_PLUGIN = "axolotl.integrations.liger.LigerPlugin"
KNOWN_PLUGINS = (CCE_PLUGIN, LIGER_PLUGIN)
GIB = 2**30
# Keys this reader turns into the plan.
READ_KEYS = frozenset(
    {
        "base_model",
        "adapter",
        "load_in_4bit",
        "load_in_8bit",
        "bnb_config_kwargs",
        "sequence_len",
        "micro_batch_size",
        "gradient_checkpointing",
        "gradient_checkpointing_kwargs",
        "activation_offloading",
        "sample_packing",
        "unfrozen_parameters",
        "liger_rms_norm",
        "liger_glu_activation",
        "lora_mlp_kernel",
        "lora_qkv_kernel",
        "lora_o_kernel",
        "liger_rope",
        "liger_layer_norm",
        "optimizer",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "lora_target_modules",
        "lora_target_linear",
        "bf16",
        "fp16",
        "tf32",
        "flash_attention",
        "sdp_attention",
        "eager_attention",
        "attn_implementation",
        "attention",
        "plugins",
        "cut_cross_entropy",
        "liger_fused_linear_cross_entropy",
        "gpu_memory_limit",
        "trust_remote_code",
        "revision_of_model",
        "rl",
        "precompute_ref_log_probs",
        "quantize_moe_experts",
        "lora_target_parameters",
        "processor_type",
        "is_multimodal",
        "image_size",
        "freeze_mm_modules",
        "model_quantization_config",
        "model_quantization_config_kwargs",
        # Only the load-time float32 copy of the embeddings: the step's dtypes are the same.
        "embeddings_skip_upcast",
        # The multi-GPU strategy (loaders/axolotl_sharding.py).
        "deepspeed",
        "fsdp",
        "fsdp_config",
        "fsdp_version",
        "ddp",
    }
)
USED_KEYS = READ_KEYS  # the name earlier callers know


@dataclass(frozen=True)
class KeyAccount:
    """Every key of the file, by what the plan did with it (the report's ``axolotl`` block).

    ``not_modelled`` maps a key that changes memory, which qplan could not plan, to what
    it changes; ``ignored`` keys do not change GPU memory; ``unknown`` keys are in none of
    qplan's tables and were not read.
    """

    path: str
    read: tuple[str, ...]
    not_modelled: dict[str, str]
    ignored: tuple[str, ...]
    unknown: tuple[str, ...]

    @property
    def warnings(self) -> tuple[str, ...]:
        return tuple(
            f"axolotl key {key}: {what}: not modelled, the plan is made without it"
            for key, what in self.not_modelled.items()
        )

    def with_not_modelled(self, key: str, what: str) -> KeyAccount:
        """The account with ``key`` moved to not modelled (a plan made without it)."""
        return replace(
            self,
            read=tuple(k for k in self.read if k != key),
            not_modelled={**self.not_modelled, key: what},
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "read": list(self.read),
            "not_modelled": [{"key": k, "effect": v} for k, v in self.not_modelled.items()],
            "ignored": list(self.ignored),
            "unknown": list(self.unknown),
        }


@dataclass(frozen=True)
class AxolotlPlan:
    """What an Axolotl YAML asks qplan to plan.

    ``estimate_kwargs`` go to ``qplan.api.estimate`` as they are; ``gpu_memory_limit``
    (bytes), when set, is the GPU size to plan for (``gpu`` gives it as ``--gpu`` text).
    """

    model: str
    estimate_kwargs: dict[str, Any]
    gpu_memory_limit: int | None
    unused_keys: tuple[str, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)
    keys: KeyAccount | None = None
    # Liger's plugin is listed and liger_rope left unset: Axolotl turns it on for Qwen-VL.
    liger_rope_unset: bool = False
    # The LoRA kernels are on because Axolotl turns them on (lora_kernels_auto_enabled),
    # not because the YAML says so; their lora_embedding_kernel is on too.
    lora_kernels_auto: bool = False
    # fsdp_config set and the top-level fsdp_version not 2: Axolotl's FSDP1 (on more than
    # one GPU it neither auto-enables the kernels nor accepts them).
    fsdp1_config: bool = False
    # fused_attn_kernel: true (Gemma 4 unified's QKV/O kernels need it).
    fused_attn_kernel: bool = False
    # The embeddings are a LoRA target, so lora_embedding_kernel (when on) patches them.
    lora_embeddings_targeted: bool = False

    @property
    def gpu(self) -> str | None:
        """``--gpu`` text for the memory limit (a size), or None when the YAML sets none."""
        if self.gpu_memory_limit is None:
            return None
        mib, rest = divmod(self.gpu_memory_limit, 2**20)
        return f"{mib}MiB" if rest == 0 else f"{self.gpu_memory_limit / 1e6:.6f}MB"


def _bad(path: Path, why: str) -> ConfigError:
    return ConfigError(f"axolotl config {path}: {why}")


def _flag(raw: dict[str, Any], key: str, path: Path) -> bool | str | None:
    value = raw.get(key)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "auto"):
        lowered = value.strip().lower()
        return lowered if lowered == "auto" else lowered == "true"
    raise _bad(path, f"{key} must be true, false (or auto), not {value!r}")


def _int(raw: dict[str, Any], key: str, path: Path) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _bad(path, f"{key} must be a positive integer, not {value!r}")
    return value


def parse_memory_limit(value: Any, path: Path) -> int | None:
    """Axolotl's ``gpu_memory_limit``: an int is GiB, a string a size such as "20GiB"."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise _bad(path, f"gpu_memory_limit must be a size such as 20GiB, not {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise _bad(path, "gpu_memory_limit must be more than zero")
        return int(value * GIB)
    from qplan.errors import UsageError
    from qplan.loaders.gpus import parse_size

    try:
        return parse_size(str(value))
    except UsageError:
        raise _bad(path, f"gpu_memory_limit {value!r} is not a size; use e.g. 20GiB") from None


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read axolotl config {path}: {exc.strerror or exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise _bad(path, f"is not valid YAML ({problem}{where}); fix the file") from None
    if not isinstance(raw, dict):
        raise _bad(path, "does not hold a YAML mapping of settings")
    return raw


def _precisions(raw: dict[str, Any], adapter: str | None, path: Path) -> tuple[str, list[str]]:
    """(precisions for estimate, notes) from load_in_* and bf16/fp16, as Axolotl loads."""
    four = _flag(raw, "load_in_4bit", path) is True
    eight = _flag(raw, "load_in_8bit", path) is True
    notes: list[str] = []
    if four and eight:
        raise _bad(path, "sets both load_in_4bit and load_in_8bit; keep one")
    if adapter == "qlora" and not four:
        raise _bad(path, "adapter qlora needs load_in_4bit: true (Axolotl requires it)")
    if four and adapter != "qlora":
        raise _bad(path, "load_in_4bit only quantises with adapter: qlora in Axolotl")
    if eight and adapter != "lora":
        raise _bad(path, "load_in_8bit only quantises with adapter: lora in Axolotl")
    if four:
        kwargs = raw.get("bnb_config_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise _bad(path, "bnb_config_kwargs must be a mapping")
        quant_type = str(kwargs.get("bnb_4bit_quant_type", "nf4"))
        double = bool(kwargs.get("bnb_4bit_use_double_quant", True))
        found = find_precision("bitsandbytes", bits=4, quant_type=quant_type, double_quant=double)
        if found is None:
            raise _bad(path, f"bnb_4bit_quant_type {quant_type!r} is not nf4 or fp4")
        return found, notes
    if eight:
        return find_precision("bitsandbytes", bits=8) or "int8", notes
    bf16, fp16 = _flag(raw, "bf16", path), _flag(raw, "fp16", path)
    if bf16 is True:
        return "bf16", notes
    if fp16 is True:
        return "fp16", notes
    if bf16 == "auto" or fp16 == "auto":
        return "bf16,fp16", notes
    notes.append("neither bf16 nor fp16 is set: Axolotl loads and trains in float32")
    return "fp32", notes


def _quant_storage(raw: dict[str, Any]) -> str:
    kwargs = raw.get("bnb_config_kwargs") or {}
    value = kwargs.get("bnb_4bit_quant_storage", "bfloat16")
    return str(value).removeprefix("torch.")


def _targets(raw: dict[str, Any], path: Path) -> tuple[dict[str, Any], list[str]]:
    """``lora_targets`` (names) or ``lora_target_regex`` (a string: Axolotl passes it to
    peft, which matches it against each module's full name with re.fullmatch)."""
    if _flag(raw, "lora_target_linear", path) is True:
        return {"lora_targets": ("all-linear",)}, []
    modules = raw.get("lora_target_modules")
    if modules is None:
        return {"lora_targets": ("all-linear",)}, [
            "no lora_target_modules / lora_target_linear: planned all-linear"
        ]
    if isinstance(modules, str):
        return {"lora_target_regex": modules}, []
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise _bad(path, "lora_target_modules must be a list of module names or a regex")
    return {"lora_targets": tuple(modules)}, []


def _attn(raw: dict[str, Any], path: Path, not_modelled: dict[str, str]) -> str | None:
    implementation = raw.get("attn_implementation")
    short = raw.get("attention")
    if not _is_set(implementation) and _is_set(short):
        if str(short) not in ATTENTION_KEY:
            not_modelled["attention"] = f"{short} attention (planned as sdpa)"
            return "sdpa"
        implementation = ATTENTION_KEY[str(short)]
    if _is_set(implementation):
        name = str(implementation)
        if name in ATTN_IMPLEMENTATIONS:
            return ATTN_IMPLEMENTATIONS[name]
        not_modelled["attn_implementation"] = f"{name} attention (planned as sdpa)"
        return "sdpa"
    if _flag(raw, "flash_attention", path) is True:
        return "flash_attention_2"
    if _flag(raw, "sdp_attention", path) is True:
        return "sdpa"
    if _flag(raw, "eager_attention", path) is True:
        return "eager"
    return None


def _is_set(value: Any) -> bool:
    return value is not None and value != "" and value != [] and value != {}


# The adapters Axolotl 0.19's load_adapter builds itself.
AXOLOTL_BUILTIN_ADAPTERS = ("lora", "qlora", "llama-adapter")


def read_axolotl(path: str | Path) -> AxolotlPlan:
    """Read an Axolotl YAML; a malformed file or missing base_model is a ConfigError."""
    path = Path(path)
    raw = _load_yaml(path)
    model = raw.get("base_model")
    if not isinstance(model, str) or not model.strip():
        raise _bad(path, "has no base_model; set base_model to a Hub id or a local folder")
    adapter_raw = raw.get("adapter")
    if adapter_raw not in (None, "", *ADAPTERS):
        if adapter_raw not in AXOLOTL_BUILTIN_ADAPTERS:
            # axolotl/loaders/adapter.py load_adapter (0.19.0): anything but these raises
            # NotImplementedError unless a plugin registers the adapter.
            raise _bad(path, f"adapter {adapter_raw!r} is not one of Axolotl 0.19's built-in "
                             "adapters (lora, qlora, llama-adapter): Axolotl fails on it unless "
                             "a plugin registers it; use adapter: lora or qlora")
        raise _bad(path, f"adapter {adapter_raw!r} is not planned by qplan (lora, qlora or none)")
    adapter = ADAPTERS.get(adapter_raw) if adapter_raw else None
    mode = adapter or "full"
    precisions, notes = _precisions(raw, adapter, path)
    not_modelled: dict[str, str] = {}

    kwargs: dict[str, Any] = {"mode": mode, "precisions": precisions}
    kwargs.update(_rl(raw, adapter, not_modelled))
    if PRECISIONS[precisions.split(",")[0]].is_4bit:
        kwargs["quant_storage"] = _quant_storage(raw)
    skips = (raw.get("bnb_config_kwargs") or {}).get("llm_int8_skip_modules")
    if skips is not None:
        if not isinstance(skips, list) or not all(isinstance(m, str) for m in skips):
            raise _bad(path, "bnb_config_kwargs.llm_int8_skip_modules must be a list of names")
        kwargs["skip_modules"] = tuple(skips)
    seq_len = _int(raw, "sequence_len", path)
    if seq_len is not None:
        kwargs["seq_len"] = seq_len
    kwargs["batch"] = _int(raw, "micro_batch_size", path) or 1
    kwargs.update(_checkpointing(raw, path, not_modelled))
    kwargs.update(_unfrozen(raw, adapter, path, not_modelled))
    kwargs.update(_multimodal(raw, path, kwargs["mode"], notes, not_modelled))
    # Liger's kernels (its plugin swaps the model's RMSNorm and SwiGLU MLP classes, its
    # RoPE helper and LayerNorm where liger-kernel's patch for the family does).
    if _flag(raw, "liger_rms_norm", path) is True:
        kwargs["liger_rms_norm"] = True
    if _flag(raw, "liger_glu_activation", path) is True:
        kwargs["liger_glu"] = True
    # Axolotl's LoRA kernels (its autograd Functions patched into the peft model): the
    # keys set true, or all three when Axolotl turns them on for a YAML that leaves them
    # unset (lora_kernels_auto_enabled; what the model and the GPU count decide is left
    # to qplan.api.estimate_axolotl, which knows them).
    for key in LORA_KERNEL_KEYS:
        if _flag(raw, key, path) is True:
            kwargs[key] = True
    auto_kernels = lora_kernels_auto_enabled(raw)
    if auto_kernels:
        kwargs.update(dict.fromkeys(LORA_KERNEL_KEYS, True))
    if any(kwargs.get(k) for k in LORA_KERNEL_KEYS) and raw.get("trust_remote_code"):
        # check_lora_kernels_trust_remote_code (axolotl/utils/schemas/validation.py:686).
        raise _bad(path, "lora_*_kernel with trust_remote_code: Axolotl 0.19 refuses it "
                   "(check_lora_kernels_trust_remote_code); set the lora_*_kernel keys "
                   "false or drop trust_remote_code")
    if _flag(raw, "liger_rope", path) is True:
        kwargs["liger_rope"] = True
    if _flag(raw, "liger_layer_norm", path) is True:
        kwargs["liger_layer_norm"] = True
    if _flag(raw, "sample_packing", path) is True:
        # One row of micro_batch_size x sequence_len tokens (Axolotl's multipack sampler).
        kwargs["sample_packing"] = True
    fused = _fused_ce(raw, path, not_modelled)
    if fused is not None:
        kwargs["fused_ce"] = fused
    optimizer = raw.get("optimizer")
    if optimizer is not None:
        if optimizer not in OPTIMIZERS:
            raise _bad(
                path,
                f"optimizer {optimizer!r} is not planned by qplan; use one of "
                + ", ".join(sorted(OPTIMIZERS)),
            )
        kwargs["optimizer"] = OPTIMIZERS[optimizer]
    attn = _attn(raw, path, not_modelled)
    if attn is not None:
        kwargs["attn"] = attn
    if adapter is not None:
        r = _int(raw, "lora_r", path)
        if r is None:
            notes.append("no lora_r: planned with qplan's default rank")
        else:
            kwargs["lora_r"] = r
        alpha = raw.get("lora_alpha")
        if alpha is not None:
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
                raise _bad(path, f"lora_alpha must be a number, not {alpha!r}")
            kwargs["lora_alpha"] = int(alpha)
        targets, target_notes = _targets(raw, path)
        kwargs.update(targets)
        notes += target_notes
        dropout = raw.get("lora_dropout")
        if dropout is not None:
            if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
                raise _bad(path, f"lora_dropout must be a number, not {dropout!r}")
            kwargs["lora_dropout"] = float(dropout)
        kwargs.update(_moe_levers(raw, path))
        if _flag(raw, "load_in_4bit", path) or _flag(raw, "load_in_8bit", path):
            # Axolotl's loader casts norms and embeddings back to the load dtype after
            # peft's k-bit preparation, embeddings_skip_upcast or not
            # (planner/training_setup.py: cast_back_like_axolotl).
            kwargs["kbit_upcast"] = False
    if raw.get("trust_remote_code"):
        kwargs["trust_remote_code"] = True
    if raw.get("revision_of_model"):
        kwargs["revision"] = str(raw["revision_of_model"])
    notes += _model_quantization(raw, precisions, not_modelled)
    sharding = read_sharding(raw, path)
    if sharding.strategy is not None:
        kwargs["strategy"] = sharding.strategy
        notes += sharding.notes
    if sharding.optimizer is not None:
        kwargs["optimizer"] = sharding.optimizer
    not_modelled.update(dict(sharding.not_modelled))
    limit = parse_memory_limit(raw.get("gpu_memory_limit"), path)
    keys = account_keys(raw, path, not_modelled, _workload_keys(kwargs["mode"]))
    if "lora_embedding_kernel" in keys.not_modelled and not (
            _embeddings_targeted(kwargs) and any(kwargs.get(k) for k in LORA_KERNEL_KEYS)):
        # Axolotl's embedding kernel patches only embeddings that carry LoRA
        # (monkeypatch/lora_kernels.py:669-681), and only inside apply_lora_kernel_patches,
        # which runs when one of the other three kernels is on (patch_manager.py:1147):
        # otherwise the key changes nothing and the plan is what it runs.
        keys = replace(keys, read=tuple(k for k in raw if k in keys.read
                                        or k == "lora_embedding_kernel"),
                       not_modelled={k: v for k, v in keys.not_modelled.items()
                                     if k != "lora_embedding_kernel"})
    # A key left empty (``fsdp:``) does nothing in Axolotl, so it is not worth a mention.
    unused = tuple(sorted(k for k in raw if k not in READ_KEYS and _is_set(raw[k])))
    return AxolotlPlan(
        model=model.strip(),
        estimate_kwargs=kwargs,
        gpu_memory_limit=limit,
        unused_keys=unused,
        notes=tuple(notes),
        keys=keys,
        liger_rope_unset=LIGER_PLUGIN in _plugins(raw) and raw.get("liger_rope") is None,
        lora_kernels_auto=auto_kernels,
        fsdp1_config=_fsdp1_config(raw),
        fused_attn_kernel=bool(raw.get("fused_attn_kernel")),
        lora_embeddings_targeted=adapter is not None and _embeddings_targeted(kwargs),
    )


# The kernel keys qplan plans, and the four check_auto_enable_lora_kernels looks at.
LORA_KERNEL_KEYS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel")
AUTO_KERNEL_KEYS = (*LORA_KERNEL_KEYS, "lora_embedding_kernel")
# Model types whose axolotl/model_support descriptor (0.19.0) declares lora_kernels
# Unsupported; normalize_config (axolotl/utils/config/__init__.py:304-323) then sets all
# four kernel keys false, auto-enabled or set by the YAML, with a warning.
LORA_KERNELS_UNSUPPORTED = {
    # model_support/muse_glimmer/__init__.py:44
    "muse_glimmer": "its attention gates the output through self_attn.gate_proj",
    # model_support/paddleocr_vl/__init__.py:39
    "paddleocr_vl": "the QKV/O rewrite does not match PaddleOCRAttention's forward",
    # model_support/qwen4_exp/__init__.py:42
    "qwen4_exp": "its GDN projections match the linear-attention rewrite on name only",
    "qwen4_exp_text": "its GDN projections match the linear-attention rewrite on name only",
}


def lora_kernels_auto_enabled(raw: dict[str, Any]) -> bool:
    """Whether Axolotl 0.19.0 turns the LoRA kernels on for this YAML, as far as the YAML
    decides: ``check_auto_enable_lora_kernels`` (axolotl/utils/schemas/config.py:1974-2083),
    a validator run on the raw YAML before any other:

    * not when ``rl`` is set (:1978) or ``nvfp4_merge_aware`` (:1981);
    * only for ``adapter: lora`` / ``qlora`` (:1985);
    * not when any of the four kernel keys is set, true or false (:1987-1998), nor for
      ``adapter: lora`` with ``load_in_8bit`` (:1995);
    * not with ``trust_remote_code`` (:2001).

    The rest of the validator needs the model or the machine: a model type whose
    model_support says lora_kernels Unsupported (:2007-2018, normally undone later by
    normalize_config: LORA_KERNELS_UNSUPPORTED), MoE models on torch < 2.9 (:2020-2051:
    qplan plans for torch 2.9+, where grouped_mm exists, so it never applies), and more
    than one GPU with an FSDP1 fsdp_config (:2053-2063: lora_kernels_fsdp1_multi_gpu)."""
    if raw.get("rl") or raw.get("nvfp4_merge_aware"):
        return False
    if raw.get("adapter") not in ("lora", "qlora"):
        return False
    if any(raw.get(k) is not None for k in AUTO_KERNEL_KEYS):
        return False
    if raw.get("adapter") == "lora" and raw.get("load_in_8bit"):
        return False
    return not raw.get("trust_remote_code")


def _fsdp1_config(raw: dict[str, Any]) -> bool:
    """Axolotl's FSDP1 test for the kernels (config.py:2056-2057, validation.py's
    check_multigpu_lora_kernels alike): an fsdp_config, even an empty mapping, with the
    top-level fsdp_version other than 2 (a version inside fsdp_config does not count)."""
    return raw.get("fsdp_config") is not None and str(raw.get("fsdp_version")) != "2"


def lora_kernels_fsdp1_multi_gpu(fsdp1_config: bool, n_gpu: int) -> bool:
    """More than one GPU under FSDP1 (config.py:2053-2063): Axolotl leaves the kernels off."""
    return fsdp1_config and n_gpu > 1


# Where _patch_embedding_layers looks for the embeddings (monkeypatch/lora_kernels.py:669).
EMBEDDING_PATHS = ("model.embed_tokens", "model.language_model.embed_tokens")


def _embeddings_targeted(kwargs: dict[str, Any]) -> bool:
    """Whether peft puts LoRA on the embeddings Axolotl's embedding kernel patches: a target
    name matching the module's name or its tail (peft's rule), or a regex fully matching it.
    all-linear adapts linear layers only."""
    import re

    regex = kwargs.get("lora_target_regex")
    if regex is not None:
        try:
            return any(re.fullmatch(regex, name) for name in EMBEDDING_PATHS)
        except re.error:
            return False  # peft refuses it when the plan builds the adapter
    names = [t for t in kwargs.get("lora_targets", ()) if t != "all-linear"]
    return any(name == t or name.endswith("." + t) for name in EMBEDDING_PATHS for t in names)


def _moe_levers(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """``quantize_moe_experts`` (Axolotl quantises the fused experts bitsandbytes leaves
    in 16 bits; it needs load_in_4bit or load_in_8bit) and ``lora_target_parameters``
    (peft's target_parameters: LoRA on the expert tensors)."""
    out: dict[str, Any] = {}
    if _flag(raw, "quantize_moe_experts", path) is True:
        if not (_flag(raw, "load_in_4bit", path) or _flag(raw, "load_in_8bit", path)):
            raise _bad(path, "quantize_moe_experts needs load_in_4bit (qlora) or load_in_8bit "
                       "(lora), as Axolotl requires")
        out["quantize_moe_experts"] = True
    params = raw.get("lora_target_parameters")
    if _is_set(params):
        names = [params] if isinstance(params, str) else params
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise _bad(path, "lora_target_parameters must be a list of parameter names such "
                       "as mlp.experts.gate_up_proj")
        out["lora_target_parameters"] = tuple(names)
    return out


def _model_quantization(raw: dict[str, Any], precisions: str,
                        not_modelled: dict[str, str]) -> list[str]:
    """``model_quantization_config: Mxfp4Config`` with ``dequantize: true`` (gpt-oss's
    examples) loads the MXFP4 checkpoint dequantised to the compute dtype, which is what
    qplan plans for a pre-quantised checkpoint at a 16-bit precision; any other loading
    config is not modelled."""
    name = raw.get("model_quantization_config")
    if not _is_set(name):
        return []
    options = raw.get("model_quantization_config_kwargs") or {}
    dequantize = isinstance(options, dict) and options.get("dequantize") is True
    if name == "Mxfp4Config" and dequantize and precisions in ("bf16", "fp16", "bf16,fp16"):
        return ["model_quantization_config Mxfp4Config(dequantize=True): the MXFP4 "
                "checkpoint is planned dequantised to the compute dtype"]
    what = f"{name}({options}) loading config (planned without it)"
    not_modelled["model_quantization_config"] = what
    if "model_quantization_config_kwargs" in raw:
        not_modelled["model_quantization_config_kwargs"] = what
    return []


def _rl(raw: dict[str, Any], adapter: str | None, not_modelled: dict[str, str]) -> dict:
    """``rl:`` picks a preference workload (planner/workloads/: TRL's trainer), trained
    with the file's adapter; an ``rl`` value no workload plans is planned as supervised
    fine-tuning, with a warning."""
    from qplan.planner.workloads import AXOLOTL_RL, WORKLOADS

    value = raw.get("rl")
    if not _is_set(value) or value is False:
        return {}
    name = AXOLOTL_RL.get(str(value))
    if name is None:
        not_modelled["rl"] = (f"rl: {value} training (planned as supervised fine-tuning; "
                              f"qplan plans rl: {', '.join(AXOLOTL_RL)})")
        return {}
    kind = WORKLOADS[name]
    options = kind.from_axolotl(raw, adapter) if kind.from_axolotl is not None else {}
    if kind.axolotl_not_modelled is not None:
        not_modelled.update(kind.axolotl_not_modelled(raw))
    return {"mode": name, **options}


def _multimodal(raw: dict[str, Any], path: Path, mode: str, notes: list[str],
                not_modelled: dict[str, str]) -> dict[str, Any]:
    """A multimodal run (``processor_type``, or the older ``is_multimodal``): its
    batches carry images, one per sample as planned (the YAML does not say how many;
    ``--images N`` decides otherwise), at ``image_size`` when given.
    ``freeze_mm_modules`` freezes the vision tower and projector; without it Axolotl hands
    the LoRA targets to peft as they are, which adapts the tower's linear layers too when
    they match (``lora_target_linear``)."""
    from qplan.planner.workloads import IMAGE_MODES

    found: dict[str, Any] = {}
    freeze = _flag(raw, "freeze_mm_modules", path)
    multimodal = _is_set(raw.get("processor_type")) or _flag(raw, "is_multimodal", path) is True
    if freeze is not None:
        found["train_vision"] = freeze is not True
    elif multimodal:
        found["train_vision"] = True
    if not multimodal:
        if _is_set(raw.get("image_size")):
            not_modelled["image_size"] = ("images (no processor_type: the batches are "
                                          "planned as text)")
        return found
    if mode not in IMAGE_MODES:
        not_modelled["processor_type"] = (f"images in rl: {raw.get('rl')} batches (planned as "
                                          f"text; images are planned for "
                                          f"{', '.join(IMAGE_MODES)})")
        return found
    found["images"] = 1
    notes.append("processor_type: planned with 1 image per sample (Axolotl's YAML does not "
                 "say how many; pass --images N)")
    size = raw.get("image_size")
    if _is_set(size):
        ok = (isinstance(size, int) and not isinstance(size, bool)) or (
            isinstance(size, list) and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in size))
        if not ok:
            raise _bad(path, f"image_size must be pixels (448) or [height, width], not {size!r}")
        found["image_size"] = (size, size) if isinstance(size, int) else tuple(size)
    return found


def _checkpointing(raw: dict[str, Any], path: Path, not_modelled: dict[str, str]) -> dict:
    """gradient_checkpointing and its use_reentrant, as Axolotl's normalize_config decides:
    ``gradient_checkpointing_kwargs`` when the YAML gives it, else use_reentrant true
    whenever checkpointing is on and neither ``unfrozen_parameters`` nor ``rl`` is set
    (src/axolotl/utils/config/__init__.py); Gemma 4 forces it false, which the model's
    type decides and qplan does not know here."""
    gc = raw.get("gradient_checkpointing")
    out: dict[str, Any] = {"gradient_checkpointing": bool(gc) if gc is not None else False}
    offload = _activation_offloading(raw, path, not_modelled)
    if offload:
        if not out["gradient_checkpointing"]:
            raise _bad(path, "activation_offloading needs gradient_checkpointing: true "
                       "(Axolotl requires it)")
        out["activation_offloading"] = True
    if not out["gradient_checkpointing"]:
        return out
    gc_kwargs = raw.get("gradient_checkpointing_kwargs")
    if gc_kwargs is not None and not isinstance(gc_kwargs, dict):
        raise _bad(path, "gradient_checkpointing_kwargs must be a mapping such as "
                   "{use_reentrant: false}")
    if gc_kwargs is not None:
        reentrant = gc_kwargs.get("use_reentrant")
        # transformers' default when the kwargs leave it out is non-reentrant.
        out["gc_reentrant"] = bool(reentrant) if reentrant is not None else False
    elif raw.get("unfrozen_parameters") is None and raw.get("rl") is None:
        out["gc_reentrant"] = True
    return out


def _unfrozen(raw: dict[str, Any], adapter: str | None, path: Path,
              not_modelled: dict[str, str]) -> dict[str, Any]:
    """``unfrozen_parameters``: a pattern or a list of them (Axolotl's freeze_layers_except,
    planner/unfrozen.py); planned for full fine-tuning, where only they train."""
    value = raw.get("unfrozen_parameters")
    if not _is_set(value):
        return {}
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise _bad(path, "unfrozen_parameters must be a list of parameter-name patterns")
    if adapter is not None:
        not_modelled["unfrozen_parameters"] = (
            "base parameters trained beside the adapter (planned without them)"
        )
        return {}
    return {"unfrozen_parameters": tuple(patterns)}


def _activation_offloading(raw: dict[str, Any], path: Path,
                           not_modelled: dict[str, str]) -> bool:
    """Axolotl's validation: ``gradient_checkpointing: offload`` is checkpointing plus
    ``activation_offloading: true`` (TRL's streamed offloading, planner/offload.py);
    ``offload_disk`` / ``activation_offloading: disk`` write activations to disk and
    ``legacy`` is Unsloth's offloaded checkpointer, which qplan does not plan."""
    gc = raw.get("gradient_checkpointing")
    value = raw.get("activation_offloading")
    if isinstance(gc, str) and gc.strip().lower() == "offload":
        return True
    if isinstance(gc, str) and gc.strip().lower() == "offload_disk":
        not_modelled["gradient_checkpointing"] = (
            "offload_disk: checkpointed activations on disk (planned on the GPU)"
        )
        return False
    if isinstance(value, str) and value.strip().lower() in ("legacy", "disk"):
        where = "on disk" if value.strip().lower() == "disk" else "in host memory (Unsloth's)"
        not_modelled["activation_offloading"] = (
            f"{value}: checkpointed activations {where} (planned on the GPU)"
        )
        return False
    return _flag(raw, "activation_offloading", path) is True


def _plugins(raw: dict[str, Any]) -> list[str]:
    """The YAML's plugins (one string or a list; checked by _fused_ce)."""
    plugins = raw.get("plugins") or []
    return [plugins] if isinstance(plugins, str) else list(plugins)


def _fused_ce(raw: dict[str, Any], path: Path, not_modelled: dict[str, str]) -> str | None:
    """Cut Cross Entropy (its plugin, unless ``cut_cross_entropy: false``) or Liger's fused
    linear cross-entropy (``liger_fused_linear_cross_entropy: true``, with Liger's plugin)."""
    plugins = raw.get("plugins") or []
    if isinstance(plugins, str):
        plugins = [plugins]
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise _bad(path, "plugins must be a list of plugin class paths")
    unknown = [p for p in plugins if p not in KNOWN_PLUGINS]
    if unknown:
        not_modelled["plugins"] = f"{', '.join(unknown)} patch the model or the loss"
    cce = CCE_PLUGIN in plugins and _flag(raw, "cut_cross_entropy", path) is not False
    liger = _flag(raw, "liger_fused_linear_cross_entropy", path) is True
    if cce and liger:
        raise _bad(path, "turns on both Cut Cross Entropy and Liger's fused linear "
                   "cross-entropy; keep one")
    return "cce" if cce else "liger" if liger else None


def _workload_keys(mode: str) -> frozenset[str]:
    """The YAML keys the planned workload's own module reads (planner/workloads/)."""
    from qplan.planner.workloads import WORKLOADS

    kind = WORKLOADS.get(mode)
    return frozenset(kind.axolotl_keys) if kind is not None else frozenset()


def account_keys(raw: dict[str, Any], path: Path, not_modelled: dict[str, str],
                 workload_keys: frozenset[str] = frozenset()) -> KeyAccount:
    """Sort every key of the file into read / not modelled / ignored / unknown.

    ``not_modelled`` holds what the reader itself found it could not plan (an attention
    it does not know, ...); keys of ``NOT_MODELLED`` join it when they ask for something.
    ``workload_keys``: keys the planned workload's module read.
    """
    read, ignored, unknown = [], [], []
    found = dict(not_modelled)
    for key, value in raw.items():
        if key in found:
            continue
        if key in READ_KEYS or key in workload_keys:
            read.append(key)
            continue
        kind = classify_key(key)
        if kind == "not_modelled":
            if _is_set(value) and value is not False:
                found[key] = NOT_MODELLED[key]
            else:
                read.append(key)  # asks for nothing: planned without it, as it says
        elif kind == "ignored" or not _is_set(value):
            ignored.append(key)
        else:
            unknown.append(key)
    return KeyAccount(
        path=str(path),
        read=tuple(read),
        not_modelled=found,
        ignored=tuple(ignored),
        unknown=tuple(unknown),
    )
