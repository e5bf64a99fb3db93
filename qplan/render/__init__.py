"""Renderers of a Report, one module per output, behind one registry the CLI dispatches to.

- ``table``: the terminal tables and summary; ``bars``: the terminal breakdown bars
- ``plot``: ``--plot FILE.png|svg`` (matplotlib, the ``qplan[plot]`` extra)
- ``html``: ``--html FILE``, one self-contained page
- ``emitters``: ``--emit KIND``, the plan as code or config

``fmt`` holds the formatting they share (``gib``, the components' names and colours) and
``breakdown`` the bars and curves the charts draw. Modules are imported when used, so a
plain ``qplan estimate`` does not import matplotlib.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from qplan.render.emitters import EMITTERS, emit_text


@dataclass(frozen=True)
class FileOutput:
    """A renderer that writes a file: its option, and its module's check and write."""

    option: str
    module: str  # under qplan.render
    check: str  # check(path): a usage error before planning (bad suffix, missing extra)
    write: str  # write(report, path)

    def _function(self, name: str) -> Callable[..., Any]:
        return getattr(importlib.import_module(f"qplan.render.{self.module}"), name)

    def check_path(self, path: Path) -> None:
        self._function(self.check)(path)

    def write_file(self, report: Any, path: Path) -> None:
        self._function(self.write)(report, path)


FILE_OUTPUTS: dict[str, FileOutput] = {
    "plot": FileOutput("--plot", "plot", "check_plot_path", "write_plot"),
    "html": FileOutput("--html", "html", "check_html_path", "write_html"),
}


def check_outputs(paths: dict[str, Path | None]) -> None:
    """Fail on a bad output path before any planning is done."""
    for name, path in paths.items():
        if path is not None:
            FILE_OUTPUTS[name].check_path(path)


def write_outputs(report: Any, paths: dict[str, Path | None]) -> list[Path]:
    """Write every requested file; returns the paths written.

    The report is drawn from its JSON form, so a fresh plan and `qplan report` on its saved
    JSON give the same files byte for byte.
    """
    from qplan.loading import report_from_dict
    from qplan.report import report_dict

    if any(path is not None for path in paths.values()):
        report = report_from_dict(report_dict(report))
    written = []
    for name, path in paths.items():
        if path is not None:
            FILE_OUTPUTS[name].write_file(report, path)
            written.append(path)
    return written


def render_terminal(report: Any, console: Console) -> None:
    """The plan in the terminal: tables, the breakdown bars under them, then the summary."""
    from qplan.render.bars import render_bars
    from qplan.render.table import render_summary, render_tables

    render_tables(report, console)
    render_bars(report, console)
    render_summary(report, console)


__all__ = [
    "EMITTERS",
    "FILE_OUTPUTS",
    "FileOutput",
    "check_outputs",
    "emit_text",
    "render_terminal",
    "write_outputs",
]
