"""Plain dtype loads (fp32, bf16, fp16): no layer is replaced, everything is trainable."""

from __future__ import annotations

from typing import ClassVar

from qplan.planner.quant.base import QuantMethod


class Unquantized(QuantMethod):
    name: ClassVar[str] = "none"
