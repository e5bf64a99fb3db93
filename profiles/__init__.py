"""Data shipped with qplan: GPU profiles (``gpus/``) and the offline model catalog (``models/``).

This is a package so the data is reachable through ``importlib.resources`` both from an
editable install (which maps packages only) and from a built wheel.
"""

from __future__ import annotations

from importlib.resources import files
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importlib.resources.abc is 3.11+; the annotation alone needs it
    from importlib.resources.abc import Traversable


def data_dir(name: str) -> Traversable:
    """The shipped data folder ``name`` ("gpus" or "models")."""
    return files(__name__) / name
