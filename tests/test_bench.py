"""`collabcompress bench` (collabcompress.commands.bench) and `report --measured`.

Tiny settings on the bundled sample (module level, no transformers needed) and on the tiny
llama decoder of tests/families.py (model level, with decoding). No test asserts a wall
time: only the structure of the record, the order of the runs, and what is counted
exactly (cache bytes, FLOP-model ratios, peak allocations of a known size).
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from collabcompress.commands import bench as latency
from collabcompress.files.bench_record import outputs_sha256
from collabcompress.commands.compress import CompressOptions, compress
from collabcompress.commands.report import build_report
from helpers import assert_clean_failure

FAST = ("--repeats", "2", "--warmup", "1", "--threads", "1")


@pytest.fixture(scope="module")
def sample_r96(sample_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench-sample") / "r96"
    compress(sample_dir, out, CompressOptions(rank=96))
    return out


@pytest.fixture(scope="module")
def llama_r8(rotary_checkpoints, tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("bench-llama") / "r8"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the data-free rotary warning: the fit's quality is not measured here
        compress(rotary_checkpoints["llama"], out, CompressOptions(rank=8))
    return out


def _json(result) -> dict:
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def _check_spread(s: dict, unit: str = "") -> None:
    values = [s[f"{k}{unit}"] for k in ("min", "q1", "median", "q3", "max")]
    assert all(math.isfinite(v) and v > 0 for v in values)
    assert values == sorted(values)


# ---- the measuring helpers ----------------------------------------------------------------

def test_interleaved_runs_alternate_and_skip_the_warmup():
    calls = []
    first, second = latency.interleaved(lambda: calls.append("o"), lambda: calls.append("c"),
                                        warmup=2, repeats=3)
    assert calls == ["o", "c"] * 5
    assert len(first) == len(second) == 3 and all(t >= 0 for t in first + second)
    with pytest.raises(ValueError):
        latency.interleaved(lambda: None, lambda: None, warmup=0, repeats=0)
    calls.clear()  # three runs take turns the same way
    times = latency.interleaved(*[lambda c=c: calls.append(c) for c in "abc"], warmup=1, repeats=2)
    assert calls == list("abc") * 3 and [len(t) for t in times] == [2, 2, 2]
    with pytest.raises(ValueError):
        latency.interleaved(lambda: None, warmup=0, repeats=1)


def test_spread_and_pair_ratio():
    s = latency.spread([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (s.min, s.q1, s.median, s.q3, s.max) == (1.0, 2.0, 3.0, 4.0, 5.0)
    # the ratio is the median of the per-pair ratios, not the ratio of the medians
    r = latency.pair_ratio([1.0, 2.0, 10.0], [2.0, 2.0, 5.0])
    assert r.median == 1.0 and r.min == 0.5 and r.max == 2.0


def test_peak_memory_sees_a_temporary_allocation():
    size = 4 << 20

    def fn():
        t = torch.empty(size, dtype=torch.uint8)
        t.fill_(1)
        del t

    assert latency.peak_memory(fn, "cpu") >= size
    assert latency.peak_memory(lambda: None, "cpu") < size


def test_measured_crossover():
    rows = [{"seq_len": n, "batch_size": 1, "ratio": {"median": r}} for n, r in ((512, 0.9), (32, 1.2), (128, 1.0))]
    assert latency.measured_crossover(rows, 1) == 128
    assert latency.measured_crossover(rows, 8) is None


# ---- module level on the bundled sample -----------------------------------------------------

def test_module_level_record(cli, sample_dir, sample_r96):
    data = _json(cli("bench", sample_dir, sample_r96, "--level", "module", "--lengths", "8,4", "--batch-sizes",
                     "2,1", *FAST, "--json", "-"))
    assert data["format"] == latency.FORMAT and data["level"] == "module" and data["device"] == "cpu"
    from collabcompress.files.manifest import read

    assert data["outputs_sha256"] == outputs_sha256(read(sample_r96))
    assert data["dtype"] == "float32"  # the float16 sample runs in float32 on the CPU
    assert data["threads"] == 1 and data["repeats"] == 2 and data["warmup"] == 1
    assert data["compressed_layers"] == 6 and data["causal"] is False and data["decode"] is None
    assert [(r["batch_size"], r["seq_len"]) for r in data["forward"]] == [(1, 4), (1, 8), (2, 4), (2, 8)]
    report = build_report(sample_r96, [4, 8])
    for row in data["forward"]:
        _check_spread(row["original"], "_s")
        _check_spread(row["compressed"], "_s")
        _check_spread(row["ratio"])
        assert row["flop_model_ratio"] == pytest.approx(report.flop_model_ratio(row["seq_len"], "module"), abs=1e-6)
        assert row["peak_memory_bytes_original"] > 0 and row["peak_memory_bytes_compressed"] > 0
    assert set(data["crossover"]["measured"]) == {"1", "2"}
    assert data["crossover"]["flop_model"] == pytest.approx(report.qk_crossover, abs=1e-4)
    assert "profile_memory" in data["memory_method"]
    assert any("--level model" in n for n in data["notes"])


def test_module_level_table_and_plot(cli, sample_dir, sample_r96, tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "bench.png"
    result = cli("bench", sample_dir, sample_r96, "--level", "module", "--lengths", "4", "--batch-sizes", "1",
                 *FAST, "--plot", plot)
    assert result.exit_code == 0, result.stderr
    assert "Forward latency" in result.stdout and "FLOP model" in result.stdout and "peak MiB" in result.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_auto_level_falls_back_to_module_on_an_attention_only_sample(cli, sample_dir, sample_r96):
    pytest.importorskip("transformers")
    data = _json(cli("bench", sample_dir, sample_r96, "--lengths", "4", "--batch-sizes", "1", *FAST, "--json", "-"))
    assert data["level"] == "module"
    assert any("cannot be run" in n for n in data["notes"])


# ---- model level with decoding on the tiny llama ------------------------------------------

def test_model_level_decoder_with_cache_bytes(cli, rotary_checkpoints, llama_r8):
    data = _json(cli("bench", rotary_checkpoints["llama"], llama_r8, "--level", "model", "--lengths", "8,16",
                     "--batch-sizes", "1", *FAST, "--context", "20", "--decode-steps", "3", "--json", "-"))
    assert data["level"] == "model" and data["causal"] is True and data["family"] == "llama"
    d = data["decode"]
    assert d["context"] == 20 and d["steps"] == 3 and d["batch_size"] == 1
    for side in ("original", "compressed"):
        _check_spread(d[side], "_s")
        assert d[side]["tokens_per_second"] > 0
    # measured from the cache tensors: 2 layers x 20 tokens x (G*d = 16 or R = 8) float32 keys
    assert d["key_cache_bytes_original"] == 2 * 20 * 16 * 4
    assert d["key_cache_bytes_compressed"] == 2 * 20 * 8 * 4
    assert d["value_cache_bytes_original"] == d["value_cache_bytes_compressed"] == 2 * 20 * 16 * 4
    assert d["key_cache_ratio"] == 0.5
    report = build_report(llama_r8, [8, 16])
    for row in data["forward"]:
        assert row["flop_model_ratio"] == pytest.approx(report.flop_model_ratio(row["seq_len"]), abs=1e-6)


def test_a_cache_left_empty_is_an_error_not_zero_bytes(cli, rotary_checkpoints, llama_r8, monkeypatch):
    """A transformers that ignores the cache keyword leaves the cache empty: exit 4, no 0 -> 0 bytes row."""
    monkeypatch.setattr(latency, "cache_bytes", lambda cache: (0, 0))
    assert_clean_failure(cli("bench", rotary_checkpoints["llama"], llama_r8, "--level", "model", "--lengths", "8",
                             "--batch-sizes", "1", *FAST, "--context", "20", "--decode-steps", "3"), 4, "cache empty")


def test_decode_context_capped_at_the_positions(cli, rotary_checkpoints, llama_r8):
    data = _json(cli("bench", rotary_checkpoints["llama"], llama_r8, "--level", "model", "--lengths", "8",
                     "--batch-sizes", "1", *FAST, "--decode-steps", "3", "--json", "-"))
    assert [r["seq_len"] for r in data["forward"]] == [8]
    assert data["decode"]["context"] == 64 - 1 - 3
    assert any("capped" in n for n in data["notes"])
    # a length beyond the positions is refused: tests/test_limits.py


# ---- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args, needle", [
    (("--lengths", "0,8"), "--lengths"),
    (("--lengths", "8,x"), "--lengths"),
    (("--batch-sizes", ""), "--batch-sizes"),
    (("--repeats", "0"), "--repeats"),
    (("--warmup", "-1"), "--warmup"),
    (("--device", "tpu"), "--device"),
])
def test_bad_options(cli, sample_dir, sample_r96, args, needle):
    assert_clean_failure(cli("bench", sample_dir, sample_r96, "--level", "module", *args), 3, needle)


def test_cuda_unavailable(cli, sample_dir, sample_r96):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert_clean_failure(cli("bench", sample_dir, sample_r96, "--device", "cuda"), 3, "CUDA is not available")


def test_missing_directories(cli, sample_dir, sample_r96, tmp_path):
    assert_clean_failure(cli("bench", tmp_path / "nope", sample_r96), 3, "not found")
    assert_clean_failure(cli("bench", sample_dir, tmp_path / "nope"), 3)


def test_wrong_pair(cli, rotary_checkpoints, sample_r96):
    assert_clean_failure(cli("bench", rotary_checkpoints["llama"], sample_r96, "--level", "module"), 3,
                         "another checkpoint")


def test_model_level_that_cannot_load(cli, sample_dir, sample_r96):
    pytest.importorskip("transformers")
    assert_clean_failure(cli("bench", sample_dir, sample_r96, "--level", "model", "--lengths", "4"), 3)


# ---- report --measured -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sample_bench(sample_dir, sample_r96, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench-json") / "bench.json"
    record = latency.bench(sample_dir, sample_r96, level="module", lengths=(4, 8), batch_sizes=(1,), repeats=2,
                           warmup=0, threads=1, memory=False)
    path.write_text(json.dumps(record), encoding="utf-8")
    return path


def test_report_measured(cli, sample_r96, sample_bench):
    data = _json(cli("report", sample_r96, "--measured", sample_bench, "--json", "-"))
    bench = json.loads(sample_bench.read_text())
    m = data["measured"]
    assert m["level"] == "module" and m["file"] == str(sample_bench)
    assert [(r["seq_len"], r["ratio"]) for r in m["forward"]] == [(r["seq_len"], r["ratio"]["median"])
                                                                  for r in bench["forward"]]
    report = build_report(sample_r96, [4])
    assert [r["flop_model_ratio"] for r in m["forward"]] == [round(report.flop_model_ratio(n, "module"), 6)
                                                             for n in (4, 8)]
    table = cli("report", sample_r96, "--measured", sample_bench)
    assert "Measured latency beside the FLOP model" in table.stdout
    plain = _json(cli("report", sample_r96, "--json", "-"))
    assert "measured" not in plain


def test_report_measured_refuses_other_files(cli, sample_r96, sample_bench, tmp_path):
    garbled = tmp_path / "garbled.json"
    garbled.write_text("{not json", encoding="utf-8")
    assert_clean_failure(cli("report", sample_r96, "--measured", garbled), 3, "not valid JSON")
    record = json.loads(sample_bench.read_text())
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**record, "outputs_sha256": "0" * 64}), encoding="utf-8")
    assert_clean_failure(cli("report", sample_r96, "--measured", other), 3, "another compressed directory")
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({**record, "forward": [{"seq_len": 4, "batch_size": 1, "ratio": {}}]}),
                      encoding="utf-8")
    assert_clean_failure(cli("report", sample_r96, "--measured", broken), 3, "forward[0]")
    not_bench = tmp_path / "report.json"
    shutil.copy(sample_bench, not_bench)
    not_bench.write_text(json.dumps({"format": "collabcompress-report/1"}), encoding="utf-8")
    assert_clean_failure(cli("report", sample_r96, "--measured", not_bench), 3, "not a bench record")
    assert_clean_failure(cli("report", sample_r96, "--measured", tmp_path / "missing.json"), 3, "not found")


# ---- the module-level layers compute what they stand for ------------------------------------------

def _layers(original: Path, compressed: Path):
    from collabcompress.files.manifest import open_output
    from collabcompress.commands.verify import resolve_original

    manifest, out = open_output(compressed)
    source, _ = resolve_original(manifest, original)
    try:
        return latency._module_layers(source, out, manifest), source.ckpt.config
    finally:
        source.ckpt.close()
        out.close()


@pytest.mark.parametrize("family, rank", [("gpt2", 32), ("bert", 32), ("llama", 16)])
def test_exact_rank_layers_match_the_original(family, rank, rotary_checkpoints, tmp_path):
    """At R = H*d (rotary: G*d) the decomposition is exact, so the module-level compressed layer
    must give the original layer's output: the bench times the right computation on both sides."""
    if family == "llama":
        original = rotary_checkpoints["llama"]
    else:
        from families import make_checkpoint

        original = make_checkpoint(family, tmp_path / family)
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compress(original, out, CompressOptions(rank=rank))
    layers, config = _layers(original, out)
    x = torch.randn(2, 6, layers[0].spec.d_model, generator=torch.Generator().manual_seed(0))
    for la in layers:
        r = la.method.position_embeddings(config, la.spec.head_dim, 6, torch.float32, torch.device("cpu"))
        torch.testing.assert_close(latency._compressed_layer(la, x, r), latency._original_layer(la, x, r),
                                   atol=2e-4, rtol=2e-4)
