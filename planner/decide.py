"""Candidates per precision, whether each fits, and the recommendation.

The recommendation is the least aggressive precision that fits, in the precision table's
order of preference: bf16 (fp16 on GPUs without bf16) -> fp8 (compute capability 8.9+)
-> int8 -> nf4 -> nf4-dq by default.
Rows that are not a default choice (fp32, the fp4 variants) are reported but only chosen
when the user names them with ``--precisions``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from qplan.planner.budget import Budget
from qplan.planner.gpu import GpuTarget
from qplan.planner.precision import PRECISIONS, default_choice
from qplan.planner.quant import QuantSettings
from qplan.planner.weights import WeightBytes

# Least to most aggressive, for choosing among what the user allowed.
AGGRESSIVENESS = tuple(sorted(PRECISIONS, key=lambda n: PRECISIONS[n].preference))
# What the recommendation may pick unasked on any GPU; rows the table marks
# ``where_supported`` (fp8) join them on GPUs that run them (``precision.default_choice``).
DEFAULT_CHOICES = tuple(n for n in AGGRESSIVENESS if PRECISIONS[n].default_choice)


@dataclass(frozen=True)
class Candidate:
    """One precision's plan: what it needs per component, and whether that fits."""

    precision: str
    compute_dtype: str
    weights_bytes: int
    weights_allocated_bytes: int
    components: dict[str, int]  # name -> bytes; their sum is total_bytes
    peak_allocated_bytes: int  # tensor-level peak, as torch.cuda.max_memory_allocated
    total_bytes: int  # what NVML would show for the process
    fits: bool
    headroom_bytes: int  # device memory left after total_bytes (negative: short by)
    notes: tuple[str, ...] = field(default_factory=tuple)
    strategy: str | None = None  # several GPUs: how this candidate spreads over them
    # Pinned host memory the step holds beside the GPU (activation offloading), bytes.
    host_bytes: int = 0


@dataclass(frozen=True)
class Recommendation:
    precision: str
    reason: str
    load_kwargs: dict[str, Any]


@dataclass(frozen=True)
class Decision:
    candidates: tuple[Candidate, ...]
    recommendation: Recommendation | None
    warnings: tuple[str, ...]


def compute_dtype_for(gpu: GpuTarget) -> str:
    """bf16 needs compute capability 8.0 (Ampere) or newer; older GPUs compute in fp16."""
    return "bfloat16" if gpu.bf16 else "float16"


def load_kwargs_for(
    precision: str,
    compute_dtype: str,
    quant_storage: str = "uint8",
    skip_modules: Sequence[str] | None = None,
) -> dict:
    """from_pretrained keyword arguments (JSON-able) that load ``precision``."""
    prec = PRECISIONS[precision]
    skips = tuple(skip_modules) if skip_modules is not None else None
    return prec.method.load_kwargs(prec, QuantSettings(compute_dtype, quant_storage, skips))


def gib(nbytes: int) -> str:
    return f"{nbytes / 1024**3:.2f} GiB"


def choosable(
    precisions: Sequence[str], gpu: GpuTarget, explicit: bool, stored_first: str | None = None
) -> list[str]:
    """Precisions the recommendation may pick, least aggressive first.

    ``stored_first``: the row a pre-quantised checkpoint is stored as; it comes first (it is
    what loads by default) unless the GPU cannot run its kernels.
    """
    allowed = set(precisions) if explicit else {
        p for p in precisions if default_choice(p, gpu.compute_capability)}
    if stored_first is not None:
        allowed = set(precisions)
        if not _kernels_run(stored_first, gpu):
            allowed.discard(stored_first)
        order = [p for p in AGGRESSIVENESS if p in allowed and p != stored_first]
        return [stored_first, *order] if stored_first in allowed else order
    # Kernels the GPU cannot run are never picked, asked for or not (fp8 below 8.9).
    allowed = {p for p in allowed if _kernels_run(p, gpu)}
    if not explicit:
        # Rows the GPU cannot run natively give way to their fallbacks (bf16 -> fp16),
        # and a fallback gives way to its row where the GPU can run that.
        allowed = {p for p in allowed if _supported(p, gpu)}
        allowed = {
            p for p in allowed
            if not (PRECISIONS[p].fallback_for in precisions
                    and _supported(PRECISIONS[p].fallback_for or "", gpu))
        }
    return [p for p in AGGRESSIVENESS if p in allowed]


def _supported(precision: str, gpu: GpuTarget) -> bool:
    needs = PRECISIONS[precision].requires
    return (needs is None or bool(getattr(gpu, needs, False))) and _kernels_run(precision, gpu)


