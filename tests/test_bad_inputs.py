"""A corpus of bad inputs: each gives one line on stderr naming the problem, its exit code
(2 for command-line mistakes, 1 for files qplan cannot plan) and no traceback; under
--json, a ``qplan.error/v1`` object on stdout.

The commands run in-process through typer's CliRunner (fast); a few run as real processes
at the end, where os._exit and the real stdout matter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from qplan.cli import app
from qplan.report import load_error_schema

jsonschema = pytest.importorskip("jsonschema")
runner = CliRunner()

CATALOG = "meta-llama/Llama-2-7b"


@dataclass(frozen=True)
class Bad:
    """One bad input: the command (``{tiny}``, ``{dir}`` and ``{file}`` are filled in), the
    exit code it must give and words the error line must hold."""

    name: str
    args: tuple[str, ...]
    code: int
    needles: tuple[str, ...] = ()
    file_text: str | bytes | None = None  # written to {file}
    file_name: str = "config.json"


def config_text(**changes) -> str:
    """The tiny Llama's config with ``changes`` (None removes a key)."""
    from tiny_models import TINY_CONFIGS

    raw = {**TINY_CONFIGS["llama"], "dtype": "bfloat16"}
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    return json.dumps(raw)


def _tiny(family: str) -> dict:
    from tiny_models import TINY_CONFIGS

    return {**TINY_CONFIGS[family], "dtype": "bfloat16"}


def est(*args: str) -> tuple[str, ...]:
    return ("estimate", *args)


def config_case(name: str, code: int, needles: tuple[str, ...], text: str | bytes,
                *extra: str) -> Bad:
    return Bad(name, est("{file}", "--gpu", "80GB", "--mode", "load", *extra), code, needles,
               text)


# --------------------------------------------------------------------------- configs

BROKEN_CONFIGS = [
    config_case("empty file", 1, ("not valid JSON",), ""),
    config_case("truncated json", 1, ("not valid JSON",), config_text()[:40]),
    config_case("json list", 1, ("list",), "[1, 2]"),
    config_case("json null", 1, ("NoneType",), "null"),
    config_case("json number", 1, ("int",), "42"),
    config_case("json string", 1, ("str",), '"llama"'),
    config_case("no model_type", 1, ("model_type",), config_text(model_type=None)),
    config_case("model_type a number", 1, ("model_type",), config_text(model_type=5)),
    config_case("empty object", 1, ("model_type",), "{}"),
    config_case("trailing garbage", 1, ("not valid JSON",), config_text() + " }"),
    config_case("not utf-8", 1, ("UTF-8",), b"\xff\xfe\x00garbage"),
    config_case("architectures a string", 1, ("architectures",),
                config_text(architectures="LlamaForCausalLM")),
    config_case("architectures of numbers", 1, ("architectures",), config_text(architectures=[1])),
]

WRONG_TYPES = [
    config_case("hidden_size a string", 1, ("hidden_size",), config_text(hidden_size="96")),
    config_case("layers a fraction", 1, ("num_hidden_layers",),
                config_text(num_hidden_layers=2.5)),
    config_case("heads a boolean", 1, ("num_attention_heads",),
                config_text(num_attention_heads=True)),
    config_case("vocab negative", 1, ("vocab_size",), config_text(vocab_size=-5)),
    config_case("zero layers", 1, ("num_hidden_layers",), config_text(num_hidden_layers=0)),
    config_case("intermediate a list", 1, ("intermediate_size",),
                config_text(intermediate_size=[200])),
    config_case("max positions negative", 1, ("max_position_embeddings",),
                config_text(max_position_embeddings=-1)),
    config_case("layers null", 1, ("num_hidden_layers",), config_text(num_hidden_layers="null")),
    config_case("eps a string", 1, ("rms_norm_eps",), config_text(rms_norm_eps="small")),
]

