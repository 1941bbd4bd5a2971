"""Shared values in analyze, report and bench: the value spectrum, the key/value/KV cache counts
and the value cache measured from the cache tensors.

Tiny checkpoints of tests/families.py: the llama decoder (2 layers, H = 4, G = 2, d = 8, D = 32:
G*d = 16 reals of keys and of values per token and layer), the bundled sample (BERT-like) and
GPT-2 (fused query/key/value: no separate value spectrum).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from collabcompress.maths.costs import output_absorbed

from collabcompress.commands.analyze import analyze
from collabcompress.commands.compress import compress
from collabcompress.commands.report import build_report
from collabcompress.options import CompressOptions

FAST = ("--repeats", "2", "--warmup", "1", "--threads", "1")
LAYERS, HEADS, GROUPS, HEAD_DIM, D_MODEL = 2, 4, 2, 8, 32
R, R_V = 8, 4


def _compress(source: Path, out: Path, **options) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the data-free warnings: the fit's quality is not measured here
        compress(source, out, CompressOptions(force_data_free=True, **options))
    return out


@pytest.fixture(scope="module")
def llama_values(rotary_checkpoints, tmp_path_factory) -> Path:
    return _compress(rotary_checkpoints["llama"], tmp_path_factory.mktemp("values") / "k8v4", rank=R, value_rank=R_V)


@pytest.fixture(scope="module")
def llama_keys_only(rotary_checkpoints, tmp_path_factory) -> Path:
    return _compress(rotary_checkpoints["llama"], tmp_path_factory.mktemp("values") / "k8", rank=R)


def _json(result) -> dict:
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


# ---- analyze --------------------------------------------------------------------------------

def test_analyze_gives_the_value_spectrum_of_each_layer(cli, rotary_checkpoints):
    data = _json(cli("analyze", rotary_checkpoints["llama"], "--energy", "0.5", "--energy", "0.9",
                     "--energy", "1", "--json", "-"))
    assert len(data["layers"]) == LAYERS
    for layer in data["layers"]:
        curve = layer["value_energy"]
        assert len(curve) == min(GROUPS * HEAD_DIM, D_MODEL)
        assert all(b >= a - 1e-9 for a, b in zip(curve, curve[1:])) and curve[-1] == pytest.approx(1.0)
        ranks = layer["value_rank_at"]
        assert set(ranks) == set(layer["rank_at"]) == {"0.5", "0.9", "1"}
        assert 1 <= ranks["0.5"] <= ranks["0.9"] <= ranks["1"] <= GROUPS * HEAD_DIM
        # the smallest r_v whose energy reaches tau
        assert curve[ranks["0.9"] - 1] >= 0.9 - 1e-9 and (ranks["0.9"] == 1 or curve[ranks["0.9"] - 2] < 0.9)
    s = data["summary"]
    assert s["value_layers"] == LAYERS and s["total_value_width"] == LAYERS * GROUPS * HEAD_DIM
    assert s["total_value_rank_at"]["0.9"] == sum(la["value_rank_at"]["0.9"] for la in data["layers"])


def test_analyze_table_has_the_values_column(cli, rotary_checkpoints):
    result = cli("analyze", rotary_checkpoints["llama"])
    assert result.exit_code == 0, result.stderr
    assert "values@0.95" in result.stdout and "shared value latent needed" in result.stdout
    layer = analyze(rotary_checkpoints["llama"]).layers[0]
    assert f"{layer.value_rank_at(0.95)}/{GROUPS * HEAD_DIM}" in result.stdout


def test_analyze_matches_the_value_method_spectrum(rotary_checkpoints):
    from collabcompress.files.checkpoint import open_checkpoint
    from collabcompress.maths.spectra import cumulative_energy
    from collabcompress.methods.values import VALUES

    result = analyze(rotary_checkpoints["llama"])
    ckpt = open_checkpoint(rotary_checkpoints["llama"])
    try:
        for la in result.layers:
            expected = cumulative_energy(VALUES.spectrum(ckpt, la.spec))
            got = la.to_dict(result.energies)["value_energy"]
            assert got == pytest.approx(expected.tolist(), abs=1e-8)
    finally:
        ckpt.close()


def test_analyze_reports_the_values_of_a_fused_family(cli, tmp_path):
    """GPT-2's values are the value slice of its fused c_attn: analysed like any other family's."""
    from families import make_checkpoint

    data = _json(cli("analyze", make_checkpoint("gpt2", tmp_path / "gpt2"), "--json", "-"))
    width = data["layers"][0]["heads"] * data["layers"][0]["head_dim"]
    assert data["layers"] and all(len(la["value_energy"]) <= width and la["value_rank_at"] for la in data["layers"])
    assert "total_value_rank_at" in data["summary"]
    table = cli("analyze", tmp_path / "gpt2")
    assert table.exit_code == 0 and "values@" in table.stdout


# ---- report ---------------------------------------------------------------------------------

def test_report_counts_keys_and_values_per_layer_and_in_total(llama_values):
    d = build_report(llama_values, [16]).to_dict()
    full = GROUPS * HEAD_DIM
    for la in d["layers"]:
        assert la["value_rank"] == R_V
        assert (la["key_cache_elements_per_token_before"], la["key_cache_elements_per_token_after"]) == (full, R)
        assert (la["value_cache_elements_per_token_before"], la["value_cache_elements_per_token_after"]) == (full, R_V)
        assert (la["kv_cache_elements_per_token_before"], la["kv_cache_elements_per_token_after"]) == (2 * full, R + R_V)
        assert la["kv_cache_bytes_per_token_after"] == 4 * (R + R_V)  # float32
        assert la["value_cache_bytes_per_token_before"] == 4 * full
        assert la["value_proj_flops_per_token_before"] == 2 * D_MODEL * full
        # the latent, then each head's lift absorbed into o_proj (cheaper at this narrow r_v): o_proj's
        # 2*D*H*d (counted from its stored shape) becomes 2*D*H*r_v
        assert output_absorbed(D_MODEL, HEAD_DIM, R_V)
        assert la["value_proj_flops_per_token_after"] == 2 * D_MODEL * R_V + 2 * D_MODEL * HEADS * (R_V - HEAD_DIM)
    for total in (d["qk_total"], d["model"]):
        assert total["value_cache_elements_per_token_after"] == LAYERS * R_V
        assert total["kv_cache_elements_per_token_before"] == LAYERS * 2 * full
        assert total["kv_cache_elements_per_token_after"] == LAYERS * (R + R_V)
        assert total["kv_cache_bytes_per_token_after"] == 4 * LAYERS * (R + R_V)
        assert (total["kv_cache_bytes_per_token_after"] == total["key_cache_bytes_per_token_after"]
                + total["value_cache_bytes_per_token_after"])
    assert any("KV cache per token" in n and "shared values in 2 layer(s)" in n for n in d["notes"])


def test_report_without_shared_values_keeps_the_value_cache(llama_keys_only):
    d = build_report(llama_keys_only, [16]).to_dict()
    full = GROUPS * HEAD_DIM
    for la in d["layers"]:
        assert la["value_rank"] is None
        assert la["value_cache_elements_per_token_before"] == la["value_cache_elements_per_token_after"] == full
        assert la["value_proj_flops_per_token_before"] == la["value_proj_flops_per_token_after"]
    assert d["model"]["kv_cache_elements_per_token_after"] == LAYERS * (R + full)
    assert any("values unchanged" in n for n in d["notes"])


def test_report_flops_of_shared_values(llama_values, llama_keys_only):
    """The same keys with and without shared values: the model differs by the value projection
    (latent + per-head lift instead of 2*D*G*d) and the value mixing (2*N*H*r_v instead of 2*N*H*d)."""
    n = 16
    with_values, keys_only = build_report(llama_values, [n]), build_report(llama_keys_only, [n])
    full = GROUPS * HEAD_DIM
    proj = LAYERS * (2 * D_MODEL * R_V + 2 * D_MODEL * HEADS * (R_V - HEAD_DIM) - 2 * D_MODEL * full)
    assert with_values.matmul_after - keys_only.matmul_after == proj
    assert with_values.matmul_before == keys_only.matmul_before
    mixing = LAYERS * 2 * n * HEADS * (R_V - HEAD_DIM)
    assert with_values.attention_flops(n, True) - keys_only.attention_flops(n, True) == mixing
    assert with_values.attention_flops(n, False) == keys_only.attention_flops(n, False)


def test_report_table_shows_the_value_and_kv_cache(cli, llama_values, llama_keys_only):
    result = cli("report", llama_values)
    assert result.exit_code == 0, result.stderr
    assert "V-cache after" in result.stdout and "KV cache (keys + values) per token, bytes" in result.stdout
    plain = cli("report", llama_keys_only)
    assert "V-cache after" not in plain.stdout and "value cache per token, elements" in plain.stdout


def test_report_on_a_collaborative_layer_with_shared_values(sample_dir, tmp_path):
    out = _compress(sample_dir, tmp_path / "out", rank=64, value_rank=24, max_iter=2)
    d = build_report(out, [32]).to_dict()
    for la in d["layers"]:
        full = la["heads"] * la["head_dim"]
        assert la["value_cache_elements_per_token_before"] == full
        assert la["value_cache_elements_per_token_after"] == 24
        assert la["kv_cache_elements_per_token_after"] == 64 + la["heads"] + 24
        assert la["value_proj_flops_per_token_after"] == 2 * la["d_model"] * 24 + 2 * full * 24


# ---- bench ----------------------------------------------------------------------------------

def test_bench_measures_the_value_cache_of_shared_values(cli, rotary_checkpoints, llama_values, tmp_path):
    context = 20
    data = _json(cli("bench", rotary_checkpoints["llama"], llama_values, "--level", "model", "--lengths", "8",
                     "--batch-sizes", "1", *FAST, "--context", str(context), "--decode-steps", "2", "--json", "-"))
    d, full = data["decode"], GROUPS * HEAD_DIM
    # from the cache tensors: layers x tokens x (G*d, or R keys and the r_v latent) float32
    assert d["value_cache_bytes_original"] == LAYERS * context * full * 4
    assert d["value_cache_bytes_compressed"] == LAYERS * context * R_V * 4
    assert d["key_cache_bytes_compressed"] == LAYERS * context * R * 4
    assert d["value_cache_bytes_per_token_compressed"] == LAYERS * R_V * 4
    assert d["key_cache_bytes_per_token_original"] == d["value_cache_bytes_per_token_original"] == LAYERS * full * 4
    assert d["kv_cache_bytes_per_token_compressed"] == LAYERS * (R + R_V) * 4
    assert d["kv_cache_bytes_compressed"] == d["key_cache_bytes_compressed"] + d["value_cache_bytes_compressed"]
    assert d["value_cache_ratio"] == pytest.approx(R_V / full)
    assert d["kv_cache_ratio"] == pytest.approx((R + R_V) / (2 * full))
    # the measured per-token figures are the report's counts
    model = build_report(llama_values).to_dict()["model"]
    assert d["kv_cache_bytes_per_token_compressed"] == model["kv_cache_bytes_per_token_after"]
    assert d["kv_cache_bytes_per_token_original"] == model["kv_cache_bytes_per_token_before"]
    record = tmp_path / "bench.json"
    record.write_text(json.dumps(data))
    measured = build_report(llama_values, measured=record).to_dict()["measured"]["decode"]
    assert measured["kv_cache_ratio"] == d["kv_cache_ratio"] and measured["value_cache_ratio"] == d["value_cache_ratio"]
    table = cli("bench", rotary_checkpoints["llama"], llama_values, "--level", "model", "--lengths", "8",
                "--batch-sizes", "1", *FAST, "--context", str(context), "--decode-steps", "2")
    assert table.exit_code == 0 and "KV cache bytes" in table.stdout


def test_module_bench_runs_the_shared_values(cli, rotary_checkpoints, llama_values):
    """At module level the compressed side runs the latent and the lift, so its FLOP model is the report's."""
    data = _json(cli("bench", rotary_checkpoints["llama"], llama_values, "--level", "module", "--lengths", "8",
                     "--batch-sizes", "1", *FAST, "--json", "-"))
    report = build_report(llama_values, [8])
    assert data["forward"][0]["flop_model_ratio"] == pytest.approx(report.flop_model_ratio(8, "module"), abs=1e-6)


