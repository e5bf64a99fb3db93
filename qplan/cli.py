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

from qplan.errors import QplanError, UsageError

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
BatchOpt = Annotated[
    int | None, typer.Option("--batch", "-b", help="Batch (micro-batch for training); 1.")
]
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
LoraROpt = Annotated[int | None, typer.Option("--lora-r", help="LoRA rank (16).")]
LoraAlphaOpt = Annotated[int | None, typer.Option("--lora-alpha", help="LoRA alpha (2r).")]
LoraTargetsOpt = Annotated[
    str | None,
    typer.Option("--lora-targets", help="all-linear (default), or a comma list of modules."),
]
LoraDropoutOpt = Annotated[float | None, typer.Option("--lora-dropout", help="LoRA dropout (0).")]
GcOpt = Annotated[
    bool | None,
    typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Recompute activations in the backward (training; on by default).",
    ),
]
OptimOpt = Annotated[
    str | None,
    typer.Option(
        "--optimizer", help="adamw (torch fused, default), adamw_8bit, paged_adamw_8bit, sgd, "
        "adafactor."
    ),
]
AttnOpt = Annotated[
    str | None, typer.Option("--attn", help="sdpa (default), eager or flash_attention_2.")
]
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
        _render_multi_candidates(report)
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
                _signed_gib(c.headroom_bytes),
                style=style,
            )
        out.print(table)
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
        _render_measured(report.measured)
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


def _render_multi_candidates(report: Any) -> None:
    """Several GPUs: each candidate's whole weights and its busiest GPU, then the devices."""
    table = Table(show_edge=False, header_style="bold")
    for column in ("precision", "weights (all)", "busiest GPU", "strategy", "fits", "headroom"):
        table.add_column(column, justify="left" if column in ("precision", "strategy") else "right")
    chosen = report.recommendation.precision if report.recommendation else None
    for c in report.candidates:
        style = "bold green" if c.precision == chosen else None
        table.add_row(c.precision, gib(c.weights_bytes), gib(c.total_bytes), c.strategy or "",
                      "yes" if c.fits else "no", _signed_gib(c.headroom_bytes), style=style)
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
                   key=_component_rank)
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


_COMPONENTS = ("weights", "adapters", "gradients", "optimizer_states", "model_states",
               "gathered", "kv_cache", "logits", "activations", "transients", "allocator",
               "communication", "offloaded", "cuda_context")


def _component_rank(name: str) -> int:
    return _COMPONENTS.index(name) if name in _COMPONENTS else len(_COMPONENTS)


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


def _emit_report(report: Any, as_json: bool, output: Path | None, render: bool = True) -> None:
    from qplan.report import report_json

    text = report_json(report)
    if output is not None:
        try:
            output.write_text(text + "\n")
        except OSError as exc:
            raise QplanError(f"cannot write the report to {output}: {exc.strerror}") from None
    if as_json:
        sys.stdout.write(text + "\n")
    elif render:
        render_report(report)


def _set_only(**options: Any) -> dict[str, Any]:
    return {key: value for key, value in options.items() if value is not None}


