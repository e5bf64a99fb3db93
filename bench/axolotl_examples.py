"""Plan every stored Axolotl example YAML (tests/data/axolotl-examples) through
``qplan estimate --axolotl FILE --gpu GPU --json``, offline, and write the table of results
(issue 12).

Each example's base model resolves offline: the bundled catalog (with its aliases), or for a
model only in tests/data/model-configs, that config.json given as MODEL. Run:

    HF_HUB_OFFLINE=1 python bench/axolotl_examples.py --out bench/results/axolotl_examples.md

``--shrink`` plans each file on its model cut to 2 decoder layers at 64 tokens, as
tests/test_axolotl_examples.py does (the full plans take minutes: torchao's 8-bit AdamW on a
full fine-tuning of an 8B model is traced per parameter).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "tests" / "data" / "axolotl-examples"
CONFIGS = ROOT / "tests" / "data" / "model-configs"
GIB = 2**30
SHRUNK_LAYERS = 2
SHRUNK_SEQ_LEN = 64
# A vision-language example puts its image tokens in every sequence (llava: 576).
SHRUNK_SEQ_LEN_IMAGES = 1024


@dataclass(frozen=True)
class ExampleRun:
    """One example planned through the CLI: exit code, report or refusal, seconds."""

    path: str
    exit_code: int
    report: dict | None
    refusal: str | None
    seconds: float
    output: str


def examples() -> list[Path]:
    return sorted(p for p in EXAMPLES.rglob("*") if p.suffix in (".yml", ".yaml"))


def base_model_of(path: Path) -> str:
    import yaml

    return str(yaml.safe_load(path.read_text(encoding="utf-8"))["base_model"])


def shrunk_seq_len(path: Path) -> int:
    import yaml

    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    images = raw.get("processor_type") or raw.get("is_multimodal")
    return SHRUNK_SEQ_LEN_IMAGES if images else SHRUNK_SEQ_LEN


def config_at_hand(base_model: str) -> str | None:
    """MODEL to pass for a base model outside the catalog (its config in tests/data), or
    None when the catalog resolves the YAML's own base_model."""
    path = CONFIGS / (base_model.replace("/", "__") + ".json")
    return str(path) if path.is_file() else None


def shrunk_model(base_model: str, folder: Path, layers: int = SHRUNK_LAYERS) -> str:
    """The base model's config cut to its first ``layers`` decoder layers, saved in
    ``folder`` (a config.json qplan reads as a local model)."""
    from qplan.api import resolve
    from qplan.planner.components import _with_layers

    spec = resolve(config_at_hand(base_model) or base_model, None, False)
    small = _with_layers(spec.config, layers)
    # The catalog plans such models with transformers' own class (spec.trust_remote_code
    # is off); a saved auto_map would send a local folder to the Hub's code instead.
    if not spec.trust_remote_code and hasattr(small, "auto_map"):
        del small.auto_map
    small.save_pretrained(folder)
    return str(folder)


def run_example(path: Path, gpu: str, model: str | None = None,
                extra: tuple[str, ...] = ()) -> ExampleRun:
    """``qplan estimate [MODEL] --axolotl FILE --gpu GPU --json`` in-process."""
    from typer.testing import CliRunner

    from qplan.cli import app

    model = model or config_at_hand(base_model_of(path))
    args = ["estimate", *([model] if model else []), "--axolotl", str(path), "--gpu", gpu,
            "--json", *extra]
    start = time.perf_counter()
    result = CliRunner().invoke(app, args)
    seconds = time.perf_counter() - start
    report = json.loads(result.stdout) if result.exit_code == 0 else None
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    refusal = errors[0].removeprefix("error:").strip() if errors else None
    if refusal is not None:
        refusal = refusal.replace(f"{path.parent}/", "").replace(f"{EXAMPLES}/", "")
    return ExampleRun(str(path.relative_to(EXAMPLES)), result.exit_code, report, refusal,
                      seconds, result.output)


def summary_row(run: ExampleRun) -> dict[str, Any]:
    """Outcome, busiest GPU and the keys qplan could not model, for the table."""
    if run.report is None:
        return {"example": run.path, "outcome": f"refused: {run.refusal}", "gib": None,
                "host_gib": None, "unmodelled": [], "unknown": []}
    report = run.report
    rec = report.get("recommendation") or {}
    precision = rec.get("precision") or report["candidates"][0]["precision"]
    cand = next(c for c in report["candidates"] if c["precision"] == precision)
    block = report.get("axolotl") or {}
    outcome = f"plan: {report['workload']['mode']} {precision}"
    strategy = cand.get("strategy")
    if strategy:
        outcome += f", {strategy}"
    outcome += "" if cand.get("fits", True) else " (does not fit)"
    # Several GPUs: the report's devices are the recommended candidate's (host RAM as "cpu").
    devices = report.get("devices") or [] if precision == rec.get("precision") else []
    gpus = [d["total_bytes"] for d in devices if d["device"].startswith("cuda")]
    busiest = max(gpus) if gpus else cand["total_bytes"]
    host = (cand.get("host_bytes") or 0) + sum(
        d["total_bytes"] for d in devices if d["device"] == "cpu")
    return {
        "example": run.path,
        "outcome": outcome,
        "gib": busiest / GIB,
        "host_gib": host / GIB if host else None,
        "unmodelled": [k["key"] for k in block.get("not_modelled", [])],
        "unknown": list(block.get("unknown", [])),
    }


def table_line(row: dict[str, Any]) -> str:
    gib = f"{row['gib']:.2f}" if row["gib"] is not None else "-"
    host = f"{row['host_gib']:.2f}" if row["host_gib"] is not None else "-"
    unmodelled = ", ".join(row["unmodelled"]) or "-"
    unknown = ", ".join(row["unknown"]) or "-"
    return f"| {row['example']} | {row['outcome']} | {gib} | {host} | {unmodelled} | {unknown} |"


HEADER = ("| example | outcome | GiB per GPU | host GiB | not modelled | unknown keys |\n"
          "| --- | --- | --- | --- | --- | --- |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gpu", default="H100")
    parser.add_argument("--shrink", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    lines = [HEADER]
    for path in examples():
        model, extra = None, ()
        if args.shrink:
            folder = Path(tempfile.mkdtemp(prefix="qplan-axolotl-"))
            model = shrunk_model(base_model_of(path), folder)
            extra = ("--seq-len", str(shrunk_seq_len(path)))
        run = run_example(path, args.gpu, model, extra)
        lines.append(table_line(summary_row(run)))
        print(lines[-1], f"({run.seconds:.1f} s)", flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