def _kernels_run(precision: str, gpu: GpuTarget) -> bool:
    """Whether the GPU meets the row's compute capability (unknown: assume it does)."""
    from qplan.planner.quant.checkpoint_helpers import cc_tuple

    need = PRECISIONS[precision].min_cc
    have = cc_tuple(gpu.compute_capability)
    return need is None or have is None or have >= need


def decide(
    precisions: Sequence[str],
    gpu: GpuTarget,
    budget: Budget,
    components_for: Callable[[str], tuple[WeightBytes, dict[str, int], int]],
    *,
    explicit: bool = False,
    compute_dtype: str | None = None,
    fits_for: Callable[[str], bool] | None = None,
    strategy_for: Callable[[str], str] | None = None,
    quant_storage: str = "uint8",
    skip_modules: Sequence[str] | None = None,
    stored_first: str | None = None,
) -> Decision:
    """Plan each precision and pick one.

    ``components_for(precision)`` returns the weights, the components (without the CUDA
    context, added here) and the tensor-level peak. ``fits_for`` decides fitting instead of
    the one-device budget (multi-GPU plans: the components are the busiest GPU's, and the
    plan fits when every GPU does and nothing is offloaded); ``strategy_for`` names the
    strategy each candidate takes there.
    """
    compute = compute_dtype or compute_dtype_for(gpu)
    warnings: list[str] = []
    candidates = []
    for precision in precisions:
        weights, components, peak = components_for(precision)
        components = {**components, "cuda_context": budget.cuda_context_bytes}
        total = sum(components.values())
        left = budget.available_bytes - total
        notes: tuple[str, ...] = ()
        if not _supported(precision, gpu) and stored_first is None:
            notes = (_unsupported_note(precision, gpu),)
        quantized = PRECISIONS[precision].quantized
        candidates.append(
            Candidate(
                precision=precision,
                compute_dtype=compute if quantized else weights.load_dtype,
                weights_bytes=weights.bytes,
                weights_allocated_bytes=weights.allocated_bytes,
                components=components,
                peak_allocated_bytes=peak,
                total_bytes=total,
                fits=left >= budget.headroom_bytes if fits_for is None else fits_for(precision),
                headroom_bytes=left,
                notes=notes,
                strategy=None if strategy_for is None else strategy_for(precision),
            )
        )
    by_name = {c.precision: c for c in candidates}
    order = choosable(precisions, gpu, explicit, stored_first)
    chosen = next((by_name[p] for p in order if by_name[p].fits), None)
    recommendation = None
    if chosen is not None:
        recommendation = Recommendation(
            precision=chosen.precision,
            reason=_reason(chosen, order, by_name, gpu, budget),
            load_kwargs=load_kwargs_for(chosen.precision, compute, quant_storage, skip_modules),
        )
    elif order:
        smallest = min((by_name[p] for p in order), key=lambda c: c.total_bytes)
        short = budget.headroom_bytes - smallest.headroom_bytes
        warnings.append(
            f"nothing fits: the smallest candidate, {smallest.precision}, needs "
            f"{gib(smallest.total_bytes)}, {gib(short)} more than {gpu.name} can give with "
            f"{gib(budget.headroom_bytes)} headroom"
        )
    return Decision(tuple(candidates), recommendation, tuple(warnings))


def _unsupported_note(precision: str, gpu: GpuTarget) -> str:
    prec = PRECISIONS[precision]
    fallback = next((p.name for p in PRECISIONS.values() if p.fallback_for == precision), None)
    if prec.requires is None and prec.min_cc is not None:
        need = ".".join(map(str, prec.min_cc))
        return f"{gpu.name} cannot run {precision} kernels (compute capability < {need})"
    use = f"; use {fallback}" if fallback else ""
    return f"{gpu.name} has no native {prec.requires} (compute capability < 8.0){use}"


def _reason(
    chosen: Candidate,
    order: Sequence[str],
    by_name: dict[str, Candidate],
    gpu: GpuTarget,
    budget: Budget,
) -> str:
    """One sentence: why this precision and not a less aggressive one."""
    skipped = [by_name[p] for p in order[: order.index(chosen.precision)]]
    # Several GPUs: the figures are the busiest GPU's.
    per = f" per GPU (busiest of {gpu.count})" if gpu.count > 1 else ""
    fit = (
        f"{chosen.precision} needs {gib(chosen.total_bytes)}{per} of {gpu.name}'s "
        f"{gib(budget.memory_bytes)} and leaves {gib(chosen.headroom_bytes)} free"
    )
    if not skipped:
        return f"{fit}; it is the least aggressive precision that fits."
    worse = skipped[-1]
    if gpu.count > 1:
        return f"{fit}; {worse.precision} does not fit the {gpu.count} GPUs without offload."
    return (
        f"{fit}; {worse.precision} would need {gib(worse.total_bytes)}, "
        f"{gib(budget.headroom_bytes - worse.headroom_bytes)} more than fits with headroom."
    )
