"""Assertions shared by the CLI tests."""

from __future__ import annotations

import hashlib
from pathlib import Path


def digest(directory: Path) -> dict[str, str]:
    """sha256 of every file directly in ``directory``."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def assert_clean_failure(result, code: int, *needles: str) -> str:
    """Exit ``code``, one or two plain lines on stderr holding every needle, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 2, result.stderr
    for needle in needles:
        assert needle.lower() in result.stderr.lower(), (needle, result.stderr)
    return result.stderr
