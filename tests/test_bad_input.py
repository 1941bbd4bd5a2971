"""Bad input to `analyze`: each is exit code 3 with one or two plain lines on stderr.

Also the good variants of the same inputs: a hand-sharded checkpoint gives the same
analysis as the single file, float16 / bfloat16 copies give nearly the same, and the
input files are never modified.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file


from families import make_checkpoint
from helpers import assert_clean_failure, digest, write_shards

QUERY = "encoder.layer.0.attention.self.query.weight"
KEY = "encoder.layer.1.attention.self.key.weight"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A tiny BERT checkpoint (D=32, 4 heads, 2 layers) with config.json; never modified."""
    return make_checkpoint("bert", tmp_path_factory.mktemp("bert") / "bert")


@pytest.fixture
def ckpt(source, tmp_path) -> Path:
    """A private copy of the source checkpoint that a test may damage."""
    return Path(shutil.copytree(source, tmp_path / "ckpt"))


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _analysis(cli, path: Path, *args: str) -> dict:
    result = cli("analyze", path, *args, "--json", "-")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


# --------------------------------------------------------------------------- paths and files

def test_missing_path(cli, tmp_path):
    assert_clean_failure(cli("analyze", tmp_path / "nowhere"), 3, "not found", "nowhere")


def test_directory_without_weights(cli, tmp_path):
    (tmp_path / "config.json").write_text('{"num_attention_heads": 4}')
    assert_clean_failure(cli("analyze", tmp_path), 3, "model.safetensors")


def test_truncated_data(cli, ckpt):
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert_clean_failure(cli("analyze", ckpt), 3, "model.safetensors")


