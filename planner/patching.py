"""Setting attributes of library modules for the length of a block.

The trace and the quantisation methods patch transformers, bitsandbytes and torch the same
way: set a few attributes, run the block, put the originals back whatever happens. This
module imports nothing of qplan so that every planner module can use it without a cycle.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def swapped(*swaps: tuple[Any, str, Any]) -> Iterator[None]:
    """``owner.name = value`` for each swap during the block; the originals are put back
    afterwards (in reverse order), whatever happens inside."""
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in swaps]
    for owner, name, value in swaps:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in reversed(originals):
            setattr(owner, name, value)
