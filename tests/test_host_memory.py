"""Real CPU runs check host memory and disk first, instead of meeting the OOM killer."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from qplan.cli import app
from qplan.errors import QplanError
from qplan.loaders import host_memory

runner = CliRunner()


def test_available_host_bytes_reads_the_machine():
    available = host_memory.available_host_bytes()
    assert available is None or available > 0


def test_check_host_room_names_the_need_and_the_fix(monkeypatch):
    monkeypatch.setattr(host_memory, "available_host_bytes", lambda: 4 * 1024**3)
    with pytest.raises(QplanError, match=r"needs about 12\.0 GiB .* 4\.0 GiB is available; "
                                         r"pass --layers"):
        host_memory.check_host_room(10 * 1024**3, 0, "measuring x", "pass --layers N")
    host_memory.check_host_room(1024**3, 0, "measuring x", "pass --layers N")  # fits


def test_measure_too_big_for_the_host_is_a_clean_error(monkeypatch):
    monkeypatch.setattr(host_memory, "available_host_bytes", lambda: 8 * 1024**3)
    result = runner.invoke(app, ["measure", "meta-llama/Llama-2-7b-hf", "--mode", "inference",
                                 "--device", "cpu", "--seq-len", "128"])
    assert result.exit_code == 1
    assert "host memory" in result.stderr and "--layers" in result.stderr
    assert "Traceback" not in result.output


def test_load_random_weights_too_big_for_the_host_is_a_clean_error(monkeypatch):
    monkeypatch.setattr(host_memory, "available_host_bytes", lambda: 8 * 1024**3)
    result = runner.invoke(app, ["load", "meta-llama/Llama-2-7b-hf", "--gpu", "80GiB", "--mode",
                                 "load", "--precision", "bf16", "--random-weights", "--device",
                                 "cpu"])
    assert result.exit_code == 1
    assert "host memory" in result.stderr
    assert "Traceback" not in result.output
