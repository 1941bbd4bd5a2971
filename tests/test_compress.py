"""compress: exactness, rank choice, output directory, manifest, determinism, bad input, atomicity."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from collabcompress.commands.compress import CompressOptions, compress
from collabcompress.methods.collaborative import collab_names
from collabcompress.commands.analyze import analyze

from families import FAMILIES, make_checkpoint

MANIFEST_KEYS = {"format", "tool", "created_utc", "source", "settings", "layers", "totals", "outputs"}
LAYER_KEYS = {"module", "index", "heads", "head_dim", "d_model", "shared_dim", "scale", "relative_error",
              "energy_spectral", "iterations", "seconds", "tensors", "removed"}
SETTINGS_KEYS = {"rank", "energy", "min_rank", "max_rank", "multiple_of", "method", "max_iter", "tol", "seed",
                 "dtype", "calibration"}
TOTALS_KEYS = {"params_before", "params_after", "qk_params_before", "qk_params_after", "bytes_before", "bytes_after"}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def minilm_exact(minilm_r384):
    return minilm_r384  # shared with the other modules (conftest.py)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny BERT (D = 32, 4 heads, 2 layers), for tests of the directory and gate logic; never modified."""
    return make_checkpoint("bert", tmp_path_factory.mktemp("tiny") / "bert")


