"""Wall time of `collabcompress analyze` on all-MiniLM-L6-v2, start-up included.

Runs ``collabcompress analyze MODEL --json TMP`` as a fresh process N times, beside
``python -c "import torch"`` (the floor that every run pays), and prints min / median / max
wall times and whether the analysis meets the budget (2.5 s by default).

    python benchmarks/bench_analyze.py [--model DIR] [-n 5] [--budget 2.5]
    OMP_NUM_THREADS=1 python benchmarks/bench_analyze.py

Exit code 0 when the median meets the budget, 1 when it does not, 2 when the model is missing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import default_model as _default_model, collabcompress_command as _collabcompress


def _time(cmd: list[str], n: int, warmup: int) -> list[float]:
    times = []
    for i in range(warmup + n):
        start = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr.strip()}")
        if i >= warmup:
            times.append(elapsed)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=_default_model(), help="checkpoint directory (default: cache)")
    parser.add_argument("-n", "--runs", type=int, default=5, help="timed runs per command (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first, to warm the file cache (default 1)")
    parser.add_argument("--budget", type=float, default=2.5, help="seconds allowed for analyze (default 2.5)")
    args = parser.parse_args()
    if not (args.model / "model.safetensors").is_file():
        print(f"model not found: {args.model} (run `python scripts/fetch_data.py`)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            ('python -c "import torch"', _time([sys.executable, "-c", "import torch"], args.runs, args.warmup)),
            ("collabcompress analyze MODEL --json TMP",
             _time([*_collabcompress(), "analyze", str(args.model), "--json", str(Path(tmp) / "out.json")],
                   args.runs, args.warmup)),
        ]

    print(f"model: {args.model}")
    print(f"runs: {args.runs} (+{args.warmup} warm-up), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
          f"cpus: {os.cpu_count()}")
    width = max(len(name) for name, _ in rows)
    print(f"{'command':<{width}}  {'min s':>7}  {'median s':>8}  {'max s':>7}")
    for name, times in rows:
        print(f"{name:<{width}}  {min(times):7.3f}  {statistics.median(times):8.3f}  {max(times):7.3f}")
    torch_median = statistics.median(rows[0][1])
    median = statistics.median(rows[1][1])
    ok = median <= args.budget
    print(f"analyze median {median:.3f} s ({median - torch_median:+.3f} s over importing torch): "
          f"{'meets' if ok else 'DOES NOT meet'} the {args.budget:g} s budget")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
