"""The typed manifest: round trip, the bytes compress writes, validation of each field."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest


from families import make_checkpoint

from collabcompress.files import manifest as mf
from collabcompress.files.output import write_manifest
from collabcompress.commands.compress import CompressOptions, compress
from collabcompress.errors import BadInputError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("manifest")
    compress(make_checkpoint("gpt2", root / "src"), root / "comp", CompressOptions(rank=4, max_iter=2), workers=1)
    return root / "comp" / mf.MANIFEST_NAME


def test_round_trip_keeps_every_byte(written):
    text = written.read_text(encoding="utf-8")
    m = mf.Manifest.from_json(json.loads(text), written)
    assert json.dumps(m.to_json(), indent=2) + "\n" == text
    assert m.layers[0].tensors.value is not None  # GPT-2 records its split value tensor
    assert m == mf.Manifest.from_json(m.to_json())


def test_write_then_read(written, tmp_path):
    m = mf.read(written.parent)
    write_manifest(tmp_path, m)
    assert (tmp_path / mf.MANIFEST_NAME).read_bytes() == written.read_bytes()
    assert not list(tmp_path.glob(".*tmp"))


def test_compress_writes_the_keys_in_their_old_order(tmp_path):
    """The keys, their order and the indent of the dict-built manifest before the typed one
    (compared byte for byte once, apart from created_utc and seconds, when it was introduced)."""
    src = ROOT / "sample_models" / "all-MiniLM-L6-v2-attention"
    if not (src / "model.safetensors").is_file():
        pytest.skip("no sample model")
    compress(src, tmp_path / "out", CompressOptions(rank=8, max_iter=2), workers=1)
    data = json.loads((tmp_path / "out" / mf.MANIFEST_NAME).read_text())
    assert list(data) == ["format", "tool", "created_utc", "source", "settings", "layers", "totals", "outputs"]
    assert list(data["source"]) == ["path", "files", "architecture", "dtype"]
    assert list(data["settings"]) == ["rank", "energy", "min_rank", "max_rank", "multiple_of", "method", "max_iter",
                                      "tol", "seed", "device", "dtype", "layers", "calibration", "refine_steps",
                                      "heads", "arch"]
    assert list(data["layers"][0]) == ["module", "index", "heads", "head_dim", "d_model", "shared_dim", "scale",
                                       "relative_error", "relative_error_plain", "energy_spectral", "iterations",
                                       "seconds", "tensors", "removed", "family", "fused", "query_bias", "key_bias",
                                       "refine"]
    assert list(data["layers"][0]["tensors"]) == ["query", "key", "mixing", "content_bias", "value"]
    assert list(data["totals"]) == ["params_before", "params_after", "qk_params_before", "qk_params_after",
                                    "bytes_before", "bytes_after"]
    assert (tmp_path / "out" / mf.MANIFEST_NAME).read_text().startswith('{\n  "format": "collabcompress/1",\n')


def _data(written) -> dict:
    return json.loads(written.read_text())


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["layers"].append(copy.deepcopy(d["layers"][0])), "listed twice"),
    (lambda d: d["layers"][1].update(module=d["layers"][0]["module"]), "layer module .* listed twice"),
    (lambda d: d["layers"][0].update(d_model=0), r"layers\[0\].d_model must be positive"),
    (lambda d: d["layers"][0].update(shared_dim=-3), "shared_dim must be positive"),
    (lambda d: d["layers"][0].update(index=True), "index has the wrong type"),
    (lambda d: d["layers"][0]["tensors"].pop("mixing"), "has no 'mixing'"),
    (lambda d: d["outputs"].append({"name": "/etc/passwd", "sha256": "0" * 64, "bytes": 1}), "not a file name inside"),
    (lambda d: d["outputs"].append({"name": "a/../../x", "sha256": "0" * 64, "bytes": 1}), "not a file name inside"),
    (lambda d: d["outputs"].append({"name": "x\0y", "sha256": "0" * 64, "bytes": 1}), "not a file name inside"),
    (lambda d: d["outputs"].append(dict(d["outputs"][0])), "outputs lists a file twice"),
    (lambda d: d["outputs"][0].update(sha256="abc"), "not a sha256"),
    (lambda d: d["source"]["files"][0].update(bytes=-1), "bytes is negative"),
    (lambda d: d["source"]["files"][0].update(name=""), "not a file name inside"),
    (lambda d: d["settings"].update(heads=0), "settings.heads must be positive"),
    (lambda d: d["totals"].update(bytes_after="1"), "totals.bytes_after has the wrong type"),
    (lambda d: d.update(format="collabcompress/2"), "format"),
    (lambda d: d.update(layers=[]), "lists no compressed layers"),
])
def test_validation_errors(written, edit, message):
    data = _data(written)
    edit(data)
    with pytest.raises(BadInputError, match=message):
        mf.Manifest.from_json(data, written)


def test_no_other_module_opens_the_manifest():
    """Only manifest.py reads or writes the file: elsewhere its name is never on a line that opens a file."""
    opening = ("read_text", "write_text", "read_bytes", "write_bytes", "open(", "read_json", "os.replace")
    for path in (ROOT / "src" / "collabcompress").glob("*.py"):
        if path.name == "manifest.py":
            continue
        for line in path.read_text().splitlines():
            if ("MANIFEST_NAME" in line or "collab_manifest" in line) and any(o in line for o in opening):
                pytest.fail(f"{path.name} opens the manifest: {line.strip()}")
