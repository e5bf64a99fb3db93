"""The step a slow command is at, on one line of the terminal's stderr.

A plan that traces many steps (a Mamba model's training takes a minute or more on this
repository's CPU machine) would otherwise print nothing until its report, which looks like
a hang. ``enter_step`` (qplan/errors.py) tells the line what runs now; the line appears
once the command's steps have run for ``DELAY_S`` (a plan that ends sooner never shows
it), only where stderr is a terminal (never in a pipe, a file, a test's capture or a
``TERM=dumb`` terminal), with the seconds so far, and is erased before the report or an
error is printed.

It is written from the step calls themselves, not from a thread: the plan workers
(loaders/plan_workers.py) fork only while no other Python thread runs, and their own
stderr goes to /dev/null, which is no terminal.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from qplan.errors import on_step

# Seconds of steps before the line shows.
DELAY_S = 2.0
# Erase the line the cursor is on: back to its start, clear to its end.
ERASE = "\r\x1b[K"


class StepLine:
    """What ``enter_step`` calls while a command runs: the step and the seconds so far."""

    def __init__(self, stream: Callable[[], TextIO], clock: Callable[[], float] = time.monotonic,
                 delay: float | None = None) -> None:
        # The stream is looked up at each step (sys.stderr as it is then): a forked plan
        # worker's stderr is /dev/null, and a test's capture is no terminal.
        self._stream = stream
        self._clock = clock
        self._delay = DELAY_S if delay is None else delay
        self._start: float | None = None
        self._shown = False

    def __call__(self, step: str) -> None:
        now = self._clock()
        if self._start is None:
            self._start = now
        elapsed = now - self._start
        if elapsed < self._delay:
            return
        stream = self._stream()
        if not _is_terminal(stream):
            return
        width = max(shutil.get_terminal_size(fallback=(80, 24)).columns - 1, 20)
        text = f"qplan [{elapsed:.0f} s] {step}"
        if len(text) > width:
            text = text[: width - 1] + "…"
        stream.write(ERASE + text)
        stream.flush()
        self._shown = True

    def erase(self) -> None:
        """Take the line off the terminal (before the report or an error is printed)."""
        if not self._shown:
            return
        self._shown = False
        stream = self._stream()
        if _is_terminal(stream):
            stream.write(ERASE)
            stream.flush()


def _is_terminal(stream: Any) -> bool:
    """A terminal that takes cursor control (a "dumb" one would print the escapes)."""
    if os.environ.get("TERM") == "dumb":
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # closed or not a file
        return False


_ACTIVE: list[StepLine] = []


@contextlib.contextmanager
def steps_on_terminal() -> Iterator[StepLine]:
    """Show the command's steps on stderr's terminal while the block runs; erased after."""
    line = StepLine(lambda: sys.stderr)
    _ACTIVE.append(line)
    try:
        with on_step(line):
            yield line
    finally:
        line.erase()
        _ACTIVE.remove(line)


def erase() -> None:
    """Erase the step line, if one is shown (before printing the report)."""
    for line in _ACTIVE:
        line.erase()
