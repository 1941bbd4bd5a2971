"""report: SPEC section 5 figures on the real MiniLM, sums over the real files, JSON keys,
the plain "costs more" sentences, a moved source, uncompressed layers, bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from collabcompress.commands.compress import CompressOptions, compress
from collabcompress.maths.costs import (
    crossover_seq_len, key_cache_elements, matmul_flops, projection_flops, qk_params, score_flops,
)
from collabcompress.commands.report import build_report

from families import make_checkpoint

LAYER_KEYS = {
    "module", "index", "heads", "head_dim", "d_model", "shared_dim", "relative_error",
    "qk_params_before", "qk_params_after", "qk_params_saved_fraction",
    "qk_proj_flops_per_token_before", "qk_proj_flops_per_token_after", "crossover_seq_len",
    "key_cache_elements_per_token_before", "key_cache_elements_per_token_after",
    "key_cache_bytes_per_token_before", "key_cache_bytes_per_token_after", "at_seq_len",
    "value_rank", "value_proj_flops_per_token_before", "value_proj_flops_per_token_after",
    *(f"{c}_cache_{u}_per_token_{w}" for c in ("value", "kv") for u in ("elements", "bytes") for w in ("before", "after")),
}
AT_QK_KEYS = {"qk_score_flops_per_token_before", "qk_score_flops_per_token_after", "qk_flops_per_token_before",
              "qk_flops_per_token_after", "qk_flops_saved_fraction", "costs_more"}
MODEL_KEYS = {
    "params_before", "params_after", "params_saved_fraction",
    "weights_bytes_before", "weights_bytes_after", "weights_bytes_saved_fraction",
    "files_bytes_before", "files_bytes_after", "files_bytes_saved_fraction", "files_before", "files_after",
    "attention_layers", "compressed_layers", "matmul_flops_per_token_before", "matmul_flops_per_token_after",
    "crossover_seq_len", "key_cache_elements_per_token_before", "key_cache_elements_per_token_after",
    "key_cache_bytes_per_token_before", "key_cache_bytes_per_token_after", "at_seq_len",
    *(f"{c}_cache_{u}_per_token_{w}" for c in ("value", "kv") for u in ("elements", "bytes") for w in ("before", "after")),
}
AT_MODEL_KEYS = {"attention_flops_per_token_before", "attention_flops_per_token_after", "flops_per_token_before",
                 "flops_per_token_after", "flops_saved_fraction", "costs_more"}


@pytest.fixture(scope="module")
def minilm_192(minilm_r192) -> Path:
    return minilm_r192[0]  # shared with the other modules (conftest.py)


def _report_json(cli, directory: Path, *args: str) -> dict:
    result = cli("report", directory, *args, "--json", "-")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def _numel_and_shapes(path: Path) -> tuple[int, dict[str, tuple[int, ...]]]:
    with safe_open(str(path), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return sum(math.prod(s) for s in shapes.values()), shapes


# ---- the acceptance figures on the real MiniLM -----------------------------------------------

def test_minilm_rank_192_acceptance_figures(minilm_192, cli):
    data = _report_json(cli, minilm_192, "--seq-len", "128")
    assert len(data["layers"]) == 6
    for layer in data["layers"]:
        assert layer["qk_params_before"] == 295_680 == 2 * 384 * 384 + 2 * 384
        assert layer["qk_params_after"] == 154_368 == 2 * 384 * 192 + 12 * 192 + 12 * 384
        assert layer["qk_proj_flops_per_token_before"] == 589_824
        assert layer["qk_proj_flops_per_token_after"] == 306_432
        assert round(layer["crossover_seq_len"], 1) == 73.8
        assert layer["key_cache_elements_per_token_before"] == 384
        assert layer["key_cache_elements_per_token_after"] == 204
        assert layer["key_cache_bytes_per_token_before"] == 384 * 4  # float32
        at = layer["at_seq_len"]["128"]
        assert at["qk_score_flops_per_token_before"] == 2 * 128 * 12 * 32
        assert at["qk_score_flops_per_token_after"] == 2 * 128 * 12 * 192
        assert at["costs_more"] is True
    assert data["qk_total"]["qk_params_before"] == 6 * 295_680
    assert data["qk_total"]["at_seq_len"]["128"]["costs_more"] is True
    assert any("key/query side costs MORE" in note and "128" in note for note in data["notes"])


def test_minilm_table_text(minilm_192, cli):
    result = cli("report", minilm_192)
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    for figure in ("295,680", "154,368", "589,824", "306,432", "73.8", "384", "204", "1,774,080", "926,208"):
        assert figure in text, figure
    flat = " ".join(text.split())
    assert "At sequence length 128 the compressed key/query side costs MORE FLOPs per token than the original" in flat
    assert "the compressed model as a whole costs MORE FLOPs per token" in flat
    assert "collab_manifest.json included" in flat


def test_no_costs_more_sentence_below_the_crossover(minilm_192, cli):
    data = _report_json(cli, minilm_192, "--seq-len", "64")
    assert data["qk_total"]["at_seq_len"]["64"]["costs_more"] is False
    assert data["model"]["at_seq_len"]["64"]["costs_more"] is False
    assert not any("MORE" in note for note in data["notes"])
    text = " ".join(cli("report", minilm_192, "--seq-len", "64").stdout.split())
    assert "costs MORE" not in text


def test_whole_model_sums_equal_the_files(minilm_dir, minilm_192, cli):
    data = _report_json(cli, minilm_192, "--seq-len", "1", "--seq-len", "128")
    m = data["model"]
    before, src_shapes = _numel_and_shapes(minilm_dir / "model.safetensors")
    after, out_shapes = _numel_and_shapes(minilm_192 / "model.safetensors")
    assert m["params_before"] == before
    assert m["params_after"] == after
    assert m["weights_bytes_before"] == (minilm_dir / "model.safetensors").stat().st_size
    assert m["weights_bytes_after"] == (minilm_192 / "model.safetensors").stat().st_size
    every = [p for p in minilm_192.rglob("*") if p.is_file()]
    assert m["files_bytes_after"] == sum(p.stat().st_size for p in every)
    assert {f["name"] for f in m["files_after"]} == {p.relative_to(minilm_192).as_posix() for p in every}
    assert "collab_manifest.json" in {f["name"] for f in m["files_after"]}
    assert m["files_bytes_before"] == sum((minilm_dir / f["name"]).stat().st_size for f in m["files_before"])
    assert "tokenizer.json" in {f["name"] for f in m["files_before"]}  # copied, so an input
    # Whole-model FLOPs: every Linear of the source, independently of the report's own code.
    linear = sum(2 * math.prod(s) for n, s in src_shapes.items() if len(s) == 2 and "embeddings" not in n)
    assert m["matmul_flops_per_token_before"] == linear
    assert m["at_seq_len"]["1"]["flops_per_token_before"] == linear + 6 * 2 * (2 * 12 * 32)
    saved = 6 * (589_824 - 306_432)
    assert m["matmul_flops_per_token_before"] - m["matmul_flops_per_token_after"] == saved
    assert round(m["crossover_seq_len"], 1) == 73.8
    assert m["at_seq_len"]["128"]["costs_more"] is True
    assert m["key_cache_elements_per_token_before"] == 6 * 384
    assert m["key_cache_elements_per_token_after"] == 6 * 204
    assert data["source"]["used"] is True and data["source"]["note"] is None
    assert "embeddings.word_embeddings.weight" in out_shapes  # counted as a parameter, not as FLOPs


def test_json_keys_and_units(minilm_192, cli, tmp_path):
    target = tmp_path / "report.json"
    result = cli("report", minilm_192, "--seq-len", "64", "--seq-len", "512", "--json", target)
    assert result.exit_code == 0, result.stderr
    assert "Whole model" in result.stdout  # a file target still prints the tables
    data = json.loads(target.read_text())
    assert set(data) == {"format", "directory", "source", "seq_lens", "layers", "qk_total", "model", "notes"}
    assert data["format"] == "collabcompress-report/1"
    assert data["seq_lens"] == [64, 512]
    for layer in data["layers"]:
        assert set(layer) == LAYER_KEYS
        assert set(layer["at_seq_len"]) == {"64", "512"}
        for at in layer["at_seq_len"].values():
            assert set(at) == AT_QK_KEYS
    assert set(data["qk_total"]) == (LAYER_KEYS - {"module", "index", "heads", "head_dim", "d_model", "shared_dim",
                                                   "relative_error", "value_rank"}) | {"layers"}
    assert set(data["model"]) == MODEL_KEYS
    for at in data["model"]["at_seq_len"].values():
        assert set(at) == AT_MODEL_KEYS
    stdout = cli("report", minilm_192, "--json", "-")
    assert "Whole model" not in stdout.stdout and json.loads(stdout.stdout)["seq_lens"] == [128]


# ---- moved source, partial compression, other families -----------------------------------------

def test_moved_source_falls_back_to_the_manifest(sample_dir, tmp_path, cli):
    source = Path(shutil.copytree(sample_dir, tmp_path / "src"))
    out = tmp_path / "out"
    compress(source, out, CompressOptions(rank=192, max_iter=2))
    with_source = _report_json(cli, out, "--seq-len", "128")
    assert with_source["source"]["used"] is True
    source.rename(tmp_path / "elsewhere")
    moved = _report_json(cli, out, "--seq-len", "128")
    assert moved["source"]["used"] is False
    assert "is not there any more" in moved["source"]["note"]
    assert moved["notes"][0] == moved["source"]["note"]
    for key in ("layers", "qk_total", "model"):
        assert moved[key] == with_source[key], key
    # the sample: q, k, v, o per layer plus the six feeding LayerNorms (weight and bias)
    assert moved["model"]["params_before"] == 6 * (4 * 384 * 384 + 4 * 384) + 6 * 2 * 384
    result = cli("report", out)
    assert result.exit_code == 0
    assert "is not there any more" in " ".join(result.stdout.split())
    assert "as recorded in the manifest" in " ".join(result.stdout.split())


def test_changed_source_is_not_trusted(sample_dir, tmp_path, cli):
    source = Path(shutil.copytree(sample_dir, tmp_path / "src"))
    out = tmp_path / "out"
    compress(source, out, CompressOptions(rank=64, max_iter=1, layers="0"))
    tensors = load_file(str(source / "model.safetensors"))
    tensors["encoder.layer.5.attention.output.dense.bias"] += 1
    save_file(tensors, str(source / "model.safetensors"))
    data = _report_json(cli, out)
    assert data["source"]["used"] is False and "changed since it was compressed" in data["source"]["note"]
    (source / "model.safetensors").write_bytes(b"not a safetensors file")
    data = _report_json(cli, out)
    assert data["source"]["used"] is False and "cannot be read" in data["source"]["note"]


def test_uncompressed_layers_count_in_the_whole_model(sample_dir, tmp_path, cli):
    out = tmp_path / "out"
    compress(sample_dir, out, CompressOptions(rank=96, max_iter=1, layers="0,3"))
    data = _report_json(cli, out, "--seq-len", "100")
    m = data["model"]
    assert (m["attention_layers"], m["compressed_layers"]) == (6, 2)
    assert [layer["index"] for layer in data["layers"]] == [0, 3]
    assert m["matmul_flops_per_token_before"] - m["matmul_flops_per_token_after"] == 2 * (
        projection_flops(384, 12, 32) - projection_flops(384, 12, 32, 96))
    assert m["key_cache_elements_per_token_before"] == 6 * 384
    assert m["key_cache_elements_per_token_after"] == 4 * 384 + 2 * (96 + 12)
    assert m["key_cache_bytes_per_token_after"] == 2 * m["key_cache_elements_per_token_after"]  # float16
    attention = m["at_seq_len"]["100"]
    assert attention["attention_flops_per_token_after"] == 4 * 2 * 2 * 100 * 384 + 2 * 2 * 100 * 12 * (96 + 32)


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_fused_and_unbiased_families(family, tmp_path, cli):
    """GPT-2's fused c_attn (value kept as collab_value) and T5 (no bias, H*d != D)."""
    source = make_checkpoint(family, tmp_path / family)
    out = tmp_path / "out"
    manifest = compress(source, out, CompressOptions(rank=4, max_iter=2))
    data = _report_json(cli, out)
    assert data["qk_total"]["qk_params_before"] == manifest["totals"]["qk_params_before"]
    assert data["qk_total"]["qk_params_after"] == manifest["totals"]["qk_params_after"]
    assert data["model"]["params_after"] == manifest["totals"]["params_after"]
    assert data["model"]["params_before"] == manifest["totals"]["params_before"]
    shutil.move(source, tmp_path / "moved")
    moved = _report_json(cli, out)
    for key in ("layers", "qk_total", "model"):
        assert moved[key] == data[key], key


