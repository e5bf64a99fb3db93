"""Small readers shared by the method modules that parse checkpoint configs."""

from __future__ import annotations

from typing import Any


def names(value: Any) -> tuple[str, ...] | None:
    """A module-name list from a config field (None when absent)."""
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def cc_tuple(text: str | None) -> tuple[int, int] | None:
    """"8.9" -> (8, 9); None when unknown (a size-only target)."""
    if not text:
        return None
    major, _, minor = str(text).partition(".")
    try:
        return int(major), int(minor or 0)
    except ValueError:
        return None
