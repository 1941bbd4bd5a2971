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
    header = next(line for line in result.stdout.splitlines() if line.startswith("command"))
    assert header.split()[:8] == ["command", "peak", "RSS", "GB", "anon", "GB", "file", "GB"]
    assert header.split()[8:] == ["wall", "s", "s/layer"]
    rows = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    assert "analyze" in rows and "compress" in rows
    data = json.loads(record.read_text())
    assert data["shape"]["layers"] == 2 and data["rank"] == 128 and data["within_limit"] is True
    assert {"bytes", "shards", "largest_shard", "largest_tensor"} <= set(data["checkpoint"])
    assert data["checkpoint"]["shards"] >= 2
    for name in ("analyze", "compress"):
        row = data["commands"][name]
        assert {"command", "layers", "wall_s", "peak_rss", "peak_vmhwm", "peak_anon", "peak_file", "s_per_layer"} \
            <= set(row)
        assert row["layers"] == 2 and row["peak_rss"] > 0 and row["command"].startswith(f"collabcompress {name} ")
    assert "--calibration $TMP/stats.safetensors" in data["commands"]["compress"]["command"]
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
