"""Shared fixtures: paths to the real data (fetched by scripts/fetch_data.py) and a CLI runner.

A test that uses the real data (a fixture of REAL_FIXTURES, directly or through another
fixture) is marked ``real`` at collection, so ``-m "not real"`` runs without the data cache;
every other test sees an empty data cache (``evaluate`` would otherwise read the cached Lee
corpus unasked). ``helpers`` and ``families`` are importable from every test (pyproject's
``pythonpath``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_models" / "all-MiniLM-L6-v2-attention"
# The fixtures that read the data cache (they call _cached); test_markers.py checks this list.
REAL_FIXTURES = frozenset({"minilm_dir", "lee_dir", "smollm2_dir"})


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if REAL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real)


@pytest.fixture(autouse=True)
def _empty_data_cache_unless_real(request, tmp_path_factory, monkeypatch):
    if request.node.get_closest_marker("real") is None:
        monkeypatch.setenv("COLLABCOMPRESS_CACHE", str(tmp_path_factory.getbasetemp() / "empty-data-cache"))


def _cached(name: str, marker: str) -> Path:
    """A folder of the data cache (scripts/fetch_data.py), or skip when it is not fetched."""
    from collabcompress.files.texts import cache_dir

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


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """One intra-op thread for the whole suite, as each layer of the code gets (parallel.py):
    the tensors here are small, and on a busy 2-core machine idle OpenMP threads spin (one
    calibration test took 13.8 s of CPU at one thread against 20.4 s at two)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The expensive real-model outputs, made once per session and shared; tests only read them.

def _compressed_minilm(minilm_dir: Path, tmp_path_factory, rank: int) -> tuple[Path, dict]:
    from collabcompress.commands.compress import CompressOptions, compress

    out = tmp_path_factory.mktemp(f"minilm-r{rank}") / "out"
    return out, compress(minilm_dir, out, CompressOptions(rank=rank))


@pytest.fixture(scope="session")
def minilm_r192(minilm_dir, tmp_path_factory) -> tuple[Path, dict]:
    """(directory, manifest): all-MiniLM-L6-v2 compressed at R = 192 with the default settings."""
    return _compressed_minilm(minilm_dir, tmp_path_factory, 192)


@pytest.fixture(scope="session")
def minilm_r384(minilm_dir, tmp_path_factory) -> tuple[Path, dict]:
    """(directory, manifest): all-MiniLM-L6-v2 compressed at R = H*d = 384, the exact solution."""
    return _compressed_minilm(minilm_dir, tmp_path_factory, 384)


@pytest.fixture(scope="session")
def minilm_calibration(minilm_dir, lee_dir, tmp_path_factory) -> tuple[Path, Path, dict]:
    """(texts, statistics, summary): `calibrate` of MiniLM on the first 12 Lee documents,
    128-token windows, 4 kept sequences."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("calibration")
    lines = (lee_dir / "lee_background.cor").read_text(encoding="utf-8", errors="replace").splitlines()[:12]
    texts = root / "calib.txt"
    texts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = root / "stats.safetensors"
    result = run_cli("calibrate", minilm_dir, "--texts", texts, "--out", out, "--max-length", "128",
                     "--keep-sequences", "4", "--json", "-")
    assert result.exit_code == 0, result.stderr
    return texts, out, json.loads(result.stdout)


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


@pytest.fixture(scope="session")
def rotary_stats(rotary_checkpoints, tmp_path_factory):
    """name -> (tiny rotary checkpoint, calibration statistics with 3 kept 64-token windows), each
    calibrated once per session on 60 short repetitive lines."""
    pytest.importorskip("transformers")
    from collabcompress.commands.calibrate import calibrate

    made: dict[str, tuple[Path, Path]] = {}

    def stats_for(name: str) -> tuple[Path, Path]:
        if name not in made:
            root = tmp_path_factory.mktemp(f"stats-{name}")
            texts = root / "texts.txt"
            texts.write_text("\n".join(f"the cat {i} sat on the mat number {i * 7} and then it went home again"
                                       for i in range(60)), encoding="utf-8")
            stats = root / "stats.safetensors"
            calibrate(rotary_checkpoints[name], texts, stats, max_tokens=400, max_length=64, keep_sequences=3)
            made[name] = rotary_checkpoints[name], stats
        return made[name]

    return stats_for
