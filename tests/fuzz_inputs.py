"""Fuzz inputs for the ``qplan`` command line, shared by tests/test_fuzz.py (a few dozen
examples) and bench/fuzz.py (thousands).

An input is a real config (the bundled catalog, plus QPLAN_FUZZ_CONFIGS' folder of Hub
configs when set) shrunk to tiny sizes so a plan takes a fraction of a second, then mutated
(values swapped for edge cases of every type, keys dropped, the JSON text cut or broken),
and a command line drawn around it (modes, GPU strings, every workload option, at and past
their limits). ``check`` runs it in-process and says what is wrong with the outcome:
a traceback, more than one error line, stdout that is not the report or error JSON, or
more than the per-input time bound.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

REPO = Path(__file__).resolve().parent.parent
CATALOG_DIR = REPO / "profiles" / "models"
SKIP_FILES = ("aliases.json",)

# Sizes a shrunk config takes (only keys the config already has are changed).
TINY = {
    "num_hidden_layers": 2, "n_layer": 2, "hidden_size": 64, "n_embd": 64, "d_model": 64,
    "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128, "num_attention_heads": 4,
    "n_head": 4, "vocab_size": 512, "head_dim": 16, "max_position_embeddings": 512,
    "n_positions": 512, "num_local_experts": 4, "n_routed_experts": 4, "num_experts": 4,
    "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "v_head_dim": 8, "sliding_window": 64, "partial_rotary_factor": 0.5,
}
NESTED = ("text_config", "vision_config", "audio_config")


def seed_files() -> list[Path]:
    folders = [CATALOG_DIR]
    extra = os.environ.get("QPLAN_FUZZ_CONFIGS")
    if extra and Path(extra).is_dir():
        folders.append(Path(extra))
    return sorted(p for folder in folders for p in folder.glob("*.json")
                  if p.name not in SKIP_FILES and not p.name.endswith(".hf_quant_config.json"))


def shrink(raw: dict[str, Any]) -> dict[str, Any]:
    """The config at tiny sizes, its per-layer lists cut to the tiny depth."""
    out = dict(raw)
    depth = out.get("num_hidden_layers", out.get("n_layer"))
    heads, kv = out.get("num_attention_heads"), out.get("num_key_value_heads")
    for key, value in TINY.items():
        if key in out and isinstance(out[key], (int, float)) and not isinstance(out[key], bool):
            out[key] = value
    if isinstance(kv, int):
        out["num_key_value_heads"] = 4 if kv == heads else 2
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        # Token ids of the real vocabulary would lie past the tiny one.
        if isinstance(out.get(key), int) and "vocab_size" in out:
            out[key] = 0
    if isinstance(depth, int) and not isinstance(depth, bool):
        kept = tiny_layers(raw, depth)
        for key in ("num_hidden_layers", "n_layer"):
            if key in out:
                out[key] = len(kept)
        for key, value in raw.items():
            # Per-layer lists and layer-pattern strings (Nemotron-H's hybrid_override_pattern:
            # one character per layer, from which the model takes its depth), cut alike.
            if isinstance(value, list) and len(value) == depth:
                out[key] = [value[i] for i in kept]
            elif _is_layer_pattern(value, depth):
                out[key] = "".join(value[i] for i in kept)
    _fit_mrope_sections(out)
    for key in NESTED:
        if isinstance(out.get(key), dict):
            out[key] = shrink(out[key])
    return out


def _fit_mrope_sections(out: dict[str, Any]) -> None:
    """Multimodal rotary sections (Qwen2-VL's mrope_section: the temporal, height and width
    shares of the rotary frequencies) scaled to the tiny head, keeping their proportions:
    the model splits its head_dim * partial_rotary_factor / 2 frequencies by them."""
    hidden, heads = out.get("hidden_size"), out.get("num_attention_heads")
    head_dim = out.get("head_dim")
    if not isinstance(head_dim, int) and isinstance(hidden, int) and isinstance(heads, int):
        head_dim = hidden // heads if heads > 0 else None
    if not isinstance(head_dim, int) or head_dim <= 0:
        return
    for key in ("rope_scaling", "rope_parameters"):
        rope = out.get(key)
        sections = rope.get("mrope_section") if isinstance(rope, dict) else None
        if not (isinstance(sections, list) and sections
                and all(isinstance(x, int) and x > 0 for x in sections)):
            continue
        factor = rope.get("partial_rotary_factor", out.get("partial_rotary_factor", 1.0))
        if not isinstance(factor, (int, float)) or not 0 < factor <= 1:
            continue
        target = int(head_dim * factor) // 2
        total = sum(sections)
        scaled = [max(1, x * target // total) for x in sections]
        scaled[0] += target - sum(scaled)
        if scaled[0] >= 1:
            out[key] = {**rope, "mrope_section": scaled}


def _is_layer_pattern(value: Any, depth: int) -> bool:
    """A string with one character per layer, of a few kinds ("M-M*E")."""
    return (isinstance(value, str) and len(value) == depth > 1
            and len(set(value)) <= 8 and not any(c.isspace() for c in value))


def tiny_layers(raw: dict[str, Any], depth: int) -> list[int]:
    """The layers a shrunk config keeps: the first 2, or where a layer-pattern string (one
    character per layer) names several kinds, the first layer of each kind, in order:
    Nemotron-H's "M-M-M-M*-..." keeps "M-*" (Mamba, MLP, attention). A model cut before
    its first attention layer is not one transformers runs."""
    keep = {pattern.index(kind) for pattern in raw.values()
            if _is_layer_pattern(pattern, depth) for kind in set(pattern)}
    for index in range(depth):
        if len(keep) >= 2:
            break
        keep.add(index)
    return sorted(keep)


@st.composite
def json_value(draw: st.DrawFn) -> Any:
    return draw(st.one_of(
        st.sampled_from([-1, 0, 1, 2, 3, 7, 1023, 1025, 2**31, 10**12, 10**30]),
        st.integers(-10, 10**6),
        st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0, 1e-30, 1e30, 0.5]),
        st.text(max_size=8),
        st.none(),
        st.booleans(),
        st.lists(st.integers(-1, 5), max_size=3),
        st.just({}),
    ))


@st.composite
def config_text(draw: st.DrawFn, seeds: list[Path]) -> tuple[str, str]:
    """(seed name, config.json text): a shrunk real config with 0-3 mutations."""
    path = draw(st.sampled_from(seeds))
    raw = shrink(json.loads(path.read_text()))
    for _ in range(draw(st.integers(0, 3))):
        where = raw
        nested = [k for k in NESTED if isinstance(raw.get(k), dict)]
        if nested and draw(st.booleans()):
            where = raw[draw(st.sampled_from(nested))]
        keys = sorted(where) + sorted(TINY)
        key = draw(st.sampled_from(keys))
        action = draw(st.sampled_from(["set", "set", "set", "delete", "add"]))
        if action == "delete":
            where.pop(key, None)
        elif action == "add":
            where[draw(st.text(min_size=1, max_size=6))] = draw(json_value())
        else:
            where[key] = draw(json_value())
    text = json.dumps(raw)
    damage = draw(st.sampled_from(["none"] * 8 + ["cut", "junk"]))
    if damage == "cut":
        text = text[: draw(st.integers(0, max(0, len(text) - 1)))]
    elif damage == "junk":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(min_size=1, max_size=4)) + text[at:]
    return path.name, text


GPUS = ["4090", "80GB", "24GiB", "2x A100-80GB", "h100", "t4", "rtx-3060", "8x h100", "b200"]
MODES = ["load"] * 6 + ["inference", "lora", "qlora", "full"]


def _int_text(low: int, high: int) -> st.SearchStrategy[str]:
    return _mostly(st.integers(low, high).map(str),
                   st.sampled_from(["0", "-1", "abc", "1.5", "9" * 30, "", "16777217"]))


def _mostly(good: st.SearchStrategy[str], junk: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """``good`` nine times in ten: junk fails at once, so it would crowd out the plans."""
    return st.integers(0, 9).flatmap(lambda n: junk if n == 0 else good)


@st.composite
def command(draw: st.DrawFn, fast: bool = False) -> list[str]:
    """Options for ``qplan estimate CONFIG``: mostly fast ones, each option sometimes past
    its limits. ``fast``: workloads at 32 tokens unless --seq-len is drawn (for the suite)."""
    args = ["--gpu", draw(_mostly(st.sampled_from(GPUS), st.text(max_size=8)))]
    args += ["--mode", draw(_mostly(st.sampled_from(MODES), st.text(max_size=6)))]
    if fast:
        args += ["--seq-len", "32"]  # a --seq-len drawn below comes later and wins
    optional = {
        "--batch": _int_text(1, 4),
        "--seq-len": _int_text(1, 64),
        "--precisions": st.one_of(
            st.lists(st.sampled_from(["fp32", "bf16", "fp16", "int8", "fp4", "nf4", "nf4-dq"]),
                     min_size=1, max_size=3).map(",".join),
            st.text(max_size=6)),
        "--lora-r": _int_text(1, 64),
        "--lora-alpha": _int_text(1, 64),
        "--lora-dropout": st.sampled_from(["0", "0.1", "1", "-0.5", "nan", "x"]),
        "--lora-targets": st.sampled_from(["q_proj,v_proj", "all-linear", "nothing", ","]),
        "--headroom": st.sampled_from(["5%", "0", "1GiB", "95%", "-1%", "abc", "1000GiB"]),
        "--optimizer": st.sampled_from(["adamw", "adamw_8bit", "paged_adamw_8bit", "sgd",
                                        "adafactor", "lion"]),
        "--attn": st.sampled_from(["sdpa", "eager", "flash_attention_2", "bogus"]),
        "--kv-dtype": st.sampled_from(["bfloat16", "float16", "float32", "int4"]),
        "--num-gpus": _int_text(1, 4),
    }
    for name, values in optional.items():
        if draw(st.integers(0, 5)) == 0:
            args += [name, draw(values)]
    if draw(st.integers(0, 3)) == 0:
        args.append("--no-gradient-checkpointing")
    return args


class InputTimeout(BaseException):
    """Raised by the alarm: not an Exception, so no handler of qplan's can swallow it."""


