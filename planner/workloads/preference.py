"""What the preference workloads (DPO and its loss variants, KTO, ORPO, SimPO) share:
TRL's trainers on a LoRA, QLoRA or fully trained policy, a batch of chosen and rejected
rows in one forward, and the reference model's three forms.

The step is TRL's own ``compute_loss`` (its fused LM head, its reference forward, its
metrics) inside the Trainer loop of planner/steps.py (backward, clipping, optimizer).
The trainer object is made without ``Trainer.__init__``, which would load a tokenizer,
a dataset and a reference checkpoint: the attributes ``compute_loss`` reads are set from
the trainer's own config class, as its ``__init__`` sets them.

A batch of ``batch`` pairs is ``2 x batch`` rows of ``seq_len`` tokens (prompt and
completion), unpadded: chosen rows first, then rejected, as TRL's collator stacks them.
"""

from __future__ import annotations

import contextlib
import copy
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

from qplan.errors import UsageError
from qplan.planner.workloads.kind import WorkloadOption

# Training a preference objective with LoRA, QLoRA or every weight (Axolotl: adapter).
ADAPTER = WorkloadOption(
    "adapter", "lora", "how the policy trains: lora (default), qlora or full",
    choices=("lora", "qlora", "full"),
)
# The reference policy: TRL's default (the adapter-disabled base under LoRA, a frozen copy
# of the model under full fine-tuning), a separate frozen copy even under LoRA, or its
# log-probs computed once before training (precompute_ref_log_probs): no reference model
# is kept while training.
REF_MODEL = WorkloadOption(
    "ref_model", "auto",
    "the reference: auto (adapter-disabled base for LoRA, a frozen copy for full), copy "
    "(a frozen copy), or precomputed (precompute_ref_log_probs: none while training)",
    choices=("auto", "copy", "precomputed"),
)
REFERENCE_ROLE = "reference_model"
# Where the completion starts in each row: the fused LM head scores every position on
# CPU and meta (TRL's non-Triton path), so this changes only real runs' data.
PROMPT_SHARE = 0.5


def adapter_tuning(options: Mapping[str, Any]) -> str | None:
    return str(options["adapter"])


def from_axolotl(raw: Mapping[str, Any], adapter: str | None) -> dict[str, Any]:
    """Axolotl: ``adapter`` (none: full fine-tuning) and ``precompute_ref_log_probs``."""
    ref = "precomputed" if raw.get("precompute_ref_log_probs") else "auto"
    return {"adapter": adapter or "full", "ref_model": ref}


def from_axolotl_no_reference(raw: Mapping[str, Any], adapter: str | None) -> dict[str, Any]:
    """Axolotl's ``adapter`` (none: full fine-tuning), for a workload without reference."""
    return {"adapter": adapter or "full"}


def to_axolotl(workload: Any) -> dict[str, Any]:
    """The ``rl:`` key and the reference's; the adapter keys are the LoRA ones."""
    ref = dict(workload.extra).get("ref_model", "auto")
    if ref == "copy" and workload.is_lora:
        raise UsageError("Axolotl has no key for a separate reference copy under LoRA (it "
                         "disables the adapter); plan with ref_model=auto or precomputed")
    keys: dict[str, Any] = {"rl": workload.kind.axolotl_rl[0]}
    if ref == "precomputed":
        keys["precompute_ref_log_probs"] = True
    return keys


def replan(workload: Any, four_bit: bool) -> dict[str, Any]:
    """The options the emitted YAML reads back as: LoRA on a 4-bit base is qlora, and a
    copy under full fine-tuning is TRL's default (auto)."""
    adapter = workload.option("adapter")
    if adapter == "lora" and four_bit:
        adapter = "qlora"
    options = dict(workload.extra)
    if "ref_model" not in options:
        return {"adapter": adapter}
    ref = options["ref_model"]
    return {"adapter": adapter, "ref_model": "auto" if ref == "copy" else ref}


def keeps_reference_copy(workload: Any) -> bool:
    """A frozen reference model sits beside the policy: asked for, or TRL's default
    for full fine-tuning (LoRA disables its adapters instead)."""
    ref = workload.option("ref_model")
    return ref == "copy" or (ref == "auto" and workload.tuning == "full")


def reference(workload: Any, model: Any, tracker: Any, seen: Any) -> tuple[bool, Any]:
    """(reference log-probs precomputed, the frozen reference model or None) for the
    reference-model workloads (DPO, KTO)."""
    precomputed = workload.option("ref_model") == "precomputed"
    ref = None
    if keeps_reference_copy(workload) and not precomputed:
        ref = reference_copy(model, tracker, seen)
    return precomputed, ref