NON_FINITE = [
    config_case("NaN eps", 1, ("rms_norm_eps", "nan"),
                config_text().replace('"model_type"', '"rms_norm_eps": NaN, "model_type"')),
    config_case("Infinity rope theta", 1, ("rope_theta", "inf"),
                config_text().replace('"model_type"', '"rope_theta": Infinity, "model_type"')),
    config_case("-Infinity init range", 1, ("initializer_range", "inf"),
                config_text().replace('"model_type"',
                                      '"initializer_range": -Infinity, "model_type"')),
    config_case("NaN hidden", 1, ("hidden_size",),
                config_text().replace('"hidden_size": 96', '"hidden_size": NaN')),
    config_case("Infinity layers", 1, ("num_hidden_layers",),
                config_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": Infinity')),
]

ABSURD = [
    config_case("100000 layers", 1, ("num_hidden_layers", "1,024"),
                config_text(num_hidden_layers=100_000)),
    config_case("hidden 2^20", 1, ("hidden_size",),
                config_text(hidden_size=1 << 20, num_attention_heads=4, num_key_value_heads=2)),
    config_case("vocab 10^10", 1, ("vocab_size",), config_text(vocab_size=10**10)),
    config_case("100000 heads", 1, ("heads",),
                config_text(num_attention_heads=100_000, num_key_value_heads=100_000)),
    config_case("positions 10^12", 1, ("max_position_embeddings",),
                config_text(max_position_embeddings=10**12)),
    config_case("intermediate 10^9", 1, ("intermediate_size",),
                config_text(intermediate_size=10**9)),
    config_case("petascale", 1, ("parameters",),
                config_text(num_hidden_layers=1024, hidden_size=1 << 17, num_attention_heads=1024,
                            num_key_value_heads=1024, intermediate_size=1 << 20)),
    config_case("huge int", 1, ("vocab_size",), config_text(vocab_size=10**400)),
    # Qwen3's config class builds a num_hidden_layers-long layer_types list while it is
    # constructed: refused before transformers is asked (found by the long fuzz, which hung).
    config_case("2^31 layers, per-layer lists", 1, ("num_hidden_layers", "1,024"),
                config_text(model_type="qwen3", architectures=["Qwen3ForCausalLM"],
                            max_window_layers=36, num_hidden_layers=2**31)),
    config_case("2^31 layers in text_config", 1, ("text_config.num_hidden_layers",),
                config_text(text_config={"num_hidden_layers": 2**31})),
]

IMPOSSIBLE = [
    config_case("more kv heads than heads", 1, ("num_key_value_heads", "more"),
                config_text(num_key_value_heads=8, num_attention_heads=4)),
    config_case("kv heads do not divide", 1, ("multiple",), config_text(num_key_value_heads=3)),
    config_case("zero kv heads", 1, ("num_key_value_heads",), config_text(num_key_value_heads=0)),
    config_case("zero heads", 1, ("heads",), config_text(num_attention_heads=0)),
    config_case("heads do not divide hidden", 1, ("heads",),
                config_text(hidden_size=90, num_attention_heads=4)),
]

UNKNOWN = [
    config_case("unknown model_type", 1, ("not known to transformers",),
                config_text(model_type="nosuchmodel")),
    # An unknown architecture name with a known model_type plans by model_type, as
    # from_pretrained resolves it (tests/test_architectures.py); a non-generative family
    # is refused in one line.
    config_case("encoder-only architecture", 1, ("encoder-only",),
                config_text(model_type="bert", architectures=["BertForMaskedLM"])),
    config_case("remote code without trust", 1, ("--trust-remote-code",),
                config_text(model_type="mycustom",
                            auto_map={"AutoConfig": "configuration_my.MyConfig"})),
    config_case("remote code trusted but missing", 1, ("custom code",),
                config_text(model_type="mycustom",
                            auto_map={"AutoConfig": "configuration_my.MyConfig"}),
                "--trust-remote-code"),
]

MODELS = [
    Bad("missing path", est("/no/such/config.json", "--gpu", "4090"), 1, ("does not exist",)),
    Bad("folder without config", est("{dir}", "--gpu", "4090"), 1, ("config.json",)),
    Bad("not a json file", est("{file}", "--gpu", "4090"), 1, (".json",), "hello",
        "notes.txt"),
    Bad("invalid hub id", est("a b c", "--gpu", "4090"), 1, ("valid",)),
    Bad("offline unknown id", est("nobody/nothing-here", "--gpu", "4090"), 1, ("offline",)),
    Bad("empty model", est("", "--gpu", "4090"), 2, ("no model",)),
    Bad("no model at all", est("--gpu", "4090"), 2, ("no model",)),
    # peft wraps fused MoE expert tensors with lora.ParamWrapper, which refuses dropout: the
    # user's own get_peft_model fails the same way (found by the long fuzz).
    Bad("moe expert lora with dropout",
        est("{file}", "--gpu", "80GB", "--mode", "lora", "--lora-dropout", "0.1"), 2,
        ("lora-dropout 0", "expert"), json.dumps(_tiny("mixtral"))),
    # Expert matrices too narrow for grouped_mm's 16-byte row alignment (the CUDA kernel's
    # check, which its meta kernel mirrors): transformers' experts fail on the GPU too
    # (found by the fuzz: intermediate_size 2).
    Bad("moe experts too narrow for grouped_mm",
        est("{file}", "--gpu", "4090", "--mode", "full", "--no-gradient-checkpointing"), 1,
        ("16 bytes", "fails the same way"),
        json.dumps({**_tiny("mixtral"), "intermediate_size": 2})),
]

# --------------------------------------------------------------------------- GPUs

GPUS = [
    Bad(f"gpu {' '.join((repr(gpu), *extra))}",
        est(CATALOG, "--gpu", gpu, "--mode", "load", *extra), 2, needles)
    for gpu, extra, needles in [
        ("", (), ("empty",)),
        ("   ", (), ("empty",)),
        ("24XB", (), ("24XB", "b200")),
        ("rtx-4091", (), ("rtx-4090",)),
        ("-24GiB", (), ("negative",)),
        ("0GB", (), ("zero",)),
        ("200TiB", (), ("100 TiB",)),
        ("2x", (), ("2x",)),
        ("0x4090", (), ("at least 1",)),
        ("2000x4090", (), ("1024",)),
        ("a100", (), ("ambiguous",)),
        ("24KB", (), ("unit",)),
        ("NaNGB", (), ("NaNGB",)),
        ("1e3GB", (), ("1e3GB",)),
        ("4x4090", ("--num-gpus", "2"), ("count once",)),
        ("4090", ("--num-gpus", "0"), ("at least 1",)),
        ("4090", ("--num-gpus", "5000"), ("1024",)),
        ("24", (), ("unit",)),
        ("B", (), ("unknown GPU",)),
        ("x4090", (), ("unknown GPU",)),
        ("\u00e9\u00e9\u00e9", (), ("names no GPU",)),
    ]
]

# --------------------------------------------------------------------------- options


def opt(name: str, args: tuple[str, ...], needles: tuple[str, ...], mode: str = "lora") -> Bad:
    return Bad(name, est("{tiny}", "--gpu", "4090", "--mode", mode, *args), 2, needles)


OPTIONS = [
    opt("batch 0", ("--batch", "0"), ("--batch",)),
    opt("batch negative", ("--batch", "-1"), ("--batch",)),
    opt("batch past the limit", ("--batch", str((1 << 20) + 1)), ("--batch",)),
    opt("batch not a number", ("--batch", "abc"), ("--batch",)),
    opt("batch huge integer", ("--batch", "9" * 40), ("--batch",)),
    opt("seq-len 0", ("--seq-len", "0"), ("--seq-len",)),
    opt("seq-len negative", ("--seq-len", "-5"), ("--seq-len",)),
    opt("seq-len past the limit", ("--seq-len", str((1 << 24) + 1)), ("--seq-len",)),
    opt("seq-len a float", ("--seq-len", "1.5"), ("--seq-len",)),
    opt("lora-r 0", ("--lora-r", "0"), ("--lora-r",)),
    opt("lora-r past the limit", ("--lora-r", "65537"), ("--lora-r",)),
    opt("lora-alpha 0", ("--lora-alpha", "0"), ("--lora-alpha",)),
    opt("lora-dropout 1", ("--lora-dropout", "1.0"), ("--lora-dropout",)),
    opt("lora-dropout negative", ("--lora-dropout", "-0.1"), ("--lora-dropout",)),
    opt("lora-dropout nan", ("--lora-dropout", "nan"), ("--lora-dropout",)),
    opt("lora-targets none match", ("--lora-targets", "no_such_proj"), ("no_such_proj",)),
    opt("headroom 95%", ("--headroom", "95%"), ("headroom",)),
    opt("headroom negative percent", ("--headroom", "-5%"), ("headroom",)),
    opt("headroom words", ("--headroom", "abc"), ("headroom",)),
    opt("headroom larger than the GPU", ("--headroom", "100GiB"), ("headroom",)),
    opt("precisions empty", ("--precisions", ""), ("precision",)),
    opt("precisions unknown", ("--precisions", "int3"), ("int3",)),
    opt("mode unknown", ("--mode", "pretrain"), ("mode",)),
    opt("kv dtype unknown", ("--kv-dtype", "int4"), ("int4",), mode="inference"),
    opt("optimizer unknown", ("--optimizer", "lion"), ("lion",)),
    opt("attention unknown", ("--attn", "flash9"), ("flash9",)),
    opt("solve unknown", ("--solve", "width"), ("--solve",)),
    opt("emit unknown", ("--emit", "vllm"), ("--emit",)),
    opt("full at 4-bit", ("--precisions", "nf4"), ("nf4",), mode="full"),
    opt("solve without a workload", ("--solve", "batch"), ("--solve",), mode="load"),
    opt("unknown option", ("--no-such-option",), ("--no-such-option",)),
    Bad("output into a missing folder",
        est("{tiny}", "--gpu", "4090", "--mode", "load", "--output", "/no/such/dir/r.json"),
        1, ("cannot write",)),
    Bad("measure layers 0", ("measure", "{tiny}", "--layers", "0", "--device", "cpu"), 1,
        ("--layers",)),
    Bad("measure on a tpu", ("measure", "{tiny}", "--device", "tpu"), 2, ("--device",)),
    Bad("measure at int3", ("measure", "{tiny}", "--precision", "int3", "--device", "cpu"), 2,
        ("int3",)),
    Bad("unknown command", ("plan", "{tiny}"), 2, ("plan",)),
]

# --------------------------------------------------------------------------- Axolotl YAML


def yml(name: str, text: str, code: int, needles: tuple[str, ...]) -> Bad:
    return Bad(name, est("--axolotl", "{file}", "--gpu", "4090"), code, needles, text,
               "plan.yml")


def axolotl(**settings) -> str:
    return yaml.safe_dump({"base_model": "{tiny}", "sequence_len": 64, **settings})


AXOLOTL = [
    Bad("yaml missing", est("--axolotl", "/no/such/plan.yml", "--gpu", "4090"), 1,
        ("plan.yml",)),
    yml("yaml syntax", "base_model: [unclosed\n", 1, ("YAML",)),
    yml("yaml list", "- a\n- b\n", 1, ("mapping",)),
    yml("yaml empty", "", 1, ("mapping",)),
    yml("yaml no base_model", "sequence_len: 64\n", 1, ("base_model",)),
    yml("yaml base_model a number", "base_model: 5\n", 1, ("base_model",)),
    yml("yaml optimizer unknown", axolotl(optimizer="lion"), 1, ("lion",)),
    yml("yaml sequence_len negative", axolotl(sequence_len=-1), 1, ("sequence_len",)),
    yml("yaml sequence_len text", axolotl(sequence_len="long"), 1, ("sequence_len",)),
    yml("yaml micro batch 0", axolotl(micro_batch_size=0), 1, ("micro_batch_size",)),
    yml("yaml lora_r text", axolotl(adapter="lora", lora_r="x"), 1, ("lora_r",)),
    yml("yaml dropout text", axolotl(adapter="lora", lora_dropout="high"), 1, ("lora_dropout",)),
    yml("yaml adapter unknown", axolotl(adapter="ia3"), 1, ("ia3",)),
    yml("yaml memory limit text", axolotl(gpu_memory_limit="lots"), 1, ("gpu_memory_limit",)),
    yml("yaml binary", "\x00\x01\x02", 1, ("plan.yml",)),
    yml("yaml tabs", "base_model:\t{tiny}\n\tsequence_len: 2\n", 1, ("YAML",)),
]

# --------------------------------------------------------------------------- reports


def rep(name: str, text: str, code: int, needles: tuple[str, ...], *extra: str) -> Bad:
    return Bad(name, ("load", "--from-report", "{file}", "--device", "cpu", *extra), code,
               needles, text, "report.json")


REPORTS = [
    Bad("report missing", ("load", "--from-report", "/no/such/report.json"), 1,
        ("cannot read",)),
    rep("report not json", "{", 1, ("not valid JSON",)),
    rep("report a list", "[]", 1, ("not a JSON object",)),
    rep("report other schema", json.dumps({"schema": "other/v9"}), 1, ("schema",)),
    rep("report without schema", json.dumps({"model": {}}), 1, ("schema",)),
    rep("report without model", json.dumps({"schema": "qplan.report/v1"}), 1, ("malformed",)),
    rep("report model a string", json.dumps({"schema": "qplan.report/v1", "model": "x",
                                             "gpu": {}, "workload": {}, "candidates": []}),
        1, ("malformed",)),
    rep("report candidates a number", "REPORT:candidates=5", 1, ("malformed",)),
    rep("report with --gpu", "REPORT:", 2, ("from_report",), "--gpu", "4090"),
    rep("report with a workload flag", "REPORT:", 2, ("from_report",), "--batch", "2"),
    Bad("report for another model", ("load", "{tiny}", "--from-report", "{file}", "--device",
                                      "cpu"), 2, ("plans",), "REPORT:", "report.json"),
]

CORPUS = (BROKEN_CONFIGS + WRONG_TYPES + NON_FINITE + ABSURD + IMPOSSIBLE + UNKNOWN + MODELS
          + GPUS + OPTIONS + AXOLOTL + REPORTS)


def test_the_corpus_is_big_enough():
    assert len(CORPUS) >= 80
    assert len({case.name for case in CORPUS}) == len(CORPUS)


@pytest.fixture(scope="module")
def tiny_report(tiny_model_dir) -> dict:
    result = runner.invoke(app, ["estimate", str(tiny_model_dir("llama")), "--gpu", "4090",
                                 "--mode", "load", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _fill(case: Bad, tmp_path: Path, tiny: str, report: dict) -> list[str]:
    folder = tmp_path / "empty-folder"
    folder.mkdir()
    path = tmp_path / case.file_name
    if case.file_text is not None:
        text = case.file_text
        if isinstance(text, str) and text.startswith("REPORT:"):
            data = json.loads(json.dumps(report))
            if case.name == "report for another model":
                data["model"]["id"] = "someone/else"
                data["model"]["config_path"] = None
            for change in filter(None, text.removeprefix("REPORT:").split(",")):
                key, _, value = change.partition("=")
                data[key] = json.loads(value)
            text = json.dumps(data)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text.replace("{tiny}", tiny))
    return [a.replace("{tiny}", tiny).replace("{dir}", str(folder)).replace("{file}", str(path))
            for a in case.args]


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_bad_input(case: Bad, tmp_path, tiny_model_dir, tiny_report, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = _fill(case, tmp_path, str(tiny_model_dir("llama")), tiny_report)
    result = runner.invoke(app, args)
    assert result.exit_code == case.code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in case.needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    assert result.stdout == "", result.stdout
    # The same input under --json: the error object on stdout, valid against its schema.
    as_json = runner.invoke(app, [*args, "--json"])
    assert as_json.exit_code == case.code, as_json.output
    data = json.loads(as_json.stdout)
    jsonschema.validate(data, load_error_schema())
    assert data["error"] == lines[0].removeprefix("error: ")


# --------------------------------------------------------------------------- real processes


def _qplan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qplan", *args], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)


@pytest.mark.parametrize(("args", "code"), [
    (("estimate", CATALOG, "--gpu", "24XB", "--json"), 2),
    (("estimate", CATALOG, "--batch", "abc", "--json"), 2),
])
def test_real_process_prints_one_line_and_json(args, code):
    proc = _qplan(*args)
    assert proc.returncode == code, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    jsonschema.validate(json.loads(proc.stdout), load_error_schema())
