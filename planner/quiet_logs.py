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
