"""What the model will do on the GPU: the workload a plan is made for."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

OPTIMIZERS = (
    "adamw", "adamw_8bit", "paged_adamw_8bit", "adamw_torch_8bit", "adamw_torch_4bit", "sgd",
    "adafactor",
)
ATTENTIONS = ("sdpa", "eager", "flash_attention_2")
KV_DTYPES = ("bfloat16", "float16", "float32")


def __getattr__(name: str) -> Any:
    """MODES and TRAINING_MODES come from the workload registry (planner/workloads/),
    which imports this module: read lazily."""
    if name in ("MODES", "TRAINING_MODES"):
        from qplan.planner import workloads

        return getattr(workloads, name)
    raise AttributeError(name)


@dataclass(frozen=True)
class Workload:
    """A workload. ``load`` is the weights resident on the device and nothing else.

    ``seq_len`` 0 means "the mode's default, capped by the model's max positions".
    """

    mode: str = "inference"
    batch: int = 1
    seq_len: int = 0
    kv_dtype: str | None = None  # inference: KV cache dtype (default: the model's dtype)
    lora_r: int = 16
    lora_alpha: int | None = None  # default 2 * r; does not change memory
    lora_targets: tuple[str, ...] = ("all-linear",)
    # A regular expression instead of names: peft matches it against each module's full
    # name (re.fullmatch), as Axolotl passes a string lora_target_modules through.
    lora_target_regex: str | None = None
    lora_dropout: float = 0.0
    gradient_checkpointing: bool = True
    # torch.utils.checkpoint's use_reentrant (qplan's default: False, as transformers);
    # Axolotl passes True unless its YAML decides otherwise.
    gc_reentrant: bool = False
    optimizer: str = "adamw"
    attn: str = "sdpa"
    # Fused linear cross-entropy (training): "cce" (Cut Cross Entropy) or "liger"; the
    # logits are never materialised (planner/fused_ce.py).
    fused_ce: str | None = None
    # Activation offloading (training, with checkpointing): what autograd saves goes to
    # pinned host memory (planner/offload.py); the plan reports that host memory apart.
    activation_offloading: bool = False
    # Sample packing (training): the micro-batch's ``batch`` sequences packed into one row
    # of ``batch x seq_len`` tokens, position ids restarting at each (planner/steps.py).
    sample_packing: bool = False
    # Full fine-tuning of these parameters only (Axolotl's unfrozen_parameters patterns,
    # planner/unfrozen.py); empty: every parameter trains.
    unfrozen_parameters: tuple[str, ...] = ()
    # Liger's RMSNorm / SwiGLU kernels in place of the model's (planner/liger_kernels.py).
    liger_rms_norm: bool = False
    liger_glu: bool = False
    # Axolotl's LoRA kernels (lora_mlp_kernel / lora_qkv_kernel / lora_o_kernel): its own
    # autograd Functions for the adapted MLP, Q/K/V and O projections
    # (planner/lora_kernels.py).
    lora_mlp_kernel: bool = False
    lora_qkv_kernel: bool = False
    lora_o_kernel: bool = False
    # Liger's RoPE / LayerNorm kernels where its patch for the family swaps them.
    liger_rope: bool = False
    liger_layer_norm: bool = False
    # Vision-language models (planner/vision.py): images per sequence (their placeholder
    # tokens count in seq_len), their size before the processor (height, width; None: the
    # processor's, or qplan's default for dynamic resolution), and whether the vision tower
    # and projector train (None: the mode's default, frozen for LoRA, trained for full).
    images: int = 0
    image_size: tuple[int, int] | None = None
    train_vision: bool | None = None
    # Axolotl's quantize_moe_experts: fused 3-D expert parameters quantised by bitsandbytes
    # at the precision's bits (planner/moe_experts.py).
    quantize_moe_experts: bool = False
    # peft's target_parameters (Axolotl's lora_target_parameters): LoRA on parameters such
    # as fused experts (lora.ParamWrapper), names matched by suffix.
    lora_target_parameters: tuple[str, ...] = ()
    # LoRA on a k-bit base: peft's k-bit preparation leaves norms, embeddings and lm_head
    # in float32 (True); False: Axolotl's loader casts them back to the load dtype after it.
    kbit_upcast: bool = True
    # The options of the mode's own module (planner/workloads/), every one with its value:
    # (name, value) pairs in the module's order, e.g. (("adapter", "lora"), ...) for dpo.
    extra: tuple[tuple[str, Any], ...] = ()

    @property
    def kind(self) -> Any:
        from qplan.planner.workloads import kind_of

        return kind_of(self.mode)

    def option(self, name: str) -> Any:
        return dict(self.extra)[name]

    @property
    def is_training(self) -> bool:
        return bool(self.kind.training)

    @property
    def runs_step(self) -> bool:
        """Whether the plan traces a step (``load``'s is the resident weights alone)."""
        return bool(self.kind.runs_step)

    @property
    def tuning(self) -> str | None:
        """How the weights train: None, lora, qlora or full (a preference mode trains
        by its adapter option)."""
        return self.kind.tuning(dict(self.extra))

    @property
    def is_lora(self) -> bool:
        return self.tuning in ("lora", "qlora")

    @property
    def vision_frozen(self) -> bool:
        """The vision tower and projector stay frozen: LoRA's default (Axolotl's advice:
        adapters on the language model only), or asked (``freeze_mm_modules``)."""
        if self.train_vision is not None:
            return not self.train_vision
        return self.is_lora

    @property
    def alpha(self) -> int:
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_r

    @property
    def target_modules(self) -> str | list[str]:
        if self.lora_target_regex is not None:
            return self.lora_target_regex
        if self.lora_targets in (("all-linear",), ()):
            return "all-linear"
        return list(self.lora_targets)


def default_seq_len(mode: str, max_positions: int | None) -> int:
    """The mode's default (4096 for inference, 2048 for training), capped by the model's
    max positions."""
    from qplan.planner.workloads import kind_of

    base = kind_of(mode).default_seq_len
    return min(base, max_positions) if max_positions else base
