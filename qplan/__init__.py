"""qplan: GPU memory planner and auto-configurator for Hugging Face language models.

``qplan.estimate(model, gpu=...)`` returns a :class:`qplan.report.Report`. Heavy imports
(torch, transformers) happen on first use so ``import qplan`` stays cheap.
"""

from __future__ import annotations

from typing import Any

from qplan.errors import QplanError

__all__ = ["QplanError", "estimate", "load"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "estimate":
        from qplan.api import estimate

        return estimate
    if name == "load":
        from qplan.loading import load

        return load
    raise AttributeError(f"module 'qplan' has no attribute {name!r}")
