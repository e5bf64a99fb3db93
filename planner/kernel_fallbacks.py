"""Functions transformers takes from an optional kernel package, traced on their PyTorch path.

Hybrid and linear-attention models (Mamba, FalconMamba, Mamba-2, Jamba, Bamba, Nemotron-H,
Zamba, Falcon-H1, LFM2, Qwen3-Next, Qwen3.5, ...) call some functions through transformers'
``use_kernel_func_from_hub_with_fallback`` (transformers/integrations/hub_kernels.py): the
package's kernel where the package is installed (mamba-ssm, causal-conv1d,
flash-linear-attention), transformers' own PyTorch code otherwise. Those kernels run on GPU
tensors only; on the meta device a plan can run the PyTorch code alone. So a trace always
runs it: where the package is installed, the wrapper is pointed at its PyTorch function for
the trace (its closure: the implementation it calls, the parameters it passes, whether the
implementation is new), and put back after. Where no package is installed nothing changes.

The report says so (``fallback_note``): the plan is the run without those packages, and a
run with them takes kernels this plan does not count (their memory differs: Mamba's PyTorch
scan makes a batch x channels x tokens x state tensor the fused kernel never holds).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from qplan.planner.patching import Loaded, model_modules, while_modules_unchanged

# What transformers' wrapper closes over (hub_kernels.use_kernel_func_from_hub_with_fallback).
_CELLS = ("implementation", "is_new_implementation", "torch_function", "applicable_params",
          "func_name", "package")
# How deep another decorator may wrap transformers' wrapper (the hub's kernel decorator).
_MAX_WRAPS = 3


@dataclass(frozen=True)
class KernelFunction:
    """One function a model takes from an optional kernel package."""

    name: str  # the function's name in transformers ("selective_scan_fn")
    package: str  # the import name of the package it comes from ("mamba_ssm")
    installed: bool  # whether the package's kernel is what the wrapper calls here


def fallback_wrapper(value: Any) -> Any:
    """transformers' fallback wrapper, where ``value`` is one (or wraps one); else None."""
    for _ in range(_MAX_WRAPS):
        code = getattr(value, "__code__", None)
        if (code is not None and code.co_name == "wrapped"
                and code.co_filename.replace("\\", "/").endswith("integrations/hub_kernels.py")
                and set(_CELLS) <= set(code.co_freevars) and value.__closure__ is not None):
            return value
        value = getattr(value, "__wrapped__", None)
        if value is None:
            return None
    return None


def _cells(wrapper: Any) -> dict[str, Any]:
    """The wrapper's closure cells by name."""
    return dict(zip(wrapper.__code__.co_freevars, wrapper.__closure__, strict=True))


def closure(wrapper: Any) -> dict[str, Any]:
    """What the wrapper closes over, by name (the implementation it calls, the PyTorch
    function, whether the implementation is new, ...)."""
    return {name: cell.cell_contents for name, cell in _cells(wrapper).items()}


def _wrappers(loaded: Loaded) -> list[Any]:
    """The fallback wrappers the transformers model modules among ``loaded`` hold, each
    once (modules import one another's)."""
    found: list[Any] = []
    for _, module in model_modules(loaded):
        for value in list(getattr(module, "__dict__", {}).values()):
            wrapper = fallback_wrapper(value) if callable(value) else None
            if wrapper is not None and not any(w is wrapper for w in found):
                found.append(wrapper)
    return found


def kernel_functions(model: nn.Module) -> tuple[KernelFunction, ...]:
    """The functions ``model``'s modelling code takes from an optional kernel package."""
    names = tuple(sorted({type(module).__module__ for module in model.modules()}))
    found: dict[tuple[str, str], KernelFunction] = {}
    for wrapper in _wrappers((names, tuple(map(sys.modules.get, names)))):
        values = closure(wrapper)
        func = KernelFunction(str(values["func_name"]), str(values["package"]),
                              bool(values["is_new_implementation"]))
        found.setdefault((func.name, func.package), func)
    return tuple(found.values())


def _distribution(package: str) -> str:
    """What pip installs ``package`` as: transformers' own map where the names differ
    (fla: flash-linear-attention), else the import name as pip spells it (mamba-ssm)."""
    from transformers.integrations import hub_kernels

    return getattr(hub_kernels, "_PACKAGE_TO_DISTRIBUTION", {}).get(
        package, package.replace("_", "-"))


def fallback_note(model: nn.Module, model_type: str) -> str | None:
    """What the report says of a model whose code takes kernels from optional packages."""
    functions = kernel_functions(model)
    if not functions:
        return None
    packages = list(dict.fromkeys(_distribution(f.package) for f in functions))
    installed = list(dict.fromkeys(_distribution(f.package) for f in functions if f.installed))
    names = ", ".join(dict.fromkeys(f.name for f in functions))
    those = "those packages" if len(packages) > 1 else "that package"
    their = "their" if len(packages) > 1 else "its"
    note = (
        f"{model_type} takes {names} from {' and '.join(packages)} where installed; this plan "
        f"runs transformers' PyTorch code for them (the run without {those}): a run with "
        f"{' or '.join(packages)} installed takes {their} kernels instead, whose memory this "
        "plan does not count"
    )
    if installed:
        verb = "is" if len(installed) == 1 else "are"
        note += f" ({' and '.join(installed)} {verb} installed here)"
    return note


def _with_kernels(loaded: Loaded) -> tuple[Any, ...]:
    """Every loaded transformers model module's fallback wrapper that calls a package's
    kernel (found again only when sys.modules changed: every trace asks)."""
    return tuple(w for w in _wrappers(loaded) if closure(w)["is_new_implementation"])


_installed_wrappers = while_modules_unchanged(_with_kernels)


@contextlib.contextmanager
def pytorch_paths() -> Iterator[None]:
    """During the block, every fallback wrapper whose package is installed calls its
    PyTorch function, as it does where the package is not installed."""
    saved = []
    try:
        for wrapper in _installed_wrappers():
            cells = _cells(wrapper)
            reference = cells["torch_function"].cell_contents
            saved.append((cells, {k: cells[k].cell_contents for k in
                                  ("implementation", "is_new_implementation",
                                   "applicable_params")}))
            cells["implementation"].cell_contents = reference
            cells["is_new_implementation"].cell_contents = False
            cells["applicable_params"].cell_contents = tuple(
                inspect.signature(reference).parameters)
        yield
    finally:
        for cells, values in reversed(saved):
            for key, value in values.items():
                cells[key].cell_contents = value
