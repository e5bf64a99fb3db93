"""The one exception family of qplan: caught once, in the CLI, and turned into an exit code.

Anything else that escapes a command is a bug or a library failure on an input qplan did
not foresee. The CLI turns it into one line too (exit 3), naming the model, the step that
was running (``enter_step``) and the library that raised it (``unexpected_summary``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar

# The CLI's exit code for an exception that is not a QplanError.
UNEXPECTED_EXIT_CODE = 3


class QplanError(Exception):
    """A problem the user can fix; the message names the problem and the fix in one line."""

    exit_code = 1
    kind = "error"


class UsageError(QplanError):
    """Bad command-line input (a malformed size, an unknown GPU name, nonsense headroom)."""

    exit_code = 2
    kind = "usage"


class ExpertDropoutError(UsageError):
    """peft's lora.ParamWrapper (LoRA on fused MoE expert tensors) refuses lora_dropout."""


class ModelNotFoundError(QplanError):
    """The model could not be resolved from disk, the catalog, the HF cache or the Hub."""

    kind = "model-not-found"


class ConfigError(QplanError):
    """A config.json that is malformed, incomplete, or names an unknown architecture."""

    kind = "config"


class DeviceError(QplanError):
    """No usable NVIDIA driver / device where one was needed."""

    kind = "device"


# --------------------------------------------------------------------------- steps

_STEP: ContextVar[str | None] = ContextVar("qplan_step", default=None)
# Who hears of each step (the command line's progress line, qplan/progress.py).
_LISTENERS: list[Callable[[str], None]] = []


def enter_step(name: str) -> None:
    """Record what qplan is doing now ("tracing qlora at nf4"), so an unexpected failure
    can say which step broke. Steps run one after the other; the last one entered is the
    one that was running when an exception escaped."""
    _STEP.set(name)
    for listener in _LISTENERS:
        listener(name)


def still_running(waiting_for: str) -> None:
    """Tell the listeners what the command waits for (the progress line's seconds keep
    counting) without entering a step: an error still names the last step entered."""
    for listener in _LISTENERS:
        listener(waiting_for)


@contextlib.contextmanager
def on_step(listener: Callable[[str], None]) -> Iterator[None]:
    """Call ``listener`` with each step entered while the block runs."""
    _LISTENERS.append(listener)
    try:
        yield
    finally:
        _LISTENERS.remove(listener)


def current_step() -> str | None:
    return _STEP.get()


def reset_step() -> None:
    _STEP.set(None)


# --------------------------------------------------------------------------- unexpected


def _top_package(module: str) -> str:
    return module.split(".", 1)[0] if module else "?"


def raising_library(exc: BaseException) -> str:
    """The top-level package whose code raised ``exc``: the innermost traceback frame that
    is not the standard library (a KeyError raised by ``dict`` inside transformers is
    transformers' failure)."""
    stdlib = getattr(sys, "stdlib_module_names", frozenset())
    tb = exc.__traceback__
    modules: list[str] = []
    while tb is not None:
        modules.append(str(tb.tb_frame.f_globals.get("__name__", "")))
        tb = tb.tb_next
    for module in reversed(modules):
        top = _top_package(module)
        if top and top not in stdlib and top not in ("builtins", "__main__"):
            return top
    return _top_package(modules[-1]) if modules else "python"


def unexpected_summary(exc: BaseException, model: str | None) -> str:
    """One line for an exception that is no QplanError: model, step, library, the error."""
    text = " ".join(str(exc).split())
    if len(text) > 200:
        text = text[:197] + "..."
    what = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    step = current_step() or "planning"
    subject = f" for {model}" if model else ""
    return (
        f"{step}{subject} failed inside {raising_library(exc)} ({what}); this input is not "
        "handled yet - rerun with --debug for the traceback and report it"
    )


class ModelCodeError(QplanError):
    """The model's own code (the installed transformers) fails on the step planned, so a
    real run would fail the same way: nothing to plan for that workload."""


class DataDependentModelError(QplanError):
    """The model's code reads tensor values to decide what it computes (MoE routing done
    with ``.tolist()``, ``nonzero``, a value read with ``.item()``): a plan traced on the
    meta device, where tensors have no values, cannot follow it."""

    kind = "data-dependent"


class MissingPackageError(QplanError):
    """transformers needs a package that is not installed to build this model (timm for
    a TimmWrapper vision tower)."""

    kind = "missing-package"
