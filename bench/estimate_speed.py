"""How long a qplan estimate takes, against the cost of importing its libraries and accelerate.

One run measures, each as the median of N fresh subprocesses (``--runs``, at least 5):

a. bare import: ``python -c "import torch, transformers, accelerate"``
b. ``qplan estimate meta-llama/Llama-2-70b-hf --gpu 4090 --mode load --json``, as a user runs it
c. the whole bundled catalog (every id from ``qplan models --json``) in ONE process through
   ``qplan.api.estimate(..., mode="load")``: process wall time, first model, per-model mean
d. accelerate's ``estimate-memory`` on the same 70B config, by calling its own functions
   (``init_empty_weights`` + ``AutoModel.from_config(..., torch_dtype=float32)``, then
   ``calculate_maximum_sizes`` and ``estimate_training_usage``, and its table), fed our
   catalog config because it would otherwise ask the Hub

and prints a table with the ratios qplan-70B / bare import (target <= 1.3x) and
qplan / accelerate (target < 1). ``--profile`` adds where qplan's start-up time goes:
``python -X importtime`` summed per top-level package, and a cProfile of one CLI run.

Usage::

    python bench/estimate_speed.py [--runs 7] [--profile] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

MODEL_70B = "meta-llama/Llama-2-70b-hf"
GPU = "4090"
TARGET_VS_IMPORT = 1.3

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "PYTHONWARNINGS": "ignore",
}

BARE_IMPORT = "import torch, transformers, accelerate"

CATALOG_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    t0 = time.perf_counter()
    from qplan.api import estimate
    t_import = time.perf_counter() - t0
    times = []
    for model_id in json.loads(sys.argv[1]):
        t = time.perf_counter()
        estimate(model_id, gpu="4090", mode="load")
        times.append(time.perf_counter() - t)
    print(json.dumps({"import": t_import, "times": times}))
    """
)

