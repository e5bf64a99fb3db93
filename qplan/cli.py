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
ModeOpt = Annotated[
    str,
    typer.Option(
        "--mode",
        "-m",
        help="Workload: inference (KV cache + prefill), lora, qlora (LoRA on 4-bit), full "
        "(full fine-tuning), or load (weights only).",
    ),
]
BatchOpt = Annotated[int, typer.Option("--batch", "-b", help="Batch (micro-batch for training).")]
SeqOpt = Annotated[
    int | None,
    typer.Option(
        "--seq-len",
        "-s",
        help="Tokens per sequence (default: min(4096, max positions) for inference, "
        "min(2048, max positions) for training).",
    ),
]
KvOpt = Annotated[
    str | None, typer.Option("--kv-dtype", help="KV cache dtype (default: the model's).")
]
LoraROpt = Annotated[int, typer.Option("--lora-r", help="LoRA rank.")]
LoraAlphaOpt = Annotated[int | None, typer.Option("--lora-alpha", help="LoRA alpha (2r).")]
LoraTargetsOpt = Annotated[
    str, typer.Option("--lora-targets", help="all-linear, or a comma list of module names.")
]
LoraDropoutOpt = Annotated[float, typer.Option("--lora-dropout", help="LoRA dropout.")]
GcOpt = Annotated[
    bool,
    typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Recompute activations in the backward (training).",
    ),
]
OptimOpt = Annotated[
    str,
    typer.Option(
        "--optimizer", help="adamw (torch fused), adamw_8bit, paged_adamw_8bit, sgd, adafactor."
    ),
]
AttnOpt = Annotated[str, typer.Option("--attn", help="sdpa, eager or flash_attention_2.")]
SolveOpt = Annotated[
    str | None,
    typer.Option("--solve", help="batch or seq-len: the largest value that fits, per precision."),
]
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
    """Bytes in the largest binary unit that keeps the number >= 1 (GiB at most)."""
    if nbytes is None:
        return "-"
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:,.2f} {unit}"
    return f"{nbytes} B"


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
    for solution in report.solutions:
        name = "longest --seq-len" if solution.variable == "seq_len" else "largest --batch"
        value = "none fits" if solution.value is None else f"{solution.value:,}"
        out.print(
            f"{name} for {solution.precision}: {value} (needs {gib(solution.needed_bytes)})"
        )
    if report.measured:
        _render_measured(report.measured)
    rec = report.recommendation
    if rec is None:
        out.print("[bold red]No candidate fits.[/]")
        return
    out.print(f"[bold green]Recommendation: {rec.precision}[/] - {rec.reason}")
    chosen_candidate = next(c for c in report.candidates if c.precision == rec.precision)
    parts = ", ".join(
        f"{name} {gib(value)}" for name, value in chosen_candidate.components.items() if value
    )
    out.print(f"[dim]{rec.precision} components: {parts}[/]", soft_wrap=True)
    out.print("from_pretrained kwargs: " + json.dumps(rec.load_kwargs), soft_wrap=True)


def _render_measured(measured: dict[str, Any]) -> None:
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


def _workload_options(
    batch: int,
    seq_len: int | None,
    kv_dtype: str | None,
    lora_r: int,
    lora_alpha: int | None,
    lora_targets: str,
    lora_dropout: float,
    gradient_checkpointing: bool,
    optimizer: str,
    attn: str,
) -> dict[str, Any]:
    return dict(
        batch=batch,
        seq_len=seq_len,
        kv_dtype=kv_dtype,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_targets=lora_targets,
        lora_dropout=lora_dropout,
        gradient_checkpointing=gradient_checkpointing,
        optimizer=optimizer,
        attn=attn,
    )


@app.command()
def estimate(
    model: Annotated[str, typer.Argument(help="Hub id, local folder, or path to config.json.")],
    gpu: GpuOpt = "auto",
    num_gpus: NumGpusOpt = None,
    mode: ModeOpt = "inference",
    precisions: PrecisionsOpt = None,
    batch: BatchOpt = 1,
    seq_len: SeqOpt = None,
    kv_dtype: KvOpt = None,
    lora_r: LoraROpt = 16,
    lora_alpha: LoraAlphaOpt = None,
    lora_targets: LoraTargetsOpt = "all-linear",
    lora_dropout: LoraDropoutOpt = 0.0,
    gradient_checkpointing: GcOpt = True,
    optimizer: OptimOpt = "adamw",
    attn: AttnOpt = "sdpa",
    solve: SolveOpt = None,
    headroom: HeadroomOpt = None,
    revision: RevisionOpt = None,
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Estimate the memory MODEL needs per precision for a workload on a GPU; recommend one."""

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
            solve=solve,
            **_workload_options(
                batch, seq_len, kv_dtype, lora_r, lora_alpha, lora_targets, lora_dropout,
                gradient_checkpointing, optimizer, attn,
            ),
        )
        _emit_report(report, as_json, output)

    _guarded(debug, run)


@app.command()
def measure(
    model: Annotated[str, typer.Argument(help="Hub id, local folder, or path to config.json.")],
    precision: Annotated[
        str, typer.Option("--precision", help="The precision to run (default bf16).")
    ] = "bf16",
    mode: ModeOpt = "inference",
    layers: Annotated[
        int | None, typer.Option("--layers", help="Keep only the first N decoder layers.")
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="cpu or cuda (default: cuda if present).")
    ] = None,
    gpu: GpuOpt = "80GiB",
    batch: BatchOpt = 1,
    seq_len: SeqOpt = None,
    kv_dtype: KvOpt = None,
    lora_r: LoraROpt = 16,
    lora_alpha: LoraAlphaOpt = None,
    lora_targets: LoraTargetsOpt = "all-linear",
    lora_dropout: LoraDropoutOpt = 0.0,
    gradient_checkpointing: GcOpt = True,
    optimizer: OptimOpt = "adamw",
    attn: AttnOpt = "sdpa",
    revision: RevisionOpt = None,
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Run real steps of a workload on random weights here, and compare with the prediction."""

    def run() -> None:
        from qplan.api import measure_workload

        report = measure_workload(
            model,
            precision=precision,
            mode=mode,
            layers=layers,
            device=device,
            gpu=gpu,
            revision=revision,
            trust_remote_code=trust_remote_code,
            **_workload_options(
                batch, seq_len, kv_dtype, lora_r, lora_alpha, lora_targets, lora_dropout,
                gradient_checkpointing, optimizer, attn,
            ),
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
