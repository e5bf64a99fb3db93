"""The ``qplan`` command: the only module that prints. It parses, calls qplan.api, renders.

Every ``QplanError`` is caught once, here, and becomes a one-line message on stderr with the
error's exit code (2 for usage errors, 1 otherwise); any other exception becomes one line
naming the model, the step and the library that raised it, exit 3. With ``--json`` stdout
carries the error as a ``qplan.error/v1`` object, so a pipeline always reads JSON.
``--debug`` re-raises with the traceback.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import select
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

try:  # typer >= 0.20 carries its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click import exceptions as click_errors  # type: ignore[no-redef]

from qplan.errors import (
    UNEXPECTED_EXIT_CODE,
    QplanError,
    UsageError,
    current_step,
    raising_library,
    reset_step,
    unexpected_summary,
)
from qplan.planner.collector import TRACE_GC_THRESHOLDS
from qplan.planner.workloads import IMAGE_MODES, WORKLOADS, modes_help
from qplan.progress import erase as erase_progress
from qplan.progress import steps_on_terminal
from qplan.render import EMITTERS, check_outputs, emit_text, render_terminal, write_outputs
from qplan.render.fmt import gib
from qplan.render.table import render_listing, render_loaded
from qplan.startup import import_planning_libraries

ERROR_SCHEMA_ID = "qplan.error/v1"


def error_object(message: str, kind: str, exit_code: int, **extra: Any) -> dict[str, Any]:
    """The ``qplan.error/v1`` object (qplan/schema/error.v1.json) printed under --json."""
    return {"schema": ERROR_SCHEMA_ID, "error": message, "kind": kind, "exit_code": exit_code,
            **extra}


# What a shell reports for a command its pipe's reader left (128 + SIGPIPE: `yes | head`).
READER_GONE_EXIT_CODE = 141


def _reader_gone(exit_code: int = READER_GONE_EXIT_CODE, stream: Any = None) -> None:
    """The reader of stdout (or ``stream``) closed the pipe (``qplan ... --json | head
    -c 100``): nobody is left to read a report or an error, and it is no failure of the
    plan. Leave quietly, that stream on /dev/null so that the last flush does not raise."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, (stream or sys.__stdout__).fileno())
    raise typer.Exit(exit_code)


