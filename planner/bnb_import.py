"""Import bitsandbytes without importing PyTorch's compiler with it.

bitsandbytes wraps its CPU fallback kernels in ``torch.compile`` when its module is
imported; building those wrappers imports ``torch._inductor`` (over a second of CPU), which
a plan never uses: traces run on the meta device, through bitsandbytes' fake kernels. While
bitsandbytes is imported, ``torch.compile`` is replaced by a wrapper that calls it on the
first call of the function instead. torch.compile compiles lazily at the first call anyway,
and bitsandbytes falls back to the plain function when compiling fails, at either moment,
so a real run (``qplan measure`` on CPU) takes the same kernels as after a plain import.
"""

from __future__ import annotations

import functools
import sys
from types import ModuleType
from typing import Any

import torch

from qplan.planner.patching import swapped


def _deferred(compile_fn: Any) -> Any:
    def deferred(fn: Any = None, **kwargs: Any) -> Any:
        if fn is None:
            return lambda f: deferred(f, **kwargs)
        compiled: list[Any] = []

        @functools.wraps(fn)
        def call(*args: Any, **kw: Any) -> Any:
            if not compiled:
                compiled.append(compile_fn(fn, **kwargs))
            return compiled[0](*args, **kw)

        return call

    return deferred


def import_bitsandbytes() -> ModuleType | None:
    """bitsandbytes, imported as above on first use; None when it is not installed."""
    found = sys.modules.get("bitsandbytes")
    if found is not None:
        return found
    try:
        with swapped((torch, "compile", _deferred(torch.compile))):
            import bitsandbytes
    except ImportError:
        return None
    return bitsandbytes
