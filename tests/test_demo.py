"""demo: analyze, compress, report and verify the bundled sample, end to end (its speed is a benchmark, not a test)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import collabcompress.commands.demo as demo_module

STEPS = ("1. analyze", "2. compress --energy 0.95", "3. report", "4. verify")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from helpers import run_cli

    out = tmp_path_factory.mktemp("demo") / "demo"
    return out, run_cli("demo", "--out", out)


def test_demo_end_to_end(demo_run, sample_dir):
    out, result = demo_run
    assert result.exit_code == 0, result.stderr
    for step in STEPS:
        assert step in result.stdout, step
    for name in ("analysis.json", "report.json", "verify.json", "demo.json", "model/collab_manifest.json",
                 "model/model.safetensors", "model/config.json"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "model" / "collab_manifest.json").read_text())
    assert manifest["settings"]["energy"] == 0.95
    assert Path(manifest["source"]["path"]) == sample_dir.resolve()
    report = json.loads((out / "report.json").read_text())
    assert report["directory"] == str(out / "model")
    assert report["source"]["used"] is True
    assert len(report["layers"]) == 6
    assert f"{report['qk_total']['qk_params_before']:,}" in result.stdout
    verify = json.loads((out / "verify.json").read_text())
    assert set(verify["overall"]) >= {"kl_mean", "kl_max", "relative_score_error"}
    summary = json.loads((out / "demo.json").read_text())
    assert set(summary["steps"]) == {"analyze", "compress", "report", "verify"}
    assert not list(out.parent.glob(".demo.tmp-*"))  # built beside, renamed into place


def test_demo_refuses_an_existing_directory(demo_run, cli):
    out, _ = demo_run
    before = sorted(p.name for p in out.iterdir())
    result = cli("demo", "--out", out)
    assert result.exit_code == 3
    assert "already exists" in result.stderr and "--force" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == before


def test_force_refuses_a_directory_that_is_not_a_demo(tmp_path, cli):
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    result = cli("demo", "--out", other, "--force")
    assert result.exit_code == 3 and "not a collabcompress output" in result.stderr
    assert (other / "notes.txt").read_text() == "keep me"


def test_missing_sample_is_a_clear_exit_3(tmp_path, cli, monkeypatch):
    monkeypatch.setattr(demo_module, "__file__", str(tmp_path / "site-packages" / "collabcompress" / "commands" / "demo.py"))
    monkeypatch.chdir(tmp_path)
    result = cli("demo", "--out", tmp_path / "d")
    assert result.exit_code == 3
    assert "sample model" in result.stderr and "--sample" in result.stderr
    assert not (tmp_path / "d").exists()
    result = cli("demo", "--out", tmp_path / "d", "--sample", tmp_path)
    assert result.exit_code == 3 and "no model.safetensors" in result.stderr


def test_force_replaces_an_earlier_demo(demo_run, cli, tmp_path):
    from families import make_checkpoint

    out, _ = demo_run
    (out / "stale.txt").write_text("from before")
    tiny = make_checkpoint("bert", tmp_path / "tiny")  # the replacing run need not redo the sample's work
    result = cli("demo", "--out", out, "--force", "--json", "-", "--sample", tiny)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["out"] == str(out)
    assert not (out / "stale.txt").exists()
    assert (out / "report.json").is_file()


@pytest.fixture
def tiny_sample(tmp_path):
    from families import make_checkpoint

    return make_checkpoint("bert", tmp_path / "tiny-bert")


def test_skipped_plots_are_announced_with_the_install_hint(tiny_sample, cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    result = cli("demo", "--out", tmp_path / "d", "--sample", tiny_sample)
    assert result.exit_code == 0, result.stderr
    said = [line for line in result.stdout.splitlines() if "matplotlib" in line]
    assert len(said) == 1 and "collabcompress[plot]" in said[0], result.stdout
    assert not (tmp_path / "d" / "energy.png").exists()


def test_plot_titles_name_the_model_not_a_temporary_path(tiny_sample, cli, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import collabcompress.tables as tables

    titles = []
    real_save = tables.save_figure

    def save_figure(plt, fig, title, path):
        titles.append(title)
        real_save(plt, fig, title, path)

    monkeypatch.setattr(tables, "save_figure", save_figure)
    result = cli("demo", "--out", tmp_path / "d", "--sample", tiny_sample)
    assert result.exit_code == 0, result.stderr
    assert "matplotlib" not in result.stdout
    assert (tmp_path / "d" / "energy.png").is_file() and (tmp_path / "d" / "flops.png").is_file()
    assert len(titles) == 2
    for title in titles:
        assert title.startswith("tiny-bert (") and str(tmp_path) not in title, title