def _reader_left(stream: Any) -> bool:
    """Whether ``stream`` writes to a pipe whose reader has closed it (poll's POLLERR on
    its write end): a BrokenPipeError from anywhere else is a failure like any other."""
    try:
        poller = select.poll()
        poller.register(stream.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no poll here, or no descriptor
        return False


class _Console(Console):
    """rich's Console, leaving as ``_reader_gone`` does when the pipe's reader is gone
    (rich's own default exits 1, which qplan's exit codes give to failed plans)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        _reader_gone(stream=sys.__stderr__ if self.stderr else sys.__stdout__)


def _fail(message: str, kind: str, exit_code: int, as_json: bool, **extra: Any) -> None:
    """One line on stderr, the JSON error on stdout under --json; leaves with ``exit_code``."""
    # escape: messages may hold brackets ('pip install "qplan[plot]"', lists, paths).
    _Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {escape(message)}",
                                                 soft_wrap=True, markup=True)
    if as_json:
        try:
            sys.stdout.write(json.dumps(error_object(message, kind, exit_code, **extra)) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:  # the error on stderr stands, and its exit code
            _reader_gone(exit_code)
    raise typer.Exit(exit_code)


class _OneLineErrors(TyperGroup):
    """click's own parsing errors (an unknown option, ``--batch abc``) as one line too,
    in the same shape as qplan's errors, instead of click's usage box."""

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        try:
            result = super().main(argv, prog_name, complete_var, False, **extra)
        except click_errors.NoArgsIsHelpError as exc:
            sys.stdout.write((exc.ctx.get_help() if exc.ctx else str(exc)) + "\n")
            sys.exit(0)
        except click_errors.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx else "qplan"
            message = " ".join(exc.format_message().split())
            try:
                _fail(f"{message} (see `{command} --help`)", "usage", 2, "--json" in argv)
            except typer.Exit as leave:
                sys.exit(leave.exit_code)
        except click_errors.ClickException as exc:
            try:
                _fail(" ".join(exc.format_message().split()), "usage", exc.exit_code,
                      "--json" in argv)
            except typer.Exit as leave:
                sys.exit(leave.exit_code)
        except typer.Abort:
            sys.stderr.write("Aborted!\n")
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    name="qplan",
    help="GPU memory planner and auto-configurator for Hugging Face language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = _Console(highlight=False)
err = _Console(stderr=True, highlight=False)

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
    typer.Option("--mode", "-m", help=f"Workload: {modes_help()}."),
]


def _options_help() -> str:
    parts = [f"{kind.name}: " + "; ".join(
        f"{o.name} ({o.help})" for o in kind.options)
        for kind in WORKLOADS.values() if kind.options]
    return "A workload's own option, NAME=VALUE (repeatable). " + " | ".join(parts)


WorkloadOpt = Annotated[
    list[str] | None,
    typer.Option("--option", "-O", help=_options_help()),
]


def _mode_options(pairs: list[str] | None) -> dict[str, str]:
    """``--option adapter=full --option ref_model=precomputed`` -> keyword arguments (the
    mode's module checks names and values)."""
    options: dict[str, str] = {}
    for pair in pairs or ():
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--option {pair!r}: write NAME=VALUE, e.g. --option adapter=full")
        options[name.strip().replace("-", "_")] = value.strip()
    return options
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
GcReentrantOpt = Annotated[
    bool | None,
    typer.Option(
        "--gc-reentrant/--no-gc-reentrant",
        help="Reentrant gradient checkpointing (Axolotl's default) or not (transformers' and "
        "qplan's default): reentrant keeps only each layer's input, which matters for 8-bit "
        "layers.",
    ),
]
LoraRegexOpt = Annotated[
    str | None,
    typer.Option(
        "--lora-target-regex",
        help="LoRA targets as one regular expression matched against full module names "
        "(peft's re.fullmatch), instead of --lora-targets.",
    ),
]
FusedCeOpt = Annotated[
    str | None,
    typer.Option(
        "--fused-ce",
        help="Training loss without logits: cce (Cut Cross Entropy) or liger (Liger's fused "
        "linear cross-entropy).",
    ),
]
OffloadOpt = Annotated[
    bool | None,
    typer.Option(
        "--activation-offloading/--no-activation-offloading",
        help="Axolotl's activation_offloading (training): every layer checkpointed, what "
        "autograd saves moved to pinned host memory (TRL's OffloadActivations); the host "
        "memory is reported beside the GPU's.",
    ),
]
PackingOpt = Annotated[
    bool | None,
    typer.Option(
        "--sample-packing/--no-sample-packing",
        help="Axolotl's sample_packing (training): the micro-batch packed into one row of "
        "batch x seq-len tokens, position ids restarting per sequence (varlen flash "
        "attention, or a block-diagonal mask with sdpa/eager).",
    ),
]
UnfrozenOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--unfrozen-parameters",
        help="Full fine-tuning of the matching parameters only (Axolotl's "
        "unfrozen_parameters: a regex with literal periods matched from the start of each "
        "name, optional [start:end] rows); repeat for several.",
    ),
]
LigerNormOpt = Annotated[
    bool | None,
    typer.Option(
        "--liger-rms-norm/--no-liger-rms-norm",
        help="Liger's RMSNorm kernel (Axolotl's liger_rms_norm): float32 inverse RMS per "
        "row, backward in place.",
    ),
]
LigerGluOpt = Annotated[
    bool | None,
    typer.Option(
        "--liger-glu/--no-liger-glu",
        help="Liger's SwiGLU kernel (Axolotl's liger_glu_activation): the MLP keeps only "
        "the gate and up projections, backward in place.",
    ),
]
LigerRopeOpt = Annotated[
    bool | None,
    typer.Option(
        "--liger-rope/--no-liger-rope",
        help="Liger's RoPE kernel (Axolotl's liger_rope): query and key rotated in place, "
        "where Liger patches the family's apply_rotary_pos_emb.",
    ),
]
LigerLayerNormOpt = Annotated[
    bool | None,
    typer.Option(
        "--liger-layer-norm/--no-liger-layer-norm",
        help="Liger's LayerNorm kernel (Axolotl's liger_layer_norm): float32 mean and "
        "inverse std per row, where Liger patches the family's LayerNorm (vision towers).",
    ),
]
ImagesOpt = Annotated[
    int | None,
    typer.Option(
        "--images",
        help="Images per sequence for a vision-language model (--mode "
        f"{', '.join(IMAGE_MODES)}): each goes through the vision tower and projector, "
        "and its placeholder tokens (per the model's processor: 576 for llava-1.5, 256 "
        "for Gemma 3, by size for Qwen2-VL) count in --seq-len. Default 0: text only.",
    ),
]
ImageSizeOpt = Annotated[
    str | None,
    typer.Option(
        "--image-size",
        help="Image size before the processor, 448 or HxW (Axolotl's image_size): sets the "
        "tokens of dynamic-resolution models (Qwen2-VL; default 448x448); fixed-size "
        "towers resize to their own.",
    ),
]
TrainVisionOpt = Annotated[
    bool | None,
    typer.Option(
        "--train-vision/--freeze-vision",
        help="Train the vision tower and projector, or freeze them (Axolotl's "
        "freeze_mm_modules). Default: frozen for LoRA/QLoRA (adapters on the language "
        "model only), trained for full fine-tuning.",
    ),
]
MoeQuantOpt = Annotated[
    bool | None,
    typer.Option(
        "--quantize-moe-experts/--no-quantize-moe-experts",
        help="Axolotl's quantize_moe_experts (lora/qlora on bitsandbytes): fused 3-D expert "
        "parameters quantised too (4-bit parametrisation or row-wise int8), dequantised on "
        "access.",
    ),
]
KbitUpcastOpt = Annotated[
    bool | None,
    typer.Option(
        "--kbit-upcast/--no-kbit-upcast",
        help="LoRA on a k-bit base: keep peft's float32 upcast of norms, embeddings and "
        "lm_head (default), or cast them back to the load dtype as Axolotl's loader does "
        "(what --axolotl plans).",
    ),
]
LoraMlpKernelOpt = Annotated[
    bool | None,
    typer.Option(
        "--lora-mlp-kernel/--no-lora-mlp-kernel",
        help="Axolotl's fused LoRA MLP (lora_mlp_kernel): gate, up and down with their "
        "adapters in one autograd function keeping X, gate and up; backward in place.",
    ),
]
LoraQkvKernelOpt = Annotated[
    bool | None,
    typer.Option(
        "--lora-qkv-kernel/--no-lora-qkv-kernel",
        help="Axolotl's fused LoRA Q/K/V projections (lora_qkv_kernel): only their input "
        "and adapters kept for backward.",
    ),
]
LoraOKernelOpt = Annotated[
    bool | None,
    typer.Option(
        "--lora-o-kernel/--no-lora-o-kernel",
        help="Axolotl's fused LoRA output projection (lora_o_kernel).",
    ),
]
LoraParamsOpt = Annotated[
    str | None,
    typer.Option(
        "--lora-target-parameters",
        help="LoRA on parameters (peft's target_parameters, Axolotl's "
        "lora_target_parameters): comma list such as "
        "mlp.experts.gate_up_proj,mlp.experts.down_proj.",
    ),
]
OptimOpt = Annotated[
    str | None,
    typer.Option(
        "--optimizer", help="adamw (torch fused, default), adamw_8bit, paged_adamw_8bit (bnb), "
        "adamw_torch_8bit, adamw_torch_4bit (torchao), sgd, adafactor."
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
        help=("Comma list of candidates: fp32,bf16,fp16,int8,fp4,nf4,fp4-dq,nf4-dq,fp8 "
              "(fp8 is a default candidate on compute capability 8.9+)."),
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
    # transformers' modeling_utils imports every quantiser, torchao's too when it is
    # installed (for any model, quantised or not), and torchao then reports the kernels it
    # cannot load for this platform and torch's pytree deprecations: nothing a plan uses.
    for name in ("transformers", "bitsandbytes", "accelerate", "huggingface_hub", "peft",
                 "torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # DeepSpeed (imported by TRL's trainers where it is installed) sets its logger's level
    # when it is first imported, after this, and on a machine without a GPU it warns that
    # it set its accelerator to CPU: a filter on the logger outlives that.
    deepspeed = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _ErrorsOnly) for f in deepspeed.filters):
        deepspeed.addFilter(_ErrorsOnly())


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def _guarded(debug: bool, action: Callable[[], T], *, as_json: bool = False,
             model: Any = None) -> T:
    """Run ``action``; a QplanError becomes one line on stderr and its exit code, any other
    exception one line naming ``model``, the step and the library, exit 3 (the traceback
    only with ``--debug``)."""
    if not debug:
        _quiet_libraries()
    reset_step()
    try:
        with _stdout_for_the_report(as_json), steps_on_terminal():
            return action()
    except QplanError as exc:
        if debug:
            raise
        _fail(" ".join(str(exc).split()), exc.kind, exc.exit_code, as_json)
        raise  # unreachable: _fail leaves
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as exc:
        # The command's stdout again here (the report's stream under --json).
        if isinstance(exc, BrokenPipeError) and _reader_left(sys.stdout):
            _reader_gone()
        if debug:
            raise
        label = str(model) if model else None
        _fail(unexpected_summary(exc, label), "internal", UNEXPECTED_EXIT_CODE, as_json,
              step=current_step() or "planning", library=raising_library(exc),
              exception=type(exc).__name__, model=label)
        raise  # unreachable


_REPORT_STREAMS: list[Any] = []


@contextlib.contextmanager
def _stdout_for_the_report(as_json: bool) -> Any:
    """Under --json, stdout carries the report and nothing else: what libraries print while
    qplan plans or measures (DeepSpeed's logger takes the stdout of its first import,
    accelerate's and bitsandbytes' notices) goes to stderr; the report is written to the
    stdout the command started with (``_report_stream``)."""
    if not as_json:
        yield
        return
    _REPORT_STREAMS.append(sys.stdout)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _REPORT_STREAMS.pop()


def _report_stream() -> Any:
    return _REPORT_STREAMS[-1] if _REPORT_STREAMS else sys.stdout


def _emit_report(report: Any, as_json: bool, output: Path | None, render: bool = True) -> None:
    from qplan.report import report_json

    text = report_json(report)
    erase_progress()
    if output is not None:
        try:
            output.write_text(text + "\n")
        except OSError as exc:
            raise QplanError(f"cannot write the report to {output}: {exc.strerror}") from None
    if as_json:
        _report_stream().write(text + "\n")
    elif render:
        render_terminal(report, out)


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
    **levers: Any,
) -> dict[str, Any]:
    """The workload options the user set (unset ones keep the API's defaults); ``levers``:
    the memory levers some commands take (--gc-reentrant, --lora-target-regex, ...)."""
    if seq_len is not None and seq_len < 1:
        # The API reads seq_len 0 as "the mode's default"; typed on the command line it is
        # a mistake (leave --seq-len out for the default).
        raise UsageError(
            f"--seq-len must be between 1 and 16777216, not {seq_len}; leave it out for the "
            "mode's default"
        )
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
        **levers,
    )


