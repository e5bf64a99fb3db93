"""A saved JSON report, checked well enough that every renderer can draw it.

``qplan report plan.json`` draws what an earlier ``estimate --json`` planned. A file that
is not a qplan report, or one edited into something else, must end in one line naming
the problem, never in a traceback from deep inside a renderer.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from qplan.errors import ConfigError
from qplan.report import Report, load_schema

FIX = "pass a file written by `qplan estimate --json` (or -o)"


def _schema_problem(data: Any) -> str | None:
    """The first place ``data`` breaks report.v1.json (jsonschema, when installed)."""
    if importlib.util.find_spec("jsonschema") is None:
        return None
    import jsonschema

    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(load_schema()).iter_errors(data)
    )
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "the top level"
    message = error.message if len(error.message) <= 120 else error.message[:117] + "..."
    return f"at {where}: {message}"


def _trial_render(report: Report) -> None:
    """Draw everything once in memory: what a renderer would trip on shows here."""
    from qplan.render.breakdown import bar_groups, sweeps
    from qplan.render.html import render_html

    bar_groups(report)
    sweeps(report)
    render_html(report)


def read_saved_report(path: Path) -> Report:
    from qplan.loading import read_report

    report = read_report(path)  # schema id, JSON syntax, the fields a Report needs
    data = json.loads(path.read_text(encoding="utf-8"))
    problem = _schema_problem(data)
    if problem is not None:
        raise ConfigError(f"report {path} does not follow qplan.report/v1 ({problem}); {FIX}")
    try:
        _trial_render(report)
    except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError) as exc:
        raise ConfigError(
            f"report {path} has a malformed field ({type(exc).__name__}: {exc}); {FIX}"
        ) from None
    return report
