"""What collabcompress writes or deletes (issue 11): destructive cases that need more than the
bad-input table of test_reliability.py, each checking that nothing else was touched."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from collabcompress.display import safe_text
from collabcompress.files.output import TEMP_MARKER, atomic_directory, copy_other_files
from helpers import assert_clean_failure
from test_reliability import snapshot, write_bert

RANK = ("--rank", "4", "--max-iter", "2")


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return write_bert(tmp_path / "src")


def _compressed(cli, src: Path, out: Path) -> Path:
    assert cli("compress", src, "--out", out, *RANK).exit_code == 0
    return out


def test_empty_out_with_force_never_touches_the_working_directory(cli, src, tmp_path, monkeypatch):
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / "precious.txt").write_text("keep me")
    monkeypatch.chdir(cwd)
    before = snapshot(tmp_path)
    for argv in (["compress", src, "--out", "", *RANK, "--force"], ["demo", "--out", "", "--force"]):
        assert_clean_failure(cli(*argv), 3, "empty")
    assert_clean_failure(cli("compress", src, "--out", ".", *RANK, "--force"), 3, "working directory")
    assert_clean_failure(cli("compress", src, "--out", tmp_path, *RANK, "--force"), 3, "working directory")
    assert snapshot(tmp_path) == before


def test_force_refuses_a_directory_that_is_not_ours(cli, src, tmp_path):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "a.jpg").write_bytes(b"jpeg")
    link = tmp_path / "link"
    link.symlink_to(other, target_is_directory=True)
    before = snapshot(tmp_path)
    for target in (other, link):
        assert_clean_failure(cli("compress", src, "--out", target, *RANK, "--force"), 3,
                             "not a collabcompress output")
        assert_clean_failure(cli("demo", "--out", target, "--force"), 3, "not a collabcompress output")
    assert snapshot(tmp_path) == before and link.is_symlink()


def test_force_replaces_our_own_output(cli, src, tmp_path):
    out = _compressed(cli, src, tmp_path / "out")
    assert cli("compress", src, "--out", out, "--rank", "8", "--max-iter", "2", "--force").exit_code == 0
    assert json.loads((out / "collab_manifest.json").read_text())["layers"][0]["shared_dim"] == 8
    assert not list(tmp_path.glob(".out.*"))


def test_out_inside_the_input_given_as_a_file_or_index(cli, src, tmp_path):
    before = snapshot(tmp_path)
    assert_clean_failure(cli("compress", src / "model.safetensors", "--out", src / "out", *RANK), 3, "inside the input")
    assert_clean_failure(cli("compress", src / "model.safetensors", "--out", tmp_path, *RANK, "--force"), 3)
    assert snapshot(tmp_path) == before


def test_json_never_overwrites_an_input_or_a_device(cli, src, tmp_path):
    comp = _compressed(cli, src, tmp_path / "comp")
    before = snapshot(tmp_path)
    cases = [(["analyze", src, "--json", src / "model.safetensors"], "input"),
             (["analyze", src / "model.safetensors", "--json", src / "config.json"], "input"),
             (["verify", comp, "--json", comp / "collab_manifest.json"], "input"),
             (["report", comp, "--json", comp / "new.json"], "input"),
             (["report", comp, "--json", "/dev/null"], "not a regular file"),
             (["report", comp, "--json", tmp_path], "not a regular file"),
             (["report", comp, "--plot", tmp_path / "f.xyz"], ".png"),
             (["report", comp, "--json", ""], "empty"),
             (["compress", src, "--out", tmp_path / "new", *RANK, "--json", tmp_path / "new" / "m.json"], "input")]
    for argv, needle in cases:
        assert_clean_failure(cli(*argv), 3, needle)
    assert snapshot(tmp_path) == before
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_json_to_a_fifo_is_refused_before_any_work(cli, src, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert_clean_failure(cli("analyze", src, "--json", fifo), 3, "not a regular file")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_json_is_written_atomically_beside_the_target(cli, src, tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    assert cli("analyze", src, "--json", target).exit_code == 0
    assert json.loads(target.read_text())["layers"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "src"]


def test_stale_cleanup_removes_only_marked_directories_of_dead_runs(src, tmp_path):
    out = tmp_path / "out"
    dead = 2 ** 22 + 12345  # above pid_max on most systems: no such process
    unrelated = [tmp_path / f".out.tmp-{dead}", tmp_path / f".out.tmp-{dead}-0123456789abcdef",
                 tmp_path / f".out.tmp-x-{dead}"]
    for d in unrelated:
        d.mkdir()
        (d / "data").write_text("not ours")
    (unrelated[1] / TEMP_MARKER).write_text("fedcba9876543210\n")  # a marker whose token is not the name's
    ours = tmp_path / f".out.tmp-{dead}-00112233aabbccdd"
    ours.mkdir()
    (ours / TEMP_MARKER).write_text("00112233aabbccdd\n")
    with atomic_directory(out, force=False) as tmp:
        (tmp / "x").write_text("x")
    assert not ours.exists()
    assert all((d / "data").is_file() for d in unrelated)
    assert (out / "x").is_file() and not (out / TEMP_MARKER).exists()


def test_copy_never_follows_links_out_or_copies_special_files(tmp_path):
    model, secret, out = tmp_path / "model", tmp_path / "secret.txt", tmp_path / "out"
    model.mkdir()
    out.mkdir()
    secret.write_text("password")
    (model / "tokenizer.json").write_text("{}")
    (model / "sub").mkdir()
    (model / "sub" / "vocab.txt").write_text("a b")
    (model / "leak.txt").symlink_to(secret)
    (model / "zero").symlink_to("/dev/zero")
    (model / "inside.txt").symlink_to(model / "tokenizer.json")
    (model / "sub" / "up").symlink_to(tmp_path, target_is_directory=True)
    os.mkfifo(model / "pipe")
    with pytest.warns(UserWarning) as caught:
        copied = copy_other_files(model, out, set())
    names = sorted(p.relative_to(out).as_posix() for p in copied)
    assert names == ["inside.txt", "sub/vocab.txt", "tokenizer.json"]
    message = str(caught[0].message)
    for skipped in ("leak.txt", "zero", "pipe", "sub/up"):
        assert skipped in message
    assert (out / "inside.txt").read_text() == "{}" and not (out / "inside.txt").is_symlink()
    assert "password" not in "".join(p.read_text() for p in out.rglob("*") if p.is_file())


def test_compress_warns_about_skipped_files(cli, src, tmp_path):
    (src / "leak.txt").symlink_to("/etc/hostname")
    result = cli("compress", src, "--out", tmp_path / "out", *RANK)
    assert result.exit_code == 0, result.output
    assert "warning:" in result.stderr and "leak.txt" in result.stderr
    assert not (tmp_path / "out" / "leak.txt").exists()


def test_names_from_files_are_escaped_and_never_markup(cli, src, tmp_path):
    comp = _compressed(cli, src, tmp_path / "comp")
    manifest = json.loads((comp / "collab_manifest.json").read_text())
    manifest["source"]["path"] = "[bold red]evil[/]\x1b]0;pwned\x07\x1b[2J"
    (comp / "collab_manifest.json").write_text(json.dumps(manifest))
    result = cli("report", comp)
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "\\x1b" in result.stdout and "[bold red]evil[/]" in result.stdout
    assert safe_text("a\x1bb\u202e") == "a\\x1bb\\u202e"


def test_errors_are_escaped(cli, tmp_path):
    result = cli("analyze", tmp_path / "nope\x1b[31m")
    assert result.exit_code == 3 and "\x1b" not in result.stderr and "\\x1b" in result.stderr


def test_tables_are_not_cut_off_a_terminal(cli, src, tmp_path):
    comp = _compressed(cli, src, tmp_path / ("a-rather-long-directory-name-" * 4))
    result = cli("report", comp, "--seq-len", "123456789")
    assert result.exit_code == 0
    assert "…" not in result.stdout and "123,456,789" in result.stdout
    assert str(comp) in result.stdout
    assert "total after" in result.stdout and "change" in result.stdout  # the last columns are there


@pytest.mark.parametrize("option", ["--rank", "--seed", "--max-iter", "--workers"])
@pytest.mark.parametrize("digits", [29, 5000])
def test_absurd_integers_are_bad_input(cli, src, tmp_path, option, digits):
    argv = ["compress", src, "--out", tmp_path / "out", "--rank", "4", option, "9" * digits]
    assert_clean_failure(cli(*argv), 3, option)


def test_help_and_version_short_forms(cli):
    assert cli("-V").stdout.startswith("collabcompress ")
    assert "Usage" in cli("-h").stdout and "Usage" in cli("compress", "-h").stdout


def test_an_unexpected_exception_is_a_short_internal_error(cli, monkeypatch, tmp_path):
    import collabcompress.commands.analyze as pipeline

    def boom(*args, **kwargs):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(pipeline, "analyze", boom)
    result = cli("analyze", tmp_path)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: internal error (ZeroDivisionError: boom)")


def test_evaluate_without_transformers_gives_the_install_hint(cli, monkeypatch, src, tmp_path):
    comp = _compressed(cli, src, tmp_path / "comp")
    monkeypatch.setitem(sys.modules, "transformers", None)
    result = cli("evaluate", src, comp)
    assert_clean_failure(result, 3, "pip install")


# SIGINT and SIGTERM while writing: tests/test_reliability.py::test_signal_while_writing_removes_the_temporary_directory


def test_compress_table_names_each_error_and_shows_the_refinement_kl():
    from rich.console import Console

    from collabcompress.tables import compress_table

    layer = {"index": 0, "heads": 4, "head_dim": 4, "shared_dim": 8, "energy_spectral": 0.9, "relative_error": 0.125,
             "relative_error_plain": 0.25, "iterations": 3, "seconds": 0.5,
             "refine": {"steps": 10, "kl_before": 0.0123, "kl_after": 0.00456}}
    manifest = {"source": {"path": "p", "architecture": "bert"}, "settings": {"calibration": {"file": "s"}},
                "layers": [layer]}
    console = Console(width=400, record=True)
    console.print(compress_table(manifest))
    text = console.export_text()
    assert "rel. error (whitened)" in text and "KL before refine" in text and "KL after refine" in text
    row = [line for line in text.splitlines() if line.strip().startswith("0 ")][0].split()
    assert row[4:8] == ["0.2500", "0.1250", "0.0123", "0.00456"]