def reference_copy(model: Any, tracker: Any, seen: Any) -> Any:
    """A frozen copy of the policy's weights (TRL loads the same checkpoint again), in
    eval mode, counted as the reference model."""
    # Under LoRA the copy keeps peft's (small) adapter layers: an upper bound by them.
    ref = copy.deepcopy(base_model(model))
    ref.requires_grad_(False)
    ref.eval()
    role = seen.roles.setdefault(REFERENCE_ROLE, set())
    for tensor in (*ref.parameters(), *ref.buffers()):
        serial = tracker.add(tensor)
        if serial is not None:
            role.add(serial)
    return ref


class MetricsAccelerator:
    """The accelerator ``compute_loss`` logs through, for one process: gathering is the
    identity. On meta a metric has no value for ``.item()``: it becomes a CPU zero
    (the real run makes a few such scalars too)."""

    def __init__(self, device: Any) -> None:
        self.device = device

    @staticmethod
    def unwrap_model(model: Any) -> Any:
        return model

    @staticmethod
    def gather(tensor: Any) -> Any:
        import torch

        if isinstance(tensor, torch.Tensor) and tensor.device.type == "meta":
            return torch.zeros(tensor.shape, dtype=tensor.dtype)
        return tensor

    gather_for_metrics = gather

    @staticmethod
    def autocast() -> Any:
        return contextlib.nullcontext()


def trainer_shell(cls: type, args: Any, model: Any, ref_model: Any) -> Any:
    """A TRL trainer of class ``cls`` with what every preference ``compute_loss`` reads:
    the models, the config, the accelerator, the metric stores, and the MoE auxiliary loss
    switch as ``__init__`` decides it."""
    trainer = object.__new__(cls)
    trainer.args = args
    trainer.model = model
    trainer.ref_model = ref_model
    trainer.accelerator = MetricsAccelerator(_device(model))
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    text = model.config.get_text_config()
    coef = getattr(args, "router_aux_loss_coef", None)
    trainer.router_aux_loss_coef = getattr(text, "router_aux_loss_coef", 0.0) if coef is None \
        else coef
    trainer.aux_loss_enabled = (hasattr(text, "output_router_logits")
                                and trainer.router_aux_loss_coef != 0.0)
    return trainer


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def base_model(model: Any) -> Any:
    """The transformers model under peft's wrapper (where TRL adds its fused LM head)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def fused_lm_heads(policy: Any, ref: Any, outputs: tuple[str, ...],
                   **options: Any) -> Iterator[None]:
    """TRL's fused LM heads for the step, as its trainers add them: on the policy's
    transformers model with ``outputs``, and on the frozen reference copy (None: the
    adapter-disabled policy or precomputed log-probs) with its defaults; ``options`` go to
    both (GRPO's temperature). Taken off after the step (``fused_lm_head``)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(fused_lm_head(base_model(policy), outputs=outputs, **options))
        if ref is not None:
            stack.enter_context(fused_lm_head(ref, **options))
        yield


@contextlib.contextmanager
def fused_lm_head(model: Any, **options: Any) -> Iterator[None]:
    """TRL's ``add_fused_lm_head(model, **options)`` for the step, taken off after it. The
    head is an instance ``forward`` on the model; without it the step leaves the policy as
    its preparation made it, so the next plan of the same preparation (``--solve``'s
    probes) runs on it instead of preparing another (planner/prepared_models.py)."""
    from trl.trainer.utils import add_fused_lm_head

    own = vars(model)
    before = own.get("forward")
    add_fused_lm_head(model, **options)
    try:
        yield
    finally:
        if before is None:
            own.pop("forward", None)
        else:
            own["forward"] = before


def capture_hooks_first(trainer: Any, model: Any) -> None:
    """Install transformers' output-capturing hooks (``capture_outputs``) on the backbone
    the fused LM head runs, where the step asks it for router logits, before the step
    rather than at the start of its first forward, where transformers installs them
    (``maybe_install_capturing_hooks``, before any op): the same hooks, making no storage
    (inactive outside a capturing forward, appending references in one). The first
    optimizer step then starts on the model the second starts on, and the second is
    counted from the first's log (planner/repeated_steps.py). Off on the reference path."""
    from qplan.planner import reuse

    if not trainer.aux_loss_enabled or not reuse.enabled():
        return
    from transformers.utils.output_capturing import maybe_install_capturing_hooks

    backbone = getattr(base_model(model), "base_model", None)
    if backbone is not None and backbone is not base_model(model):
        maybe_install_capturing_hooks(backbone)


def check_fused_lm_head(model: Any, mode: str) -> None:
    """Refuse a model TRL's fused LM head cannot run. ``add_fused_lm_head`` (on in every
    DPO, KTO and GRPO trainer of TRL 1.x) runs ``model.base_model`` with transformers 5
    and reads ``last_hidden_state`` off its output; transformers' ``base_model`` is the
    attribute ``base_model_prefix`` names, or the model itself when it has none
    (transformers 5.24's Llama4ForCausalLM names language_model and keeps model): the whole
    causal LM then runs and its output has no last_hidden_state, so the real trainer fails
    the same way (AttributeError, in TRL's code)."""
    from qplan.errors import ModelCodeError

    inner = base_model(model)
    if getattr(inner, "base_model", None) is not inner:
        return
    import transformers
    import trl

    raise ModelCodeError(
        f"--mode {mode}: TRL {trl.__version__}'s fused LM head runs the backbone "
        f"{type(inner).__name__}.base_model, which is the whole model (transformers "
        f"{transformers.__version__}'s base_model_prefix "
        f"'{getattr(inner, 'base_model_prefix', '')}' names no attribute of it), and fails "
        "reading last_hidden_state, so a real run fails the same way; plan --mode orpo or "
        "simpo (no fused head), lora, qlora or full, or use a transformers or TRL version "
        "where this model runs"
    )


def pair_inputs(workload: Any, model: Any, precomputed: bool) -> dict[str, Any]:
    """What TRL's DataCollatorForPreference hands the step for ``batch`` unpadded pairs:
    ``2 x batch`` rows (chosen, then rejected) of ids, attention mask and completion mask,
    plus the precomputed reference log-probs when there are some."""
    import torch

    from qplan.planner.steps import input_ids

    device = _device(model)
    rows, seq = 2 * workload.batch, workload.seq_len
    vocab = model.config.get_text_config().vocab_size
    ids = input_ids(rows, seq, vocab, device)
    prompt = int(seq * PROMPT_SHARE)
    completion = torch.ones((rows, seq), dtype=torch.long, device=device)
    if device.type != "meta":
        completion[:, :prompt] = 0
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones((rows, seq), dtype=torch.long, device=device),
        "completion_mask": completion,
    }
    if precomputed:
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            inputs[key] = torch.zeros(workload.batch, dtype=torch.float32, device=device)
    return inputs


