"""Shared fixtures: paths to the real data (fetched by scripts/fetch_data.py) and a CLI runner."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_models" / "all-MiniLM-L6-v2-attention"


def cache_dir() -> Path:
    env = os.environ.get("COLLABCOMPRESS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "collabcompress"


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    path = cache_dir() / "all-MiniLM-L6-v2"
    if not (path / "model.safetensors").is_file():
        pytest.skip("real MiniLM not in the cache: run `python scripts/fetch_data.py`")
    return path


@pytest.fixture(scope="session")
def lee_dir() -> Path:
    path = cache_dir() / "lee"
    if not (path / "lee_background.cor").is_file():
        pytest.skip("Lee corpus not in the cache: run `python scripts/fetch_data.py`")
    return path


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
