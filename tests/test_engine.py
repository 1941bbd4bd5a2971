"""A stock export served by vLLM (benchmarks/bench_engine.py), where vLLM is installed.

vLLM lives in its own virtual environment (its CPU build pins its own torch): the test finds its
Python in ``COLLABCOMPRESS_VLLM_PYTHON``, or uses this interpreter when it imports vllm, and is
skipped otherwise. A tiny LLaMA compressed with ``--stock`` at full width and exported must load in
vLLM with no plug-in, give the same greedy tokens as transformers on the export (and as the
original), and allocate (R + R) x layers x 4 bytes (here R = G*d = 64) of KV cache per token.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from families import make_char_tokenizer

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_engine.py"


def _vllm_python() -> str | None:
    given = os.environ.get("COLLABCOMPRESS_VLLM_PYTHON")
    if given:
        return given if Path(given).is_file() else None
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


def _llama(directory: Path) -> Path:
    """A tiny LLaMA whose head size vLLM's CPU attention supports (32; the fixtures' 8 is refused)."""
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                      max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(directory))
    make_char_tokenizer(directory)
    return directory


@pytest.mark.slow
def test_vllm_serves_the_stock_export(tmp_path):
    python = _vllm_python()
    if python is None:
        pytest.skip("vLLM is not installed (set COLLABCOMPRESS_VLLM_PYTHON to the Python of its venv)")
    pytest.importorskip("transformers")
    from collabcompress.commands.compress import CompressOptions, compress
    from collabcompress.commands.export import export

    src = _llama(tmp_path / "src")
    compress(src, tmp_path / "c", CompressOptions(rank=64, stock=True, force_data_free=True), workers=1)
    export(tmp_path / "c", tmp_path / "e")
    out = tmp_path / "engine.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--original", str(src), "--export", str(tmp_path / "e"),
                           "--vllm-python", python, "--prompts", "2", "--new-tokens", "8", "--max-len", "64",
                           "--json", str(out)], capture_output=True, text=True, check=False, timeout=1800,
                          cwd=BENCH.parent.parent, env={**os.environ, "PYTHONPATH": str(BENCH.parents[1] / "src")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = {r["model"]: r for r in doc["rows"]}
    assert rows["export"]["kv_heads"] == 1 and rows["export"]["head_size"] == 64
    assert rows["export"]["kv_bytes_per_token"] == rows["original"]["kv_bytes_per_token"] == 2 * 64 * 2 * 4
    assert all(c["passed"] in (True, None) for c in doc["checks"])
    assert doc["checks"][-1]["value"] == 2  # full width: the original's tokens
