"""The public Python API: ``qplan.estimate(...)`` returns a Report. The CLI is a layer over it."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from qplan.errors import UsageError
from qplan.planner.budget import Headroom, budget_for
from qplan.planner.components import workload_components
from qplan.planner.decide import compute_dtype_for, decide
from qplan.planner.gpu import GpuTarget
from qplan.planner.precision import PRECISION_NAMES
from qplan.planner.spec import ModelSpec
from qplan.planner.workload import MODES, Workload
from qplan.report import GpuInfo, ModelInfo, Report


def parse_headroom(text: str | None) -> Headroom:
    """``"5%"`` (of the device) or a size (``"1.5GiB"``); None gives the default."""
    if text is None:
        return Headroom()
    raw = text.strip()
    if raw.endswith("%"):
        try:
            percent = float(raw[:-1])
        except ValueError:
            percent = float("nan")
        if not 0 <= percent < 90:
            raise UsageError(
                f"headroom {text!r} is not a percentage between 0 and 90; "
                "use e.g. --headroom 5% or --headroom 1GiB"
            )
        return Headroom(fraction=percent / 100)
    if raw in ("0", "0B"):
        return Headroom(fraction=None, bytes=0)
    from qplan.loaders.gpus import parse_size

    try:
        size = parse_size(raw)
    except UsageError:
        raise UsageError(
            f"headroom {text!r} is neither a percentage nor a size; "
            "use e.g. --headroom 5% or --headroom 1GiB"
        ) from None
    return Headroom(fraction=None, bytes=size)


def parse_precisions(value: str | Sequence[str] | None) -> tuple[list[str], bool]:
    """The candidate list and whether the user named it."""
    if value is None:
        return list(PRECISION_NAMES), False
    names = [p.strip().lower() for p in (value.split(",") if isinstance(value, str) else value)]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in PRECISION_NAMES]
    if unknown or not names:
        raise UsageError(
            f"unknown precision {', '.join(unknown) or '(none given)'}; "
            f"--precisions takes a comma list of {', '.join(PRECISION_NAMES)}"
        )
    return [p for p in PRECISION_NAMES if p in names], True


def _versions() -> dict[str, str]:
    found = {}
    for dist in ("qplan", "torch", "transformers", "accelerate", "bitsandbytes", "peft"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return found


def _dtype_name(value: Any) -> str | None:
    if value is None:
        return None
    return str(value).removeprefix("torch.")


def resolve(model: str | ModelSpec, revision: str | None, trust_remote_code: bool) -> ModelSpec:
    if isinstance(model, ModelSpec):
        return model
    from qplan.loaders.model_source import resolve_model

    return resolve_model(model, revision=revision, trust_remote_code=trust_remote_code)


def resolve_target(gpu: str | GpuTarget, num_gpus: int | None) -> GpuTarget:
    if isinstance(gpu, GpuTarget):
        return gpu
    from qplan.loaders.gpus import resolve_gpu

    return resolve_gpu(gpu, num_gpus=num_gpus)


def estimate(
    model: str | ModelSpec,
    *,
    gpu: str | GpuTarget = "auto",
    num_gpus: int | None = None,
    mode: str = "load",
    precisions: str | Sequence[str] | None = None,
    headroom: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    skip_modules: Sequence[str] | None = None,
    quant_storage: str = "uint8",
) -> Report:
    """Plan ``model`` on ``gpu`` for a workload; see ``qplan estimate --help`` for the options."""
    from qplan.planner.inventory import build_meta_model, model_class_for, take_inventory

    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    names, explicit = parse_precisions(precisions)
    room = parse_headroom(headroom)
    spec = resolve(model, revision, trust_remote_code)
    target = resolve_target(gpu, num_gpus)
    config_dtype = _dtype_name(getattr(spec.config, "dtype", None))
    _, architecture = model_class_for(spec.config, spec.trust_remote_code)
    meta = build_meta_model(copy.deepcopy(spec.config), spec.trust_remote_code)
    inventory = take_inventory(meta, skip_modules)
    workload = Workload(mode=mode)
    budget = budget_for(target, room)
    compute = compute_dtype_for(target)

    def plan_one(precision: str):
        plan = workload_components(inventory, workload, precision, compute, quant_storage)
        return plan.weights, plan.components, plan.peak_allocated_bytes

    decision = decide(names, target, budget, plan_one, explicit=explicit, compute_dtype=compute)
    return Report(
        model=ModelInfo(
            id=spec.id,
            source=spec.source,
            model_type=inventory.model_type,
            architecture=architecture,
            parameters=inventory.num_parameters,
            dtype=config_dtype,
            revision=spec.revision,
            config_path=spec.config_path,
        ),
        gpu=GpuInfo(
            name=target.name,
            count=target.count,
            memory_bytes=target.memory_bytes,
            source=target.source,
            compute_capability=target.compute_capability,
            bf16=target.bf16,
            architecture=target.architecture,
            free_bytes=target.free_bytes,
            cuda_context_bytes=budget.cuda_context_bytes,
            headroom_bytes=budget.headroom_bytes,
            usable_bytes=budget.usable_bytes,
        ),
        workload={"mode": mode, "compute_dtype": compute, "quant_storage": quant_storage},
        candidates=decision.candidates,
        recommendation=decision.recommendation,
        warnings=decision.warnings,
        notes=spec.notes,
        versions=_versions(),
    )
