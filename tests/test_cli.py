"""The ``qplan`` command line: output, JSON contract, exit codes and one-line errors.

Every estimate passes ``--mode load`` explicitly so these tests stay valid when the default
mode changes. Errors must be ONE line on stderr, name the problem, exit 2 for usage errors
and 1 otherwise, and show no traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qplan.cli import app
from qplan.report import SCHEMA_ID, load_schema

jsonschema = pytest.importorskip("jsonschema")

CATALOG_MODEL = "meta-llama/Llama-2-7b"
PRECISIONS = ("fp32", "bf16", "fp16", "int8", "fp4", "nf4", "fp4-dq", "nf4-dq", "fp8")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI never reaches the Hub in these tests."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def estimate(*args: str):
    return invoke("estimate", *args)


def validate(report: dict) -> None:
    jsonschema.validate(report, load_schema())


def assert_one_line_error(result, code: int, *needles: str) -> str:
    """Exit ``code``, exactly one non-empty line on stderr naming the problem, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output)
    stderr = result.stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    line = lines[0]
    assert line.startswith("error: "), line
    for needle in needles:
        assert needle.lower() in line.lower(), (needle, line)
    assert "Traceback" not in result.output
    assert result.stdout == "", result.stdout
    return line


def write_config(folder: Path, config: dict | str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = config if isinstance(config, str) else json.dumps(config)
    (folder / "config.json").write_text(text)
    return folder


TINY_LLAMA = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    vocab_size=1000,
    hidden_size=96,
    intermediate_size=200,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


# --------------------------------------------------------------------------- estimate


def test_estimate_prints_table_and_recommendation() -> None:
    result = estimate(CATALOG_MODEL, "--gpu", "4090", "--mode", "load")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "meta-llama/Llama-2-7b-hf" in out
    assert "RTX 4090" in out
    assert "mode: load" in out
    for column in ("precision", "weights", "total", "fits"):
        assert column in out
    for precision in PRECISIONS:
        assert f" {precision} " in out, precision
    assert "Recommendation: bf16" in out
    assert 'from_pretrained kwargs: {"dtype": "bfloat16"}' in out
    # the alias note is shown
    assert "note:" in out
    assert result.stderr == ""


def test_json_stdout_is_only_a_valid_report() -> None:
    result = estimate(CATALOG_MODEL, "--gpu", "4090", "--mode", "load", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # the whole of stdout, nothing else
    validate(report)
    assert report["schema"] == SCHEMA_ID == "qplan.report/v1"
    assert report["model"]["id"] == "meta-llama/Llama-2-7b-hf"
    assert report["model"]["source"] == "catalog"
    assert report["model"]["architecture"] == "LlamaForCausalLM"
    assert 6.7e9 < report["model"]["parameters"] < 6.8e9
    assert report["gpu"]["source"] == "profile"
    assert report["workload"]["mode"] == "load"
    assert [c["precision"] for c in report["candidates"]] == list(PRECISIONS)
    assert report["recommendation"]["precision"] == "bf16"
    assert report["warnings"] == []
    for c in report["candidates"]:
        assert sum(c["components"].values()) == c["total_bytes"]
        assert c["fits"] == (c["headroom_bytes"] >= report["gpu"]["headroom_bytes"])
    assert result.stderr == ""


def test_output_file_gets_the_same_report(tmp_path: Path) -> None:
    target = tmp_path / "plan.json"
    as_json = estimate(CATALOG_MODEL, "--gpu", "4090", "--mode", "load", "--json")
    to_file = estimate(CATALOG_MODEL, "--gpu", "4090", "--mode", "load", "-o", str(target))
    assert as_json.exit_code == 0 and to_file.exit_code == 0, to_file.output
    written = json.loads(target.read_text())
    validate(written)
    assert written == json.loads(as_json.stdout)
    # without --json the table still goes to stdout
    assert "Recommendation:" in to_file.stdout


def test_output_to_unwritable_place_is_one_line(tmp_path: Path) -> None:
    target = tmp_path / "missing-dir" / "plan.json"
    result = estimate(CATALOG_MODEL, "--gpu", "4090", "--mode", "load", "-o", str(target))
    assert_one_line_error(result, 1, "cannot write the report", "missing-dir")


def test_tiny_model_folder_works_as_model(tiny_model_dir) -> None:
    folder = tiny_model_dir("llama")
    result = estimate(str(folder), "--gpu", "24GiB", "--mode", "load", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    validate(report)
    assert report["model"]["source"] == "path"
    assert report["model"]["model_type"] == "llama"
    assert report["model"]["config_path"] == str(folder / "config.json")
    assert report["gpu"]["source"] == "size"
    assert report["recommendation"]["precision"] == "bf16"


def test_config_json_path_works_as_model(tmp_path: Path) -> None:
    folder = write_config(tmp_path / "m", TINY_LLAMA)
    result = estimate(str(folder / "config.json"), "--gpu", "T4", "--mode", "load")
    assert result.exit_code == 0, result.output
    assert "Recommendation: fp16" in result.stdout


# --------------------------------------------------------------------------- recommendation


def _report(*args: str) -> dict:
    result = estimate(*args, "--mode", "load", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    validate(report)
    return report


def test_t4_has_no_bf16_so_fp16_and_float16_compute() -> None:
    report = _report(CATALOG_MODEL, "--gpu", "T4")
    assert report["gpu"]["bf16"] is False
    assert report["workload"]["compute_dtype"] == "float16"
    # 7B in 16 bits (13 GiB) fits a 15 GiB T4; its 16-bit choice is fp16, never bf16
    assert report["recommendation"]["precision"] == "fp16"
    assert report["recommendation"]["load_kwargs"] == {"dtype": "float16"}
    bf16 = next(c for c in report["candidates"] if c["precision"] == "bf16")
    assert any("no native bf16" in note for note in bf16["notes"])
    # 13B needs a quantised load, computing in float16
    big = _report("meta-llama/Llama-2-13b-hf", "--gpu", "T4")
    assert big["recommendation"]["precision"] == "int8"
    assert big["recommendation"]["load_kwargs"]["dtype"] == "float16"
    # and 4-bit computes in float16
    nf4 = _report(CATALOG_MODEL, "--gpu", "T4", "--precisions", "nf4")
    qc = nf4["recommendation"]["load_kwargs"]["quantization_config"]
    assert qc["load_in_4bit"] is True
    assert qc["bnb_4bit_quant_type"] == "nf4"
    assert qc["bnb_4bit_compute_dtype"] == "float16"
    assert nf4["recommendation"]["load_kwargs"]["dtype"] == "float16"


def test_a100_picks_bf16_and_bfloat16_compute() -> None:
    report = _report(CATALOG_MODEL, "--gpu", "A100-80GB")
    assert report["gpu"]["bf16"] is True
    assert report["recommendation"]["precision"] == "bf16"
    assert report["recommendation"]["load_kwargs"] == {"dtype": "bfloat16"}
    nf4 = _report(CATALOG_MODEL, "--gpu", "A100-80GB", "--precisions", "nf4-dq")
    qc = nf4["recommendation"]["load_kwargs"]["quantization_config"]
    assert qc["bnb_4bit_compute_dtype"] == "bfloat16"
    assert qc["bnb_4bit_use_double_quant"] is True
    assert qc["bnb_4bit_quant_type"] == "nf4"


def test_precisions_restricts_candidates_and_choice() -> None:
    report = _report(CATALOG_MODEL, "--gpu", "4090", "--precisions", "nf4,int8")
    assert [c["precision"] for c in report["candidates"]] == ["int8", "nf4"]
    assert report["recommendation"]["precision"] == "int8"
    assert report["recommendation"]["load_kwargs"]["quantization_config"] == {"load_in_8bit": True}
    only_fp32 = _report(CATALOG_MODEL, "--gpu", "A100-80GB", "--precisions", "FP32")
    assert only_fp32["recommendation"]["precision"] == "fp32"


def test_nothing_fits_gives_null_and_a_warning_with_the_shortfall() -> None:
    report = _report("meta-llama/Llama-2-70b", "--gpu", "8GiB")
    assert report["recommendation"] is None
    assert not any(c["fits"] for c in report["candidates"])
    (warning,) = report["warnings"]
    assert "nothing fits" in warning
    smallest = min(
        (c for c in report["candidates"] if c["precision"] in ("bf16", "int8", "nf4", "nf4-dq")),
        key=lambda c: c["total_bytes"],
    )
    short = report["gpu"]["headroom_bytes"] - smallest["headroom_bytes"]
    assert smallest["precision"] in warning
    assert f"{short / 1024**3:.2f} GiB more" in warning
    table = estimate("meta-llama/Llama-2-70b", "--gpu", "8GiB", "--mode", "load")
    assert table.exit_code == 0
    assert "No candidate fits" in table.stdout
    assert "warning:" in table.stdout


def test_headroom_option_changes_the_budget() -> None:
    five = _report(CATALOG_MODEL, "--gpu", "4090")
    ten = _report(CATALOG_MODEL, "--gpu", "4090", "--headroom", "10%")
    fixed = _report(CATALOG_MODEL, "--gpu", "4090", "--headroom", "1GiB")
    memory = five["gpu"]["memory_bytes"]
    assert five["gpu"]["headroom_bytes"] == int(memory * 0.05)
    assert ten["gpu"]["headroom_bytes"] == int(memory * 0.10)
    assert fixed["gpu"]["headroom_bytes"] == 1024**3
    for r in (five, ten, fixed):
        g = r["gpu"]
        overhead = g["cuda_context_bytes"] + g["headroom_bytes"]
        assert g["usable_bytes"] == g["memory_bytes"] - overhead


# --------------------------------------------------------------------------- bad input


def test_unknown_model_offline_says_so() -> None:
    result = estimate("no-such-org/no-such-model", "--gpu", "4090", "--mode", "load")
    assert_one_line_error(result, 1, "no-such-org/no-such-model", "HF_HUB_OFFLINE")


def test_malformed_config_json(tmp_path: Path) -> None:
    folder = write_config(tmp_path / "bad", '{"model_type": "llama", ')
    result = estimate(str(folder), "--gpu", "4090", "--mode", "load")
    assert_one_line_error(result, 1, "not valid JSON")


def test_config_with_unknown_model_type(tmp_path: Path) -> None:
    folder = write_config(tmp_path / "odd", {"model_type": "no-such-type", "hidden_size": 8})
    result = estimate(str(folder), "--gpu", "4090", "--mode", "load")
    assert_one_line_error(result, 1, "no-such-type", "not known")


def test_config_with_unknown_architecture_plans_by_model_type(tmp_path: Path) -> None:
    """As from_pretrained does: the auto class goes by model_type; a note says so."""
    config = {**TINY_LLAMA, "architectures": ["NoSuchModelForCausalLM"]}
    folder = write_config(tmp_path / "arch", config)
    result = estimate(str(folder), "--gpu", "4090", "--mode", "load")
    assert result.exit_code == 0, result.output
    assert "NoSuchModelForCausalLM" in result.output and "LlamaForCausalLM" in result.output


def test_unknown_gpu_suggests_the_closest() -> None:
    result = estimate(CATALOG_MODEL, "--gpu", "rtx-4091", "--mode", "load")
    assert_one_line_error(result, 2, "unknown GPU", "rtx-4091", "closest: rtx-4090")


@pytest.mark.parametrize(
    ("size", "needle"), [("0GiB", "more than zero"), ("-5GB", "cannot be negative")]
)
def test_bad_gpu_size(size: str, needle: str) -> None:
    result = estimate(CATALOG_MODEL, f"--gpu={size}", "--mode", "load")
    assert_one_line_error(result, 2, size, needle)


def test_gpu_auto_without_a_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pynvml whose init fails as it does on a machine without the NVIDIA driver."""
    fake = types.ModuleType("pynvml")

    def nvml_init() -> None:
        raise RuntimeError("NVML Shared Library Not Found")

    fake.nvmlInit = nvml_init  # type: ignore[attr-defined]
    fake.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    result = estimate(CATALOG_MODEL, "--gpu", "auto", "--mode", "load")
    assert_one_line_error(result, 1, "no NVIDIA driver", "--gpu auto", "--gpu 4090")


@pytest.mark.parametrize(
    ("value", "needle"),
    [("200%", "between 0 and 90"), ("abc", "neither a percentage nor a size"), ("-3%", "-3%")],
)
def test_nonsense_headroom(value: str, needle: str) -> None:
    result = estimate(CATALOG_MODEL, "--gpu", "4090", "--mode", "load", f"--headroom={value}")
    assert_one_line_error(result, 2, "headroom", needle)


@pytest.mark.parametrize("value", ["int3", "nf4,bogus", ","])
def test_unknown_precisions(value: str) -> None:
    result = estimate(CATALOG_MODEL, "--gpu", "4090", "--mode", "load", f"--precisions={value}")
    assert_one_line_error(result, 2, "precision")


def test_unknown_mode() -> None:
    result = estimate(CATALOG_MODEL, "--gpu", "4090", "--mode", "bogus")
    assert_one_line_error(result, 2, "mode", "bogus")


def test_debug_reraises_the_error() -> None:
    result = estimate(CATALOG_MODEL, "--gpu", "rtx-4091", "--mode", "load", "--debug")
    assert result.exit_code != 0
    from qplan.errors import UsageError

    assert isinstance(result.exception, UsageError)


def _qplan_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qplan", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )


def test_debug_shows_a_traceback_in_a_real_process() -> None:
    args = ("estimate", CATALOG_MODEL, "--gpu", "4090", "--mode", "load", "--headroom", "abc")
    proc = _qplan_process(*args, "--debug")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr
    assert "UsageError" in proc.stderr
    without = _qplan_process(*args)
    assert without.returncode == 2
    assert "Traceback" not in without.stderr
    assert len(without.stderr.strip().splitlines()) == 1


def _with_reader_gone(*args: str) -> tuple[int, str]:
    """Run qplan with stdout a pipe whose reader has left (``qplan ... | head -c 0``)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "qplan", *args], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=300,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    finally:
        os.close(write_end)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("args", [
    ("estimate", CATALOG_MODEL, "--gpu", "4090", "--mode", "load", "--json"),
    ("gpus",),  # a table written by rich
])
def test_a_reader_that_leaves_the_pipe_ends_the_command_quietly(args) -> None:
    # As a shell reports `yes | head`: 128 + SIGPIPE, no error and no traceback.
    assert _with_reader_gone(*args) == (141, "")


def test_an_error_keeps_its_exit_code_when_the_reader_has_left() -> None:
    code, stderr = _with_reader_gone("estimate", CATALOG_MODEL, "--gpu", "rtx-4091", "--json")
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1 and "unknown GPU" in stderr


def test_a_broken_pipe_elsewhere_is_a_failure_like_any_other(monkeypatch) -> None:
    import qplan.api

    def broken(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")  # a pipe of the plan's own, not stdout

    monkeypatch.setattr(qplan.api, "estimate", broken)
    result = estimate(CATALOG_MODEL, "--gpu", "4090", "--json")
    assert result.exit_code == 3
    assert json.loads(result.stdout)["exception"] == "BrokenPipeError"


# --------------------------------------------------------------------------- listings


def test_gpus_table_and_json() -> None:
    table = invoke("gpus")
    assert table.exit_code == 0, table.output
    assert "rtx-4090" in table.stdout and "h100-sxm" in table.stdout
    listed = invoke("gpus", "--json")
    assert listed.exit_code == 0, listed.output
    profiles = json.loads(listed.stdout)
    assert len(profiles) >= 30
    keys = {p["key"] for p in profiles}
    assert {"rtx-4090", "t4", "a100-80gb-sxm"} <= keys
    for p in profiles:
        assert p["memory_bytes"] > 0
        assert isinstance(p["bf16"], bool)


def test_models_table_and_json() -> None:
    table = invoke("models")
    assert table.exit_code == 0, table.output
    assert "meta-llama/Llama-2-7b-hf" in table.stdout
    listed = invoke("models", "--json")
    assert listed.exit_code == 0, listed.output
    entries = json.loads(listed.stdout)
    ids = [e["id"] for e in entries]
    assert "meta-llama/Llama-2-70b-hf" in ids
    assert ids == sorted(ids, key=str.lower)
    for e in entries:
        assert e["model_type"] and e["architecture"]


def test_every_catalog_model_plans() -> None:
    """Each bundled config builds on the meta device and gives a valid report."""
    entries = json.loads(invoke("models", "--json").stdout)
    from qplan.api import estimate as plan
    from qplan.report import report_dict

    for entry in entries:
        report = report_dict(plan(entry["id"], gpu="H100", mode="load"))
        validate(report)
        assert report["model"]["source"] == "catalog", entry["id"]
        assert report["model"]["parameters"] > 0, entry["id"]


def test_python_m_qplan_help() -> None:
    proc = _qplan_process("--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("estimate", "gpus", "models"):
        assert command in proc.stdout


def test_deepspeeds_warnings_do_not_reach_the_terminal() -> None:
    """DeepSpeed (TRL's trainers import it where installed) resets its logger's level at
    import and warns "Setting accelerator to CPU" on a machine without a GPU: the CLI
    filters its logger to errors, whenever DeepSpeed is imported."""
    import logging

    result = invoke("gpus", "--json")
    assert result.exit_code == 0, result.output
    deepspeed = logging.getLogger("DeepSpeed")
    deepspeed.setLevel(logging.WARNING)  # what DeepSpeed's import does
    heard: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: heard.append(record.getMessage())  # type: ignore[method-assign]
    deepspeed.addHandler(handler)
    try:
        deepspeed.warning("Setting accelerator to CPU.")
        deepspeed.error("a real failure")
    finally:
        deepspeed.removeHandler(handler)
    assert heard == ["a real failure"]
