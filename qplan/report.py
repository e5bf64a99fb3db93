"""The report: what an estimate found, as frozen dataclasses and as stable JSON (v1)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from typing import Any

from qplan.planner.decide import Candidate, Recommendation
from qplan.planner.placement import DeviceUse, Strategy
from qplan.planner.solve import Solution

SCHEMA_ID = "qplan.report/v1"


@dataclass(frozen=True)
class ModelInfo:
    id: str
    source: str  # path | catalog | cache | hub
    model_type: str
    architecture: str
    parameters: int  # unique parameters, tied weights once
    dtype: str | None  # the config's dtype (torch_dtype)
    revision: str | None = None
    config_path: str | None = None
    # A checkpoint stored quantised: method, bits, what stays unquantised, what it loads as.
    quantization: dict[str, Any] | None = None
    # Bytes the checkpoint's safetensors hold (headers only), when they could be read.
    stored_bytes: int | None = None


@dataclass(frozen=True)
class GpuInfo:
    name: str
    count: int
    memory_bytes: int  # per device
    source: str  # profile | nvml | size
    compute_capability: str | None
    bf16: bool
    architecture: str | None
    free_bytes: int | None
    cuda_context_bytes: int
    headroom_bytes: int
    usable_bytes: int  # memory - context - headroom (free instead of memory under nvml)


@dataclass(frozen=True)
class Report:
    model: ModelInfo
    gpu: GpuInfo
    workload: dict[str, Any]
    candidates: tuple[Candidate, ...]
    recommendation: Recommendation | None
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    versions: dict[str, str] = field(default_factory=dict)
    measured: dict[str, Any] | None = None
    solutions: tuple[Solution, ...] = ()
    schema: str = SCHEMA_ID
    # Several GPUs: every device's share of the chosen plan, and the strategy with its reason.
    devices: tuple[DeviceUse, ...] = ()
    strategy: Strategy | None = None
    # Planned from an Axolotl YAML: every key, by what the plan did with it
    # (loaders/axolotl.py KeyAccount.as_dict).
    axolotl: dict[str, Any] | None = None

    def candidate(self, precision: str) -> Candidate:
        return next(c for c in self.candidates if c.precision == precision)


def report_dict(report: Report) -> dict[str, Any]:
    """The JSON form: dataclasses.asdict with tuples as lists, ``measured`` only when set."""
    data = asdict(report)
    if data["measured"] is None:
        del data["measured"]
    if data["axolotl"] is None:
        del data["axolotl"]
    for key in ("quantization", "stored_bytes"):
        if data["model"].get(key) is None:
            data["model"].pop(key, None)
    if data["strategy"] is None:
        # One GPU: the JSON stays as it was before multi-GPU plans.
        del data["strategy"], data["devices"]
        for candidate in data["candidates"]:
            del candidate["strategy"]
    data = {"schema": data.pop("schema"), **data}  # the schema name first, for readers
    return json.loads(json.dumps(data))


def report_json(report: Report) -> str:
    return json.dumps(report_dict(report), indent=2, sort_keys=False)


def load_schema() -> dict[str, Any]:
    return json.loads((files("qplan") / "schema" / "report.v1.json").read_text())


def load_error_schema() -> dict[str, Any]:
    """The schema of the error object failing commands print under --json."""
    return json.loads((files("qplan") / "schema" / "error.v1.json").read_text())
