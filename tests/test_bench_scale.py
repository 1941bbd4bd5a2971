"""benchmarks/bench_scale.py end to end in its --small mode: the table, the JSON keys, and that
the synthetic checkpoint is gone afterwards (after SIGTERM too). No test
asserts a wall time or a memory figure: the limit is set out of reach."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_scale.py"
SMALL = ("--small", "--layers", "2", "--limit-gb", "1000")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, check=False)


def test_small_run_reports_both_commands_and_cleans_up(tmp_path):
    work, record = tmp_path / "work", tmp_path / "scale.json"
    work.mkdir()
    result = _run(*SMALL, "--dir", str(work), "--json", str(record))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("| command | layers | peak_rss_gb |")
    data = json.loads(record.read_text())
    assert data["benchmark"] == "scale" and {"version", "settings", "rows", "checks", "machine"} <= set(data)
    assert data["settings"]["layers"] == 2 and data["settings"]["rank_used"] == 128
    assert data["settings"]["shards"] >= 2 and data["settings"]["checkpoint_bytes"] > 0
    rows = {row["command"]: row for row in data["rows"]}
    assert set(rows) == {"analyze", "compress"}
    for name, row in rows.items():
        assert {"layers", "wall_s", "peak_rss_gb", "peak_anon_gb", "peak_file_gb", "s_per_layer", "run"} <= set(row)
        assert row["layers"] == 2 and row["peak_rss_gb"] > 0 and row["run"].startswith(f"collabcompress {name} ")
    assert "--calibration $TMP/stats.safetensors" in rows["compress"]["run"]
    assert [c["passed"] for c in data["checks"]] == [True, True]
    assert list(work.iterdir()) == []  # checkpoint, statistics and output removed


def test_sigterm_cleans_up(tmp_path):
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *SMALL, "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("*/llama/config.json")) and time.monotonic() < deadline:
            assert proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()
        proc.wait()
    assert list(tmp_path.iterdir()) == []
