"""--help as a newcomer reads it: flags without value placeholders, the plot formats, the options
that need calibrate's kept windows."""

from __future__ import annotations

import pytest

COMMANDS = ("analyze", "compress", "verify", "calibrate", "report", "bench", "demo", "evaluate", "archs")


def _help(cli, *command: str) -> str:
    result = cli(*command, "--help")
    assert result.exit_code == 0, result.stderr
    return " ".join(result.stdout.replace("│", " ").split())  # the help box, unwrapped


@pytest.mark.parametrize("command", [(), *((c,) for c in COMMANDS)])
def test_flags_show_no_value_placeholder(cli, command):
    assert "<bool>" not in _help(cli, *command)


@pytest.mark.parametrize("command", ["analyze", "report", "bench"])
def test_plot_names_every_accepted_format(cli, command):
    text = _help(cli, command)
    assert "--plot FILE.png|pdf|svg" in text and "(.png, .pdf or .svg)" in text
    assert " PNG " not in text


def test_keep_sequences_names_every_option_that_needs_it(cli):
    text = _help(cli, "calibrate")
    start = text.index("--keep-sequences")
    entry = text[start:text.index("--seed", start)]
    for option in ("--refine-steps", "--budget", "--heal-steps"):
        assert option in entry, entry


def test_flags_take_no_value(cli, tmp_path):
    assert cli("--version").exit_code == 0  # (not --debug: it stays on for the rest of the process)
    result = cli("demo", "--out", tmp_path / "d", "--force=yes")
    assert result.exit_code == 2 and "does not take a value" in result.stderr
