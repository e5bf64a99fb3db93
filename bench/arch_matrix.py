"""Every architecture transformers registers, planned in every mode: ok, refused, or crash.

The registry is transformers' own: every model_type with a causal-LM or an
image-text-to-text auto class. Each gets its default config, cut to 2 decoder layers (or
to the first layer of each kind, for hybrids; 2 layers in its other sub-models), and
``qplan.api.estimate`` runs in the five modes at a short sequence. Planning happens on the
meta device, where the cost follows the depth and not the width, so the widths stay the
defaults. An outcome is "ok" (every candidate
planned), "refused: <why>" (a one-line QplanError), "no default config" (transformers'
own default config does not validate) or "CRASH: <exception>" (anything else: a bug).

    python bench/arch_matrix.py [--jobs 2] [--only llama,mamba] [--timeout 300]
                                [--out bench/arch_matrix.md]

The committed bench/arch_matrix.md is its output; tests/test_arch_registry.py runs a
fast subset of the same function in the suite.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import signal
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

MODES = ("load", "inference", "lora", "qlora", "full")
# One precision per distinct trace a mode takes (fp4 traces like nf4, fp16 like bf16);
# a load is not traced, so it plans every candidate.
PRECISIONS: dict[str, str | None] = {
    "load": None,
    "inference": "bf16,nf4",
    "lora": "bf16",
    "qlora": "nf4",
    "full": "bf16",
}
SHAPE = dict(batch=1, seq_len=32, lora_r=8)
LAYERS = 2
# Attribute names sub-configs (vision towers, audio encoders) give their depth.
_DEPTH_NAMES = ("num_hidden_layers", "depth", "num_layers", "encoder_layers")


def registry_model_types() -> list[str]:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    return sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
                  | set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES))


def _shrink_sub_configs(config: Any) -> None:
    """2 layers in every sub-config other than the text model's (already cut)."""
    text = config.get_text_config()
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is None or sub is text or not hasattr(sub, "to_dict"):
            continue
        for name in _DEPTH_NAMES:
            value = getattr(sub, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > LAYERS:
                with contextlib.suppress(Exception):  # a read-only depth stays
                    setattr(sub, name, LAYERS)


def depth_for(config: Any) -> int:
    """2 layers, or the shortest prefix holding every layer kind of a hybrid pattern: a
    model cut before its first attention layer is not one transformers runs (its cache
    needs an attention layer)."""
    text = config.get_text_config()
    for name in ("layers_block_type", "layer_types"):
        kinds = getattr(text, name, None)
        if isinstance(kinds, list) and kinds:
            return max(LAYERS, *(kinds.index(kind) + 1 for kind in set(kinds)))
    return LAYERS


def tiny_config(model_type: str) -> Any:
    """transformers' default config of ``model_type``, cut to 2 layers where it builds
    that way (else the text model only, else as it is)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from qplan.planner.components import _with_layers
    from qplan.planner.inventory import build_meta_model

    config = CONFIG_MAPPING[model_type]()
    attempts = []
    try:
        small = _with_layers(config, depth_for(config))
        attempts.append(small)
        both = copy.deepcopy(small)
        _shrink_sub_configs(both)
        attempts.insert(0, both)
    except Exception:
        pass
    for candidate in attempts:
        try:
            build_meta_model(copy.deepcopy(candidate))
            return candidate
        except Exception:
            continue
    return config


class _Timeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Timeout()


def _one_line(text: str, limit: int = 140) -> str:
    flat = " ".join(str(text).split()).replace("|", "/")
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def plan_model_type(model_type: str, timeout_s: int = 300,
                    modes: tuple[str, ...] = MODES) -> dict[str, str]:
    """{mode: outcome} for one model_type (and "class": the class planned)."""
    warnings.simplefilter("ignore")
    from qplan.api import estimate
    from qplan.errors import QplanError
    from qplan.planner.spec import ModelSpec

    row: dict[str, str] = {}
    try:
        config = tiny_config(model_type)
    except Exception as exc:
        reason = f"no default config ({type(exc).__name__}: {_one_line(exc, 80)})"
        return {"class": "-", **dict.fromkeys(modes, reason)}
    spec = ModelSpec(id=model_type, source="registry", config=config)
    row["class"] = "-"
    signal.signal(signal.SIGALRM, _alarm)
    for mode in modes:
        signal.alarm(timeout_s)
        try:
            report = estimate(spec, gpu="80GB", mode=mode, precisions=PRECISIONS[mode],
                              **({} if mode == "load" else SHAPE))
            row["class"] = report.model.architecture
            row[mode] = "ok"
        except QplanError as exc:
            row[mode] = "refused: " + _one_line(exc)
        except _Timeout:
            row[mode] = f"CRASH: no answer within {timeout_s} s"
        except Exception as exc:
            row[mode] = f"CRASH: {type(exc).__name__}: {_one_line(exc)}"
        finally:
            signal.alarm(0)
    return row


def _kind(outcome: str) -> str:
    if outcome == "ok":
        return "ok"
    if outcome.startswith("refused"):
        return "refused"
    if outcome.startswith("no default config"):
        return "no default config"
    return "crashed"


def write_table(rows: dict[str, dict[str, str]], out: Path, seconds: float,
                total: int) -> dict[str, int]:
    import transformers

    counts = {"ok": 0, "refused": 0, "crashed": 0, "no default config": 0}
    for row in rows.values():
        for mode in MODES:
            counts[_kind(row[mode])] += 1
    lines = [
        "# Every registered architecture, in every mode",
        "",
        f"Written by `python bench/arch_matrix.py` with transformers {transformers.__version__}"
        f" ({len(rows)} of {total} model types: every one with a causal-LM or"
        " image-text-to-text auto",
        f"class; default config cut to {LAYERS} layers; seq {SHAPE['seq_len']}, batch 1; "
        f"{seconds / 60:.0f} min). Cells: ok = every candidate planned; refused = a one-line",
        "error saying why; CRASH = anything else.",
        "",
        "| outcome | model type x mode |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in counts.items()),
        "",
        "| model_type | class | " + " | ".join(MODES) + " |",
        "|---|---|" + "---|" * len(MODES),
    ]
    for model_type, row in sorted(rows.items()):
        cells = [row[m] for m in MODES]
        if len(set(cells)) == 1 and cells[0] != "ok":
            cells = [cells[0]] + ["same"] * (len(MODES) - 1)
        lines.append(f"| {model_type} | {row['class']} | " + " | ".join(cells) + " |")
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", default="")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per model and mode")
    parser.add_argument("--out", default=str(Path(__file__).with_name("arch_matrix.md")))
    args = parser.parse_args()
    types = [t for t in args.only.split(",") if t] or registry_model_types()
    start = time.time()
    rows: dict[str, dict[str, str]] = {}
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {t: pool.submit(plan_model_type, t, args.timeout) for t in types}
        for model_type, future in futures.items():
            try:
                rows[model_type] = future.result()
            except Exception as exc:  # the worker itself died
                rows[model_type] = {"class": "-", **dict.fromkeys(
                    MODES, f"CRASH: worker died ({type(exc).__name__})")}
            row = rows[model_type]
            print(model_type, *(row[m][:60] for m in MODES), sep=" | ", flush=True)
            # Written as it goes, so an interrupted run still leaves what it found.
            write_table(rows, Path(args.out), time.time() - start, len(types))
    counts = write_table(rows, Path(args.out), time.time() - start, len(types))
    print(counts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
