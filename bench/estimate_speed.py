"""How long a qplan estimate takes, against the cost of importing its libraries and accelerate.

One run measures, in rounds (so a drift in machine load hits every measurement alike), each
as the median over ``--runs`` fresh subprocesses:

a. bare import: ``python -c "import torch, transformers"``
b. ``qplan estimate DIR --gpu 4090 --json`` (the default: inference) on Llama-2-70B's config
   in a local folder, with the trace cache off (``QPLAN_CACHE=0``)
c. the same with the trace cache on, first run: an empty cache folder every time
d. the same again on the cache c filled (a repeated plan)
e. accelerate's ``estimate-memory`` on the same folder's config, by calling its own functions
   (``init_empty_weights`` + ``AutoModel.from_config(..., torch_dtype=float32)``, then
   ``calculate_maximum_sizes`` and ``estimate_training_usage``, and its table): it would
   otherwise ask the Hub

and, ``--catalog-runs`` times (default once: it takes minutes), the whole bundled catalog x
every mode in ONE process through ``qplan.api.estimate`` (cache off): wall per mode and the
slowest model. ``--reference`` times the same sweep on the reference path too
(``QPLAN_REUSE=0``: every candidate traced from scratch, as qplan did before it shared
work between traces). ``--baseline PYTHON`` sweeps the same catalog models with the qplan
installed for PYTHON (a venv of the commit issue #10 called "today") and prints the
speed-up in wall and CPU time (target 3x). ``--check`` runs the catalog x every mode on both
paths in one process
and compares every report byte for byte. ``--profile`` adds ``python -X importtime`` per
top-level package and a cProfile of one CLI run.

``--sweep-configs DIR`` / ``--sweep-catalog`` replace all of that by a per-item sweep: every
config file of DIR (and/or every catalog model) x every mode of ``--modes``, each planned
through ``qplan.api.estimate`` (gpu 4090, cache off) in one worker process, with the wall
and CPU time (``time.process_time``, plus the plan workers it forked: all the work) of each
item and a digest of its report. Wall time is what a user waits; CPU time is the fair
figure on a shared machine (wall time there includes waiting for a core), and with plan
workers (``QPLAN_WORKERS``, loaders/plan_workers.py) it is the sum over the processes. An item
running past ``--item-timeout`` seconds is recorded as a timeout and the sweep goes on in a
fresh worker. ``--digests FILE`` compares each report digest with an earlier sweep's
``--json`` (byte identity before/after a change).

Usage::

    python bench/estimate_speed.py [--runs 5] [--catalog-runs 1] [--reference] [--check]
                                   [--baseline OLD_VENV/bin/python]
                                   [--profile] [--json results.json]
    python bench/estimate_speed.py --sweep-configs ../shared/model-configs --sweep-catalog
                                   [--modes load,inference,lora,qlora,full,dpo]
                                   [--models SUBSTR,...] [--item-timeout 600] [--over 20]
                                   [--digests earlier.json] [--json sweep.json]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

MODEL_70B = "meta-llama/Llama-2-70b-hf"
GPU = "4090"
TARGET_VS_ACCELERATE = 0.7
# The catalog x every mode in one process, against the commit issue #10 measured "today".
TARGET_CATALOG_SPEEDUP = 3.0
MODES = ("load", "inference", "lora", "qlora", "full")
# What an item may take (CPU seconds) before the sweep lists it as slow (issue #10).
SLOW_ITEM_S = 20.0

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "PYTHONWARNINGS": "ignore",
}

BARE_IMPORT = "import torch, transformers"

CATALOG_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time
    t0 = time.perf_counter()
    from qplan.api import estimate
    from qplan.report import report_json
    t_import = time.perf_counter() - t0
    times = {}
    reports = {}
    for mode in json.loads(sys.argv[2]):
        for model_id in json.loads(sys.argv[1]):
            t = time.perf_counter()
            try:
                text = report_json(estimate(model_id, gpu="4090", mode=mode))
            except Exception as exc:  # some catalog models fail in some modes
                text = f"error: {type(exc).__name__}: {exc}"
            times[f"{mode} {model_id}"] = time.perf_counter() - t
            reports[f"{mode} {model_id}"] = text
    # With the plan workers it forked and waited for (loaders/plan_workers.py).
    done = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"import": t_import, "times": times, "reports": reports,
                      "cpu": time.process_time() + done.ru_utime + done.ru_stime}))
    """
)