EmitOpt = Annotated[
    str | None,
    typer.Option(
        "--emit",
        help="Print the plan as code/config: transformers, peft, axolotl or accelerate.",
    ),
]
PlotOpt = Annotated[
    Path | None,
    typer.Option(
        "--plot",
        help='Also draw the breakdown (and the --solve curves) to FILE.png or FILE.svg; '
        'needs pip install "qplan[plot]".',
    ),
]
HtmlOpt = Annotated[
    Path | None,
    typer.Option("--html", help="Also write the whole plan as one self-contained HTML file."),
]


def _write_files(report: Any, files: dict[str, Path | None]) -> None:
    erase_progress()
    for path in write_outputs(report, files):
        err.print(f"[dim]wrote {path}[/]", soft_wrap=True)


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
            help=f"Workload (default inference): {modes_help()}.",
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
    gc_reentrant: GcReentrantOpt = None,
    lora_target_regex: LoraRegexOpt = None,
    fused_ce: FusedCeOpt = None,
    activation_offloading: OffloadOpt = None,
    sample_packing: PackingOpt = None,
    unfrozen_parameters: UnfrozenOpt = None,
    liger_rms_norm: LigerNormOpt = None,
    liger_glu: LigerGluOpt = None,
    liger_rope: LigerRopeOpt = None,
    liger_layer_norm: LigerLayerNormOpt = None,
    images: ImagesOpt = None,
    image_size: ImageSizeOpt = None,
    train_vision: TrainVisionOpt = None,
    quantize_moe_experts: MoeQuantOpt = None,
    lora_target_parameters: LoraParamsOpt = None,
    kbit_upcast: KbitUpcastOpt = None,
    lora_mlp_kernel: LoraMlpKernelOpt = None,
    lora_qkv_kernel: LoraQkvKernelOpt = None,
    lora_o_kernel: LoraOKernelOpt = None,
    optimizer: OptimOpt = None,
    attn: AttnOpt = None,
    option: WorkloadOpt = None,
    solve: SolveOpt = None,
    headroom: HeadroomOpt = None,
    revision: RevisionOpt = None,
    trust_remote_code: TrustOpt = False,
    emit: EmitOpt = None,
    axolotl: AxolotlOpt = None,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
    plot: PlotOpt = None,
    html: HtmlOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Estimate the memory MODEL needs per precision for a workload on a GPU; recommend one."""

    def run() -> None:
        import_planning_libraries()
        from qplan.api import estimate as plan

        files = {"plot": plot, "html": html}
        check_outputs(files)

        options: dict[str, Any] = _set_only(
            num_gpus=num_gpus, precisions=precisions, headroom=headroom, revision=revision,
            solve=solve, **_workload_options(
                batch, seq_len, kv_dtype, lora_r, lora_alpha, lora_targets, lora_dropout,
                gradient_checkpointing, optimizer, attn, gc_reentrant=gc_reentrant,
                lora_target_regex=lora_target_regex, fused_ce=fused_ce,
                activation_offloading=activation_offloading,
                sample_packing=sample_packing, unfrozen_parameters=unfrozen_parameters,
                liger_rms_norm=liger_rms_norm, liger_glu=liger_glu, liger_rope=liger_rope,
                liger_layer_norm=liger_layer_norm, images=images,
                image_size=image_size, train_vision=train_vision,
                quantize_moe_experts=quantize_moe_experts,
                lora_target_parameters=lora_target_parameters,
                kbit_upcast=kbit_upcast,
                lora_mlp_kernel=lora_mlp_kernel, lora_qkv_kernel=lora_qkv_kernel,
                lora_o_kernel=lora_o_kernel,
                **_mode_options(option),
            ),
        )
        if mode is not None:
            options["mode"] = mode
        if axolotl is None and model is None:
            raise UsageError("no model given; pass MODEL or --axolotl FILE")
        if emit is not None and emit not in EMITTERS:
            raise UsageError(f"--emit {emit!r}: choose one of {', '.join(EMITTERS)}")
        if axolotl is not None:
            from qplan.api import estimate_axolotl

            # Flags win over the YAML; the YAML's gpu_memory_limit is the GPU unless --gpu.
            if trust_remote_code:
                options["trust_remote_code"] = True
            report = estimate_axolotl(str(axolotl), model=model, gpu=gpu, **options)
        else:
            report = plan(model, gpu=gpu, trust_remote_code=trust_remote_code, **options)
        _write_files(report, files)
        if emit is not None:
            if output is not None:
                _emit_report(report, False, output, render=False)
            erase_progress()
            sys.stdout.write(emit_text(emit, report))
            return
        _emit_report(report, as_json, output)

    _guarded(debug, run, as_json=as_json, model=model or (axolotl and f"--axolotl {axolotl}"))


@app.command("report")
def report_command(
    path: Annotated[
        Path, typer.Argument(help="A JSON report written by `qplan estimate --json` or -o.")
    ],
    plot: PlotOpt = None,
    html: HtmlOpt = None,
    emit: EmitOpt = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Render a saved JSON report (terminal, --plot, --html, --emit) without planning again."""

    def run() -> None:
        from qplan.render.saved import read_saved_report

        files = {"plot": plot, "html": html}
        check_outputs(files)
        if emit is not None and emit not in EMITTERS:
            raise UsageError(f"--emit {emit!r}: choose one of {', '.join(EMITTERS)}")
        report = read_saved_report(path)
        _write_files(report, files)
        if emit is not None:
            sys.stdout.write(emit_text(emit, report))
        elif as_json:
            _emit_report(report, True, None)
        elif plot is None and html is None:
            render_terminal(report, out)

    _guarded(debug, run, as_json=as_json, model=f"report {path}")


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
    gc_reentrant: GcReentrantOpt = None,
    lora_target_regex: LoraRegexOpt = None,
    fused_ce: FusedCeOpt = None,
    activation_offloading: OffloadOpt = None,
    sample_packing: PackingOpt = None,
    unfrozen_parameters: UnfrozenOpt = None,
    liger_rms_norm: LigerNormOpt = None,
    liger_glu: LigerGluOpt = None,
    liger_rope: LigerRopeOpt = None,
    liger_layer_norm: LigerLayerNormOpt = None,
    images: ImagesOpt = None,
    image_size: ImageSizeOpt = None,
    train_vision: TrainVisionOpt = None,
    quantize_moe_experts: MoeQuantOpt = None,
    lora_target_parameters: LoraParamsOpt = None,
    kbit_upcast: KbitUpcastOpt = None,
    lora_mlp_kernel: LoraMlpKernelOpt = None,
    lora_qkv_kernel: LoraQkvKernelOpt = None,
    lora_o_kernel: LoraOKernelOpt = None,
    optimizer: OptimOpt = None,
    attn: AttnOpt = None,
    option: WorkloadOpt = None,
    revision: RevisionOpt = None,
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
    output: OutputOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Run real steps of a workload on random weights here, and compare with the prediction."""

    def run() -> None:
        import_planning_libraries()
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
                gradient_checkpointing, optimizer, attn, gc_reentrant=gc_reentrant,
                lora_target_regex=lora_target_regex, fused_ce=fused_ce,
                activation_offloading=activation_offloading,
                sample_packing=sample_packing, unfrozen_parameters=unfrozen_parameters,
                liger_rms_norm=liger_rms_norm, liger_glu=liger_glu, liger_rope=liger_rope,
                liger_layer_norm=liger_layer_norm, images=images,
                image_size=image_size, train_vision=train_vision,
                quantize_moe_experts=quantize_moe_experts,
                lora_target_parameters=lora_target_parameters,
                kbit_upcast=kbit_upcast,
                lora_mlp_kernel=lora_mlp_kernel, lora_qkv_kernel=lora_qkv_kernel,
                lora_o_kernel=lora_o_kernel,
                **_mode_options(option),
            ),
        )
        _emit_report(report, as_json, output)

    _guarded(debug, run, as_json=as_json, model=model)


def _print_list(items: list[Any], columns: tuple[str, ...], row: Any, as_json: bool) -> None:
    """A listing as JSON (the dataclasses) or as a table (``row`` gives the cells)."""
    from dataclasses import asdict

    if as_json:
        _report_stream().write(json.dumps([asdict(item) for item in items], indent=2) + "\n")
        return
    render_listing(items, columns, row, out)


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

    _guarded(debug, run, as_json=as_json)


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

    _guarded(debug, run, as_json=as_json)


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
        import_planning_libraries()
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

        def progress(message: str) -> None:
            erase_progress()
            err.print(f"[dim]{message}...[/]")

        loaded = load_model(
            model, gpu=gpu, precision=precision, from_report=from_report,
            random_weights=random_weights, device=device,
            progress=None if as_json else progress, **options,
        )
        report = loaded.report
        if as_json or output is not None:
            _emit_report(report, as_json, output, render=False)
        if not as_json:
            render_loaded(report, out)

    _guarded(debug, run, as_json=as_json,
             model=model or (from_report and f"--from-report {from_report}"))


# The thresholds traces run under (planner/collector.py), for the whole command.
GC_THRESHOLDS = TRACE_GC_THRESHOLDS


def main() -> None:
    """Run the app, then leave without the interpreter's teardown.

    Tearing down the ~2,600 modules torch and transformers import takes about a second and
    does nothing for a command-line run, so flush and exit directly.

    The cyclic garbage collector runs rarely: importing torch and transformers creates
    millions of long-lived objects, and every full collection walks them all again (over a
    second of a plan's CPU at the default thresholds). What a short-lived command leaves
    in cycles is small (meta tensors hold no memory), and the trace counts storages as
    their reference counts free them, which the collector's timing does not change.
    """
    gc.set_threshold(*GC_THRESHOLDS)
    code = 0
    try:
        app()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    logging.shutdown()
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # what was left in the buffer had no reader
        code = code or READER_GONE_EXIT_CODE
    with contextlib.suppress(OSError):
        sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
