"""scripts/fetch_data.py without its optional dependencies: one line naming the extra, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

FETCH = Path(__file__).resolve().parents[1] / "scripts" / "fetch_data.py"


def _fetch_without(blocked: list[str], cache: Path) -> subprocess.CompletedProcess:
    """Run fetch_data.py in a fresh interpreter where importing ``blocked`` fails, as when
    only the ``hf`` extra is installed."""
    code = ("import runpy, sys\n"
            f"for name in {blocked!r}: sys.modules[name] = None\n"
            f"sys.argv = ['fetch_data.py']\n"
            f"runpy.run_path({str(FETCH)!r}, run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLLABCOMPRESS_CACHE": str(cache)})


@pytest.mark.parametrize("blocked", [["gguf", "accelerate"], ["gguf"], ["transformers"]])
def test_fetch_names_the_missing_modules_and_the_extra_before_downloading(tmp_path, blocked):
    done = _fetch_without(blocked, tmp_path / "cache")
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and ".[dev]" in lines[0]
    for name in blocked:
        assert name in lines[0]
    assert not (tmp_path / "cache").exists()  # checked before anything was downloaded