CHECK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from qplan.api import estimate
    from qplan.planner import reuse
    from qplan.report import report_json
    differ, errors, same = [], [], 0
    for mode in json.loads(sys.argv[2]):
        for model_id in json.loads(sys.argv[1]):
            try:
                fast = report_json(estimate(model_id, gpu="4090", mode=mode))
                with reuse.disabled():
                    reference = report_json(estimate(model_id, gpu="4090", mode=mode))
            except Exception as exc:
                errors.append(f"{mode} {model_id}: {type(exc).__name__}: {exc}")
                continue
            if fast == reference:
                same += 1
            else:
                differ.append(f"{mode} {model_id}")
    print(json.dumps({"same": same, "differ": differ, "errors": errors}))
    """
)
# One worker of --sweep-configs: plans the items of argv[1] (JSON [[model, mode], ...]) one
# after the other and prints a JSON line when each starts and when it ends.
SWEEP_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, resource, sys, time
    from qplan.api import estimate
    from qplan.report import report_json
    # Lazy imports (peft, bitsandbytes, trl's trainers...) are paid here, not by item one.
    for mode in {mode for _, mode in json.loads(sys.argv[1])}:
        try:
            estimate("openai-community/gpt2", gpu="4090", mode=mode, seq_len=16)
        except Exception:
            pass
    for model_id, mode in json.loads(sys.argv[1]):
        print(json.dumps({"start": [model_id, mode]}), flush=True)
        # CPU time: this process's and that of the plan workers it forked and waited for
        # (loaders/plan_workers.py), so the figure is all the work an item took.
        def cpu_now():
            done = resource.getrusage(resource.RUSAGE_CHILDREN)
            return time.process_time() + done.ru_utime + done.ru_stime
        wall, cpu = time.perf_counter(), cpu_now()
        try:
            text = report_json(estimate(model_id, gpu="4090", mode=mode))
            status = "ok"
        except Exception as exc:  # a refusal is an outcome too: its message is the report
            text = f"error: {type(exc).__name__}: {exc}"
            status = "error"
        print(json.dumps({
            "model": model_id, "mode": mode, "status": status,
            "wall_s": time.perf_counter() - wall, "cpu_s": cpu_now() - cpu,
            "digest": hashlib.sha256(text.encode()).hexdigest(),
            "error": text if status == "error" else None,
        }), flush=True)
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


def run(cmd: list[str], cwd: str, env: dict | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env or ENV, cwd=cwd,
                          check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")
    return wall, proc.stdout


def catalog_config_path(model_id: str) -> str:
    from qplan.profiles import data_dir

    path = data_dir("models") / (model_id.replace("/", "__") + ".json")
    return str(path)


def local_folder(model_id: str, cwd: str) -> str:
    """The catalog config of ``model_id`` as a local model folder (what a user points at)."""
    folder = Path(cwd) / model_id.replace("/", "__")
    folder.mkdir(exist_ok=True)
    shutil.copy(catalog_config_path(model_id), folder / "config.json")
    return str(folder)


def catalog_ids(cwd: str, python: str | None = None) -> list[str]:
    """The catalog's model ids; with ``python``, those of the qplan installed there."""
    command = (qplan_command() if python is None
               else [str(Path(python).with_name("qplan"))])
    _, listing = run([*command, "models", "--json"], cwd)
    return [entry["id"] for entry in json.loads(listing)]


def compile_qplan_bytecode() -> None:
    """Write qplan's bytecode as ``pip install`` does for a wheel (every other package timed
    here has its own): an editable install under ``PYTHONDONTWRITEBYTECODE`` would
    otherwise compile qplan's ~100 modules from source in every timed run."""
    import importlib.util

    folders = []
    for package in ("qplan", "qplan.planner", "qplan.loaders", "qplan.render"):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            folders.extend(spec.submodule_search_locations)
    env = {k: v for k, v in ENV.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-m", "compileall", "-q", *folders], env=env,
                   capture_output=True, check=False)


