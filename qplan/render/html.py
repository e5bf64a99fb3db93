"""``--html FILE``: the whole plan as one self-contained HTML file.

No network and no JavaScript: the CSS and the charts (SVG) are inline, code blocks select
whole on a click (CSS ``user-select: all``) so they copy without a script, and the JSON
report is embedded in a ``<script type="application/json" id="qplan-report">`` for tools.
The page narrows to a phone's width: tables scroll sideways, the bars stretch.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

from qplan.errors import QplanError
from qplan.render.breakdown import Bar, BarGroup, Sweep, bar_groups, host_shares, sweeps
from qplan.render.emitters import applicable_snippets
from qplan.render.fmt import (
    GIB,
    HEADROOM_COLOR,
    LIMIT_COLOR,
    component_rank,
    gib,
    signed_gib,
    style_of,
)
from qplan.report import Report, report_json

SUFFIXES = (".html", ".htm")
BAR_VIEW_WIDTH = 1000  # SVG units across a bar; the bar stretches to the page's width
BAR_VIEW_HEIGHT = 28
SWEEP_W, SWEEP_H = 560, 300
SWEEP_COLORS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948",
                "#b07aa1", "#9c755f")

CSS = """
:root { --fg: #1d1d1f; --muted: #5f6368; --line: #d0d4d9; --ok: #1e7b34; --bad: #b3261e; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
  font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Helvetica, Arial, sans-serif; }