ACCELERATE_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from accelerate import init_empty_weights
    from accelerate.commands.estimate import create_ascii_table, estimate_training_usage
    from accelerate.utils import calculate_maximum_sizes, convert_bytes
    from transformers import AutoConfig, AutoModel

    # What accelerate.commands.estimate.create_empty_model does once it has the config
    # (it would fetch the config and model info from the Hub; we feed the catalog copy).
    config = AutoConfig.from_pretrained(sys.argv[1])
    with init_empty_weights():
        model = AutoModel.from_config(config, torch_dtype=torch.float32)
    # ... and what gather_data + estimate_command do with it.
    total_size, largest_layer = calculate_maximum_sizes(model)
    rows = []
    for dtype, div in (("float32", 1), ("float16", 2), ("int8", 4), ("int4", 8)):
        training = estimate_training_usage(total_size, dtype)
        peak = max(training.values())
        rows.append([
            dtype,
            convert_bytes(largest_layer[0] / div),
            convert_bytes(total_size / div),
            convert_bytes(peak) if peak != -1 else "N/A",
        ])
    headers = ["dtype", "Largest Layer", "Total Size", "Training using Adam"]
    print(create_ascii_table(headers, rows, f"Memory Usage for loading `{sys.argv[2]}`"))
    """
)


def qplan_command() -> list[str]:
    """The installed ``qplan`` script next to this interpreter, else ``python -m qplan``."""
    script = Path(sys.executable).with_name("qplan")
    if script.exists():
        return [str(script)]
    found = shutil.which("qplan")
    return [found] if found else [sys.executable, "-m", "qplan"]


def run(cmd: list[str], cwd: str) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=cwd, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")
    return wall, proc.stdout


def catalog_config_path(model_id: str) -> str:
    from qplan.profiles import data_dir

    path = data_dir("models") / (model_id.replace("/", "__") + ".json")
    return str(path)


def measure(runs: int, cwd: str) -> dict:
    """Rounds of a, b, c, d one after the other, so a drift in machine load hits all four."""
    qplan = qplan_command()
    results: dict = {"runs": runs, "python": sys.version.split()[0], "qplan_cmd": qplan}
    bare = [sys.executable, "-c", BARE_IMPORT]
    qplan_70b = [*qplan, "estimate", MODEL_70B, "--gpu", GPU, "--mode", "load", "--json"]
    accelerate = [sys.executable, "-c", ACCELERATE_SCRIPT, catalog_config_path(MODEL_70B)]
    accelerate.append(MODEL_70B)
    _, listing = run([*qplan, "models", "--json"], cwd)
    ids = [entry["id"] for entry in json.loads(listing)]
    catalog = [sys.executable, "-c", CATALOG_SCRIPT, json.dumps(ids)]

    # Warm the OS file cache once so the first timed round is not an outlier.
    for cmd in (bare, qplan_70b, accelerate):
        run(cmd, cwd)

    walls: dict[str, list[float]] = {"bare": [], "qplan": [], "catalog": [], "accelerate": []}
    per_run = []
    out_qplan = out_accelerate = ""
    for _ in range(runs):
        wall, _ = run(bare, cwd)
        walls["bare"].append(wall)
        wall, out_qplan = run(qplan_70b, cwd)
        walls["qplan"].append(wall)
        wall, out = run(catalog, cwd)
        walls["catalog"].append(wall)
        per_run.append(json.loads(out.strip().splitlines()[-1]))
        wall, out_accelerate = run(accelerate, cwd)
        walls["accelerate"].append(wall)

    report = json.loads(out_qplan)
    assert report["schema"] == "qplan.report/v1"
    med = {key: statistics.median(values) for key, values in walls.items()}
    results["bare_import"] = {"median_s": med["bare"], "runs_s": walls["bare"]}
    results["qplan_70b"] = {
        "median_s": med["qplan"],
        "runs_s": walls["qplan"],
        "recommendation": (report["recommendation"] or {}).get("precision"),
    }
    results["catalog"] = {
        "models": len(ids),
        "median_process_s": med["catalog"],
        "median_import_s": statistics.median(d["import"] for d in per_run),
        "median_first_model_s": statistics.median(d["times"][0] for d in per_run),
        "median_mean_per_model_s": statistics.median(statistics.fmean(d["times"]) for d in per_run),
        "median_mean_after_first_s": statistics.median(
            statistics.fmean(d["times"][1:]) for d in per_run
        ),
        "slowest": max(zip(per_run[-1]["times"], ids, strict=True), key=lambda pair: pair[0]),
    }
    results["accelerate_70b"] = {
        "median_s": med["accelerate"],
        "runs_s": walls["accelerate"],
        "table": out_accelerate,
    }
    # Per-round ratios too: robust when the machine's load changes during the run.
    results["ratio_qplan_vs_import"] = med["qplan"] / med["bare"]
    results["ratio_qplan_vs_accelerate"] = med["qplan"] / med["accelerate"]
    results["per_round_ratio_vs_import"] = [
        q / b for q, b in zip(walls["qplan"], walls["bare"], strict=True)
    ]
    results["per_round_ratio_vs_accelerate"] = [
        q / a for q, a in zip(walls["qplan"], walls["accelerate"], strict=True)
    ]
    return results


def print_results(r: dict) -> None:
    c = r["catalog"]
    rows = [
        ("a. bare import torch, transformers, accelerate", r["bare_import"]["median_s"]),
        (f"b. qplan estimate {MODEL_70B} --gpu {GPU} --json", r["qplan_70b"]["median_s"]),
        (f"c. catalog, {c['models']} models in one process (wall)", c["median_process_s"]),
        ("   of which: import qplan.api", c["median_import_s"]),
        ("   of which: first model (lazy imports, caches)", c["median_first_model_s"]),
        ("   per-model mean (all models)", c["median_mean_per_model_s"]),
        ("   per-model mean after the first", c["median_mean_after_first_s"]),
        (f"d. accelerate estimate-memory {MODEL_70B}", r["accelerate_70b"]["median_s"]),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"\nmedian of {r['runs']} fresh subprocesses each (python {r['python']})\n")
    print(f"{'measurement'.ljust(width)}  {'seconds':>8}")
    print(f"{'-' * width}  {'-' * 8}")
    for name, value in rows:
        print(f"{name.ljust(width)}  {value:8.3f}")
    slow_s, slow_id = c["slowest"]
    print(f"\nslowest catalog model (last run): {slow_id} {slow_s:.3f} s")
    vs_import = r["ratio_qplan_vs_import"]
    vs_acc = r["ratio_qplan_vs_accelerate"]
    ok = "ok" if vs_import <= TARGET_VS_IMPORT else "MISSED"
    print(f"\nqplan-70B / bare import : {vs_import:.2f}x  (target <= {TARGET_VS_IMPORT}x: {ok})")
    ok = "ok" if vs_acc < 1 else "MISSED"
    print(f"qplan-70B / accelerate  : {vs_acc:.2f}x  (target < 1: {ok})")
    rounds_i = statistics.median(r["per_round_ratio_vs_import"])
    rounds_a = statistics.median(r["per_round_ratio_vs_accelerate"])
    print(f"median of per-round ratios: {rounds_i:.2f}x vs import, {rounds_a:.2f}x vs accelerate")


# --------------------------------------------------------------------------- profile


def importtime_by_package(cwd: str) -> list[tuple[str, float]]:
    """Cumulative import time (s) of each top-level package for one qplan estimate."""
    cmd = [sys.executable, "-X", "importtime", "-m", "qplan", "estimate", MODEL_70B]
    cmd += ["--gpu", GPU, "--mode", "load", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=cwd, check=True)
    totals: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        _, self_us, _cumulative, name = _split_importtime(line)
        top = name.strip().split(".")[0]
        totals[top] = totals.get(top, 0.0) + self_us / 1e6
    return sorted(totals.items(), key=lambda kv: -kv[1])


def _split_importtime(line: str) -> tuple[str, int, int, str]:
    head, cumulative, name = line.split("|")
    self_us = int(head.split(":", 1)[1])
    return head, self_us, int(cumulative), name


def cprofile_top(cwd: str, limit: int) -> str:
    """cProfile of one in-process CLI run, sorted by cumulative time."""
    with tempfile.TemporaryDirectory() as tmp:
        stats = Path(tmp) / "qplan.prof"
        code = textwrap.dedent(
            f"""
            import cProfile, sys
            sys.argv = ["qplan", "estimate", {MODEL_70B!r}, "--gpu", {GPU!r},
                        "--mode", "load", "--json"]
            prof = cProfile.Profile()
            prof.enable()
            try:
                # The typer app, not qplan.cli.main: main() leaves through os._exit, which
                # would skip writing the profile.
                from qplan.cli import app
                app()
            except SystemExit:
                pass
            prof.disable()
            prof.dump_stats({str(stats)!r})
            """
        )
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, env=ENV, cwd=cwd, check=True
        )
        import io
        import pstats

        buf = io.StringIO()
        pstats.Stats(str(stats), stream=buf).sort_stats("cumulative").print_stats(limit)
        return buf.getvalue()


def profile(cwd: str, limit: int) -> None:
    print("\n== python -X importtime: self time summed per top-level package (one run)")
    packages = importtime_by_package(cwd)
    total = sum(s for _, s in packages)
    for name, seconds in packages[:20]:
        print(f"  {name:<28} {seconds:7.3f} s")
    print(f"  {'(all imports)':<28} {total:7.3f} s")
    print(f"\n== cProfile of one CLI run, top {limit} by cumulative time")
    print(cprofile_top(cwd, limit))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="subprocesses per measurement (>=5)")
    parser.add_argument("--profile", action="store_true", help="also profile qplan's start-up")
    parser.add_argument("--top", type=int, default=40, help="cProfile rows to print")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    args = parser.parse_args()
    if args.runs < 5:
        parser.error("--runs must be at least 5")
    # Run outside the repo so the installed package is what gets timed.
    with tempfile.TemporaryDirectory() as cwd:
        results = measure(args.runs, cwd)
        print_results(results)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        if args.profile:
            profile(cwd, args.top)


if __name__ == "__main__":
    main()
