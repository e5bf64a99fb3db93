"""Setting attributes of library modules for the length of a block.

The trace and the quantisation methods patch transformers, bitsandbytes and torch the same
way: set a few attributes, run the block, put the originals back whatever happens. This
module imports nothing of qplan so that every planner module can use it without a cycle.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import operator
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

# sys.modules as names and module objects, in order.
Loaded = tuple[tuple[str, ...], tuple[Any, ...]]


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


def loaded_modules() -> Loaded:
    """sys.modules now: its names and its module objects, in order."""
    return tuple(sys.modules), tuple(sys.modules.values())


def same_modules(now: Loaded, earlier: Loaded) -> bool:
    """Whether nothing was imported, reloaded or removed between two ``loaded_modules``:
    two C-level comparisons (names by equality, modules by identity) instead of a Python
    loop over the ~2,800 entries, asked at every trace. The caller keeps ``earlier``, so
    its modules stay alive and no id looked at is reused by a new module."""
    names, modules = now
    return (names == earlier[0] and len(modules) == len(earlier[1])
            and all(map(operator.is_, modules, earlier[1])))


def model_modules(loaded: Loaded) -> Iterator[tuple[str, Any]]:
    """The transformers model modules (``transformers.models.*``) among ``loaded``."""
    for name, module in zip(*loaded, strict=True):
        if module is not None and name.startswith("transformers.models."):
            yield name, module


def while_modules_unchanged(find: Callable[[Loaded], T]) -> Callable[[], T]:
    """``find`` of sys.modules, found again only when sys.modules changed since the last
    call (``same_modules``): the traces of a plan after its first import nothing. The
    last snapshot is kept, so its modules stay alive and no id is reused."""
    last: list[Any] = []  # [answer, names, modules] once found

    def found() -> T:
        loaded = loaded_modules()
        if not last or not same_modules(loaded, (last[1], last[2])):
            last[:] = [find(loaded), *loaded]
        return last[0]

    return found


def source_digest(function: Any) -> str:
    """sha256 of ``inspect.getsource(function)`` (of "" where it has none): how a stand-in
    that mirrors a library function checks that the installed code is the code it read."""
    try:
        source = inspect.getsource(function) if callable(function) else ""
    except (TypeError, OSError):
        source = ""
    return hashlib.sha256(source.encode()).hexdigest()


def once_per_object(make: Callable[[Any], T]) -> Callable[[Any], T]:
    """``make(obj)`` made once per object, by identity (the object is kept with its answer,
    so its id is not reused): the stand-ins made for a library function or method."""
    made: dict[int, tuple[Any, T]] = {}

    def get(obj: Any) -> T:
        found = made.get(id(obj))
        if found is not None and found[0] is obj:
            return found[1]
        value = make(obj)
        made[id(obj)] = (obj, value)
        return value

    return get
