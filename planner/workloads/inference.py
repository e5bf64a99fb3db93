"""Weights only (``load``) and ``model.generate``'s prefill (``inference``)."""

from __future__ import annotations

from typing import Any

from qplan.planner.workloads.kind import WorkloadKind, fixed

DEFAULT_INFERENCE_SEQ = 4096


def _prefill(model: Any, workload: Any, tracker: Any, seen: Any) -> None:
    from qplan.planner.steps import run_inference

    run_inference(model, workload, tracker, seen)


KINDS = (
    WorkloadKind(
        name="load", summary="weights only", tuning=fixed(None), step=None,
        default_seq_len=DEFAULT_INFERENCE_SEQ,
    ),
    WorkloadKind(
        name="inference", summary="KV cache + prefill", tuning=fixed(None), step=_prefill,
        default_seq_len=DEFAULT_INFERENCE_SEQ, takes_images=True,
    ),
)
