"""Import transformers' quantisers without importing all of torchao with them.

Where torchao is installed (the test extra, ``qplan[torchao]``, an Axolotl environment),
transformers' torchao quantiser imports it when its module is imported, which
``transformers.modeling_utils`` does for every model, quantised or not: torchao's package
init brings its quantisation API, its Triton kernel wrappers and their imports (0.3 s of a
plan's wall time on this repository's machine, net of what transformers imports anyway:
bench/estimate_speed.py). The quantiser takes one name at import time,
``flatten_tensor_state_dict``, which only serialising a torchao-quantised model calls.

So, while ``transformers.quantizers`` is imported, the quantiser module alone is told that
torchao is unavailable (every other caller gets the real answer), and afterwards that name
is a function importing torchao's on its first call and delegating to it, and every module
holds transformers' real ``is_torchao_available`` again: a torchao checkpoint loads as
before, its import paid when it is used. This is done only where the quantiser's source
takes exactly that one name from torchao at module level (read from its file, not
imported); any other source (another transformers release) is imported as it is.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Any

from qplan.planner.patching import swapped

QUANTIZER = "transformers.quantizers.quantizer_torchao"
DEFERRED_NAME = "flatten_tensor_state_dict"
TORCHAO_MODULE = "torchao.prototype.safetensors.safetensors_support"


def flatten_tensor_state_dict(*args: Any, **kwargs: Any) -> Any:
    """torchao's ``flatten_tensor_state_dict``, imported at this first call."""
    from torchao.prototype.safetensors.safetensors_support import (
        flatten_tensor_state_dict as torchao_flatten,
    )

    return torchao_flatten(*args, **kwargs)


def _takes_only_the_deferred_name(source: str) -> bool:
    """Whether the quantiser's module-level code imports from torchao exactly once: the
    deferred name from ``TORCHAO_MODULE`` (under ``if is_torchao_available():``, which
    the stand-in answers)."""
    found: list[tuple[str | None, tuple[str, ...]]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            return  # code that runs when called, not at import
        if isinstance(node, ast.Import) and any(
                alias.name.split(".")[0] == "torchao" for alias in node.names):
            found.append((None, ()))
        if (isinstance(node, ast.ImportFrom) and node.level == 0
                and (node.module or "").split(".")[0] == "torchao"):
            found.append((node.module, tuple(alias.name for alias in node.names)))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found == [(TORCHAO_MODULE, (DEFERRED_NAME,))]


def _quantizer_source() -> str | None:
    import transformers

    path = Path(transformers.__file__).parent / "quantizers" / "quantizer_torchao.py"
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None


def import_transformers_quantizers() -> None:
    """Import ``transformers.quantizers`` with the torchao import deferred, where that is
    known to be safe; as it is otherwise. Nothing changes once it is imported."""
    if "transformers.quantizers" in sys.modules:
        return
    import transformers.utils as hf_utils

    real = hf_utils.is_torchao_available
    source = _quantizer_source()
    if not real() or source is None or not _takes_only_the_deferred_name(source):
        import transformers.quantizers
        return

    def only_there_unavailable(*args: Any, **kwargs: Any) -> bool:
        if sys._getframe(1).f_globals.get("__name__") == QUANTIZER:
            return False
        return real(*args, **kwargs)

    before = set(sys.modules)
    try:
        with swapped((hf_utils, "is_torchao_available", only_there_unavailable)):
            import transformers.quantizers  # noqa: F401
    finally:
        # Modules imported meanwhile took the stand-in by ``from ..utils import``.
        for name in set(sys.modules) - before:
            module = sys.modules.get(name)
            if getattr(module, "is_torchao_available", None) is only_there_unavailable:
                module.is_torchao_available = real  # type: ignore[union-attr]
    quantizer = sys.modules.get(QUANTIZER)
    if quantizer is not None and not hasattr(quantizer, DEFERRED_NAME):
        setattr(quantizer, DEFERRED_NAME, flatten_tensor_state_dict)
