"""CPU time of one estimate with the bitsandbytes candidates' inference steps derived from
the plain row's (planner/derived_traces.py) against the same estimate tracing every one of
them, in ONE process, alternating, so a shared machine's load hits both alike.

Imports are warm (a small estimate runs first); before every estimate each qplan cache is
emptied (meta-op memo, shared meta models, micro steps, the quantisation probe), so every
estimate starts cold as in a fresh process. "traced" makes ``deriving`` the identity: the
tracer stack qplan had before derived steps. It prints each round's CPU seconds
(``time.process_time``) and real traces, the medians, and whether the reports are equal.

Usage::

    python bench/derived_speed.py [MODEL_OR_DIR] [--rounds 6] [--gpu 4090]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="meta-llama/Llama-2-70b-hf")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--gpu", default="4090")
    args = parser.parse_args()
    os.environ["QPLAN_CACHE"] = "0"
    gc.set_threshold(100_000, 50, 100)

    from qplan.api import estimate
    from qplan.planner import derived_traces, meta_memo, meta_models, quantize_meta
    from qplan.planner import trace as trace_module
    from qplan.report import report_json

    deriving = derived_traces.deriving
    traces = [0]
    real_trace = trace_module.trace

    def counting(*a, **k):
        traces[0] += 1
        return real_trace(*a, **k)

    trace_module.trace = counting
    estimate("openai-community/gpt2", gpu=args.gpu, mode="inference", seq_len=16)
    seconds: dict[str, list[float]] = {"derived": [], "traced": []}
    reports: dict[str, str] = {}
    for index in range(args.rounds):
        for mode in ("traced", "derived") if index % 2 else ("derived", "traced"):
            derived_traces.deriving = deriving if mode == "derived" else (lambda t: t)
            meta_memo.clear()
            meta_models.clear()
            derived_traces.clear()
            quantize_meta._PROBED.clear()
            gc.collect()
            traces[0] = 0
            start = time.process_time()
            reports[mode] = report_json(estimate(args.model, gpu=args.gpu))
            seconds[mode].append(time.process_time() - start)
            print(f"{mode:8} {seconds[mode][-1]:.3f} s CPU, {traces[0]} traces", flush=True)
    derived_traces.deriving = deriving
    for mode, values in seconds.items():
        print(f"{mode:8} median {statistics.median(values):.3f} s, min {min(values):.3f} s")
    print("same report:", reports["derived"] == reports["traced"])


if __name__ == "__main__":
    main()
