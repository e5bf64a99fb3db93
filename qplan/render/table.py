"""The terminal tables: the plan's header, its candidates (per device on several GPUs),
the summary under them, measurements, and the plain listings of `qplan gpus` / `models`."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from qplan.render.fmt import component_rank, gib, signed_gib


def render_tables(report: Any, out: Console) -> None:
    """The header, the usable-memory line and the candidates table (per device too)."""
    model, gpu = report.model, report.gpu
    count = f"{gpu.count}x " if gpu.count > 1 else ""
    out.print(
        f"[bold]{model.id}[/] ({model.architecture}, {model.parameters / 1e9:.2f}B parameters, "
        f"{model.source}) on [bold]{count}{gpu.name}[/] ({gib(gpu.memory_bytes)}, "
        f"{gpu.source}); mode: {report.workload['mode']}",
        soft_wrap=True,
    )
    out.print(
        f"usable: {gib(gpu.usable_bytes)} = "
        f"{'free ' + gib(gpu.free_bytes) if gpu.free_bytes is not None else gib(gpu.memory_bytes)}"
        f" - CUDA context {gib(gpu.cuda_context_bytes)} - headroom {gib(gpu.headroom_bytes)}",
        soft_wrap=True,
    )
    if report.strategy is not None:
        _render_multi_candidates(report, out)
    else:
        table = Table(show_edge=False, header_style="bold")
        for column in ("precision", "weights", "overhead", "total", "fits", "headroom"):
            table.add_column(column, justify="left" if column == "precision" else "right")
        chosen = report.recommendation.precision if report.recommendation else None
        for c in report.candidates:
            style = "bold green" if c.precision == chosen else None
            table.add_row(
                c.precision,
                gib(c.weights_bytes),
                gib(c.total_bytes - c.weights_bytes),
                gib(c.total_bytes),
                "yes" if c.fits else "no",
                signed_gib(c.headroom_bytes),
                style=style,
            )
        out.print(table)
    _render_host(report, out)


def _render_host(report: Any, out: Console) -> None:
    """Activation offloading: the pinned host memory each candidate needs beside the GPU."""
    held = [(c.precision, c.host_bytes) for c in report.candidates if c.host_bytes]
    if held:
        out.print("host memory (pinned, offloaded activations): " + ", ".join(
            f"{name} {gib(nbytes)}" for name, nbytes in held), soft_wrap=True)


def render_axolotl_keys(keys: dict[str, Any], out: Console) -> None:
    """Every key of the Axolotl YAML the plan was read from, by what the plan did with it."""
    table = Table(show_edge=False, header_style="bold", title=f"axolotl keys: {keys['path']}")
    table.add_column("keys")
    table.add_column("")
    not_modelled = [f"{k['key']} ({k['effect']})" for k in keys["not_modelled"]]
    for label, items, joiner in (
        ("read", keys["read"], ", "),
        ("not modelled", not_modelled, "\n"),
        ("ignored (no memory)", keys["ignored"], ", "),
        ("unknown (not read)", keys["unknown"], ", "),
    ):
        if items:
            table.add_row(f"{label}: {len(items)}", joiner.join(items))
    out.print(table)


def render_summary(report: Any, out: Console) -> None:
    """The Axolotl keys (when planned from a YAML), notes, warnings, solve results,
    measurements and the recommendation."""
    if getattr(report, "axolotl", None):
        render_axolotl_keys(report.axolotl, out)
    for note in report.notes:
        out.print(f"[dim]note: {note}[/]", soft_wrap=True)
    for warning in report.warnings:
        out.print(f"[yellow]warning:[/] {warning}", soft_wrap=True)
    for solution in report.solutions:
        name = "longest --seq-len" if solution.variable == "seq_len" else "largest --batch"
        value = "none fits" if solution.value is None else f"{solution.value:,}"
        out.print(
            f"{name} for {solution.precision}: {value} (needs {gib(solution.needed_bytes)})"
        )
    if report.measured:
        _render_measured(report.measured, out)
    rec = report.recommendation
    if rec is None:
        out.print("[bold red]No candidate fits.[/]")
        return
    out.print(f"[bold green]Recommendation: {rec.precision}[/] - {rec.reason}", soft_wrap=True)
    chosen_candidate = next(c for c in report.candidates if c.precision == rec.precision)
    parts = ", ".join(
        f"{name} {gib(value)}" for name, value in chosen_candidate.components.items() if value
    )
    out.print(f"[dim]{rec.precision} components: {parts}[/]", soft_wrap=True)
    out.print("from_pretrained kwargs: " + json.dumps(rec.load_kwargs), soft_wrap=True)


def _render_multi_candidates(report: Any, out: Console) -> None:
    """Several GPUs: each candidate's whole weights and its busiest GPU, then the devices."""
    table = Table(show_edge=False, header_style="bold")
    for column in ("precision", "weights (all)", "busiest GPU", "strategy", "fits", "headroom"):
        table.add_column(column, justify="left" if column in ("precision", "strategy") else "right")
    chosen = report.recommendation.precision if report.recommendation else None
    for c in report.candidates:
        style = "bold green" if c.precision == chosen else None
        table.add_row(c.precision, gib(c.weights_bytes), gib(c.total_bytes), c.strategy or "",
                      "yes" if c.fits else "no", signed_gib(c.headroom_bytes), style=style)
    out.print(table)
    strategy = report.strategy
    which = chosen or "closest candidate"
    out.print(f"[bold]strategy ({which}): {strategy.name}[/] - {strategy.reason}",
              soft_wrap=True)
    if strategy.options:
        tried = ", ".join(
            f"{o.name} {gib(o.per_gpu_bytes)}{' + host ' + gib(o.cpu_bytes) if o.cpu_bytes else ''}"
            f" ({'fits' if o.fits else 'no'})" for o in strategy.options
        )
        out.print(f"[dim]per GPU: {tried}[/]", soft_wrap=True)
    # One column per device, identical neighbours merged (8 equal ranks -> "cuda:0-7").
    groups: list[list[Any]] = []
    for d in report.devices:
        same = groups and groups[-1][0].components == d.components and \
            groups[-1][0].limit_bytes == d.limit_bytes
        if same:
            groups[-1].append(d)
        else:
            groups.append([d])
    names = sorted({k for d in report.devices for k, v in d.components.items() if v},
                   key=component_rank)
    table = Table(show_edge=False, header_style="bold")
    table.add_column("per device")
    for group in groups:
        label = group[0].device
        if len(group) > 1:
            label += f"-{group[-1].device.rpartition(':')[2]}"
        table.add_column(label, justify="right")
    for n in names:
        table.add_row(n, *(gib(g[0].components.get(n, 0)) for g in groups))
    table.add_row("total", *(gib(g[0].total_bytes) for g in groups), style="bold")
    table.add_row("limit", *(gib(g[0].limit_bytes) for g in groups))
    out.print(table)
    for note in strategy.notes:
        out.print(f"[dim]note: {note}[/]", soft_wrap=True)
    if strategy.offloaded:
        shown = ", ".join(strategy.offloaded[:4]) + (", ..." if len(strategy.offloaded) > 4 else "")
        out.print(f"[yellow]warning:[/] {len(strategy.offloaded)} module(s) offloaded "
                  f"({shown}): generation will be much slower", soft_wrap=True)