def test_exact_rank_reproduces_attention_probabilities(minilm_dir, minilm_exact):
    out, manifest = minilm_exact
    src, dst = load_file(str(minilm_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 384, generator=g)  # (B, N, D)
    for layer in manifest["layers"]:
        m, n_head, s = layer["module"], layer["heads"], layer["scale"]
        q = (x @ src[f"{m}.query.weight"].T + src[f"{m}.query.bias"]).unflatten(-1, (n_head, -1)).transpose(1, 2)
        k = (x @ src[f"{m}.key.weight"].T + src[f"{m}.key.bias"]).unflatten(-1, (n_head, -1)).transpose(1, 2)
        p_orig = torch.softmax(s * q @ k.transpose(-1, -2), dim=-1)  # (B, H, N, N)
        names = collab_names(m)
        u_x = x @ dst[names["query"]].T  # (B, N, R)
        v_y = x @ dst[names["key"]].T  # (B, N, R)
        mixing, content = dst[names["mixing"]], dst[names["content_bias"]]
        scores = torch.einsum("bnr,hr,bmr->bhnm", u_x, mixing, v_y) + (x @ content.T).transpose(1, 2)[:, :, None, :]
        p_collab = torch.softmax(s * scores, dim=-1)
        assert (p_orig - p_collab).abs().max() < 1e-5, m
        for name in (f"{m}.query.weight", f"{m}.query.bias", f"{m}.key.weight", f"{m}.key.bias"):
            assert name not in dst


def test_exact_rank_verify_relative_error(minilm_exact, cli):
    out, _ = minilm_exact
    result = cli("verify", out, "--json", "-")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert len(data["layers"]) == 6
    assert all(r["relative_score_error"] <= 1e-5 for r in data["layers"])
    assert data["overall"]["kl_max"] < 1e-8
    assert cli("verify", out, "--max-kl", "1e-6").exit_code == 0


def test_output_directory_and_manifest(minilm_dir, minilm_exact):
    out, manifest = minilm_exact
    on_disk = json.loads((out / "collab_manifest.json").read_text())
    assert MANIFEST_KEYS <= set(on_disk)
    assert SETTINGS_KEYS <= set(on_disk["settings"])
    assert TOTALS_KEYS <= set(on_disk["totals"])
    for layer in on_disk["layers"]:
        assert LAYER_KEYS <= set(layer)
        assert {"query", "key", "mixing", "content_bias", "value"} <= set(layer["tensors"])
    for rec in on_disk["source"]["files"]:
        assert _sha(minilm_dir / rec["name"]) == rec["sha256"]
        assert (minilm_dir / rec["name"]).stat().st_size == rec["bytes"]
    for rec in on_disk["outputs"]:
        assert _sha(out / rec["name"]) == rec["sha256"]
    # every other file of the source directory is copied; config carries the block
    for name in ("tokenizer.json", "vocab.txt", "1_Pooling/config.json", "modules.json"):
        assert (out / name).read_bytes() == (minilm_dir / name).read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["collaborative_attention"]["layers"]["encoder.layer.0.attention.self"]["shared_dim"] == 384
    assert config["hidden_size"] == 384
    # every non-attention tensor identical, same dtype
    src = safe_open(str(minilm_dir / "model.safetensors"), "pt")
    dst = safe_open(str(out / "model.safetensors"), "pt")
    removed = {n for layer in on_disk["layers"] for n in layer["removed"]}
    assert len(removed) == 24
    for name in src.keys():
        if name not in removed:
            assert torch.equal(src.get_tensor(name), dst.get_tensor(name)), name
    total = sum(dst.get_slice(n).get_shape().__len__() and math.prod(dst.get_slice(n).get_shape()) for n in dst.keys())
    assert total == on_disk["totals"]["params_after"]


def test_rank_192_quality_and_determinism(minilm_dir, minilm_r192, tmp_path):
    out, a = minilm_r192
    # a second run gives the same bytes; one layer is enough, the layers are fitted independently
    compress(minilm_dir, tmp_path / "b", CompressOptions(rank=192, layers="0"))
    first, again = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    names = [n for n in collab_names("encoder.layer.0.attention.self").values() if n in first]
    assert len(names) >= 4
    for name in names:
        assert first[name].dtype == again[name].dtype and torch.equal(first[name], again[name]), name
    errors = [layer["relative_error"] for layer in a["layers"]]
    assert errors[0] <= 0.27
    assert all(e < 0.55 for e in errors)
    assert a["totals"]["qk_params_after"] == 6 * (2 * 384 * 192 + 12 * 192 + 12 * 384)
    assert a["totals"]["qk_params_before"] == 6 * (2 * 384 * 384 + 2 * 384)


def test_energy_ranks_match_analyze(sample_dir, tmp_path):
    ranks = [layer.spectrum.rank_at(0.95) for layer in analyze(sample_dir, energies=[0.95]).layers]
    manifest = compress(sample_dir, tmp_path / "out", CompressOptions(energy=0.95, max_iter=3))
    assert [layer["shared_dim"] for layer in manifest["layers"]] == [min(384, -(-r // 8) * 8) for r in ranks]


def test_layers_option_and_dtype(sample_dir, tmp_path):
    manifest = compress(sample_dir, tmp_path / "out", CompressOptions(rank=64, layers="0,4-5", dtype="float32",
                                                                      max_iter=3))
    assert [layer["index"] for layer in manifest["layers"]] == [0, 4, 5]
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert f.get_slice("encoder.layer.0.attention.self.collab_query.weight").get_dtype() == "F32"
        assert f.get_slice("encoder.layer.1.attention.self.query.weight").get_dtype() == "F16"
        assert "encoder.layer.1.attention.self.collab_query.weight" not in f.keys()


def test_sharded_source_gives_sharded_output(tmp_path):
    src = make_checkpoint("bert", tmp_path / "bert")
    tensors = load_file(str(src / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(sharded / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in keys})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (sharded / "config.json").write_bytes((src / "config.json").read_bytes())
    manifest = compress(sharded, tmp_path / "out", CompressOptions(rank=16))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for layer in manifest["layers"]:
        for name in layer["tensors"].values():
            if name:
                assert name in index["weight_map"]
                with safe_open(str(out / index["weight_map"][name]), "pt") as f:
                    assert name in f.keys()
    unsharded = compress(src, tmp_path / "plain", CompressOptions(rank=16))
    assert [l["relative_error"] for l in manifest["layers"]] == [l["relative_error"] for l in unsharded["layers"]]


def test_sharded_source_named_by_a_relative_path(tmp_path, monkeypatch, cli):
    """The shards are read through their resolved paths; the manifest still names them
    relative to the directory the user gave (this failed as an internal error)."""
    src = make_checkpoint("bert", tmp_path / "bert")
    tensors = load_file(str(src / "model.safetensors"))
    names = sorted(tensors)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    weight_map = {}
    for k, keys in enumerate((names[: len(names) // 2], names[len(names) // 2:]), 1):
        save_file({n: tensors[n] for n in keys}, str(sharded / f"model-0000{k}-of-00002.safetensors"))
        weight_map.update({n: f"model-0000{k}-of-00002.safetensors" for n in keys})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (sharded / "config.json").write_bytes((src / "config.json").read_bytes())
    absolute = compress(sharded, tmp_path / "absolute", CompressOptions(rank=16))
    monkeypatch.chdir(tmp_path)
    result = cli("compress", "sharded", "--out", "relative", "--rank", "16", "--json", "-")
    assert result.exit_code == 0, result.stderr
    relative = json.loads(result.stdout)
    assert [f["name"] for f in relative["source"]["files"]] == [f["name"] for f in absolute["source"]["files"]]
    assert relative["outputs"] == absolute["outputs"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_compresses_exactly_at_full_rank(family, tmp_path, cli):
    src = make_checkpoint(family, tmp_path / "src")
    facts = FAMILIES[family]
    result = cli("compress", src, "--out", tmp_path / "out", "--rank", str(min(m["heads"] * m["head_dim"] for m in facts["modules"])), "--json", "-")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["source"]["architecture"] == facts["arch"]
    assert len(manifest["layers"]) == facts["n_modules"]
    check = cli("verify", tmp_path / "out", "--json", "-")
    assert check.exit_code == 0, check.stderr
    data = json.loads(check.stdout)
    full = [r for r, l in zip(data["layers"], manifest["layers"]) if l["shared_dim"] == l["heads"] * l["head_dim"]]
    assert full and all(r["relative_score_error"] < 1e-5 for r in full)
    if facts.get("fused"):
        with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
            names = set(f.keys())
        first = manifest["layers"][0]
        assert first["tensors"]["value"] in names
        assert first["removed"][0] not in names


@pytest.mark.parametrize("args,message", [
    (["--rank", "0"], "--rank must be at least 1"),
    (["--rank", "385"], "above H*d = 384"),
    (["--rank", "8", "--energy", "0.9"], "exactly one of --rank and --energy"),
    ([], "exactly one of --rank and --energy"),
    (["--energy", "1.5"], "--energy must be in (0, 1]"),
    (["--rank", "8", "--layers", "7"], "--layers"),
    (["--rank", "8", "--multiple-of", "0"], "--multiple-of"),
])
def test_bad_options_exit_3(sample_dir, tmp_path, cli, args, message):
    result = cli("compress", sample_dir, "--out", tmp_path / "out", *args)
    assert result.exit_code == 3, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) <= 2
    assert not (tmp_path / "out").exists()


def test_existing_output_refused_without_force(tiny, tmp_path, cli):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = cli("compress", tiny, "--out", tmp_path / "out", "--rank", "8", "--max-iter", "2")
    assert result.exit_code == 3 and "--force" in result.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    # --force replaces only a collabcompress output, never a directory of the user's
    result = cli("compress", tiny, "--out", tmp_path / "out", "--rank", "8", "--max-iter", "2", "--force")
    assert result.exit_code == 3 and "not a collabcompress output" in result.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    (tmp_path / "out" / "keep.txt").unlink()
    (tmp_path / "out").rmdir()
    for _ in range(2):  # the second run replaces the first one's output
        result = cli("compress", tiny, "--out", tmp_path / "out", "--rank", "8", "--max-iter", "2", "--force")
        assert result.exit_code == 0, result.stderr
    assert (tmp_path / "out" / "collab_manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_equal_to_source_or_containing_it_refused(tmp_path, cli):
    src = make_checkpoint("bert", tmp_path / "src")
    before = _sha(src / "model.safetensors")
    for out in (src, src / "model.safetensors", tmp_path, src / "inner"):
        result = cli("compress", src, "--out", out, "--rank", "8", "--force")
        assert result.exit_code == 3, (out, result.stderr)
        assert "source" in result.stderr
    assert _sha(src / "model.safetensors") == before
    assert sorted(p.name for p in src.iterdir()) == ["config.json", "model.safetensors"]


def test_already_compressed_checkpoint_refused(tiny, tmp_path, cli):
    compress(tiny, tmp_path / "once", CompressOptions(rank=16, max_iter=2))
    result = cli("compress", tmp_path / "once", "--out", tmp_path / "twice", "--rank", "8")
    assert result.exit_code == 3
    assert "already compressed" in result.stderr
    assert not (tmp_path / "twice").exists()


def test_verify_on_non_compressed_directory(sample_dir, cli):
    result = cli("verify", sample_dir)
    assert result.exit_code == 3
    assert "not a model compressed by collabcompress" in result.stderr


def test_verify_gate_exit_5(tiny, tmp_path, cli):
    compress(tiny, tmp_path / "out", CompressOptions(rank=8, max_iter=2))
    result = cli("verify", tmp_path / "out", "--max-kl", "1e-9")
    assert result.exit_code == 5
    assert "exceeds --max-kl" in result.stderr


# SIGINT during the decomposition and while writing, SIGKILL while writing: tests/test_reliability.py
# (the interruption tests, on a tiny model with a layer that never finishes).


def test_remote_code_output_loads_with_automodel(tmp_path):
    transformers = pytest.importorskip("transformers")
    src = make_checkpoint("bert", tmp_path / "src")
    manifest = compress(src, tmp_path / "out", CompressOptions(rank=32), remote_code=True)
    names = {o["name"] for o in manifest["outputs"]}
    assert "modeling_collabcompress.py" in names
    for rec in manifest["outputs"]:
        assert _sha(tmp_path / "out" / rec["name"]) == rec["sha256"]
    original = transformers.AutoModel.from_pretrained(str(src)).eval()
    loaded = transformers.AutoModel.from_pretrained(str(tmp_path / "out"), trust_remote_code=True).eval()
    ids = torch.tensor([[1, 5, 7, 9, 2]])
    with torch.no_grad():
        a, b = original(input_ids=ids).last_hidden_state, loaded(input_ids=ids).last_hidden_state
    assert torch.allclose(a, b, atol=1e-4)
