"""Predicted vs measured peak for every catalog model, shrunk to a few layers, on CPU.

For each model: inference (bf16), lora (bf16), qlora (nf4-dq) and full (bf16), with and
without gradient checkpointing for the training modes. The prediction is the planner's
meta-device trace for a CPU target; the measurement loads random weights through
bitsandbytes and runs real steps under the live-tensor tracker. Runs whose predicted peak
exceeds --max-gib are skipped (the machine has 24 GiB) and listed.

    python bench/accuracy.py [--layers 2] [--seq-len 128] [--batch 1] [--models a,b]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

CASES = [
    ("inference", "bf16", True),
    ("lora", "bf16", True),
    ("lora", "bf16", False),
    ("qlora", "nf4-dq", True),
    ("qlora", "nf4-dq", False),
    ("full", "bf16", True),
    ("full", "bf16", False),
]


def _size_proxy(config) -> int:
    text = config.get_text_config()
    hidden = getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0)
    return hidden * (getattr(text, "vocab_size", 0) + 12 * hidden * text.num_hidden_layers)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--models", default="", help="comma list of catalog ids (default all)")
    parser.add_argument("--max-gib", type=float, default=10.0)
    parser.add_argument("--json", dest="json_out", default="", help="write rows to this file")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    import dataclasses
    import tempfile

    from qplan.api import estimate, make_workload
    from qplan.loaders.measure import measure, save_random_weights, shrink
    from qplan.loaders.model_source import list_catalog, resolve_model

    ids = [m for m in args.models.split(",") if m] or [e.id for e in list_catalog()]
    specs = {model_id: resolve_model(model_id) for model_id in ids}
    # Smallest first (by a 2-layer parameter count proxy), so a cut-short run covers most.
    ids.sort(key=lambda m: _size_proxy(shrink(specs[m].config, args.layers)))
    rows, skipped = [], []
    for model_id in ids:
        spec = specs[model_id]
        config = shrink(spec.config, args.layers)
        small = dataclasses.replace(spec, config=config)
        folder = tempfile.mkdtemp(prefix="qplan-bench-")
        save_random_weights(config, folder)
        for mode, precision, gc in CASES:
            shape = dict(batch=args.batch, seq_len=args.seq_len, gradient_checkpointing=gc)
            started = time.perf_counter()
            report = estimate(
                small, gpu="1TiB", mode=mode, precisions=precision, target="cpu", **shape
            )
            candidate = report.candidate(precision)
            if candidate.peak_allocated_bytes > args.max_gib * 1024**3:
                skipped.append((model_id, mode, precision, gc))
                continue
            workload = make_workload(mode, config, **shape)
            measured = measure(config, workload, precision, candidate.compute_dtype,
                               weights_dir=folder)
            error = (
                100 * (candidate.peak_allocated_bytes - measured.peak_bytes) / measured.peak_bytes
            )
            row = dict(
                model=model_id,
                mode=mode,
                precision=precision,
                gc=gc,
                predicted=candidate.peak_allocated_bytes,
                measured=measured.peak_bytes,
                error_pct=error,
                seconds=time.perf_counter() - started,
            )
            rows.append(row)
            print(
                f"{model_id:42s} {mode:9s} {precision:6s} gc={int(gc)} "
                f"pred {row['predicted'] / 2**20:9.1f} MiB  meas "
                f"{row['measured'] / 2**20:9.1f} MiB  err {error:+6.2f}%  "
                f"{row['seconds']:5.1f}s",
                flush=True,
            )
    errors = [abs(r["error_pct"]) for r in rows]
    if errors:
        print(
            f"\n{len(rows)} runs: median |error| {statistics.median(errors):.2f}%, "
            f"max |error| {max(errors):.2f}%"
        )
    for s in skipped:
        print("skipped (predicted peak over --max-gib):", *s)
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump({"rows": rows, "skipped": skipped, "args": vars(args)}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