def measure(runs: int, cwd: str) -> dict:
    """Rounds of a..e one after the other, so a drift in machine load hits all of them."""
    compile_qplan_bytecode()
    qplan = qplan_command()
    folder = local_folder(MODEL_70B, cwd)
    results: dict = {"runs": runs, "python": sys.version.split()[0], "qplan_cmd": qplan}
    bare = [sys.executable, "-c", BARE_IMPORT]
    qplan_70b = [*qplan, "estimate", folder, "--gpu", GPU, "--json"]
    accelerate = [sys.executable, "-c", ACCELERATE_SCRIPT, str(Path(folder) / "config.json"),
                  MODEL_70B]
    no_cache = {**ENV, "QPLAN_CACHE": "0"}

    # Warm the OS file cache once so the first timed round is not an outlier.
    for cmd in (bare, qplan_70b, accelerate):
        run(cmd, cwd, no_cache)

    names = ("bare", "qplan", "qplan_cold_cache", "qplan_warm_cache", "accelerate")
    walls: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, str] = {}
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as home:
            cache = {**ENV, "QPLAN_CACHE": "1", "HF_HOME": home}
            for name, cmd, env in (
                ("bare", bare, ENV),
                ("qplan", qplan_70b, no_cache),
                ("qplan_cold_cache", qplan_70b, cache),
                ("qplan_warm_cache", qplan_70b, cache),
                ("accelerate", accelerate, ENV),
            ):
                wall, outputs[name] = run(cmd, cwd, env)
                walls[name].append(wall)
    reports = {outputs[n] for n in ("qplan", "qplan_cold_cache", "qplan_warm_cache")}
    assert len(reports) == 1, "the trace cache changed the 70B report"
    report = json.loads(outputs["qplan"])
    assert report["schema"] == "qplan.report/v1"
    results["recommendation"] = (report["recommendation"] or {}).get("precision")
    for name in names:
        results[name] = {"median_s": statistics.median(walls[name]), "runs_s": walls[name]}
    for name in ("qplan", "qplan_cold_cache", "qplan_warm_cache"):
        results[f"ratio_{name}_vs_accelerate"] = statistics.median(
            q / a for q, a in zip(walls[name], walls["accelerate"], strict=True)
        )
        results[f"ratio_{name}_vs_import"] = statistics.median(
            q / b for q, b in zip(walls[name], walls["bare"], strict=True)
        )
    return results


def sweep(cwd: str, ids: list[str], reuse: bool, python: str = sys.executable) -> dict:
    """The catalog x every mode in one process (cache off); wall per mode, slowest model.
    ``python``: the interpreter whose qplan runs it (``--baseline``: an older install)."""
    env = {**ENV, "QPLAN_CACHE": "0", "QPLAN_REUSE": "1" if reuse else "0"}
    cmd = [python, "-c", CATALOG_SCRIPT, json.dumps(ids), json.dumps(MODES)]
    wall, out = run(cmd, cwd, env)
    data = json.loads(out.strip().splitlines()[-1])
    per_mode = {
        mode: sum(t for key, t in data["times"].items() if key.split(" ")[0] == mode)
        for mode in MODES
    }
    slowest = max(data["times"].items(), key=lambda kv: kv[1])
    errors = sorted(key for key, text in data["reports"].items() if text.startswith("error:"))
    return {"process_s": wall, "cpu_s": data.get("cpu"), "import_s": data["import"],
            "per_mode_s": per_mode,
            "slowest": slowest, "errors": errors, "times": data["times"],
            "reports": data["reports"]}


def check(cwd: str, ids: list[str]) -> dict:
    cmd = [sys.executable, "-c", CHECK_SCRIPT, json.dumps(ids), json.dumps(MODES)]
    _, out = run(cmd, cwd, {**ENV, "QPLAN_CACHE": "0"})
    return json.loads(out.strip().splitlines()[-1])


