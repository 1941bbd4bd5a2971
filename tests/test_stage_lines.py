"""Long commands whose stderr is not a terminal (CliRunner's is not) print one plain line per
stage, once its work has begun: nothing before an early error, nothing with ``--json -``."""

from __future__ import annotations

import pytest

from families import make_checkpoint
from helpers import assert_clean_failure, split_stage_lines


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_checkpoint("bert", tmp_path_factory.mktemp("stages") / "bert")


def test_compress_says_what_it_is_doing(bert, tmp_path, cli):
    result = cli("compress", bert, "--out", tmp_path / "out", "--rank", "8")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines() == ["compress: fitting 2 layers"]
    assert "compress:" not in result.stdout  # the table and the summary alone


def test_no_stage_lines_with_the_json_on_stdout(bert, tmp_path, cli):
    result = cli("compress", bert, "--out", tmp_path / "out", "--rank", "8", "--json", "-")
    assert result.exit_code == 0 and result.stderr == ""


def test_an_early_error_is_alone_on_stderr(bert, tmp_path, cli):
    result = cli("compress", bert, "--out", tmp_path / "out", "--rank", "999")
    assert_clean_failure(result, 3, "--rank")
    assert split_stage_lines(result.stderr)[0] == []


def test_calibrate_budget_and_healing_stages(rotary_checkpoints, tmp_path, cli):
    pytest.importorskip("transformers")
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"the cat {i} sat on the mat number {i * 7} and then it went home again"
                               for i in range(60)), encoding="utf-8")
    stats = tmp_path / "stats.safetensors"
    result = cli("calibrate", rotary_checkpoints["llama"], "--texts", texts, "--out", stats, "--max-tokens", "400",
                 "--max-length", "64", "--keep-sequences", "3")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines() == ["calibrate: running the model on up to 400 tokens"]
    result = cli("compress", rotary_checkpoints["llama"], "--out", tmp_path / "out", "--budget", "0.5",
                 "--calibration", stats, "--heal-steps", "2")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines() == ["compress: measuring the loss curves of 2 layers",
                                          "compress: fitting 2 layers",
                                          "compress: healing: sampling the original model's text",
                                          "compress: healing 2 steps"]
