"""The long fuzz of the ``qplan`` command line (issue 9): thousands of mutated real configs
and command lines, each checked for a traceback, an error of more than one line, stdout that
is not valid report/error JSON, an unexpected failure (exit 3) and a hang (a per-input
time bound). The inputs are drawn by tests/fuzz_inputs.py, as in the suite's short fuzz.

    python bench/fuzz.py --examples 10000 --log /tmp/fuzz.jsonl
    QPLAN_FUZZ_CONFIGS=../shared/model-configs python bench/fuzz.py ...  # more seeds

Every input's outcome is appended to the log as it is checked (so a run stopped early still
says how many inputs it tried); the summary goes to stdout at the end: inputs, exit codes,
the slowest input, and every finding with its input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--bound", type=float, default=300.0, help="wall seconds per input")
    parser.add_argument("--cpu-bound", type=float, default=60.0,
                        help="CPU seconds per input (the hang bound on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log", type=Path, default=Path("fuzz-log.jsonl"))
    parser.add_argument("--replay", type=Path, metavar="LOG",
                        help="re-check every finding of an earlier run's log (its config and "
                             "command line) on the code as it is now, instead of fuzzing")
    options = parser.parse_args()
    if options.replay is not None:
        return replay(options.replay, options.bound, options.cpu_bound)

    from fuzz_inputs import check, command, config_text, seed_files
    from hypothesis import HealthCheck, Phase, given, seed, settings

    seeds = seed_files()
    counts: Counter[str] = Counter()
    findings: list[dict] = []
    slowest = (0.0, {})
    start = time.monotonic()
    folder = Path(tempfile.mkdtemp(prefix="qplan-fuzz-"))
    log = options.log.open("a")

    @seed(options.seed)
    @settings(max_examples=options.examples, deadline=None, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(config=config_text(seeds), args=command())
    def one(config: tuple[str, str], args: list[str]) -> None:
        nonlocal slowest
        name, text = config
        outcome = check(text, args, folder, options.bound, options.cpu_bound)
        counts["inputs"] += 1
        counts[f"exit {outcome.exit_code}"] += 1
        record = {"n": counts["inputs"], "seed": name, "args": args, "exit": outcome.exit_code,
                  "seconds": round(outcome.seconds, 3), "problems": outcome.problems,
                  "message": outcome.message[:300]}
        if outcome.problems:
            record["config"] = text
            findings.append(record)
        if outcome.seconds > slowest[0]:
            slowest = (outcome.seconds, record)
        log.write(json.dumps(record) + "\n")
        log.flush()

    one()
    summary = {
        "inputs": counts["inputs"],
        "exit_codes": {k: v for k, v in sorted(counts.items()) if k.startswith("exit")},
        "wall_s": round(time.monotonic() - start, 1),
        "seeds": len(seeds),
        "slowest_s": round(slowest[0], 2),
        "slowest": {k: v for k, v in slowest[1].items() if k != "config"},
        "findings": findings,
    }
    print(json.dumps(summary, indent=2))
    return 1 if findings else 0


def replay(log_path: Path, bound_s: float, cpu_bound_s: float) -> int:
    """Run each distinct finding of ``log_path`` again; print what each gives now."""
    from fuzz_inputs import check

    folder = Path(tempfile.mkdtemp(prefix="qplan-replay-"))
    seen: set[str] = set()
    still = 0
    for line in log_path.read_text().splitlines():
        record = json.loads(line)
        if not record.get("problems") or "config" not in record:
            continue
        key = json.dumps([record["config"], record["args"]])
        if key in seen:
            continue
        seen.add(key)
        outcome = check(record["config"], record["args"], folder, bound_s, cpu_bound_s)
        still += bool(outcome.problems)
        print(json.dumps({"n": record["n"], "seed": record["seed"], "args": record["args"],
                          "then": record["problems"][0][:160], "now_exit": outcome.exit_code,
                          "now_problems": outcome.problems,
                          "now_message": outcome.message[:200],
                          "seconds": round(outcome.seconds, 2)}))
    print(json.dumps({"replayed": len(seen), "still_failing": still}))
    return 1 if still else 0


if __name__ == "__main__":
    sys.exit(main())
