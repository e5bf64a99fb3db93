"""``--plot FILE.png|FILE.svg``: the breakdown as stacked horizontal bars (matplotlib).

With ``--solve`` the figure adds one panel per solved variable: each precision's traced
totals against the variable, with the usable line, so the crossing point shows.

matplotlib is an optional extra (``pip install "qplan[plot]"``). The output is
deterministic: a fixed size, DPI and font (DejaVu Sans, shipped with matplotlib), no dates
or version strings in the metadata and a fixed SVG id salt, so the same report gives the
same file and tests can compare files.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

from qplan.errors import QplanError, UsageError
from qplan.render.breakdown import Bar, BarGroup, Sweep, bar_groups, sweeps
from qplan.render.fmt import GIB, HEADROOM_COLOR, LIMIT_COLOR, gib, style_of
from qplan.report import Report

SUFFIXES = (".png", ".svg")
WIDTH_IN = 10.0
DPI = 100
BAR_ROW_IN = 0.42  # height per bar
GROUP_EXTRA_IN = 1.5  # title, axis and legend of a bar panel
SWEEP_IN = 3.6
PRECISION_COLORS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948",
                    "#b07aa1", "#9c755f")
RC = {
    "font.family": "DejaVu Sans",
    "font.size": 9.0,
    "svg.fonttype": "none",  # text stays text: searchable, and the labels can be checked
    "svg.hashsalt": "qplan",  # fixed ids for clip paths and the like
    "path.simplify": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
MISSING = '--plot needs matplotlib, which is not installed; run: pip install "qplan[plot]"'
METADATA = {
    ".png": {"Software": None},
    ".svg": {"Date": None, "Creator": "qplan"},
}


def _pyplot() -> Any:
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        raise UsageError(MISSING) from None
    matplotlib.use("Agg", force=True)  # files only: never a window
    return importlib.import_module("matplotlib.pyplot")


def _ticker() -> Any:
    return importlib.import_module("matplotlib.ticker")


def check_plot_path(path: Path) -> None:
    """Before planning: a suffix matplotlib writes, and matplotlib installed."""
    if path.suffix.lower() not in SUFFIXES:
        raise UsageError(f"--plot {path}: the file must end in .png or .svg")
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError(MISSING)


def figure_size(report: Report) -> tuple[float, float]:
    """Inches: fixed width; height from the number of bars and sweeps."""
    height = sum(GROUP_EXTRA_IN + BAR_ROW_IN * len(g.bars) for g in bar_groups(report))
    return WIDTH_IN, round(height + SWEEP_IN * len(sweeps(report)) + 0.6, 2)


def pixel_size(report: Report) -> tuple[int, int]:
    width, height = figure_size(report)
    return round(width * DPI), round(height * DPI)


_MARKS = ("headroom (", "usable line (", "GPU memory (")


def _bar_label(bar: Bar) -> str:
    return f"{bar.label} (recommended)" if bar.chosen else bar.label


def _draw_bars(ax: Any, group: BarGroup) -> None:
    bars = group.bars
    rows = list(range(len(bars)))[::-1]  # the first bar on top
    drawn: set[str] = set()
    for row, bar in zip(rows, bars, strict=True):
        left = 0.0
        for seg in bar.segments:
            style = style_of(seg.component)
            ax.barh(row, seg.bytes / GIB, left=left, height=0.62, color=style.color,
                    edgecolor="white", linewidth=0.4,
                    label=style.label if seg.component not in drawn else None)
            drawn.add(seg.component)
            left += seg.bytes / GIB
        verdict = "fits" if bar.fits else "does not fit"
        ax.text(left, row, f"  {gib(bar.total_bytes)} ({verdict})", va="center", fontsize=8,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5, "alpha": 0.8})
    first = bars[0]
    memory = first.scale_bytes / GIB
    limit = first.limit_bytes / GIB
    ax.axvspan(limit, limit + first.headroom_bytes / GIB, color=HEADROOM_COLOR, alpha=0.6,
               zorder=0, label=f"headroom ({gib(first.headroom_bytes)})")
    ax.axvline(limit, color=LIMIT_COLOR, linewidth=1.4, linestyle="--",
               label=f"usable line ({gib(first.limit_bytes)})")
    ax.axvline(memory, color="#333333", linewidth=1.0,
               label=f"GPU memory ({gib(first.scale_bytes)})")
    top = max([memory, *(b.total_bytes / GIB for b in bars)])
    ax.set_xlim(0, top * 1.25)  # room for the totals written after the bars
    ax.set_yticks(rows, [_bar_label(b) for b in bars])
    ax.set_ylim(-0.6, len(bars) - 0.4)
    ax.set_xlabel("GiB")
    ax.set_title(group.title, loc="left", fontsize=10)
    # Components in stacking order, then the headroom band and the lines (matplotlib puts
    # lines before patches otherwise).
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: (labels[i].startswith(_MARKS), i))
    ax.legend([handles[i] for i in order], [labels[i] for i in order], loc="upper left",
              bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)


def _draw_sweep(ax: Any, sweep: Sweep) -> None:
    values = [x for c in sweep.curves for x, _ in c.points]
    for i, curve in enumerate(sweep.curves):
        color = PRECISION_COLORS[i % len(PRECISION_COLORS)]
        xs = [x for x, _ in curve.points]
        ys = [y / GIB for _, y in curve.points]
        answer = "none fits" if curve.value is None else f"{curve.value:,}"
        ax.plot(xs, ys, marker="o", markersize=4, color=color, linewidth=1.4,
                label=f"{curve.precision}: {sweep.option} {answer}")
        if curve.value is not None and curve.needed_bytes is not None:
            ax.plot([curve.value], [curve.needed_bytes / GIB], marker="*", markersize=11,
                    color=color, linestyle="none")
    ax.axhline(sweep.limit_bytes / GIB, color=LIMIT_COLOR, linewidth=1.4, linestyle="--",
               label=f"usable line ({gib(sweep.limit_bytes)})")
    if values and max(values) / max(min(values), 1) >= 16:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(_ticker().FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_xlabel(sweep.variable.replace("_", " ") + " (traced points; * the answer)")
    ax.set_ylabel("GiB")
    ax.set_ylim(bottom=0)
    ax.set_title(f"memory against {sweep.option}, per precision", loc="left", fontsize=10)
    ax.grid(True, linewidth=0.3, alpha=0.6)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)


def write_plot(report: Report, path: Path) -> None:
    check_plot_path(path)
    plt = _pyplot()
    groups = bar_groups(report)
    curves = sweeps(report)
    width, height = figure_size(report)
    ratios = [GROUP_EXTRA_IN + BAR_ROW_IN * len(g.bars) for g in groups] + [SWEEP_IN] * len(curves)
    with plt.rc_context(RC):
        fig, axes = plt.subplots(len(ratios), 1, figsize=(width, height), dpi=DPI,
                                 gridspec_kw={"height_ratios": ratios}, squeeze=False,
                                 layout="constrained")
        try:
            model, gpu = report.model, report.gpu
            count = f"{gpu.count} x " if gpu.count > 1 else ""
            fig.suptitle(f"{model.id} on {count}{gpu.name}, mode {report.workload.get('mode')}",
                         x=0.01, ha="left", fontsize=11, fontweight="bold")
            for ax, group in zip(axes[: len(groups), 0], groups, strict=True):
                _draw_bars(ax, group)
            for ax, sweep in zip(axes[len(groups):, 0], curves, strict=True):
                _draw_sweep(ax, sweep)
            suffix = path.suffix.lower()
            try:
                fig.savefig(path, format=suffix[1:], dpi=DPI, metadata=METADATA[suffix])
            except OSError as exc:
                raise QplanError(f"cannot write the plot to {path}: {exc.strerror}") from None
        finally:
            plt.close(fig)
