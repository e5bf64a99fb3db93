"""Library loggers held at ERROR while the planner builds and traces meta models.

transformers and bitsandbytes log advice meant for real loads and runs (legacy activation
names, dtype casts on every layer call); a plan is not the place for it. ``setLevel``
clears the cache of every logger in the process (thousands, with torch and transformers
imported), so a logger already at ERROR (an enclosing ``quiet``, or
``TRANSFORMERS_VERBOSITY=error``) is left alone: one estimate wraps its many traces in one
``quiet`` instead of paying for a level change around each.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

LIBRARIES = ("transformers", "bitsandbytes")


@contextlib.contextmanager
def quiet(*names: str) -> Iterator[None]:
    """The loggers ``names`` (default: transformers and bitsandbytes) at ERROR, then back."""
    loggers = [logging.getLogger(name) for name in names or LIBRARIES]
    changed = [(logger, logger.level) for logger in loggers if logger.level != logging.ERROR]
    for logger, _ in changed:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in changed:
            logger.setLevel(level)


@contextlib.contextmanager
def quiet_plan() -> Iterator[None]:
    """What one in-process plan (``qplan.api.estimate``) runs under: the libraries' loggers
    at ERROR (``quiet``), and the warnings the libraries raise at the calls a plan makes
    ignored (transformers' deprecation of ``gradient_checkpointing_enable``, which peft
    calls; peft's notes on the adapters it adds to a meta model): they are about qplan's
    own calls, not the caller's code, and a notebook would show dozens of them per plan.
    The command line ignores them for the whole process (qplan/cli.py)."""
    with quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