# ---- bad input -----------------------------------------------------------------------------------

def test_report_on_a_non_compressed_directory_exit_3(sample_dir, cli):
    result = cli("report", sample_dir)
    assert result.exit_code == 3
    assert "not a model compressed by collabcompress" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("args, message", [
    (["--seq-len", "0"], "--seq-len must be at least 1"),
])
def test_bad_seq_len_exit_3(minilm_192, cli, args, message):
    result = cli("report", minilm_192, *args)
    assert result.exit_code == 3 and message in result.stderr


def test_missing_directory_exit_3(tmp_path, cli):
    result = cli("report", tmp_path / "nope")
    assert result.exit_code == 3 and "not found" in result.stderr


def test_plot_writes_png(minilm_192, cli, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "flops.png"
    result = cli("report", minilm_192, "--seq-len", "512", "--plot", png)
    assert result.exit_code == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the formulas of SPEC section 5 ------------------------------------------------------------

@pytest.mark.parametrize("d_model, n_head, head_dim, shared_dim",
                         [(384, 12, 32, 192), (32, 4, 12, 8), (768, 12, 64, 64), (64, 1, 64, 80)])
def test_formulas(d_model, n_head, head_dim, shared_dim):
    D, H, d, R = d_model, n_head, head_dim, shared_dim
    assert qk_params(D, H, d) == 2 * D * H * d
    assert qk_params(D, H, d, bias_elements=2 * H * d) == 2 * D * H * d + 2 * H * d
    assert qk_params(D, H, d, R) == 2 * D * R + H * R + H * D
    assert projection_flops(D, H, d) == 4 * D * H * d
    assert projection_flops(D, H, d, R) == 4 * D * R + 2 * D * H + H * R
    assert score_flops(100, H, d) == 2 * 100 * H * d and score_flops(100, H, d, R) == 2 * 100 * H * R
    assert key_cache_elements(H, d) == H * d and key_cache_elements(H, d, R) == R + H
    n_star = crossover_seq_len(D, H, d, R)
    if R <= d:
        assert n_star is None
    else:
        assert n_star == pytest.approx((4 * D * H * d - (4 * D * R + 2 * D * H + H * R)) / (2 * H * (R - d)))
        # at N* the two costs meet
        before = projection_flops(D, H, d) + 2 * n_star * H * d
        after = projection_flops(D, H, d, R) + 2 * n_star * H * R
        assert before == pytest.approx(after)


@pytest.mark.parametrize("name, shape, flops", [
    ("encoder.layer.0.intermediate.dense.weight", (1536, 384), 2 * 1536 * 384),
    ("h.0.attn.c_attn.weight", (32, 96), 2 * 32 * 96),
    ("embeddings.word_embeddings.weight", (30522, 384), 0),
    ("wte.weight", (100, 32), 0),
    ("shared.weight", (100, 32), 0),
    ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", (32, 4), 0),
    ("encoder.embed_positions.weight", (64, 32), 0),
    ("encoder.layer.0.output.LayerNorm.weight", (384,), 0),
    ("embeddings.patch_embeddings.projection.weight", (32, 3, 4, 4), 0),
])
def test_matmul_flops_rules(name, shape, flops):
    assert matmul_flops(name, shape) == flops


def test_build_report_from_python(minilm_192):
    report = build_report(minilm_192, [128, 128, 64])
    assert report.seq_lens == (128, 64)
    assert report.qk_flops(128, True) > report.qk_flops(128, False)
    assert report.qk_flops(64, True) < report.qk_flops(64, False)
    assert round(report.qk_crossover, 1) == 73.8
