"""SimPO through TRL's ``CPOTrainer`` with ``loss_type="simpo"`` (trl.experimental.cpo, as
Axolotl runs ``rl: simpo``): chosen and rejected rows in one forward
(``concatenated_forward``) with the full logits, length-normalised log-probs, and the
chosen rows' NLL term at CPOConfig's default ``cpo_alpha``. No reference model.

``rl: simpo`` in Axolotl; ``--mode simpo``."""

from __future__ import annotations

from typing import Any

from qplan.planner.workloads import preference
from qplan.planner.workloads.finetune import DEFAULT_TRAINING_SEQ, prepare
from qplan.planner.workloads.kind import WorkloadKind


def step(model: Any, workload: Any, tracker: Any, seen: Any) -> None:
    with preference.trace_quiet():
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(output_dir=preference.scratch_dir(), loss_type="simpo", use_cpu=True,
                         report_to=[])
    from qplan.planner.steps import run_training

    trainer = preference.concatenated_shell(CPOTrainer, args, model)
    # CPOTrainer.__init__'s training arguments.
    trainer.label_smoothing = args.label_smoothing
    trainer.loss_type = args.loss_type
    trainer.cpo_alpha = args.cpo_alpha
    trainer.simpo_gamma = args.simpo_gamma
    trainer.alpha = args.alpha
    inputs = preference.chosen_rejected_inputs(workload, model)
    # compute_loss reads the policy and this batch; what it keeps is its metrics, scalar
    # tensors appended to the trainer's lists (store_metrics), emptied only when it logs:
    # a later step runs as the first (planner/repeated_steps.py).
    run_training(model, workload, tracker, seen,
                 loss_of=lambda m: trainer.compute_loss(m, inputs),
                 loss_reads=(), loss_accumulates=True)


KINDS = (
    WorkloadKind(
        name="simpo", summary="SimPO (TRL's CPO trainer), chosen + rejected, no reference",
        tuning=preference.adapter_tuning, step=step, default_seq_len=DEFAULT_TRAINING_SEQ,
        prepare=prepare, options=(preference.ADAPTER,), axolotl_rl=("simpo",),
        needs=("trl",),
        causal_lm_step=False, from_axolotl=preference.from_axolotl_no_reference,
        to_axolotl=preference.to_axolotl, replan=preference.replan,
    ),
)