def print_results(r: dict) -> None:
    rows = [
        ("a. bare import torch, transformers", "bare"),
        ("b. qplan estimate 70B dir --gpu 4090 --json, cache off", "qplan"),
        ("c. the same, trace cache on, first run (empty)", "qplan_cold_cache"),
        ("d. the same, cache filled by c", "qplan_warm_cache"),
        ("e. accelerate estimate-memory, same config", "accelerate"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"\nmedian of {r['runs']} fresh subprocesses each (python {r['python']}); "
          f"recommendation {r['recommendation']}\n")
    print(f"{'measurement'.ljust(width)}  {'seconds':>8}  {'vs e':>6}  {'vs a':>6}")
    print(f"{'-' * width}  {'-' * 8}  {'-' * 6}  {'-' * 6}")
    for name, key in rows:
        vs_acc = r.get(f"ratio_{key}_vs_accelerate")
        vs_imp = r.get(f"ratio_{key}_vs_import")
        extra = f"  {vs_acc:5.2f}x  {vs_imp:5.2f}x" if vs_acc is not None else ""
        print(f"{name.ljust(width)}  {r[key]['median_s']:8.3f}{extra}")
    print("(ratios: median of per-round ratios)")
    for key, label in (("qplan", "cache off"), ("qplan_cold_cache", "empty cache")):
        ratio = r[f"ratio_{key}_vs_accelerate"]
        ok = "ok" if ratio <= TARGET_VS_ACCELERATE else "MISSED"
        print(f"qplan-70B ({label}) / accelerate: {ratio:.2f}x "
              f"(target <= {TARGET_VS_ACCELERATE}x: {ok})")


def print_sweep(label: str, s: dict) -> None:
    modes = ", ".join(f"{m} {t:.1f}" for m, t in s["per_mode_s"].items())
    print(f"\ncatalog x every mode in one process ({label}): {s['process_s']:.1f} s wall "
          f"(import {s['import_s']:.1f} s; per mode: {modes})")
    if s.get("cpu_s") is not None:
        print(f"  CPU {s['cpu_s']:.1f} s")
    print(f"  slowest: {s['slowest'][0]} {s['slowest'][1]:.1f} s; "
          f"{len(s['errors'])} errors {s['errors'][:5]}")


# --------------------------------------------------------------------------- per-item sweep


def config_files(folder: str) -> list[str]:
    """The model configs of ``folder``: its ``*.json`` files, less the ModelOpt quant configs
    kept beside them (``X.hf_quant_config.json``, read with ``X.json``)."""
    return sorted(str(p.resolve()) for p in Path(folder).glob("*.json")
                  if not p.name.endswith(".hf_quant_config.json"))


def _worker_lines(proc: subprocess.Popen) -> queue.Queue:
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def sweep_items(cwd: str, items: list[tuple[str, str]], item_timeout: float) -> list[dict]:
    """Plan every (model, mode) in one worker process; an item past ``item_timeout`` seconds
    (wall) is recorded as a timeout and the rest go on in a fresh worker."""
    env = {**ENV, "QPLAN_CACHE": "0"}
    results: list[dict] = []
    todo = list(items)
    while todo:
        proc = subprocess.Popen([sys.executable, "-c", SWEEP_SCRIPT, json.dumps(todo)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env=env, cwd=cwd)
        lines = _worker_lines(proc)
        current, started = None, time.perf_counter()
        while True:
            try:
                line = lines.get(timeout=max(1.0, item_timeout - (time.perf_counter() - started)))
            except queue.Empty:
                proc.kill()
                proc.wait()
                # A worker that never began its first item (its imports alone ran past the
                # timeout, on a loaded machine): that item is the one that timed out.
                current = current or tuple(todo[0])
                results.append({"model": current[0], "mode": current[1], "status": "timeout",
                                "wall_s": time.perf_counter() - started, "cpu_s": None,
                                "digest": None, "error": None})
                print(f"  TIMEOUT {current[1]:<9} {current[0]} (> {item_timeout:.0f} s)",
                      flush=True)
                todo = todo[todo.index(current) + 1:]
                break
            if line is None:  # the worker is done (or died: the rest are lost)
                proc.wait()
                if current is not None and (not results or results[-1]["model"] != current[0]
                                            or results[-1]["mode"] != current[1]):
                    results.append({"model": current[0], "mode": current[1],
                                    "status": f"crash (exit {proc.returncode})", "wall_s": None,
                                    "cpu_s": None, "digest": None, "error": None})
                    todo = todo[todo.index(current) + 1:]
                else:
                    todo = []
                break
            data = json.loads(line)
            if "start" in data:
                current, started = tuple(data["start"]), time.perf_counter()
                continue
            results.append(data)
            print(f"  {data['cpu_s']:7.1f} s cpu {data['wall_s']:7.1f} s wall  "
                  f"{data['mode']:<9} {data['model']}  {data['status']}", flush=True)
    return results


def print_item_sweep(results: list[dict], over: float) -> None:
    cpu = sum(r["cpu_s"] or 0.0 for r in results)
    wall = sum(r["wall_s"] or 0.0 for r in results)
    slow = [r for r in results
            if r["cpu_s"] is None or r["status"] == "timeout"
            or max(r["cpu_s"], r["wall_s"] or 0.0) > over]
    errors = [r for r in results if r["status"] == "error"]
    print(f"\n{len(results)} items: {cpu:.1f} s cpu, {wall:.1f} s wall in all; "
          f"{len(errors)} refused; over {over:.0f} s cpu or wall (or not finished): "
          f"{len(slow)}")
    for r in sorted(slow, key=lambda r: -(r["cpu_s"] or r["wall_s"] or 0.0)):
        cpu_text = "-" if r["cpu_s"] is None else f"{r['cpu_s']:.1f}"
        wall_text = "-" if r["wall_s"] is None else f"{r['wall_s']:.1f}"
        print(f"  {cpu_text:>7} s cpu  {wall_text:>7} s wall  {r['mode']:<9} {r['model']}  "
              f"{r['status']}")
    for r in errors:
        print(f"  refused: {r['mode']} {r['model']}: {(r['error'] or '')[:150]}")


def compare_digests(results: list[dict], earlier_file: Path) -> list[str]:
    """Items whose report differs from the same item's in an earlier sweep's --json."""
    earlier = {(r["model"], r["mode"]): r["digest"]
               for r in json.loads(earlier_file.read_text())["sweep"]}
    return [f"{r['mode']} {r['model']}" for r in results
            if (r["model"], r["mode"]) in earlier and r["digest"] is not None
            and earlier[(r["model"], r["mode"])] is not None
            and earlier[(r["model"], r["mode"])] != r["digest"]]


def run_item_sweep(args: argparse.Namespace) -> None:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    with tempfile.TemporaryDirectory() as cwd:
        models = config_files(args.sweep_configs) if args.sweep_configs else []
        if args.sweep_catalog:
            models += catalog_ids(cwd)
        if args.models:
            wanted = [w.strip().lower() for w in args.models.split(",")]
            models = [m for m in models if any(w in m.lower() for w in wanted)]
        items = [(model, mode) for model in models for mode in modes]
        print(f"sweep: {len(models)} models x {len(modes)} modes, one worker process "
              f"(gpu {GPU}, cache off); times are per item, CPU time is the fair figure")
        results = sweep_items(cwd, items, args.item_timeout)
    print_item_sweep(results, args.over)
    out: dict = {"sweep": results, "modes": modes, "over_s": args.over}
    if args.digests:
        differ = compare_digests(results, args.digests)
        out["digests_differ"] = differ
        print(f"\nreports vs {args.digests}: {len(differ)} differ {differ}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


# --------------------------------------------------------------------------- profile


def importtime_by_package(cwd: str) -> list[tuple[str, float]]:
    """Cumulative import time (s) of each top-level package for one qplan estimate."""
    cmd = [sys.executable, "-X", "importtime", "-m", "qplan", "estimate", MODEL_70B]
    cmd += ["--gpu", GPU, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**ENV, "QPLAN_CACHE": "0"},
                          cwd=cwd, check=True)
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
            sys.argv = ["qplan", "estimate", {MODEL_70B!r}, "--gpu", {GPU!r}, "--json"]
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
        subprocess.run([sys.executable, "-c", code], capture_output=True,
                       env={**ENV, "QPLAN_CACHE": "0"}, cwd=cwd, check=True)
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
    parser.add_argument("--runs", type=int, default=5, help="subprocesses per measurement (>=5)")
    parser.add_argument("--catalog-runs", type=int, default=1,
                        help="catalog x every mode sweeps (0: none)")
    parser.add_argument("--reference", action="store_true",
                        help="also sweep on the reference path (QPLAN_REUSE=0)")
    parser.add_argument("--baseline", metavar="PYTHON",
                        help="also sweep the catalog with the qplan installed for this "
                             "interpreter (an older commit's venv), over the models both "
                             "catalogs hold, and print the speed-up")
    parser.add_argument("--check", action="store_true",
                        help="compare every catalog report, fast vs reference path")
    parser.add_argument("--profile", action="store_true", help="also profile qplan's start-up")
    parser.add_argument("--top", type=int, default=40, help="cProfile rows to print")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    sweep_opts = parser.add_argument_group("per-item sweep (instead of the measurements above)")
    sweep_opts.add_argument("--sweep-configs", metavar="DIR",
                            help="sweep every config file of DIR (e.g. ../shared/model-configs)")
    sweep_opts.add_argument("--sweep-catalog", action="store_true",
                            help="sweep every model of the bundled catalog")
    sweep_opts.add_argument("--modes", default=",".join(MODES),
                            help="comma-separated modes to sweep (any of qplan's --mode)")
    sweep_opts.add_argument("--models", help="only models whose id or path contains one of "
                                             "these comma-separated strings")
    sweep_opts.add_argument("--item-timeout", type=float, default=600.0,
                            help="seconds (wall) before an item is recorded as a timeout")
    sweep_opts.add_argument("--over", type=float, default=SLOW_ITEM_S,
                            help="list items over this many CPU seconds")
    sweep_opts.add_argument("--digests", type=Path,
                            help="an earlier sweep's --json: list the reports that differ")
    args = parser.parse_args()
    if args.sweep_configs or args.sweep_catalog:
        run_item_sweep(args)
        return
    if args.runs < 5:
        parser.error("--runs must be at least 5")
    # Run outside the repo so the installed package is what gets timed.
    with tempfile.TemporaryDirectory() as cwd:
        results = measure(args.runs, cwd)
        print_results(results)
        ids = catalog_ids(cwd) if args.catalog_runs or args.check else []
        if args.baseline:
            # The same models on both sides: those the older catalog holds too.
            older = set(catalog_ids(cwd, args.baseline))
            ids = [i for i in ids if i in older]
        sweeps: dict[str, list] = {"fast": [], "reference": [], "baseline": []}
        for _ in range(args.catalog_runs):
            sweeps["fast"].append(sweep(cwd, ids, reuse=True))
            print_sweep("fast path", sweeps["fast"][-1])
            if args.reference:
                sweeps["reference"].append(sweep(cwd, ids, reuse=False))
                print_sweep("reference path, QPLAN_REUSE=0", sweeps["reference"][-1])
            if args.baseline:
                sweeps["baseline"].append(sweep(cwd, ids, reuse=True, python=args.baseline))
                print_sweep(f"baseline {args.baseline}", sweeps["baseline"][-1])
        if sweeps["fast"] and sweeps["baseline"]:
            for unit, key in (("wall", "process_s"), ("CPU", "cpu_s")):
                now = statistics.median(s[key] for s in sweeps["fast"])
                then = statistics.median(s[key] for s in sweeps["baseline"])
                print(f"\nbaseline / now ({unit}, {len(ids)} models x {len(MODES)} modes): "
                      f"{then / now:.2f}x (target >= {TARGET_CATALOG_SPEEDUP}x)")
        if sweeps["fast"] and sweeps["reference"]:
            fast = statistics.median(s["process_s"] for s in sweeps["fast"])
            ref = statistics.median(s["process_s"] for s in sweeps["reference"])
            same = sweeps["fast"][0]["reports"] == sweeps["reference"][0]["reports"]
            print(f"\nreference / fast: {ref / fast:.2f}x; reports identical: {same}")
        results["catalog"] = {
            name: [{k: v for k, v in s.items() if k != "reports"} for s in runs]
            for name, runs in sweeps.items()
        }
        if args.check:
            results["check"] = check(cwd, ids)
            c = results["check"]
            print(f"\ncheck: {c['same']} reports identical, {len(c['differ'])} differ "
                  f"{c['differ']}, {len(c['errors'])} errors {c['errors'][:5]}")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        if args.profile:
            profile(cwd, args.top)


if __name__ == "__main__":
    main()
