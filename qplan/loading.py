"""The public loading API: ``qplan.loading.load(...)`` plans, loads and measures a model.

``load`` is ``estimate`` followed by a real load of the chosen precision (or of an earlier
report's choice), with the measurement written into the returned report's ``measured``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qplan.errors import ConfigError, QplanError, UsageError, enter_step
from qplan.planner.config_checks import check_config
from qplan.planner.placement import DeviceUse, Strategy, StrategyOption
from qplan.planner.solve import Solution
from qplan.planner.spec import ModelSpec
from qplan.report import SCHEMA_ID, GpuInfo, ModelInfo, Report

# Estimate kwargs that only say how to resolve the model, so they may go with from_report.
_RESOLVE_KWARGS = ("revision", "trust_remote_code")
CPU_WARNING = (
    "no CUDA device: loaded on CPU, so the measurement is of CPU tensors (weights and "
    "adapters, exact) and says nothing about CUDA context or allocator overhead"
)


@dataclass(frozen=True)
class LoadedModel:
    """A model loaded as planned, its tokenizer (None when the folder has none) and the
    report with ``measured`` filled in."""

    model: Any
    tokenizer: Any | None
    report: Report


# --------------------------------------------------------------------------- reports from JSON


def _build(cls: type, data: Mapping[str, Any]) -> Any:
    """A frozen dataclass from its JSON form; list fields typed as tuples become tuples."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        if key not in names:
            continue  # written by a newer qplan; not needed to load
        if isinstance(value, list) and "tuple" in str(names[key].type):
            value = tuple(value)
        values[key] = value
    return cls(**values)


def _strategy(data: Mapping[str, Any] | None) -> Strategy | None:
    if not data:
        return None
    built = _build(Strategy, data)
    return dataclasses.replace(
        built,
        devices=tuple(_build(DeviceUse, d) for d in data.get("devices", ())),
        options=tuple(_build(StrategyOption, o) for o in data.get("options", ())),
    )


def _solution(data: Mapping[str, Any]) -> Solution:
    built = _build(Solution, data)
    return dataclasses.replace(built, points=tuple(tuple(p) for p in data.get("points", ())))


def report_from_dict(data: Mapping[str, Any]) -> Report:
    """Rebuild a Report from ``report_dict`` / ``estimate --json`` output."""
    from qplan.planner.decide import Candidate, Recommendation

    schema = data.get("schema") if isinstance(data, Mapping) else None
    if schema != SCHEMA_ID:
        raise ConfigError(
            f"not a qplan report (schema {schema!r}, expected {SCHEMA_ID!r}); "
            "pass the output of `qplan estimate --json`"
        )
    try:
        rec = data.get("recommendation")
        return Report(
            model=_build(ModelInfo, data["model"]),
            gpu=_build(GpuInfo, data["gpu"]),
            workload=dict(data["workload"]),
            candidates=tuple(_build(Candidate, c) for c in data["candidates"]),
            recommendation=_build(Recommendation, rec) if rec else None,
            warnings=tuple(data.get("warnings", ())),
            notes=tuple(data.get("notes", ())),
            versions=dict(data.get("versions", {})),
            measured=data.get("measured"),
            axolotl=data.get("axolotl"),
            devices=tuple(_build(DeviceUse, d) for d in data.get("devices", ())),
            strategy=_strategy(data.get("strategy")),
            solutions=tuple(_solution(s) for s in data.get("solutions", ())),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(
            f"the qplan report is incomplete or malformed ({type(exc).__name__}: {exc}); "
            "re-run `qplan estimate --json`"
        ) from None


def read_report(source: str | Path | Mapping[str, Any]) -> Report:
    """A Report from a dict, or from a JSON file written by ``qplan estimate --json``."""
    if isinstance(source, Mapping):
        return report_from_dict(source)
    path = Path(source)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read report {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"report {path} is not valid JSON: {exc.msg} (line {exc.lineno})"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"report {path} is not a JSON object; pass `qplan estimate --json` output"
        )
    return report_from_dict(data)


# --------------------------------------------------------------------------- load


def _same_model(spec: ModelSpec, report: Report) -> bool:
    if spec.id == report.model.id:
        return True
    a, b = spec.config_path, report.model.config_path
    return bool(a and b and Path(a).resolve() == Path(b).resolve())


def _resolve(model: str | ModelSpec, kwargs: Mapping[str, Any]) -> ModelSpec:
    from qplan.api import resolve

    return resolve(model, kwargs.get("revision"), bool(kwargs.get("trust_remote_code", False)))


def _pick_precision(report: Report, precision: str | None) -> str:
    if precision is not None:
        name = precision.strip().lower()
        if name not in {c.precision for c in report.candidates}:
            raise UsageError(
                f"precision {precision!r} is not in the plan; choose one of "
                + ", ".join(c.precision for c in report.candidates)
            )
        return name
    if report.recommendation is None:
        why = report.warnings[0] if report.warnings else f"nothing fits {report.gpu.name}"
        raise QplanError(
            f"{why}; nothing to load - force a precision (precision=... / --precision) "
            "or plan for a bigger GPU"
        )
    return report.recommendation.precision


def load(
    model: str | ModelSpec | None,
    *,
    gpu: str = "auto",
    precision: str | None = None,
    from_report: str | Path | Mapping[str, Any] | None = None,
    random_weights: bool = False,
    device: str | None = None,
    progress: Callable[[str], None] | None = None,
    **estimate_kwargs: Any,
) -> LoadedModel:
    """Plan ``model`` on ``gpu`` (or take ``from_report``'s plan), load it and measure it.

    ``precision`` forces a candidate; otherwise the recommendation is loaded. ``device``
    "cpu" forces a CPU load; the default is CUDA when torch sees it, else CPU (with a
    warning in the report). Every other keyword goes to ``qplan.api.estimate``.
    """
    from qplan.loaders.loading import load_planned, pick_device
    from qplan.planner.emit import workload_of

    if from_report is not None:
        extra = sorted(k for k in estimate_kwargs if k not in _RESOLVE_KWARGS)
        if extra or gpu != "auto":
            given = ", ".join(extra + (["gpu"] if gpu != "auto" else []))
            raise UsageError(
                f"from_report fixes the GPU and the workload; drop {given} or re-run the estimate"
            )
        enter_step("reading the report")
        report = read_report(from_report)
        enter_step("resolving the model")
        spec = _resolve(model if model is not None else report.model.id, estimate_kwargs)
        check_config(spec.config, spec.config_path or spec.id)
        if not _same_model(spec, report):
            raise UsageError(
                f"the report plans {report.model.id!r}, not {spec.id!r}; pass the report of "
                "this model or leave the model out"
            )
    else:
        if model is None:
            raise UsageError("no model given; pass a model id or folder, or from_report")
        from qplan.api import estimate

        spec = _resolve(model, estimate_kwargs)
        report = estimate(spec, gpu=gpu, **estimate_kwargs)

    chosen = _pick_precision(report, precision)
    where = pick_device(device)
    warnings = list(report.warnings)
    enter_step(f"loading {chosen} on {where}")
    if device is None and where == "cpu":
        warnings.append(CPU_WARNING)
    result = load_planned(
        spec,
        report,
        chosen,
        workload_of(report),
        device=where,
        random_weights=random_weights,
        attn=estimate_kwargs.get("attn"),
        progress=progress,
    )
    warnings += [w for w in result.warnings if w not in warnings]
    measured = dict(result.measured)
    return LoadedModel(
        model=result.model,
        tokenizer=result.tokenizer,
        report=dataclasses.replace(report, measured=measured, warnings=tuple(warnings)),
    )
