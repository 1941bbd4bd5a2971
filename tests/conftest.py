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
    from collabcompress.evaluate import cache_dir

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


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as float32 safetensors + config + tokenizer (scripts/fetch_data.py)."""
    return _cached("smollm2-135m-instruct", "model.safetensors")


@pytest.fixture(scope="session")
def rotary_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Every tiny rotary decoder of tests/families.py, built once per session: name -> directory.

    Keys: the supported ROTARY names (llama, llama-mha, llama-rope-linear, llama-rope-llama3,
    llama-rope-yarn, mistral, qwen2), the refused ROTARY_REFUSED names (qwen3, stablelm-partial,
    cohere-interleaved), and "llama-noconfig": the llama checkpoint without config.json and
    generation_config.json. Shared by every test: copy a directory before changing it.
    """
    from families import make_rotary_checkpoint, rotary_names

    root = tmp_path_factory.mktemp("rotary")
    built = {name: make_rotary_checkpoint(name, root / name) for name in rotary_names()}
    built["llama-noconfig"] = make_rotary_checkpoint("llama", root / "llama-noconfig", with_config=False)
    return built
