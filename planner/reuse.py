"""One switch for every shortcut that reuses work between traces (the meta-op memo, shared
meta models, shared traces): ``QPLAN_REUSE=0`` turns them all off, which is the reference
path the tests compare the fast path against, component for component."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

_forced: list[bool] = []


def enabled() -> bool:
    if _forced:
        return _forced[-1]
    return os.environ.get("QPLAN_REUSE", "1") != "0"


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the block on the reference path: every trace from scratch."""
    _forced.append(False)
    try:
        yield
    finally:
        _forced.pop()
