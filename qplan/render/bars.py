"""Stacked bars in the terminal: one per candidate, and per device for a multi-GPU plan.

A bar is as long as the GPU's memory; each component fills its share, the usable line
(``|``) marks what the total must stay under and the headroom above it is hatched. With
colour (a terminal, no ``NO_COLOR``) the segments are coloured blocks; otherwise each
component has its own ASCII glyph, so the bars read the same in a log file or a CI job.
"""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

from qplan.render.breakdown import Bar, BarGroup, bar_groups, host_shares
from qplan.render.fmt import (
    FREE_GLYPH,
    HEADROOM_GLYPH,
    LIMIT_COLOR,
    LIMIT_GLYPH,
    OVER_GLYPH,
    gib,
    style_of,
)
from qplan.report import Report

MIN_WIDTH, MAX_WIDTH = 20, 60
_FREE, _HEADROOM = "", "/"  # cell kinds besides component names


def plain_output(console: Console) -> bool:
    """ASCII without colour: not a terminal, or NO_COLOR set (rich reads it)."""
    return not console.is_terminal or console.no_color


def cells(bar: Bar, width: int) -> list[str]:
    """What each of ``width`` cells shows: a component's name, free, or headroom.

    Segment edges are rounded cumulatively, so the cells add up to the total exactly
    (within a cell) and a component under half a cell takes none: the scale stays honest.
    A total over the device's memory is cut at the bar's end (the caller marks it).
    """
    out: list[str] = []
    start = 0
    for seg in bar.segments:
        end = start + seg.bytes
        a = min(width, round(start / bar.scale_bytes * width))
        b = min(width, round(end / bar.scale_bytes * width))
        out.extend([seg.component] * (b - a))
        start = end
    limit_cell = limit_position(bar, width)
    while len(out) < width:
        out.append(_HEADROOM if len(out) >= limit_cell else _FREE)
    return out


def limit_position(bar: Bar, width: int) -> int:
    return max(0, min(width, round(bar.limit_bytes / bar.scale_bytes * width)))


def _summary(bar: Bar) -> str:
    left = bar.left_bytes
    # Measured from the usable line (the table's headroom column is from the device's end).
    verdict = f"fits, {gib(left)} below the line" if bar.fits else (
        f"{gib(-left)} over the line" if left < 0 else "does not fit"
    )
    extra = f", {bar.detail}" if bar.detail else ""
    chosen = "  <- recommended" if bar.chosen else ""
    return f" {gib(bar.total_bytes):>10}  {verdict}{extra}{chosen}"


def bar_line(bar: Bar, width: int, label_width: int, plain: bool) -> Text:
    text = Text(f"  {bar.label:<{label_width}} ")
    kinds = cells(bar, width)
    limit = limit_position(bar, width)
    text.append("[" if plain else "▕")
    for i, kind in enumerate(kinds):
        if i == limit:
            text.append(LIMIT_GLYPH if plain else "┃", style=None if plain else LIMIT_COLOR)
        if kind == _FREE:
            text.append(FREE_GLYPH if plain else "·", style=None if plain else "dim")
        elif kind == _HEADROOM:
            text.append(HEADROOM_GLYPH if plain else "░", style=None if plain else "dim")
        else:
            style = style_of(kind)
            text.append(style.glyph if plain else "█", style=None if plain else style.color)
    if limit == width:
        text.append(LIMIT_GLYPH if plain else "┃", style=None if plain else LIMIT_COLOR)
    text.append("]" if plain else "▏")
    text.append(OVER_GLYPH if bar.total_bytes > bar.scale_bytes else " ")
    text.append(_summary(bar), style=("bold green" if bar.chosen and not plain else None))
    return text


def legend(groups: tuple[BarGroup, ...], plain: bool) -> Text:
    names: list[str] = []
    for group in groups:
        for bar in group.bars:
            names.extend(s.component for s in bar.segments if s.component not in names)
    from qplan.render.fmt import component_rank

    text = Text("  ")
    for name in sorted(names, key=component_rank):
        style = style_of(name)
        text.append(style.glyph if plain else "█", style=None if plain else style.color)
        text.append(f" {style.label}  ")
    bar = groups[0].bars[0]
    text.append(LIMIT_GLYPH if plain else "┃", style=None if plain else LIMIT_COLOR)
    text.append(f" usable line ({gib(bar.limit_bytes)})  ")
    text.append(HEADROOM_GLYPH if plain else "░", style=None if plain else "dim")
    text.append(f" headroom ({gib(bar.headroom_bytes)})  ")
    text.append(FREE_GLYPH if plain else "·", style=None if plain else "dim")
    text.append(" free")
    if any(b.total_bytes > b.scale_bytes for g in groups for b in g.bars):
        text.append(f"  {OVER_GLYPH} over the device's memory")
    return text


def bar_width(console: Console, label_width: int) -> int:
    # Room for the label, the brackets and the start of the summary (it may run on).
    return max(MIN_WIDTH, min(MAX_WIDTH, console.width - label_width - 40))


def render_bars(report: Report, console: Console) -> None:
    """Print the breakdown bars under the table."""
    groups = bar_groups(report)
    if not any(g.bars for g in groups):
        return
    plain = plain_output(console)
    label_width = max(len(b.label) for g in groups for b in g.bars)
    width = bar_width(console, label_width)
    for group in groups:
        scale = group.bars[0].scale_bytes
        console.print(Text(f"{group.title}; a bar is {gib(scale)}",
                           style=None if plain else "bold"), soft_wrap=True)
        for bar in group.bars:
            console.print(bar_line(bar, width, label_width, plain), soft_wrap=True)
    for device, nbytes in host_shares(report):
        console.print(Text(f"  {device}: {gib(nbytes)} offloaded"), soft_wrap=True)
    console.print(legend(groups, plain), soft_wrap=True)