def test_module_bench_compressed_layer_is_exact_at_full_width(rotary_checkpoints, tmp_path):
    """R = r_v = G*d reproduce the original layer exactly: the latent, the attention and the lift as bench runs them."""
    import torch

    from collabcompress.commands import bench as latency
    from collabcompress.commands.verify import resolve_original
    from collabcompress.files.manifest import open_output

    full = GROUPS * HEAD_DIM
    out = _compress(rotary_checkpoints["llama"], tmp_path / "full", rank=full, value_rank=full)
    manifest, ckpt = open_output(out)
    source, _ = resolve_original(manifest, rotary_checkpoints["llama"])
    try:
        layers = latency._module_layers(source, ckpt, manifest)
        config = source.ckpt.config
    finally:
        source.ckpt.close()
        ckpt.close()
    assert all(la.latent is not None and la.latent.shape == (full, D_MODEL) for la in layers)
    x = torch.randn(2, 6, D_MODEL, generator=torch.Generator().manual_seed(0))
    for la in layers:
        rope = la.method.position_embeddings(config, HEAD_DIM, 6, torch.float32, torch.device("cpu"))
        original = latency._original_layer(la, x, rope)  # (B, H, N, d)
        compressed = latency._compressed_layer(la, x, rope)
        assert compressed.shape == original.shape == (2, HEADS, 6, HEAD_DIM)
        torch.testing.assert_close(compressed, original, atol=1e-4, rtol=1e-4)