@contextlib.contextmanager
def trace_quiet() -> Iterator[None]:
    """TRL warns about experimental trainers and deprecated arguments on construction.
    Its trainers import DeepSpeed where installed, whose logger is a handler on the stdout
    of its first import: imported here, while stdout is stderr, ``--json`` stays clean."""
    import importlib.util
    import sys
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        if importlib.util.find_spec("deepspeed") is not None:
            # accelerate's is_peft_model, which TRL's compute_loss calls, imports it.
            import deepspeed  # noqa: F401
        yield


def scratch_dir() -> str:
    """TrainingArguments needs an output_dir; nothing is written to it."""
    import tempfile

    return tempfile.gettempdir()


class _ArgsOnDevice:
    """The trainer's config, on the model's device: the concatenated-forward trainers
    (ORPO, CPO) move the loss to ``args.device``, which on meta is meta."""

    def __init__(self, args: Any, device: Any) -> None:
        self._args = args
        self.device = device

    def __getattr__(self, name: str) -> Any:
        return getattr(self._args, name)


def concatenated_shell(cls: type, args: Any, model: Any) -> Any:
    """A TRL ORPO/CPO trainer (``concatenated_forward``: chosen and rejected rows padded
    together and run in one forward, with the full logits) with what its
    ``compute_loss`` reads, as its ``__init__`` sets it."""
    trainer = trainer_shell(cls, _ArgsOnDevice(args, _device(model)), model, None)
    trainer.is_encoder_decoder = False
    trainer.padding_value = trainer.pad_token_id = 0  # ORPO's name, CPO's name
    trainer.label_pad_token_id = -100
    trainer.beta = args.beta
    trainer.aux_loss_enabled = getattr(model.config, "output_router_logits", False)
    trainer.aux_loss_coef = getattr(model.config, "router_aux_loss_coef", 0.0)
    trainer._peft_has_been_casted_to_bf16 = False
    trainer._stored_metrics = defaultdict(lambda: defaultdict(list))
    return trainer


def chosen_rejected_inputs(workload: Any, model: Any) -> dict[str, Any]:
    """The DPO-style collator's batch the ORPO/CPO trainers take: ``batch`` chosen and
    ``batch`` rejected rows of ``seq_len`` tokens, their masks, and labels that leave the
    prompt out (-100)."""
    import torch

    from qplan.planner.steps import input_ids

    device = _device(model)
    rows, seq = workload.batch, workload.seq_len
    vocab = model.config.get_text_config().vocab_size
    prompt = int(seq * PROMPT_SHARE)
    inputs: dict[str, Any] = {}
    for side in ("chosen", "rejected"):
        ids = input_ids(rows, seq, vocab, device)
        labels = ids.clone()
        if device.type != "meta":
            labels[:, :prompt] = -100
        inputs[f"{side}_input_ids"] = ids
        inputs[f"{side}_attention_mask"] = torch.ones((rows, seq), dtype=torch.long,
                                                      device=device)
        inputs[f"{side}_labels"] = labels
    return inputs
