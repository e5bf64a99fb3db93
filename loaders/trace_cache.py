"""An on-disk cache of traced steps, so that planning the same model again skips tracing.

A traced step (planner/components.py: ``TraceOutcome``) is a pure function of the config,
the workload, the precision, the compute dtype, the trace options, the libraries that run
the step and qplan's own planner code. The cache key hashes all of them: the config's full
JSON, the workload, the options, the versions of torch, transformers, bitsandbytes, peft
and accelerate, and a digest of the planner's source files (so a changed planner never
reads an older planner's traces). A hit returns the stored outcome, which is exactly what
the trace returned; anything unreadable is traced again.

Files live in the Hugging Face cache folder: ``$HF_HOME/qplan/traces`` (default
``~/.cache/huggingface``). ``QPLAN_CACHE=0`` turns the cache off. Models with remote code
are never cached: their code can change under the same config.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from qplan import planner as planner_package
from qplan.planner.components import TraceOutcome, trace_components
from qplan.planner.workload import Workload

FORMAT = 1
# trl: the preference workloads trace its trainers (planner/workloads/).
LIBRARIES = ("torch", "transformers", "bitsandbytes", "peft", "accelerate", "trl")


def cache_dir() -> Path | None:
    """Where traces are kept, or None when ``QPLAN_CACHE=0`` turns the cache off."""
    if os.environ.get("QPLAN_CACHE", "1").strip() == "0":
        return None
    home = os.environ.get("HF_HOME")
    if not home:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        home = os.path.join(xdg, "huggingface")
    return Path(home) / "qplan" / "traces"


@functools.cache
def _environment() -> str:
    """Library versions and a digest of the planner's source: what a trace's code is."""
    found = {}
    for dist in LIBRARIES:
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            found[dist] = None
    digest = hashlib.sha256()
    planner = Path(planner_package.__file__).resolve().parent
    for path in sorted(planner.rglob("*.py")):
        digest.update(path.relative_to(planner).as_posix().encode())
        digest.update(path.read_bytes())
    return json.dumps({"format": FORMAT, "libraries": found, "planner": digest.hexdigest()})


def trace_key(config: Any, workload: Workload, precision: str, compute_dtype: str,
              options: dict[str, Any]) -> str:
    """The cache key of one traced step."""
    parts = {
        "environment": _environment(),
        "config": config.to_json_string(use_diff=False),
        "workload": dataclasses.asdict(workload),
        "precision": precision,
        "compute_dtype": compute_dtype,
        "options": {
            k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
            for k, v in sorted(options.items())
        },
    }
    text = json.dumps(parts, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def _read(path: Path) -> TraceOutcome | None:
    try:
        data = json.loads(path.read_text())
        outcome = TraceOutcome(**data)
    except (OSError, ValueError, TypeError):
        return None
    return outcome


def _write(path: Path, outcome: TraceOutcome) -> None:
    """Atomically (another qplan may be reading); a cache that cannot be written is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One write of the whole text: json.dump would hand the file hundreds of small
        # chunks, which cost a cold 70B plan more than its traces' encoding (52 files).
        text = json.dumps(dataclasses.asdict(outcome))
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp",
                                         delete=False) as handle:
            handle.write(text)
        os.replace(handle.name, path)
    except OSError:
        return


def cached(tracer: Callable[..., TraceOutcome] = trace_components) -> Callable[..., TraceOutcome]:
    """``tracer`` behind the on-disk cache (``workload_components(..., tracer=...)``)."""

    def trace(config: Any, workload: Workload, precision: str, compute_dtype: str,
              **options: Any) -> TraceOutcome:
        folder = cache_dir()
        if folder is None or options.get("trust_remote_code"):
            return tracer(config, workload, precision, compute_dtype, **options)
        path = folder / f"{trace_key(config, workload, precision, compute_dtype, options)}.json"
        found = _read(path)
        if found is not None:
            return found
        outcome = tracer(config, workload, precision, compute_dtype, **options)
        _write(path, outcome)
        return outcome

    return trace
