"""ORPO through TRL's ``ORPOTrainer`` (trl.experimental.orpo): chosen and rejected rows
padded together and run in one forward (``concatenated_forward``) with the full logits, the
chosen rows' NLL and the odds-ratio term. No reference model.

``rl: orpo`` in Axolotl; ``--mode orpo``."""

from __future__ import annotations

from typing import Any

from qplan.planner.workloads import preference
from qplan.planner.workloads.finetune import DEFAULT_TRAINING_SEQ, prepare
from qplan.planner.workloads.kind import WorkloadKind


def step(model: Any, workload: Any, tracker: Any, seen: Any) -> None:
    with preference.trace_quiet():
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = ORPOConfig(output_dir=preference.scratch_dir(), use_cpu=True, report_to=[])
    from qplan.planner.steps import run_training

    trainer = preference.concatenated_shell(ORPOTrainer, args, model)
    inputs = preference.chosen_rejected_inputs(workload, model)
    # compute_loss reads the policy and this batch; what it keeps is its metrics, scalar
    # tensors appended to the trainer's lists (store_metrics), emptied only when it logs:
    # a later step runs as the first (planner/repeated_steps.py).
    run_training(model, workload, tracker, seen,
                 loss_of=lambda m: trainer.compute_loss(m, inputs),
                 loss_reads=(), loss_accumulates=True)


KINDS = (
    WorkloadKind(
        name="orpo", summary="ORPO (TRL), chosen + rejected, full logits, no reference",
        tuning=preference.adapter_tuning, step=step, default_seq_len=DEFAULT_TRAINING_SEQ,
        prepare=prepare, options=(preference.ADAPTER,), axolotl_rl=("orpo",), needs=("trl",),
        causal_lm_step=False,
        from_axolotl=preference.from_axolotl_no_reference,
        to_axolotl=preference.to_axolotl, replan=preference.replan,
    ),
)
