"""What the planner says beyond the table: what would fit, and what to watch out for.

Pure decision logic over traced plans: the largest batch / longest sequence per precision,
the advice when nothing fits (gradient checkpointing, an 8-bit optimizer, more GPUs), and a
warning when bitsandbytes leaves much of the model unquantised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from qplan.planner.decide import Decision, gib
from qplan.planner.gpu import GpuTarget
from qplan.planner.precision import PRECISIONS
from qplan.planner.solve import Solution, solve_for, values_ahead
from qplan.planner.workload import Workload


def max_positions(config: Any) -> int:
    text = config.get_text_config()
    found = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    return int(found or 131072)


def _unit(variable: str, workload: Workload) -> int:
    """The step the search takes: a workload may take only multiples of some batch
    (GRPO: whole groups of completions), and the search runs over those multiples."""
    multiple = workload.kind.batch_multiple
    return multiple(workload) if variable == "batch" and multiple is not None else 1


def _upper(variable: str, config: Any, unit: int) -> int:
    upper = max_positions(config) if variable == "seq_len" else 4096
    return max(1, upper // unit)


def probe_workload(workload: Workload, variable: str, value: int) -> Workload:
    """The workload a search over ``variable`` traces at ``value``."""
    return replace(workload, **{variable: value * _unit(variable, workload)})


def solve_one(
    precision: str,
    variable: str,
    workload: Workload,
    plan_for: Any,
    context: int,
    limit: int,
    config: Any,
) -> Solution:
    unit = _unit(variable, workload)

    def needed(value: int) -> int:
        plan = plan_for(precision, probe_workload(workload, variable, value))
        return sum(plan.components.values()) + context

    found = solve_for(precision, variable, needed, limit, _upper(variable, config, unit))
    if unit == 1:
        return found
    return replace(found, value=None if found.value is None else found.value * unit,
                   points=tuple((x * unit, y) for x, y in found.points))


def plans_ahead(
    problems: Sequence[tuple[str, str]],
    workload: Workload,
    known_plan: Any,
    fetch: Any,
    context: int,
    limit: int,
    config: Any,
) -> None:
    """Have ready, round by round, the plans ``solve_one`` will ask for when it solves
    each (precision, variable) of ``problems``: ``known_plan(precision, workload)`` gives
    a plan already made (or None), ``fetch([(precision, workload), ...])`` makes a round's
    plans together (qplan's plan workers). The answers are ``solve_one``'s own: it runs
    as before and finds these plans made."""
    units = [_unit(variable, workload) for _, variable in problems]

    def known(index: int, value: int) -> int | None:
        precision, variable = problems[index]
        plan = known_plan(precision, probe_workload(workload, variable, value))
        return None if plan is None else sum(plan.components.values()) + context

    def wanted(missing: list[tuple[int, int]]) -> None:
        fetch([(problems[i][0], probe_workload(workload, problems[i][1], x))
               for i, x in missing])

    values_ahead([(variable, limit, _upper(variable, config, unit))
                  for (_, variable), unit in zip(problems, units, strict=True)], known, wanted)


def advice_tries(workload: Workload) -> list[tuple[str, Workload]]:
    """The changed workloads the advice when nothing fits plans (at the last precision of
    the order), each with what it says the change is."""
    tries = []
    if workload.is_training and not workload.gradient_checkpointing:
        tries.append(
            (
                "gradient checkpointing (--gradient-checkpointing)",
                replace(workload, gradient_checkpointing=True),
            )
        )
    if workload.is_training and workload.optimizer in ("adamw", "adafactor"):
        tries.append(
            (
                "an 8-bit optimizer (--optimizer adamw_8bit)",
                replace(workload, optimizer="adamw_8bit"),
            )
        )
    return tries


def advice_plans(decision: Decision, workload: Workload,
                 order: list[str]) -> list[tuple[str, Workload]]:
    """The (precision, workload) plans ``advice_when_nothing_fits`` asks for: the advice's
    changed workloads at the last precision of the order, when nothing fits."""
    if decision.recommendation is not None or not order:
        return []
    return [(order[-1], changed) for _, changed in advice_tries(workload)]


def advice_when_nothing_fits(
    decision: Decision,
    workload: Workload,
    plan_for: Any,
    budget: Any,
    gpu: GpuTarget,
    order: list[str],
) -> list[str]:
    """What would make the workload fit when nothing does: checkpointing, an 8-bit
    optimizer, more GPUs."""
    if decision.recommendation is not None or not order:
        return []
    limit = budget.available_bytes - budget.headroom_bytes
    best = order[-1]
    advice = []
    tries = advice_tries(workload)
    for label, changed in tries:
        total = sum(plan_for(best, changed).components.values()) + budget.cuda_context_bytes
        verdict = "fits" if total <= limit else "still does not fit"
        advice.append(f"with {label}, {best} needs {gib(total)} and {verdict}")
    smallest = min(
        (c for c in decision.candidates if c.precision in order), key=lambda c: c.total_bytes
    )
    if gpu.count == 1:
        advice.append(_more_gpus_advice(smallest.precision, smallest.components,
                                        smallest.total_bytes, limit, budget.cuda_context_bytes,
                                        gpu.name))
    return advice


# What more GPUs can divide between them: sharded or split by layers. Activations, logits
# and step temporaries belong to each GPU's own micro-batch (or, for a layer split, to the
# GPUs that run layers), so every GPU keeps them whole.
SPLITTABLE = ("weights", "adapters", "gradients", "optimizer_states", "kv_cache")


def _more_gpus_advice(precision: str, components: dict[str, int], total: int, limit: int,
                      context: int, gpu_name: str) -> str:
    splittable = sum(v for k, v in components.items() if k in SPLITTABLE)
    per_gpu = sum(v for k, v in components.items() if k not in SPLITTABLE and
                  k != "cuda_context") + context
    room = limit - per_gpu
    if room <= 0:
        return (
            f"more GPUs would not help {precision}: its activations, logits and temporaries "
            f"alone need {gib(per_gpu)} on every GPU, more than {gpu_name} can give; lower "
            "--seq-len or --batch"
        )
    gpus = max(2, -(-splittable // room))
    return (
        f"{precision} needs {gib(total)} in all; split across GPUs it would need at least "
        f"{gpus} x {gpu_name} (plan it with --num-gpus {gpus})"
    )


def unquantized_warning(inventory: Any, names: Sequence[str]) -> list[str]:
    """Say when quantisation leaves a large share of the model in the load dtype."""
    if not any(PRECISIONS[n].quantized for n in names):
        return []
    count, types = inventory.unquantizable_matrices()
    total = inventory.num_parameters
    if not total or count / total < 0.10:
        return []
    return [
        f"{count / 1e9:.2f}B of {total / 1e9:.2f}B parameters ({100 * count / total:.0f}%) are "
        f"in {', '.join(types)} weights bitsandbytes does not quantise (only nn.Linear is "
        "replaced); at int8/4-bit they stay in the load dtype, and peft's k-bit preparation "
        "upcasts them to fp32"
    ]