@dataclass
class Outcome:
    exit_code: int | None
    seconds: float
    problems: list[str] = field(default_factory=list)
    message: str = ""


def _alarm(signum: int, frame: Any) -> None:
    raise InputTimeout()


def check(config: str, args: list[str], folder: Path, bound_s: float,
          cpu_bound_s: float | None = None) -> Outcome:
    """Run ``qplan estimate`` on ``config`` with ``args`` (plus --json) in-process.

    ``bound_s`` bounds the wall time; ``cpu_bound_s`` (when given) bounds the CPU time the
    process spends on the input, so that a long run sharing a busy machine tells a hang
    (CPU time keeps growing) from an input that merely waited for a core.
    """
    import jsonschema
    from typer.testing import CliRunner

    from qplan.cli import app
    from qplan.report import load_error_schema, load_schema

    path = folder / "config.json"
    path.write_text(config)
    argv = ["estimate", str(path), *args, "--json"]
    start = time.monotonic()
    cpu_start = time.process_time()
    previous = signal.signal(signal.SIGALRM, _alarm)
    previous_prof = signal.signal(signal.SIGPROF, _alarm)
    signal.setitimer(signal.ITIMER_REAL, bound_s)
    if cpu_bound_s is not None:
        signal.setitimer(signal.ITIMER_PROF, cpu_bound_s)
    try:
        result = CliRunner().invoke(app, argv)
    except InputTimeout:
        cpu = time.process_time() - cpu_start
        return Outcome(None, time.monotonic() - start,
                       [f"no answer within {bound_s:g} s wall / "
                        f"{cpu_bound_s or bound_s:g} s CPU (CPU used {cpu:.1f} s)"])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGALRM, previous)
        signal.signal(signal.SIGPROF, previous_prof)
    outcome = Outcome(result.exit_code, time.monotonic() - start)
    problems = outcome.problems
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        problems.append(f"exception escaped: {type(result.exception).__name__}: "
                        f"{result.exception}")
    if "Traceback" in result.output:
        problems.append("traceback in the output")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    outcome.message = errors[0] if errors else ""
    try:
        data = json.loads(result.stdout)
    except ValueError:
        problems.append(f"stdout is not JSON: {result.stdout[:200]!r}")
        return outcome
    schema = load_schema() if result.exit_code == 0 else load_error_schema()
    try:
        jsonschema.validate(data, schema)
    except jsonschema.ValidationError as exc:
        problems.append(f"JSON does not match its schema: {exc.message[:200]}")
    if result.exit_code != 0 and len(errors) != 1:
        problems.append(f"{len(errors)} error lines on stderr")
    if result.exit_code not in (0, 1, 2):
        problems.append(f"exit {result.exit_code}: {outcome.message}")
    return outcome
