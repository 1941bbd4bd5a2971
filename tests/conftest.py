"""Shared fixtures: paths to the real data (fetched by scripts/fetch_data.py) and a CLI runner."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_models" / "all-MiniLM-L6-v2-attention"


def _cached(name: str, marker: str) -> Path:
    """A folder of the data cache (scripts/fetch_data.py), or skip when it is not fetched."""
    from collabcompress.texts import cache_dir

    path = cache_dir() / name
    if not (path / marker).is_file():
        pytest.skip(f"{name} not in the cache: run `python scripts/fetch_data.py`")
    return path


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return _cached("all-MiniLM-L6-v2", "model.safetensors")


@pytest.fixture(scope="session")
def lee_dir() -> Path:
    return _cached("lee", "lee_background.cor")


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE


def run_cli(*args: str):
    """Invoke the CLI in-process; returns the click Result (stdout, stderr, exit_code)."""
    from typer.testing import CliRunner

    from collabcompress.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def cli():
    return run_cli
