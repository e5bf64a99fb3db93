"""KTO through ``trl.KTOTrainer``: unpaired examples (a prompt, one completion, a
desirable / undesirable label), and for the KL estimate the same prompts with the batch's
completions cycled, scored without gradients by the policy and the reference. The
reference: the adapter-disabled base (LoRA), a frozen copy (full), or precomputed.

``rl: kto`` in Axolotl; ``--mode kto``. ``--batch`` counts examples (rows), not pairs."""

from __future__ import annotations

from typing import Any

from qplan.planner.workloads import preference
from qplan.planner.workloads.finetune import DEFAULT_TRAINING_SEQ, prepare
from qplan.planner.workloads.kind import WorkloadKind

# What KTOTrainer.__init__ asks its fused LM head for (the logged metrics need them).
FUSED_OUTPUTS = ("log_probs", "entropy", "mean_logits")


def _inputs(workload: Any, model: Any, precomputed: bool) -> dict[str, Any]:
    """DataCollatorForUnpairedPreference's batch for ``batch`` unpadded examples: ids,
    masks and completion masks of the examples and of their KL rows, and the labels
    (alternating desirable / undesirable)."""
    import torch

    from qplan.planner.steps import input_ids

    device = next(model.parameters()).device
    rows, seq = workload.batch, workload.seq_len
    vocab = model.config.get_text_config().vocab_size
    prompt = int(seq * preference.PROMPT_SHARE)
    inputs: dict[str, Any] = {}
    for prefix in ("", "KL_"):
        completion = torch.ones((rows, seq), dtype=torch.long, device=device)
        if device.type != "meta":
            completion[:, :prompt] = 0
        inputs[f"{prefix}input_ids"] = input_ids(rows, seq, vocab, device)
        inputs[f"{prefix}attention_mask"] = torch.ones((rows, seq), dtype=torch.long,
                                                       device=device)
        inputs[f"{prefix}completion_mask"] = completion
    if precomputed:
        inputs["ref_logps"] = torch.zeros(rows, dtype=torch.float32, device=device)
        inputs["ref_KL_logps"] = torch.zeros(rows, dtype=torch.float32, device=device)
    label = torch.zeros(rows, dtype=torch.bool, device=device)
    if device.type != "meta":
        label[::2] = True
    inputs["label"] = label
    return inputs


def step(model: Any, workload: Any, tracker: Any, seen: Any) -> None:
    with preference.trace_quiet():
        from trl import KTOConfig, KTOTrainer

    from qplan.planner.steps import run_training
    from qplan.planner.training_setup import gc_kwargs

    precomputed, ref = preference.reference(workload, model, tracker, seen)
    with preference.trace_quiet():
        args = KTOConfig(
            output_dir=preference.scratch_dir(), precompute_ref_log_probs=precomputed,
            use_cpu=True, report_to=[], gradient_checkpointing=workload.gradient_checkpointing,
            gradient_checkpointing_kwargs=gc_kwargs(workload),
        )
    trainer = preference.trainer_shell(KTOTrainer, args, model, ref)
    # KTOTrainer.__init__'s training arguments.
    trainer.beta = args.beta
    trainer.precompute_ref_logps = precomputed
    trainer.loss_type = args.loss_type
    trainer.desirable_weight = args.desirable_weight
    trainer.undesirable_weight = args.undesirable_weight
    trainer.calculate_KL = args.loss_type not in ["apo_zero_unpaired"]
    preference.check_fused_lm_head(model, workload.mode)
    preference.capture_hooks_first(trainer, model)
    inputs = _inputs(workload, model, precomputed)
    # compute_loss reads the policy, the reference and this batch, and keeps only Python
    # numbers (its metrics): a later step runs as the first (planner/repeated_steps.py).
    with preference.fused_lm_heads(model, ref, FUSED_OUTPUTS):
        run_training(model, workload, tracker, seen,
                     loss_of=lambda m: trainer.compute_loss(m, inputs),
                     loss_reads=() if ref is None else (ref,))


KINDS = (
    WorkloadKind(
        name="kto", summary="KTO (TRL), unpaired examples + KL rows",
        tuning=preference.adapter_tuning, step=step, default_seq_len=DEFAULT_TRAINING_SEQ,
        prepare=prepare, options=(preference.ADAPTER, preference.REF_MODEL),
        roles=(preference.REFERENCE_ROLE,), weight_copies=(preference.REFERENCE_ROLE,),
        axolotl_rl=("kto",), needs=("trl",),
        causal_lm_step=False,
        from_axolotl=preference.from_axolotl, to_axolotl=preference.to_axolotl,
        replan=preference.replan,
    ),
)
