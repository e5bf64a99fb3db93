"""The ``qplan`` command: the only module that prints. It parses, calls qplan.api, renders.

Every ``QplanError`` is caught once, here, and becomes a one-line message on stderr with the
error's exit code (2 for usage errors, 1 otherwise); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from qplan.errors import QplanError

app = typer.Typer(
    name="qplan",
    help="GPU memory planner and auto-configurator for Hugging Face language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

T = TypeVar("T")

GpuOpt = Annotated[
    str,
    typer.Option(
        "--gpu",
        "-g",
        help="A GPU name or alias (4090, rtx-4090, A100-80GB), a size (24GiB, 80GB), "
        "or 'auto' for the GPUs in this machine.",
    ),
]
NumGpusOpt = Annotated[
    int | None, typer.Option("--num-gpus", help="Number of such GPUs (default: 1, or 'Nx' prefix).")
]
ModeOpt = Annotated[str, typer.Option("--mode", "-m", help="Workload: load (weights only).")]
PrecisionsOpt = Annotated[
    str | None,
    typer.Option(
        "--precisions",
        "-p",
        help="Comma list of candidates: fp32,bf16,fp16,int8,fp4,nf4,fp4-dq,nf4-dq.",
    ),
]
HeadroomOpt = Annotated[
    str | None,
    typer.Option("--headroom", help="Memory to leave free: a percentage (5%) or a size (1GiB)."),
]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub revision of the model.")]
TrustOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow models that ship their own code.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print only the JSON report on stdout.")]
OutputOpt = Annotated[
    Path | None, typer.Option("--output", "-o", help="Also write the JSON report to this file.")
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks and library logs.")]


def _quiet_libraries() -> None:
    """Library chatter (progress bars, kernel hints) is noise in a planner's output."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    for name in ("transformers", "bitsandbytes", "accelerate", "huggingface_hub", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _guarded(debug: bool, action: Callable[[], T]) -> T:
    """Run ``action``; a QplanError becomes one line on stderr and its exit code."""
    if not debug:
        _quiet_libraries()
    try:
        return action()
    except QplanError as exc:
        if debug:
            raise
        err.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None


def gib(nbytes: int | None) -> str:
    if nbytes is None:
        return "-"
    return f"{nbytes / 1024**3:,.2f} GiB"


def _signed_gib(nbytes: int) -> str:
    return gib(nbytes) if nbytes >= 0 else f"-{gib(-nbytes)}"


def render_report(report: Any) -> None:
    model, gpu = report.model, report.gpu
    count = f"{gpu.count}x " if gpu.count > 1 else ""
    out.print(
        f"[bold]{model.id}[/] ({model.architecture}, {model.parameters / 1e9:.2f}B parameters, "
        f"{model.source}) on [bold]{count}{gpu.name}[/] ({gib(gpu.memory_bytes)}, "
        f"{gpu.source}); mode: {report.workload['mode']}"
    )
    out.print(
        f"usable: {gib(gpu.usable_bytes)} = "
        f"{'free ' + gib(gpu.free_bytes) if gpu.free_bytes is not None else gib(gpu.memory_bytes)}"
        f" - CUDA context {gib(gpu.cuda_context_bytes)} - headroom {gib(gpu.headroom_bytes)}"
    )
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
            _signed_gib(c.headroom_bytes),
            style=style,
        )
    out.print(table)
    for note in report.notes:
        out.print(f"[dim]note: {note}[/]")
    for warning in report.warnings:
        out.print(f"[yellow]warning:[/] {warning}")
    rec = report.recommendation
    if rec is None:
        out.print("[bold red]No candidate fits.[/]")
        return
    out.print(f"[bold green]Recommendation: {rec.precision}[/] - {rec.reason}")
    out.print("from_pretrained kwargs: " + json.dumps(rec.load_kwargs), soft_wrap=True)


def _emit_report(report: Any, as_json: bool, output: Path | None) -> None:
    from qplan.report import report_json

    text = report_json(report)
    if output is not None:
        try:
            output.write_text(text + "\n")
        except OSError as exc:
            raise QplanError(f"cannot write the report to {output}: {exc.strerror}") from None
    if as_json:
        sys.stdout.write(text + "\n")
    else:
        render_report(report)


@app.command()
def estimate(
    model: Annotated[str, typer.Argument(help="Hub id, local folder, or path to config.json.")],
    gpu: GpuOpt = "auto",
    num_gpus: NumGpusOpt = None,
    mode: ModeOpt = "load",
    precisions: PrecisionsOpt = None,
    headroom: HeadroomOpt = None,
    revision: RevisionOpt = None,
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Estimate the memory MODEL needs per precision on a GPU, and recommend one."""

    def run() -> None:
        from qplan.api import estimate as plan

        report = plan(
            model,
            gpu=gpu,
            num_gpus=num_gpus,
            mode=mode,
            precisions=precisions,
            headroom=headroom,
            revision=revision,
            trust_remote_code=trust_remote_code,
        )
        _emit_report(report, as_json, output)

    _guarded(debug, run)


@app.command()
def gpus(as_json: JsonOpt = False, debug: DebugOpt = False) -> None:
    """List the shipped GPU profiles."""

    def run() -> None:
        from dataclasses import asdict

        from qplan.loaders.gpus import load_profiles

        profiles = load_profiles()
        if as_json:
            sys.stdout.write(json.dumps([asdict(p) for p in profiles], indent=2) + "\n")
            return
        table = Table(show_edge=False, header_style="bold")
        for column in ("key", "name", "memory", "cc", "bf16", "fp8", "GB/s", "aliases"):
            table.add_column(column)
        for p in profiles:
            table.add_row(
                p.key,
                p.name,
                gib(p.memory_bytes),
                p.compute_capability,
                "yes" if p.bf16 else "no",
                "yes" if p.fp8 else "no",
                f"{p.bandwidth_gb_s:,.0f}",
                ", ".join(p.aliases[:4]),
            )
        out.print(table)

    _guarded(debug, run)


@app.command()
def models(as_json: JsonOpt = False, debug: DebugOpt = False) -> None:
    """List the bundled offline catalog of model configs."""

    def run() -> None:
        from dataclasses import asdict

        from qplan.loaders.model_source import list_catalog

        entries = list_catalog()
        if as_json:
            sys.stdout.write(json.dumps([asdict(e) for e in entries], indent=2) + "\n")
            return
        table = Table(show_edge=False, header_style="bold")
        for column in ("id", "model_type", "architecture"):
            table.add_column(column)
        for e in entries:
            table.add_row(e.id, e.model_type, e.architecture)
        out.print(table)

    _guarded(debug, run)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
