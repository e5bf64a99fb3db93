"""The workload commands through the CLI: estimate modes, --solve, measure, load, emit."""

from __future__ import annotations

import json

import bitsandbytes  # noqa: F401  (imported before CUDA is faked: it probes CUDA on import)
import jsonschema
import pytest
import torch
import transformers
from typer.testing import CliRunner

from qplan.cli import app
from qplan.report import load_schema

runner = CliRunner()
SHAPE = ["--batch", "2", "--seq-len", "64", "--lora-r", "8"]


def run_json(*args: str) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    jsonschema.validate(report, load_schema())
    return report


@pytest.mark.parametrize("mode", ["inference", "lora", "qlora", "full"])
def test_estimate_modes_report_components(tiny_model_dir, mode):
    report = run_json("estimate", str(tiny_model_dir("llama")), "--gpu", "4090", "--mode", mode,
                      *SHAPE)
    assert report["workload"]["mode"] == mode
    assert report["workload"]["seq_len"] == 64
    expected = {"full": {"fp32", "bf16", "fp16"}, "qlora": {"fp4", "nf4", "fp4-dq", "nf4-dq"}}
    names = {c["precision"] for c in report["candidates"]}
    assert names == expected.get(mode, names)
    for candidate in report["candidates"]:
        parts = candidate["components"]
        assert sum(parts.values()) == candidate["total_bytes"]
        assert candidate["peak_allocated_bytes"] <= candidate["total_bytes"]
        if mode == "inference":
            assert parts["kv_cache"] > 0
        else:
            assert parts["optimizer_states"] > 0


def test_default_mode_is_inference_with_default_seq_len(tiny_model_dir):
    report = run_json("estimate", str(tiny_model_dir("llama")), "--gpu", "4090",
                      "--precisions", "bf16")
    assert report["workload"]["mode"] == "inference"
    assert report["workload"]["seq_len"] == 256  # min(4096, max_position_embeddings=256)


def test_solve_seq_len_finds_a_fitting_value(tiny_model_dir):
    report = run_json("estimate", str(tiny_model_dir("llama")), "--gpu", "1GiB", "--mode",
                      "inference", "--precisions", "bf16,nf4", "--solve", "seq-len")
    solutions = {s["precision"]: s for s in report["solutions"]}
    assert set(solutions) == {"bf16", "nf4"}
    assert all(s["value"] == 256 for s in solutions.values())  # capped at max positions


def test_nothing_fits_solves_and_advises(tiny_model_dir):
    report = run_json("estimate", str(tiny_model_dir("llama")), "--gpu", "520MiB", "--headroom",
                      "0", "--mode", "full", "--precisions", "bf16", "--batch", "64",
                      "--seq-len", "256", "--no-gradient-checkpointing")
    assert report["recommendation"] is None
    variables = {s["variable"] for s in report["solutions"]}
    assert variables == {"batch", "seq_len"}
    batch = next(s for s in report["solutions"] if s["variable"] == "batch")
    assert batch["value"] is None or 1 <= batch["value"] < 64
    text = " ".join(report["warnings"])
    assert "nothing fits" in text and "gradient checkpointing" in text
    assert "8-bit optimizer" in text and "GPUs" in text


def test_measure_prints_measured_beside_predicted(tiny_model_dir):
    report = run_json("measure", str(tiny_model_dir("qwen2")), "--mode", "lora", "--precision",
                      "bf16", "--device", "cpu", *SHAPE)
    measured = report["measured"]
    assert measured["device"] == "cpu"
    assert abs(measured["error_pct"]) <= 5
    assert measured["components"]["adapters"] == measured["predicted_components"]["adapters"]


def test_measure_layers_shrinks_the_model(tiny_model_dir):
    report = run_json("measure", str(tiny_model_dir("llama")), "--mode", "inference",
                      "--layers", "1", "--device", "cpu", *SHAPE)
    assert report["measured"]["layers"] == 1


