"""Item 1 of issue 9: no traceback without --debug, a JSON error under --json, and the
table's rows that used to crash or answer wrongly (Axolotl trust_remote_code, paged 8-bit
Adam without CUDA, a mistyped --gpu, --seq-len 0, impossible and absurd configs)."""

from __future__ import annotations

import json
import time

import pytest
import torch
import yaml
from typer.testing import CliRunner

from qplan import api
from qplan.api import estimate
from qplan.cli import app
from qplan.planner.steps import PAGED_MIN_NUMEL
from qplan.report import load_error_schema

jsonschema = pytest.importorskip("jsonschema")
runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def one_line(result, code: int, *needles: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    return lines[0]


def json_error(result) -> dict:
    data = json.loads(result.stdout)
    jsonschema.validate(data, load_error_schema())
    assert data["exit_code"] == result.exit_code
    return data


def _raise_inside(module: str, exc: Exception):
    """A function whose frames belong to ``module``, as if that library raised ``exc``."""
    namespace: dict = {"__name__": module, "exc": exc}
    exec("def boom(*args, **kwargs):\n    raise exc\n", namespace)
    return namespace["boom"]


# --------------------------------------------------------------------------- item 1


def test_unexpected_exception_is_one_line_exit_3(tiny_model_dir, monkeypatch):
    boom = _raise_inside("transformers.models.fake", KeyError("complex64"))
    monkeypatch.setattr(api, "workload_components", boom)
    folder = str(tiny_model_dir("llama"))
    result = run("estimate", folder, "--gpu", "4090", "--mode", "inference")
    line = one_line(result, 3, folder, "transformers", "KeyError", "complex64", "--debug",
                    "planning inference at")
    assert result.stdout == ""
    as_json = run("estimate", folder, "--gpu", "4090", "--json")
    one_line(as_json, 3)
    data = json_error(as_json)
    assert data["kind"] == "internal" and data["library"] == "transformers"
    assert data["exception"] == "KeyError" and data["model"] == folder
    assert data["error"] == line.removeprefix("error: ")


def test_debug_reraises_the_unexpected_exception(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(api, "workload_components",
                        _raise_inside("torch.fake", RuntimeError("kaputt")))
    result = run("estimate", str(tiny_model_dir("llama")), "--gpu", "4090", "--debug")
    assert isinstance(result.exception, RuntimeError)


def test_qplan_errors_are_json_under_json():
    result = run("estimate", "meta-llama/Llama-2-7b", "--gpu", "rtx-4091", "--json")
    one_line(result, 2, "rtx-4091")
    data = json_error(result)
    assert data["kind"] == "usage" and "rtx-4090" in data["error"]


def test_every_error_kind_is_in_the_error_schema():
    from qplan import errors

    kinds = set(load_error_schema()["properties"]["kind"]["enum"])
    classes = [c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, errors.QplanError)]
    assert {c.kind for c in classes} <= kinds


@pytest.mark.parametrize("args", [
    ("estimate", "meta-llama/Llama-2-7b", "--batch", "abc"),
    ("estimate", "meta-llama/Llama-2-7b", "--no-such-option"),
    ("nosuchcommand",),
    ("estimate", "meta-llama/Llama-2-7b", "--gpu"),
])
def test_click_parse_errors_are_one_line_too(args):
    result = run(*args)
    one_line(result, 2)
    with_json = run(*args[:-1], "--json", args[-1]) if args[-1] == "--gpu" else \
        run(*args, "--json")
    one_line(with_json, 2)
    assert json_error(with_json)["kind"] == "usage"


def test_no_arguments_still_prints_help():
    result = run()
    assert "estimate" in result.output and "Traceback" not in result.output


# --------------------------------------------------------------------------- the table's rows


def test_axolotl_trust_remote_code_is_one_permission(tiny_model_dir, tmp_path):
    plan = tmp_path / "plan.yml"
    plan.write_text(yaml.safe_dump({
        "base_model": str(tiny_model_dir("mixtral")), "trust_remote_code": True,
        "adapter": "qlora", "load_in_4bit": True, "sequence_len": 64, "micro_batch_size": 1,
    }))
    result = run("estimate", "--axolotl", str(plan), "--gpu", "4090", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["workload"]["mode"] == "qlora" and report["recommendation"]
    with_flag = run("estimate", "--axolotl", str(plan), "--gpu", "4090", "--json",
                    "--trust-remote-code")
    assert with_flag.exit_code == 0, with_flag.output


def test_paged_8bit_adam_plans_without_cuda_and_matches_a_real_step(tiny_model_dir):
    """The 8-bit states against a real bitsandbytes step on CPU; the paged part (state
    buffers of >= 100k elements, in CUDA managed memory) leaves torch's peak."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    folder = tiny_model_dir("llama", "float32", vocab_size=2000)  # embeddings >= 100k
    shape = dict(mode="full", precisions="fp32", batch=1, seq_len=16, target="cpu")
    paged = estimate(str(folder), gpu="A100-80GB", optimizer="paged_adamw_8bit", **shape)
    plain = estimate(str(folder), gpu="A100-80GB", optimizer="adamw_8bit", **shape)

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    optimizer = bnb.optim.PagedAdamW8bit(model.parameters(), lr=1e-4)  # CPU: not paged
    ids = torch.randint(0, 2000, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    states = [(p, s) for p, s in optimizer.state.items()]
    # Every state tensor once (the quantile maps are shared by all parameters).
    real_all = sum({v.untyped_storage().data_ptr(): v.untyped_storage().nbytes()
                    for _, s in states for v in s.values()
                    if isinstance(v, torch.Tensor)}.values())
    assert real_all
    for report in (paged, plain):
        assert report.candidate("fp32").components["optimizer_states"] == real_all
    managed = sum(s[k].nbytes for p, s in states if p.numel() >= PAGED_MIN_NUMEL
                  for k in ("state1", "state2"))
    assert managed > 0
    drop = (plain.candidate("fp32").peak_allocated_bytes
            - paged.candidate("fp32").peak_allocated_bytes)
    assert drop == managed


def test_mistyped_gpu_suggests_close_names():
    result = run("estimate", "meta-llama/Llama-2-7b", "--gpu", "24XB", "--mode", "load")
    one_line(result, 2, "24XB", "b200", "24GB")


def test_seq_len_zero_is_refused_on_the_command_line_but_the_api_default_stays(
        tiny_model_dir):
    folder = str(tiny_model_dir("llama"))
    result = run("estimate", folder, "--gpu", "4090", "--seq-len", "0")
    one_line(result, 2, "--seq-len", "0")
    report = estimate(folder, gpu="4090", seq_len=0)
    assert report.workload["seq_len"] == 256  # the model's max positions cap the default


def _config_with(tiny_model_dir, tmp_path, arch="llama", **changes):
    folder = tiny_model_dir(arch)
    raw = json.loads((folder / "config.json").read_text())
    raw.update(changes)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    return str(path)


@pytest.mark.parametrize(("changes", "needles"), [
    (dict(num_key_value_heads=8, num_attention_heads=4), ("num_key_value_heads", "more")),
    (dict(num_key_value_heads=3), ("multiple",)),
    (dict(hidden_size=90, num_attention_heads=4, head_dim=None), ("90", "heads")),
    (dict(rms_norm_eps=float("nan")), ("rms_norm_eps", "nan")),
    (dict(num_hidden_layers=100000), ("num_hidden_layers", "1,024")),
    (dict(vocab_size=10**10), ("vocab_size",)),
    (dict(hidden_size=1 << 20), ("hidden_size",)),
    (dict(num_hidden_layers=1000, hidden_size=1 << 17, intermediate_size=1 << 20,
          num_attention_heads=1024, num_key_value_heads=1024), ("parameters",)),
])
def test_impossible_or_absurd_configs_are_refused_fast(tiny_model_dir, tmp_path, changes,
                                                       needles):
    path = _config_with(tiny_model_dir, tmp_path, **changes)
    start = time.monotonic()
    result = run("estimate", path, "--gpu", "80GB", "--mode", "load")
    one_line(result, 1, *needles)
    assert time.monotonic() - start < 20


def test_explicit_head_dim_frees_the_hidden_size(tiny_model_dir, tmp_path):
    # Gemma-style: head_dim * heads != hidden_size is a real, valid layout.
    path = _config_with(tiny_model_dir, tmp_path, "gemma", hidden_size=90, head_dim=24)
    result = run("estimate", path, "--gpu", "80GB", "--mode", "load")
    assert result.exit_code == 0, result.output
