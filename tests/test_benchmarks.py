"""The benchmark scripts parse their options, and their one output format holds its documented keys.

Nothing here measures anything: benchmarks time real models (benchmarks/README.md); these
tests only keep the scripts runnable and their JSON the shape the README documents.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("bench_*.py"))
KEYS = {"benchmark", "version", "settings", "rows", "checks", "machine"}


def _common():
    spec = importlib.util.spec_from_file_location("benchmarks_common", BENCHMARKS / "_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_benchmarks():
    assert len(SCRIPTS) >= 5


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_help_works_and_offers_json(script: Path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as `python benchmarks/bench_x.py` finds _common
    monkeypatch.setattr(sys, "argv", [script.name])
    spec = importlib.util.spec_from_file_location(f"benchmarks_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {script.name}") and "--json PATH" in out


def test_a_script_runs_as_a_program():
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_cli.py"), "--help"], check=False,
                          capture_output=True, text=True, timeout=120, cwd=BENCHMARKS.parent)
    assert proc.returncode == 0, proc.stderr
    assert "--json PATH" in proc.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_every_script_reports_through_the_shared_helper(script: Path):
    text = script.read_text(encoding="utf-8")
    assert "parser(__doc__)" in text and "return report(NAME, args, " in text
    assert "args.json.write" not in text  # the one format is written by _common.report only


def test_report_writes_the_documented_keys(tmp_path, capsys):
    common = _common()
    args = argparse.Namespace(json=tmp_path / "out.json", runs=3, model=Path("some/dir"), ranks=[96, 192])
    rows = [{"case": "a", "ratio": 0.5, "sides": {"original_s": 2.0, "compressed_s": 1.0}},
            {"case": "b", "ratio": 1.25, "sides": {"original_s": 1.0, "compressed_s": 1.25}},
            {"step": "calibrate", "seconds": 3.0, "ok": True, "note": None}]
    checks = [common.check("ratio of a <= 1", 0.5, True), common.check("not run here", None, None)]

    assert common.report("fake", args, rows, checks) == 0

    doc = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert set(doc) == KEYS
    assert doc["benchmark"] == "fake"
    assert doc["version"] == common.version()
    assert doc["settings"] == {"runs": 3, "model": "some/dir", "ranks": [96, 192]}
    assert doc["rows"][0] == {"case": "a", "ratio": 0.5, "sides.original_s": 2.0, "sides.compressed_s": 1.0}
    assert doc["rows"][2] == {"step": "calibrate", "seconds": 3.0, "ok": True, "note": None}
    assert doc["checks"] == [{"target": "ratio of a <= 1", "value": 0.5, "passed": True},
                             {"target": "not run here", "value": None, "passed": None}]
    assert set(doc["machine"]) == {"cpu_count", "torch", "python"}
    out = capsys.readouterr().out
    assert "| case | ratio | sides.original_s | sides.compressed_s |" in out  # one table per kind of row
    assert "| step | seconds | ok | note |" in out
    assert "[PASS] ratio of a <= 1: 0.5" in out and "[ -- ] not run here: -" in out


def test_a_missed_target_is_exit_code_1_and_no_json_without_the_option(tmp_path, capsys):
    common = _common()
    args = argparse.Namespace(json=None)
    assert common.report("fake", args, [{"x": 1}], [common.check("x >= 2", 1, False)]) == 1
    assert "[FAIL] x >= 2: 1" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_rows_are_flat():
    common = _common()
    with pytest.raises(TypeError, match="'runs.times' is a list"):
        common.flat({"runs": {"times": [1.0, 2.0]}})
