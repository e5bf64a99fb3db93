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

from qplan.planner.patching import loaded_modules, same_modules

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


def _wrapper_of(value: Any) -> Any:
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


def _wrappers_in(module: Any) -> list[Any]:
    found = []
    for value in list(getattr(module, "__dict__", {}).values()):
        wrapper = _wrapper_of(value) if callable(value) else None
        if wrapper is not None and not any(w is wrapper for w in found):
            found.append(wrapper)
    return found


def kernel_functions(model: nn.Module) -> tuple[KernelFunction, ...]:
    """The functions ``model``'s modelling code takes from an optional kernel package."""
    names = sorted({type(module).__module__ for module in model.modules()})
    found: dict[tuple[str, str], KernelFunction] = {}
    for name in names:
        module = sys.modules.get(name)
        if module is None or not name.startswith("transformers.models."):
            continue
        for wrapper in _wrappers_in(module):
            cells = _cells(wrapper)
            func = KernelFunction(str(cells["func_name"].cell_contents),
                                  str(cells["package"].cell_contents),
                                  bool(cells["is_new_implementation"].cell_contents))
            found.setdefault((func.name, func.package), func)
    return tuple(found.values())


_DISTRIBUTIONS = {"mamba_ssm": "mamba-ssm", "causal_conv1d": "causal-conv1d",
                  "fla": "flash-linear-attention"}


def fallback_note(model: nn.Module, model_type: str) -> str | None:
    """What the report says of a model whose code takes kernels from optional packages."""
    functions = kernel_functions(model)
    if not functions:
        return None
    packages = list(dict.fromkeys(_DISTRIBUTIONS.get(f.package, f.package) for f in functions))
    installed = list(dict.fromkeys(_DISTRIBUTIONS.get(f.package, f.package)
                                   for f in functions if f.installed))
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


# The wrappers found at the last look, and sys.modules (names, modules) then.
_FOUND: list[Any] = [(), (), ()]


def _installed_wrappers() -> tuple[Any, ...]:
    """Every loaded transformers model module's fallback wrapper that calls a package's
    kernel. Looked for again only when sys.modules changed: every trace asks."""
    names, modules = loaded = loaded_modules()
    if same_modules(loaded, (_FOUND[1], _FOUND[2])):
        return _FOUND[0]
    found: list[Any] = []
    for name, module in zip(names, modules, strict=True):
        if module is None or not name.startswith("transformers.models."):
            continue
        for wrapper in _wrappers_in(module):
            if (_cells(wrapper)["is_new_implementation"].cell_contents
                    and not any(w is wrapper for w in found)):
                found.append(wrapper)
    _FOUND[:] = [tuple(found), names, modules]
    return _FOUND[0]


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