def test_truncated_inside_header(cli, ckpt):
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    weights.write_bytes(data[: 8 + n // 2])
    assert_clean_failure(cli("analyze", ckpt), 3, "truncated")


@pytest.mark.parametrize("content", [os.urandom(4096), b"this is a text file, not safetensors\n" * 40, b"", b"{}"],
                         ids=["random", "text", "empty", "tiny"])
def test_not_safetensors(cli, ckpt, content):
    (ckpt / "model.safetensors").write_bytes(content)
    assert_clean_failure(cli("analyze", ckpt), 3, "not a safetensors file")


def test_not_safetensors_given_as_file(cli, tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_text("hello\n" * 100)
    assert_clean_failure(cli("analyze", path), 3, "weights.safetensors")


def test_header_not_json(cli, ckpt):
    header = b"{this is not json}"
    (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    assert_clean_failure(cli("analyze", ckpt), 3, "model.safetensors")


def test_config_not_json(cli, ckpt):
    (ckpt / "config.json").write_text("{not json")
    assert_clean_failure(cli("analyze", ckpt), 3, "config")


# --------------------------------------------------------------------------- sharded indexes

@pytest.fixture
def sharded(source, tmp_path) -> Path:
    directory = tmp_path / "sharded"
    directory.mkdir()
    shutil.copy(source / "config.json", directory)
    # the query tensors in the first shard, the rest in the second: a module's query and key in two files
    write_shards(_tensors(source / "model.safetensors"), directory, lambda name: ".query." in name)
    return directory


def test_sharded_equals_single_file(cli, source, sharded):
    single = _analysis(cli, source)
    for path in (sharded, sharded / "model.safetensors.index.json"):
        data = _analysis(cli, path)
        assert data["checkpoint"] == str(path)
        assert {k: v for k, v in data.items() if k != "checkpoint"} == \
            {k: v for k, v in single.items() if k != "checkpoint"}


def test_single_file_path_equals_directory(cli, source):
    a, b = _analysis(cli, source), _analysis(cli, source / "model.safetensors")
    assert a["layers"] == b["layers"]


def test_index_names_missing_shard(cli, sharded):
    (sharded / "model-00002-of-00002.safetensors").unlink()
    assert_clean_failure(cli("analyze", sharded), 3, "missing shard", "model-00002-of-00002.safetensors")


@pytest.mark.parametrize("exists", [False, True], ids=["absent", "present"])
def test_index_points_outside_directory(cli, sharded, exists):
    index = sharded / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    outside = sharded.parent / "x.safetensors"
    if exists:  # a readable file there must not be read either
        shutil.copy(sharded / "model-00001-of-00002.safetensors", outside)
    data["weight_map"] = {k: "../x.safetensors" if v.startswith("model-00001") else v
                          for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    assert_clean_failure(cli("analyze", sharded), 3, "outside")


def test_index_absolute_path_is_outside(cli, sharded):
    index = sharded / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: "/etc/passwd" if v.startswith("model-00001") else v for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    assert_clean_failure(cli("analyze", sharded), 3, "outside")


def test_index_not_json(cli, sharded):
    (sharded / "model.safetensors.index.json").write_text('{"weight_map": {')
    assert_clean_failure(cli("analyze", sharded), 3, "not valid JSON")


def test_index_without_weight_map(cli, sharded):
    (sharded / "model.safetensors.index.json").write_text('{"metadata": {}}')
    assert_clean_failure(cli("analyze", sharded), 3, "weight_map")


def test_index_names_tensor_absent_from_shard(cli, sharded):
    index = sharded / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["encoder.layer.9.attention.self.query.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    assert_clean_failure(cli("analyze", sharded), 3, "encoder.layer.9.attention.self.query.weight")


# --------------------------------------------------------------------------- heads, values, options

def test_heads_not_dividing_width(cli, source):
    assert_clean_failure(cli("analyze", source, "--heads", "5"), 3, "5", "32", "--heads")


@pytest.mark.parametrize("heads", ["0", "-2"])
def test_heads_not_positive(cli, source, heads):
    assert_clean_failure(cli("analyze", source, "--heads", heads), 3, "--heads")


def test_no_head_count(cli, tmp_path):
    directory = make_checkpoint("bert", tmp_path / "noconfig", with_config=False)
    assert_clean_failure(cli("analyze", directory), 3, "--heads")


@pytest.mark.parametrize("tensor,value", [(QUERY, math.nan), (KEY, math.inf), (KEY, -math.inf)],
                         ids=["nan-query", "inf-key", "neginf-key"])
def test_non_finite_weight(cli, ckpt, tensor, value):
    weights = ckpt / "model.safetensors"
    tensors = _tensors(weights)
    tensors[tensor][1, 2] = value
    save_file(tensors, str(weights), metadata={"format": "pt"})
    before = digest(ckpt)
    assert_clean_failure(cli("analyze", ckpt), 3, tensor, "NaN or Inf")
    assert digest(ckpt) == before


@pytest.mark.parametrize("tau", ["0", "1.5", "-1", "nan"])
def test_energy_outside_unit_interval(cli, source, tau):
    assert_clean_failure(cli("analyze", source, "--energy", tau), 3, "--energy")


def test_energy_one_is_accepted(cli, source):
    data = _analysis(cli, source, "--energy", "1")
    for layer in data["layers"]:
        assert 1 <= layer["rank_at"]["1"] <= layer["heads"] * layer["head_dim"]


def test_already_compressed(cli, ckpt):
    weights = ckpt / "model.safetensors"
    tensors = _tensors(weights)
    module = "encoder.layer.0.attention.self"
    for suffix in ("query.weight", "query.bias", "key.weight", "key.bias"):
        del tensors[f"{module}.{suffix}"]
    tensors[f"{module}.collab_query.weight"] = torch.zeros(16, 32)
    tensors[f"{module}.collab_key.weight"] = torch.zeros(16, 32)
    tensors[f"{module}.collab_mixing"] = torch.zeros(4, 16)
    tensors[f"{module}.collab_content_bias.weight"] = torch.zeros(4, 32)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert_clean_failure(cli("analyze", ckpt), 3, "already compressed")


def test_integer_query_weight(cli, ckpt):
    weights = ckpt / "model.safetensors"
    tensors = _tensors(weights)
    tensors[QUERY] = tensors[QUERY].to(torch.int32)
    save_file(tensors, str(weights))
    assert_clean_failure(cli("analyze", ckpt), 3, QUERY)


def test_json_to_missing_directory(cli, source, tmp_path):
    assert_clean_failure(cli("analyze", source, "--json", tmp_path / "no" / "such" / "dir.json"), 3, "JSON")


# --------------------------------------------------------------------------- dtypes, input untouched

@pytest.mark.parametrize("dtype,atol", [(torch.float16, 1e-3), (torch.bfloat16, 5e-3)], ids=["float16", "bfloat16"])
def test_half_precision_copies_close_to_float32(cli, source, tmp_path, dtype, atol):
    tensors = _tensors(source / "model.safetensors")
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(source / "config.json", tmp_path)
    full, half = _analysis(cli, source), _analysis(cli, tmp_path)
    for a, b in zip(full["layers"], half["layers"], strict=True):
        assert (a["module"], a["heads"], a["head_dim"]) == (b["module"], b["heads"], b["head_dim"])
        for side in ("energy_query", "energy_key"):
            assert torch.allclose(torch.tensor(a[side]), torch.tensor(b[side]), atol=atol)
        for tau in a["rank_at"]:
            assert abs(a["rank_at"][tau] - b["rank_at"][tau]) <= 1


def test_input_untouched_and_nothing_written_beside_it(cli, source, sharded, tmp_path):
    for directory in (source, sharded):
        before, names = digest(directory), sorted(p.name for p in directory.iterdir())
        _analysis(cli, directory)
        result = cli("analyze", directory, "--json", tmp_path / f"{directory.name}.json")
        assert result.exit_code == 0, result.stderr
        assert digest(directory) == before
        assert sorted(p.name for p in directory.iterdir()) == names


def test_input_untouched_on_failure(cli, source):
    before = digest(source)
    assert_clean_failure(cli("analyze", source, "--heads", "5"), 3)
    assert digest(source) == before


def test_a_reader_that_closes_stdout_early_gets_a_quiet_exit_141():
    """A real process whose stdout's reader is gone. `archs` prints its table through the same
    output path (cli._emit and its console) and error boundary as `analyze` and every other
    command, without the 2 s of importing torch and analysing a model first."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "from collabcompress.cli import main; main()", "archs"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "COLUMNS": "80", "PYTHONUNBUFFERED": "1"})  # writes fail at once
    proc.stdout.close()  # as `| head` does once it has its lines
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""
