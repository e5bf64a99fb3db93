"""Axolotl's ``unfrozen_parameters``: full fine-tuning of the named parameters only.

Axolotl (src/axolotl/utils/freeze.py, ``freeze_layers_except``) freezes every parameter
and unfreezes those whose name matches one of the patterns: a regular expression whose
periods are literal (``.`` becomes ``\\.`` unless it is ``.+``), matched from the start of
the name (``re.match``), with an optional row range such as ``[:32000]``; rows outside the
range keep ``requires_grad`` but a gradient hook zeroes them in place. Memory follows from
``requires_grad``: a matched parameter gets a full gradient and optimizer states, the rest
get none.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from qplan.errors import UsageError

_RANGE = re.compile(r"^(.+)\[([0-9]*)(?::([0-9]*))?\]$")


@dataclass(frozen=True)
class LayerNamePattern:
    """One pattern: the name regex and the optional [start:end] row range."""

    raw: str
    regex: re.Pattern[str]
    rows: tuple[int, int | None] | None

    def match(self, name: str) -> bool:
        return self.regex.match(name) is not None


def parse_pattern(pattern: str) -> LayerNamePattern:
    """Axolotl's LayerNamePattern; a pattern that does not compile is a UsageError."""
    found = _RANGE.match(pattern)
    rows: tuple[int, int | None] | None = None
    name = pattern
    if found:
        name, start_part, end_part = found.groups()
        if end_part is None and start_part.isdecimal():
            rows = (int(start_part), int(start_part) + 1)
        else:
            start = int(start_part) if start_part else 0
            end = int(end_part) if end_part else None
            if end is not None and start >= end:
                raise UsageError(f"unfrozen parameter pattern {pattern!r}: the range's end "
                                 "must be greater than its start")
            rows = (start, end)
    try:
        regex = re.compile(re.sub(r"\.(?!\+)", "\\\\.", name))
    except re.error as exc:
        raise UsageError(f"unfrozen parameter pattern {pattern!r} does not compile ({exc}); "
                         "fix it") from None
    return LayerNamePattern(pattern, regex, rows)


def _zero_rows(ranges: list[tuple[int, int]]) -> Any:
    def hook(grad: Any) -> None:
        for start, end in ranges:
            grad[start:end].zero_()

    return hook


def _frozen_rows(rows: list[tuple[int, int | None]], size: int) -> list[tuple[int, int]]:
    """The rows outside the unfrozen ranges (Axolotl's _merge_ranges + _invert_ranges)."""
    spans = sorted((start, end if end is not None else size) for start, end in rows)
    frozen, current = [], 0
    for start, end in spans:
        if start > current:
            frozen.append((current, start))
        current = max(current, end)
    if current < size:
        frozen.append((current, size))
    return frozen


def freeze_except(model: nn.Module, patterns: Sequence[str]) -> None:
    """Freeze every parameter of ``model`` but those the patterns match (in place)."""
    parsed = [parse_pattern(p) for p in patterns]
    trained = 0
    for name, param in model.named_parameters():
        matches = [p for p in parsed if p.match(name)]
        param.requires_grad = bool(matches)
        if not matches:
            continue
        trained += 1
        rows = [p.rows for p in matches if p.rows is not None]
        if rows:
            param.register_hook(_zero_rows(_frozen_rows(rows, len(param))))
    if not trained:
        raise UsageError(
            f"unfrozen parameters {', '.join(patterns)} match no parameter of the model "
            "(Axolotl would train nothing); name parameters it has, e.g. "
            "model.layers.0.mlp or lm_head"
        )