def test_load_cli_on_cpu_is_exact(tiny_model_dir):
    result = runner.invoke(app, ["load", str(tiny_model_dir("llama")), "--gpu", "24GiB",
                                 "--mode", "load", "--precision", "nf4-dq", "--device", "cpu",
                                 "--json"])
    assert result.exit_code == 0, result.output
    measured = json.loads(result.stdout)["measured"]
    assert measured["error_pct"] == 0
    assert measured["weights_bytes"] == measured["predicted_bytes"]


class Stop(Exception):
    pass


@pytest.mark.parametrize(("gpu", "compute"),
                         [("T4", torch.float16), ("A100-80GB", torch.bfloat16)])
def test_load_cli_passes_gpu_specific_kwargs(tiny_model_dir, monkeypatch, gpu, compute):
    calls = []

    def fake(source, **kwargs):
        calls.append(kwargs)
        raise Stop

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    result = runner.invoke(app, ["load", str(tiny_model_dir("llama")), "--gpu", gpu, "--mode",
                                 "load", "--precision", "nf4", "--device", "cuda", "--debug"])
    assert isinstance(result.exception, Stop)  # --debug lets the exception through
    kwargs = calls[-1]
    assert kwargs["quantization_config"].bnb_4bit_compute_dtype == compute
    assert kwargs["dtype"] == compute
    assert kwargs["device_map"] == {"": 0}
    assert kwargs["attn_implementation"] == "sdpa"


def test_emit_and_axolotl_round_trip_through_the_cli(tiny_model_dir, tmp_path):
    folder = str(tiny_model_dir("llama"))
    emitted = runner.invoke(app, ["estimate", folder, "--gpu", "4090", "--mode", "qlora",
                                  "--precisions", "nf4-dq", "--emit", "axolotl", *SHAPE])
    assert emitted.exit_code == 0, emitted.output
    config = tmp_path / "axolotl.yml"
    config.write_text(emitted.stdout)
    direct = run_json("estimate", folder, "--gpu", "4090", "--mode", "qlora", "--precisions",
                      "nf4-dq", *SHAPE)
    again = run_json("estimate", "--axolotl", str(config), "--gpu", "4090")
    assert again["recommendation"]["precision"] == direct["recommendation"]["precision"]
    for key in ("mode", "batch", "seq_len", "lora_r", "gradient_checkpointing", "optimizer"):
        assert again["workload"][key] == direct["workload"][key], key


def test_emit_transformers_is_python(tiny_model_dir):
    result = runner.invoke(app, ["estimate", str(tiny_model_dir("llama")), "--gpu", "4090",
                                 "--mode", "load", "--emit", "transformers"])
    assert result.exit_code == 0, result.output
    compile(result.stdout, "<emitted>", "exec")
    assert "BitsAndBytesConfig" in result.stdout or "dtype" in result.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--mode", "full", "--precisions", "nf4"], "plans only"),
        (["--optimizer", "lion"], "optimizer"),
        (["--solve", "width"], "--solve"),
        (["--batch", "0"], "--batch"),
        (["--emit", "vllm"], "--emit"),
        (["--headroom", "-1GiB"], "negative"),
    ],
)
def test_bad_workload_options_are_usage_errors(tiny_model_dir, args, needle):
    result = runner.invoke(app, ["estimate", str(tiny_model_dir("llama")), "--gpu", "4090",
                                 *args])
    assert result.exit_code == 2, result.output
    assert needle in result.stderr
    assert "Traceback" not in result.output


def test_measure_json_stdout_is_only_the_report_in_a_real_process(tiny_model_dir):
    """DeepSpeed (imported by the real step's libraries) logs a notice on the stdout of its
    first import; in a fresh process under --json that notice goes to stderr, and stdout
    parses as one report."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "qplan", "measure", str(tiny_model_dir("llama")), "--mode",
         "inference", "--layers", "1", "--device", "cpu", "--batch", "1", "--seq-len", "16",
         "--json"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    jsonschema.validate(report, load_schema())
    assert report["measured"]["layers"] == 1