main { max-width: 980px; margin: 0 auto; padding: 1rem; }
h1 { font-size: 1.35rem; margin: 0 0 .25rem; word-break: break-word; }
h2 { font-size: 1.1rem; margin: 1.6rem 0 .5rem; border-bottom: 1px solid var(--line); }
h3 { font-size: .95rem; margin: 1rem 0 .4rem; }
.muted { color: var(--muted); }
.verdict { padding: .75rem 1rem; border-radius: 6px; margin: 1rem 0; }
.verdict.ok { background: #e6f4ea; border-left: 5px solid var(--ok); }
.verdict.bad { background: #fce8e6; border-left: 5px solid var(--bad); }
.scroll { overflow-x: auto; -webkit-overflow-scrolling: touch; }
table { border-collapse: collapse; font-size: .9rem; min-width: 100%; }
th, td { padding: .3rem .6rem; border-bottom: 1px solid var(--line); text-align: right;
  white-space: nowrap; }
th:first-child, td:first-child, td.text, th.text { text-align: left; }
tr.chosen td { font-weight: 600; background: #f1f8f3; }
.yes { color: var(--ok); } .no { color: var(--bad); }
.bar-row { margin: .5rem 0 .7rem; }
.bar-head { display: flex; flex-wrap: wrap; gap: .2rem .8rem; font-size: .9rem; }
.bar-head b { min-width: 4.5rem; }
svg.bar { display: block; width: 100%; height: 26px; }
.legend { list-style: none; padding: 0; margin: .5rem 0; display: flex; flex-wrap: wrap;
  gap: .3rem 1rem; font-size: .85rem; }
.swatch { display: inline-block; width: .9rem; height: .9rem; vertical-align: -2px;
  margin-right: .3rem; border-radius: 2px; }
.swatch.limit { width: 3px; }
svg.sweep { display: block; width: 100%; max-width: 720px; height: auto; }
pre { background: #f6f8fa; border: 1px solid var(--line); border-radius: 6px; padding: .7rem;
  overflow-x: auto; font-size: .82rem; line-height: 1.4; }
pre.copy { user-select: all; -webkit-user-select: all; cursor: text; }
details { margin: .5rem 0; }
summary { cursor: pointer; font-weight: 600; }
ul.messages { padding-left: 1.2rem; }
ul.messages li { margin: .25rem 0; }
li.warning::marker { color: var(--bad); }
footer { margin-top: 2rem; font-size: .8rem; color: var(--muted); }
@media (max-width: 600px) {
  body { font-size: 14px; }
  main { padding: .6rem; }
  th, td { padding: .25rem .4rem; }
}
"""


def check_html_path(path: Path) -> None:
    from qplan.errors import UsageError

    if path.suffix.lower() not in SUFFIXES:
        raise UsageError(f"--html {path}: the file must end in .html")


def _num(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


# --------------------------------------------------------------------------- pieces


def _header(report: Report) -> str:
    model, gpu = report.model, report.gpu
    count = f"{gpu.count} x " if gpu.count > 1 else ""
    available = f"free {gib(gpu.free_bytes)}" if gpu.free_bytes is not None else \
        gib(gpu.memory_bytes)
    workload = ", ".join(
        f"{k} {','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
        for k, v in report.workload.items() if v is not None and not isinstance(v, dict)
    )
    return (
        f"<header><h1>{escape(model.id)}</h1>"
        f"<p>{escape(model.architecture)}, {model.parameters / 1e9:.2f}B parameters "
        f"({escape(model.source)}) on <b>{escape(count + gpu.name)}</b> "
        f"({gib(gpu.memory_bytes)} each, {escape(gpu.source)}); "
        f"mode <b>{escape(str(report.workload.get('mode')))}</b></p>"
        f"<p class=\"muted\">usable: {gib(gpu.usable_bytes)} = {available} - CUDA context "
        f"{gib(gpu.cuda_context_bytes)} - headroom {gib(gpu.headroom_bytes)}</p>"
        f"<p class=\"muted\">workload: {escape(workload)}</p></header>"
    )


def _verdict(report: Report) -> str:
    rec = report.recommendation
    if rec is None:
        return ('<section class="verdict bad" id="recommendation"><b>No candidate fits.</b> '
                "See the warnings below for what would make it fit.</section>")
    return (
        f'<section class="verdict ok" id="recommendation"><b>Recommendation: '
        f"{escape(rec.precision)}</b> - {escape(rec.reason)}</section>"
    )


def _candidates_table(report: Report) -> str:
    multi = report.strategy is not None
    columns = ["precision", "weights", "overhead", "total", "fits", "headroom"]
    if multi:
        columns = ["precision", "weights (all)", "busiest GPU", "strategy", "fits", "headroom"]
    chosen = report.recommendation.precision if report.recommendation else None
    head = "".join(
        f'<th{" class=text" if c == "strategy" else ""}>{escape(c)}</th>' for c in columns
    )
    rows = []
    for c in report.candidates:
        fits = '<td class="yes">yes</td>' if c.fits else '<td class="no">no</td>'
        if multi:
            cells = (f"<td>{escape(c.precision)}</td><td>{gib(c.weights_bytes)}</td>"
                     f"<td>{gib(c.total_bytes)}</td><td class=text>{escape(c.strategy or '')}</td>")
        else:
            cells = (f"<td>{escape(c.precision)}</td><td>{gib(c.weights_bytes)}</td>"
                     f"<td>{gib(c.total_bytes - c.weights_bytes)}</td>"
                     f"<td>{gib(c.total_bytes)}</td>")
        cls = ' class="chosen"' if c.precision == chosen else ""
        rows.append(f'<tr{cls} data-precision="{escape(c.precision)}">{cells}{fits}'
                    f"<td>{signed_gib(c.headroom_bytes)}</td></tr>")
    return (
        '<section id="candidates"><h2>Candidates</h2><div class="scroll">'
        f'<table id="candidates-table"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div></section>"
    )


def _bar_svg(bar: Bar, extent: int) -> str:
    """One bar as SVG: the free device in grey, segments, the headroom band, the line."""
    unit = BAR_VIEW_WIDTH / extent
    h = BAR_VIEW_HEIGHT
    parts = [
        f'<svg class="bar" viewBox="0 0 {BAR_VIEW_WIDTH} {h}" preserveAspectRatio="none" '
        f'role="img" aria-label="{escape(bar.label)}: {gib(bar.total_bytes)}">',
        f'<rect class="device" x="0" y="0" width="{_num(bar.scale_bytes * unit)}" '
        f'height="{h}" fill="#f1f3f4"/>',
        f'<rect class="headroom" x="{_num(bar.limit_bytes * unit)}" y="0" '
        f'width="{_num(bar.headroom_bytes * unit)}" height="{h}" fill="{HEADROOM_COLOR}"/>',
    ]
    x = 0.0
    for seg in bar.segments:
        style = style_of(seg.component)
        width = seg.bytes * unit
        parts.append(
            f'<rect class="seg seg-{escape(seg.component)}" data-component="'
            f'{escape(seg.component)}" data-bytes="{seg.bytes}" x="{_num(x)}" y="3" '
            f'width="{_num(width)}" height="{h - 6}" fill="{style.color}">'
            f"<title>{escape(style.label)}: {gib(seg.bytes)}</title></rect>"
        )
        x += width
    limit = _num(bar.limit_bytes * unit)
    parts.append(
        f'<line class="limit" x1="{limit}" x2="{limit}" y1="0" y2="{h}" stroke="{LIMIT_COLOR}" '
        'stroke-width="2.5" vector-effect="non-scaling-stroke"/>'
    )
    if extent > bar.scale_bytes:  # someone needs more than the device: mark its end
        end = _num(bar.scale_bytes * unit)
        parts.append(f'<line class="memory" x1="{end}" x2="{end}" y1="0" y2="{h}" '
                     'stroke="#333" stroke-width="1.5" vector-effect="non-scaling-stroke"/>')
    parts.append("</svg>")
    return "".join(parts)


def _bar_row(bar: Bar, extent: int) -> str:
    left = bar.left_bytes
    verdict = (f'<span class="yes">fits, {gib(left)} below the usable line</span>' if bar.fits
               else f'<span class="no">does not fit'
               f'{", " + gib(-left) + " over the usable line" if left < 0 else ""}</span>')
    extra = f'<span class="muted">{escape(bar.detail)}</span>' if bar.detail else ""
    chosen = "<span><b>recommended</b></span>" if bar.chosen else ""
    return (
        f'<div class="bar-row" data-label="{escape(bar.label)}"><div class="bar-head">'
        f"<b>{escape(bar.label)}</b><span>{gib(bar.total_bytes)}</span>{verdict}{extra}"
        f"{chosen}</div>{_bar_svg(bar, extent)}</div>"
    )


def _legend(groups: tuple[BarGroup, ...]) -> str:
    names = sorted({s.component for g in groups for b in g.bars for s in b.segments},
                   key=component_rank)
    first = groups[0].bars[0]
    items = [
        f'<li><span class="swatch" style="background:{style_of(n).color}"></span>'
        f"{escape(style_of(n).label)}</li>"
        for n in names
    ]
    items.append(f'<li><span class="swatch limit" style="background:{LIMIT_COLOR}"></span>'
                 f"usable line ({gib(first.limit_bytes)})</li>")
    items.append(f'<li><span class="swatch" style="background:{HEADROOM_COLOR}"></span>'
                 f"headroom ({gib(first.headroom_bytes)})</li>")
    items.append('<li><span class="swatch" style="background:#f1f3f4"></span>free</li>')
    return f'<ul class="legend">{"".join(items)}</ul>'


def _breakdown(report: Report) -> str:
    groups = bar_groups(report)
    if not any(g.bars for g in groups):
        return ""
    out = ['<section id="breakdown"><h2>Memory breakdown</h2>', _legend(groups)]
    for group in groups:
        extent = max([group.bars[0].scale_bytes, *(b.total_bytes for b in group.bars)])
        out.append(f"<h3>{escape(group.title)}; a full bar is {gib(extent)}</h3>")
        out.extend(_bar_row(bar, extent) for bar in group.bars)
    shares = host_shares(report)
    if shares:
        text = ", ".join(f"{escape(d)} {gib(n)}" for d, n in shares)
        out.append(f'<p class="muted">offloaded off the GPUs: {text}</p>')
    out.append("</section>")
    return "".join(out)


def _nice_step(raw: float) -> float:
    """1, 2, 2.5 or 5 times a power of ten, at least ``raw``."""
    import math

    power = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)


def _sweep_svg(sweep: Sweep) -> str:
    """Totals against the solved variable, one polyline per precision, the usable line."""
    left, right, top, bottom = 58, 12, 14, 40
    xs = [x for c in sweep.curves for x, _ in c.points] or [1]
    ys = [y for c in sweep.curves for _, y in c.points] + [sweep.limit_bytes]
    x0, x1 = min(xs), max(xs)
    y1 = max(ys) * 1.08
    w, h = SWEEP_W - left - right, SWEEP_H - top - bottom

    def px(x: int) -> float:
        return left + (w * (x - x0) / (x1 - x0) if x1 > x0 else w / 2)

    def py(y: float) -> float:
        return top + h - h * y / y1

    parts = [f'<svg class="sweep" viewBox="0 0 {SWEEP_W} {SWEEP_H}" role="img" '
             f'aria-label="memory against {escape(sweep.option)}" font-size="12">',
             f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#ccc"/>']
    step = _nice_step(y1 / GIB / 4)
    value = 0.0
    while value <= y1 / GIB:  # y grid and labels, in GiB
        y = _num(py(value * GIB))
        parts.append(f'<line x1="{left}" x2="{left + w}" y1="{y}" y2="{y}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{y}" text-anchor="end" dominant-baseline="middle"'
                     f">{value:g}</text>")
        value = round(value + step, 6)
    last = -1e9
    for x in sorted(set(xs)):  # the traced values, those that would overlap left out
        if px(x) - last < 36:
            continue
        last = px(x)
        parts.append(f'<text x="{_num(px(x))}" y="{top + h + 16}" text-anchor="middle">{x:,}'
                     "</text>")
    parts.append(f'<text x="{left + w / 2}" y="{SWEEP_H - 4}" text-anchor="middle">'
                 f"{escape(sweep.variable.replace('_', ' '))}</text>"
                 f'<text x="14" y="{top + h / 2}" transform="rotate(-90 14 {top + h / 2})" '
                 'text-anchor="middle">GiB</text>')
    limit_y = _num(py(sweep.limit_bytes))
    parts.append(f'<line class="limit" x1="{left}" x2="{left + w}" y1="{limit_y}" '
                 f'y2="{limit_y}" stroke="{LIMIT_COLOR}" stroke-width="2" stroke-dasharray="6 4"/>'
                 f'<text x="{left + w - 4}" y="{_num(py(sweep.limit_bytes) - 5)}" '
                 f'text-anchor="end" fill="{LIMIT_COLOR}">usable {gib(sweep.limit_bytes)}</text>')
    for i, curve in enumerate(sweep.curves):
        color = SWEEP_COLORS[i % len(SWEEP_COLORS)]
        points = " ".join(f"{_num(px(x))},{_num(py(y))}" for x, y in curve.points)
        parts.append(f'<polyline class="curve" data-precision="{escape(curve.precision)}" '
                     f'points="{points}" fill="none" stroke="{color}" stroke-width="2"/>')
        for x, y in curve.points:
            parts.append(f'<circle cx="{_num(px(x))}" cy="{_num(py(y))}" r="3.5" '
                         f'fill="{color}"><title>{escape(curve.precision)} at {x:,}: '
                         f"{gib(y)}</title></circle>")
    parts.append("</svg>")
    legend = "".join(
        f'<li><span class="swatch" style="background:{SWEEP_COLORS[i % len(SWEEP_COLORS)]}">'
        f"</span>{escape(c.precision)}</li>" for i, c in enumerate(sweep.curves)
    )
    return "".join(parts) + f'<ul class="legend">{legend}</ul>'


def _solutions(report: Report) -> str:
    if not report.solutions:
        return ""
    out = ['<section id="solve"><h2>Largest that fits</h2>']
    for sweep in sweeps(report):
        rows = "".join(
            f"<tr><td>{escape(c.precision)}</td>"
            f"<td>{'none fits' if c.value is None else f'{c.value:,}'}</td>"
            f"<td>{gib(c.needed_bytes)}</td></tr>" for c in sweep.curves
        )
        out.append(
            f"<h3>{escape(sweep.option)}</h3><div class=scroll><table class=solutions><thead>"
            f"<tr><th>precision</th><th>{escape(sweep.option)}</th><th>needs</th></tr></thead>"
            f"<tbody>{rows}</tbody></table></div>{_sweep_svg(sweep)}"
        )
    out.append("</section>")
    return "".join(out)


def _strategy(report: Report) -> str:
    strategy = report.strategy
    if strategy is None:
        return ""
    rows = "".join(
        f"<tr><td>{escape(o.name)}</td><td>{gib(o.per_gpu_bytes)}</td><td>{gib(o.cpu_bytes)}"
        f"</td><td class={'yes' if o.fits else 'no'}>{'yes' if o.fits else 'no'}</td></tr>"
        for o in strategy.options
    )
    table = ("<div class=scroll><table><thead><tr><th>strategy</th><th>per GPU</th>"
             f"<th>host</th><th>fits</th></tr></thead><tbody>{rows}</tbody></table></div>"
             if rows else "")
    return (f'<section id="strategy"><h2>Strategy: {escape(strategy.name)}</h2>'
            f"<p>{escape(strategy.reason)}</p>{table}</section>")


def _code(text: str, label: str) -> str:
    return (f'<details open><summary>{escape(label)}</summary>'
            f'<pre class="copy"><code>{escape(text)}</code></pre></details>')


def _how_to_load(report: Report) -> str:
    rec = report.recommendation
    if rec is None:
        return ""
    out = ['<section id="load"><h2>Load it</h2>',
           _code(json.dumps(rec.load_kwargs, indent=2), "from_pretrained kwargs")]
    out.extend(_code(text, f"--emit {name} ({language})")
               for name, language, text in applicable_snippets(report))
    out.append("</section>")
    return "".join(out)


def _messages(report: Report) -> str:
    notes = [*report.notes, *(report.strategy.notes if report.strategy else ())]
    if not report.warnings and not notes:
        return ""
    items = [f'<li class="warning"><b>warning:</b> {escape(w)}</li>' for w in report.warnings]
    items += [f'<li class="note">note: {escape(n)}</li>' for n in notes]
    return f'<section id="messages"><h2>Warnings and notes</h2><ul class="messages">' \
        f'{"".join(items)}</ul></section>'


def _measured(report: Report) -> str:
    m = report.measured
    if not m or "components" not in m:
        return ""
    rows = "".join(
        f"<tr><td>{escape(name)}</td><td>{gib(m.get('predicted_components', {}).get(name, 0))}"
        f"</td><td>{gib(value)}</td></tr>" for name, value in m["components"].items()
    )
    return (f'<section id="measured"><h2>Measured on {escape(str(m.get("device")))}</h2>'
            f"<p>peak {gib(m.get('peak_bytes'))}, predicted {gib(m.get('predicted_peak_bytes'))}"
            f"</p><div class=scroll><table><thead><tr><th>component</th><th>predicted</th>"
            f"<th>measured</th></tr></thead><tbody>{rows}</tbody></table></div></section>")


def _embedded_json(report: Report) -> str:
    # "</" inside a script element would end it; JSON allows "\/" for "/".
    text = report_json(report).replace("</", "<\\/")
    return f'<script type="application/json" id="qplan-report">{text}</script>'


def render_html(report: Report) -> str:
    model, gpu = report.model, report.gpu
    versions = ", ".join(f"{k} {v}" for k, v in sorted(report.versions.items()))
    body = "".join((
        _header(report), _verdict(report), _candidates_table(report), _breakdown(report),
        _solutions(report), _strategy(report), _how_to_load(report), _messages(report),
        _measured(report),
    ))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>qplan: {escape(model.id)} on {escape(gpu.name)}</title>"
        f"<style>{CSS}</style></head><body><main>{body}"
        f"<footer>{escape(report.schema)}; {escape(versions)}. The JSON report is embedded "
        "in this file (script#qplan-report).</footer></main>"
        f"{_embedded_json(report)}</body></html>\n"
    )


def write_html(report: Report, path: Path) -> None:
    check_html_path(path)
    try:
        path.write_text(render_html(report), encoding="utf-8")
    except OSError as exc:
        raise QplanError(f"cannot write the HTML report to {path}: {exc.strerror}") from None
