"""DPO and its loss variants (IPO) through ``trl.DPOTrainer``: chosen and rejected rows
in one forward through TRL's fused LM head (per-token log-probs in tiles, no
[rows, seq, vocab] logits), the reference's log-probs from the adapter-disabled policy
(LoRA), a frozen copy (full) or precomputed, the loss, the backward.

``rl: dpo`` / ``rl: ipo`` in Axolotl; ``--mode dpo`` / ``--mode ipo``."""

from __future__ import annotations

from typing import Any

from qplan.planner.workloads import preference
from qplan.planner.workloads.finetune import DEFAULT_TRAINING_SEQ, prepare
from qplan.planner.workloads.kind import WorkloadKind

# Mode -> DPOConfig.loss_type (TRL 1.x computes each in DPOTrainer._compute_loss).
LOSS_TYPES = {"dpo": "sigmoid", "ipo": "ipo"}
# What DPOTrainer.__init__ asks its fused LM head for (the logged metrics need them).
FUSED_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


def step(model: Any, workload: Any, tracker: Any, seen: Any) -> None:
    with preference.trace_quiet():
        from trl import DPOConfig, DPOTrainer

    from qplan.planner.steps import run_training
    from qplan.planner.training_setup import gc_kwargs

    precomputed, ref = preference.reference(workload, model, tracker, seen)
    with preference.trace_quiet():
        args = DPOConfig(
            output_dir=preference.scratch_dir(), loss_type=[LOSS_TYPES[workload.mode]],
            precompute_ref_log_probs=precomputed, use_cpu=True, report_to=[],
            gradient_checkpointing=workload.gradient_checkpointing,
            gradient_checkpointing_kwargs=gc_kwargs(workload),
        )
    trainer = preference.trainer_shell(DPOTrainer, args, model, ref)
    # DPOTrainer.__init__'s training arguments.
    trainer.beta = args.beta
    trainer.precompute_ref_logps = precomputed
    trainer.loss_types = args.loss_type
    trainer.loss_weights = args.loss_weights or [1.0] * len(args.loss_type)
    trainer.ld_alpha = args.ld_alpha
    trainer.f_divergence_type = args.f_divergence_type
    trainer.f_alpha_divergence_coef = args.f_alpha_divergence_coef
    trainer.label_smoothing = args.label_smoothing
    trainer.use_weighting = args.use_weighting
    preference.check_fused_lm_head(model, workload.mode)
    preference.capture_hooks_first(trainer, model)
    inputs = preference.pair_inputs(workload, model, precomputed)
    # compute_loss reads the policy, the reference and this batch, and keeps only Python
    # numbers (its metrics): a later step runs as the first (planner/repeated_steps.py).
    with preference.fused_lm_heads(model, ref, FUSED_OUTPUTS):
        run_training(model, workload, tracker, seen,
                     loss_of=lambda m: trainer.compute_loss(m, inputs),
                     loss_reads=() if ref is None else (ref,))


def _kind(name: str, summary: str) -> WorkloadKind:
    return WorkloadKind(
        name=name, summary=summary, tuning=preference.adapter_tuning, step=step,
        default_seq_len=DEFAULT_TRAINING_SEQ, prepare=prepare,
        options=(preference.ADAPTER, preference.REF_MODEL),
        roles=(preference.REFERENCE_ROLE,), weight_copies=(preference.REFERENCE_ROLE,),
        axolotl_rl=(name,), needs=("trl",),
        causal_lm_step=False,
        from_axolotl=preference.from_axolotl, to_axolotl=preference.to_axolotl,
        replan=preference.replan,
    )


KINDS = (
    _kind("dpo", "DPO (TRL), chosen + rejected"),
    _kind("ipo", "IPO: DPO with TRL's ipo loss"),
)
