"""Wall time of `collabcompress demo` on the bundled sample, start-up included.

The budget that tests/test_demo.py once asserted (15 s) lives here: a loaded machine makes
wall time a poor test, so it is a benchmark. Runs ``collabcompress demo --out TMP`` as a fresh
process N times and prints min / median / max wall times and whether the median meets it.

    python benchmarks/bench_demo.py [-n 3] [--budget 15]

Exit code 0 when the median meets the budget, 1 when it does not.
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

from _common import collabcompress_command as _collabcompress


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--runs", type=int, default=3, help="timed runs (default 3)")
    parser.add_argument("--budget", type=float, default=15.0, help="seconds allowed for the demo (default 15)")
    args = parser.parse_args()
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            cmd = [*_collabcompress(), "demo", "--out", str(Path(tmp) / f"demo{i}")]
            start = time.perf_counter()
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            times.append(time.perf_counter() - start)
            if proc.returncode != 0:
                sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr.strip()}")
    median = statistics.median(times)
    ok = median <= args.budget
    print(f"runs: {args.runs}, cpus: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}")
    print(f"collabcompress demo: min {min(times):.2f} s, median {median:.2f} s, max {max(times):.2f} s: "
          f"{'meets' if ok else 'DOES NOT meet'} the {args.budget:g} s budget")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
