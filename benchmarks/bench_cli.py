#!/usr/bin/env python
"""Wall time of `collabcompress analyze` and `collabcompress demo` as a user runs them, start-up included.

Runs each command as a fresh process ``--runs`` times after ``--warmup`` untimed runs (to warm
the file cache), beside ``python -c "import torch"``, the floor every command pays, and checks
each median against its budget:

    analyze: collabcompress analyze MINILM --json TMP      (the real all-MiniLM-L6-v2)
    demo:    collabcompress demo --out TMP                 (the bundled sample)

    python benchmarks/bench_cli.py [--commands analyze demo] [--runs 5] [--json PATH]
    OMP_NUM_THREADS=1 python benchmarks/bench_cli.py --commands analyze
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

from _common import check, collabcompress_command, minilm, missing, parser, report, timed

NAME = "cli"
BUDGETS = {"analyze": 2.5, "demo": 15.0}  # seconds, median wall time


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--commands", nargs="+", choices=list(BUDGETS), default=list(BUDGETS))
    ap.add_argument("--model", type=Path, default=None, help="analyze this checkpoint directory (default: MiniLM)")
    ap.add_argument("-n", "--runs", type=int, default=5, help="timed runs per command")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs per command first")
    ap.add_argument("--analyze-budget", type=float, default=BUDGETS["analyze"], help="seconds allowed for analyze")
    ap.add_argument("--demo-budget", type=float, default=BUDGETS["demo"], help="seconds allowed for the demo")
    args = ap.parse_args(argv)
    model = args.model = args.model or minilm()
    if "analyze" in args.commands and not (model / "model.safetensors").is_file():
        return missing(f"model not found: {model}")

    rows, checks = [], []
    with tempfile.TemporaryDirectory(prefix="cc-bench-cli-") as tmp:
        commands = {"import torch": [sys.executable, "-c", "import torch"],
                    "analyze": [*collabcompress_command(), "analyze", model, "--json", Path(tmp) / "analyze.json"],
                    "demo": [*collabcompress_command(), "demo", "--force", "--out", Path(tmp) / "demo"]}
        for name in ["import torch", *args.commands]:
            times = [timed(commands[name]) for _ in range(args.warmup + args.runs)][args.warmup:]
            budget = {"analyze": args.analyze_budget, "demo": args.demo_budget}.get(name)
            median = statistics.median(times)
            rows.append({"command": name, "runs": len(times), "min_s": min(times), "median_s": median,
                         "max_s": max(times), "budget_s": budget})
            if budget is not None:
                checks.append(check(f"median wall time of {name} <= {budget:g} s", round(median, 3),
                                    median <= budget))
    return report(NAME, args, rows, checks)


if __name__ == "__main__":
    sys.exit(main())