def _render_measured(measured: dict[str, Any], out: Console) -> None:
    out.print(
        f"measured on {measured['device']} ({measured['precision']}, "
        f"{measured['layers']} layers): peak {gib(measured['peak_bytes'])}, predicted "
        f"{gib(measured['predicted_peak_bytes'])}, error {measured['error_pct']:+.2f}%"
    )
    table = Table(show_edge=False, header_style="bold")
    for column in ("component", "predicted", "measured"):
        table.add_column(column, justify="left" if column == "component" else "right")
    for name, value in measured["components"].items():
        table.add_row(name, gib(measured["predicted_components"].get(name, 0)), gib(value))
    out.print(table)
    if "host_bytes" in measured:
        out.print(f"host memory: {gib(measured['host_bytes'])} measured, "
                  f"{gib(measured['predicted_host_bytes'])} predicted")




def render_loaded(report: Any, out: Console) -> None:
    """What `qplan load` measured against the plan."""
    m = report.measured
    out.print(
        f"loaded [bold]{report.model.id}[/] at [bold]{m['precision']}[/] on {m['device']} "
        f"(attention: {m['attn_implementation']})"
    )
    seen = m["weights_bytes"] + m.get("adapter_bytes", 0)
    label = "weights + adapters" if "adapter_bytes" in m else "weights"
    out.print(
        f"{label}: predicted {gib(m['predicted_bytes'])} ({m['predicted_bytes']:,} B), measured "
        f"{gib(seen)} ({seen:,} B), error {m['error_pct']:+.2f}%"
    )
    if "trainable_parameters" in m:
        out.print(f"trainable parameters: {m['trainable_parameters']:,} of {m['all_parameters']:,}")
    if "planned_resident_bytes" in m:
        out.print(
            f"after the training patches: planned {gib(m['planned_resident_bytes'])}, resident "
            f"{gib(m['resident_bytes'])}, error {m['resident_error_pct']:+.2f}%"
        )
    if m["device"] == "cuda":
        out.print(
            f"CUDA: allocated {gib(m['allocated_bytes'])}, reserved {gib(m['reserved_bytes'])}, "
            f"NVML used {gib(m.get('nvml_used_bytes'))}; planned total "
            f"{gib(m['planned_total_bytes'])}"
        )
    for warning in report.warnings:
        out.print(f"[yellow]warning:[/] {warning}")


def render_listing(
    items: Sequence[Any], columns: tuple[str, ...], row: Callable[[Any], Sequence[str]],
    out: Console,
) -> None:
    """A listing as a table, ``row`` giving each item's cells."""
    table = Table(show_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column)
    for item in items:
        table.add_row(*row(item))
    out.print(table)