def _workload_options(
    batch: int | None,
    seq_len: int | None,
    kv_dtype: str | None,
    lora_r: int | None,
    lora_alpha: int | None,
    lora_targets: str | None,
    lora_dropout: float | None,
    gradient_checkpointing: bool | None,
    optimizer: str | None,
    attn: str | None,
) -> dict[str, Any]:
    """The workload options the user set (unset ones keep the API's defaults)."""
    return _set_only(
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


EmitOpt = Annotated[
    str | None,
    typer.Option(
        "--emit",
        help="Print the plan as code/config: transformers, peft, axolotl or accelerate.",
    ),
]
AxolotlOpt = Annotated[
    Path | None, typer.Option("--axolotl", help="Read the model and workload from an Axolotl YAML.")
]


@app.command()
def estimate(
    model: Annotated[
        str | None, typer.Argument(help="Hub id, local folder, or path to config.json.")
    ] = None,
    gpu: GpuOpt = "auto",
    num_gpus: NumGpusOpt = None,
    mode: Annotated[
        str | None,
        typer.Option(
            "--mode",
            "-m",
            help="Workload: inference (default: KV cache + prefill), lora, qlora (LoRA on "
            "4-bit), full (full fine-tuning), or load (weights only).",
        ),
    ] = None,
    precisions: PrecisionsOpt = None,
    batch: BatchOpt = None,
    seq_len: SeqOpt = None,
    kv_dtype: KvOpt = None,
    lora_r: LoraROpt = None,
    lora_alpha: LoraAlphaOpt = None,
    lora_targets: LoraTargetsOpt = None,
    lora_dropout: LoraDropoutOpt = None,
    gradient_checkpointing: GcOpt = None,
    optimizer: OptimOpt = None,
    attn: AttnOpt = None,
    solve: SolveOpt = None,
    headroom: HeadroomOpt = None,
    revision: RevisionOpt = None,
    trust_remote_code: TrustOpt = False,
    emit: EmitOpt = None,
    axolotl: AxolotlOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Estimate the memory MODEL needs per precision for a workload on a GPU; recommend one."""

    def run() -> None:
        from qplan.api import estimate as plan

        options: dict[str, Any] = _set_only(
            num_gpus=num_gpus, precisions=precisions, headroom=headroom, revision=revision,
            solve=solve, **_workload_options(
                batch, seq_len, kv_dtype, lora_r, lora_alpha, lora_targets, lora_dropout,
                gradient_checkpointing, optimizer, attn,
            ),
        )
        if mode is not None:
            options["mode"] = mode
        target_gpu, target_model = gpu, model
        if axolotl is not None:
            from qplan.loaders.axolotl import read_axolotl

            plan_file = read_axolotl(axolotl)
            target_model = model or plan_file.model
            options = {**plan_file.estimate_kwargs, **options}  # flags win over the YAML
            if gpu == "auto" and plan_file.gpu:
                target_gpu = plan_file.gpu
            for note in plan_file.notes:
                err.print(f"[dim]note: {note}[/]", soft_wrap=True)
            if plan_file.unused_keys:
                err.print(
                    f"[dim]note: not used for the plan: {', '.join(plan_file.unused_keys)}[/]",
                    soft_wrap=True,
                )
        if target_model is None:
            raise UsageError("no model given; pass MODEL or --axolotl FILE")
        if emit is not None and emit not in EMITTERS:
            raise UsageError(f"--emit {emit!r}: choose one of {', '.join(EMITTERS)}")
        report = plan(target_model, gpu=target_gpu, trust_remote_code=trust_remote_code,
                      **options)
        if emit is not None:
            if output is not None:
                _emit_report(report, False, output, render=False)
            sys.stdout.write(_emit_text(emit, report))
            return
        _emit_report(report, as_json, output)

    _guarded(debug, run)


EMITTERS = ("transformers", "peft", "axolotl", "accelerate")


def _emit_text(kind: str, report: Any) -> str:
    from qplan.planner.emit import emit_axolotl, emit_peft, emit_transformers
    from qplan.planner.emit_accelerate import emit_accelerate

    if kind == "accelerate":
        return emit_accelerate(report)

    if kind == "transformers":
        return emit_transformers(report)
    if kind == "peft":
        # The loading snippet first, so what is printed runs as a whole.
        return emit_transformers(report) + "\n" + emit_peft(report)
    return emit_axolotl(report)


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
    batch: BatchOpt = None,
    seq_len: SeqOpt = None,
    kv_dtype: KvOpt = None,
    lora_r: LoraROpt = None,
    lora_alpha: LoraAlphaOpt = None,
    lora_targets: LoraTargetsOpt = None,
    lora_dropout: LoraDropoutOpt = None,
    gradient_checkpointing: GcOpt = None,
    optimizer: OptimOpt = None,
    attn: AttnOpt = None,
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


def _print_list(items: list[Any], columns: tuple[str, ...], row: Any, as_json: bool) -> None:
    """A listing as JSON (the dataclasses) or as a table (``row`` gives the cells)."""
    from dataclasses import asdict

    if as_json:
        sys.stdout.write(json.dumps([asdict(item) for item in items], indent=2) + "\n")
        return
    table = Table(show_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column)
    for item in items:
        table.add_row(*row(item))
    out.print(table)


@app.command()
def gpus(as_json: JsonOpt = False, debug: DebugOpt = False) -> None:
    """List the shipped GPU profiles."""

    def run() -> None:
        from qplan.loaders.gpus import load_profiles

        _print_list(
            list(load_profiles()),
            ("key", "name", "memory", "cc", "bf16", "fp8", "GB/s", "aliases"),
            lambda p: (
                p.key, p.name, gib(p.memory_bytes), p.compute_capability,
                "yes" if p.bf16 else "no", "yes" if p.fp8 else "no",
                f"{p.bandwidth_gb_s:,.0f}", ", ".join(p.aliases[:4]),
            ),
            as_json,
        )

    _guarded(debug, run)


@app.command()
def models(as_json: JsonOpt = False, debug: DebugOpt = False) -> None:
    """List the bundled offline catalog of model configs."""

    def run() -> None:
        from qplan.loaders.model_source import list_catalog

        _print_list(
            list_catalog(),
            ("id", "model_type", "architecture"),
            lambda e: (e.id, e.model_type, e.architecture),
            as_json,
        )

    _guarded(debug, run)


@app.command()
def load(
    model: Annotated[
        str | None,
        typer.Argument(help="Hub id, folder or config.json (optional with --from-report)."),
    ] = None,
    gpu: GpuOpt = "auto",
    num_gpus: NumGpusOpt = None,
    mode: Annotated[
        str | None, typer.Option("--mode", "-m", help="load, inference, lora, qlora, full.")
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option("--precision", help="Load this candidate instead of the recommendation."),
    ] = None,
    from_report: Annotated[
        Path | None,
        typer.Option("--from-report", help="Load exactly what an earlier `estimate --json` chose."),
    ] = None,
    random_weights: Annotated[
        bool,
        typer.Option("--random-weights", help="Random weights from the config (a dry run)."),
    ] = False,
    device: Annotated[
        str | None, typer.Option("--device", help="cpu or cuda (default: cuda when present).")
    ] = None,
    batch: BatchOpt = None,
    seq_len: SeqOpt = None,
    kv_dtype: KvOpt = None,
    lora_r: LoraROpt = None,
    lora_alpha: LoraAlphaOpt = None,
    lora_targets: LoraTargetsOpt = None,
    lora_dropout: LoraDropoutOpt = None,
    gradient_checkpointing: GcOpt = None,
    optimizer: OptimOpt = None,
    attn: Annotated[
        str | None,
        typer.Option(
            "--attn", help="Default: flash_attention_2 when installed on cc >= 8.0, else sdpa."
        ),
    ] = None,
    headroom: HeadroomOpt = None,
    revision: RevisionOpt = None,
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Load MODEL as planned (quantisation, dtype, placement, attention, training patches)
    and report predicted against measured memory."""

    def run() -> None:
        from qplan.loading import load as load_model

        options = _set_only(
            num_gpus=num_gpus, mode=mode, headroom=headroom, revision=revision,
            **_workload_options(
                batch, seq_len, kv_dtype, lora_r, lora_alpha, lora_targets, lora_dropout,
                gradient_checkpointing, optimizer, attn,
            ),
        )
        if trust_remote_code:
            options["trust_remote_code"] = True
        progress = None if as_json else (lambda message: err.print(f"[dim]{message}...[/]"))
        loaded = load_model(
            model, gpu=gpu, precision=precision, from_report=from_report,
            random_weights=random_weights, device=device, progress=progress, **options,
        )
        report = loaded.report
        if as_json or output is not None:
            _emit_report(report, as_json, output, render=False)
        if not as_json:
            _render_loaded(report)

    _guarded(debug, run)


def _render_loaded(report: Any) -> None:
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


def main() -> None:
    """Run the app, then leave without the interpreter's teardown.

    Tearing down the ~2,600 modules torch and transformers import takes about a second and
    does nothing for a command-line run, so flush and exit directly.
    """
    code = 0
    try:
        app()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
