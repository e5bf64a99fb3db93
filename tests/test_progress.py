"""The step line a slow command shows on a terminal's stderr (qplan/progress.py)."""

from __future__ import annotations

import io
import json
import os

import pytest
from typer.testing import CliRunner

from qplan import progress
from qplan.cli import app
from qplan.errors import enter_step, on_step
from qplan.progress import ERASE, StepLine


@pytest.fixture(autouse=True)
def _a_terminal_that_takes_cursor_control(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_line_shows_after_the_delay_with_the_seconds_then_is_erased() -> None:
    screen, clock = Terminal(), Clock()
    line = StepLine(lambda: screen, clock, delay=2.0)
    line("resolving the model")  # the clock starts at the first step
    clock.now += 1.5
    line("planning lora at bf16")
    assert screen.getvalue() == ""  # a plan that ends before the delay shows nothing
    clock.now += 1.0
    line("planning lora at nf4")
    assert screen.getvalue() == ERASE + "qplan [2 s] planning lora at nf4"
    clock.now += 40.2
    line("planning lora at int8")
    assert screen.getvalue().endswith(ERASE + "qplan [43 s] planning lora at int8")
    line.erase()
    assert screen.getvalue().endswith(ERASE)
    written = screen.getvalue()
    line.erase()  # nothing shown: nothing written
    assert screen.getvalue() == written


def test_nothing_is_written_where_stderr_is_no_terminal() -> None:
    """A pipe, a file, a test's capture, a plan worker's /dev/null."""
    piped, clock = io.StringIO(), Clock()
    line = StepLine(lambda: piped, clock, delay=0.0)
    line("planning lora at bf16")
    line.erase()
    assert piped.getvalue() == ""
    with open(os.devnull, "w") as null:
        line = StepLine(lambda: null, clock, delay=0.0)
        line("planning lora at bf16")  # no error, nothing to see


def test_a_dumb_terminal_gets_no_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "dumb")
    screen = Terminal()
    StepLine(lambda: screen, Clock(), delay=0.0)("planning lora at bf16")
    assert screen.getvalue() == ""


def test_a_long_step_is_cut_to_the_terminal_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress.shutil, "get_terminal_size",
                        lambda fallback: os.terminal_size((40, 24)))
    screen = Terminal()
    StepLine(lambda: screen, Clock(), delay=0.0)("planning " + "x" * 100)
    shown = screen.getvalue().removeprefix(ERASE)
    assert len(shown) == 39 and shown.endswith("…")


def test_steps_reach_a_listener_only_while_it_listens() -> None:
    heard: list[str] = []
    with on_step(heard.append):
        enter_step("resolving the model")
        enter_step("planning inference at bf16")
    enter_step("after")
    assert heard == ["resolving the model", "planning inference at bf16"]


def test_the_command_shows_its_steps_on_a_terminal_and_erases_them_before_the_report(
        monkeypatch: pytest.MonkeyPatch, tiny_model_dir) -> None:
    """The CLI's own path: the steps of a real plan reach stderr (taken for a terminal
    here), the line is erased, and stdout under --json is the report alone."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(progress, "_is_terminal", lambda stream: True)
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    folder = tiny_model_dir("llama")
    result = CliRunner().invoke(app, ["estimate", str(folder), "--gpu", "24GiB", "--mode",
                                      "lora", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["schema"] == "qplan.report/v1"
    shown = result.stderr.split(ERASE)
    assert shown[-1] == ""  # erased last
    steps = [s for s in shown if s]
    assert steps[0].startswith("qplan [") and steps[0].endswith("] resolving the model")
    assert any("] planning lora at bf16, batch 1, seq " in s for s in steps), steps
