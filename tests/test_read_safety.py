"""One reader (issue 11): every path that reads a checkpoint or a compressed directory goes
through io's rule (regular files only, checked before opening; inside their directory; each
shard once), and no reader trusts the manifest (sha256 of outputs and source, unique layers,
shapes). Library-level checks; the CLI cases are rows of tests/test_reliability.py."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file


from families import make_checkpoint
from helpers import rerecord_outputs

from collabcompress.files import manifest as mf
from collabcompress.files.output import write_manifest
from collabcompress.files.arch import detect
from collabcompress.commands.compress import CompressOptions, compress
from collabcompress.errors import BadInputError, UnsupportedArchitectureError
from collabcompress.files.checkpoint import open_checkpoint, read_json, regular_file
from collabcompress.commands.report import build_report
from collabcompress.commands.verify import verify



@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("read-safety")
    src = make_checkpoint("bert", root / "src")
    compress(src, root / "comp", CompressOptions(rank=5, max_iter=2), workers=1)
    return {"root": root, "src": src, "comp": root / "comp"}


@pytest.fixture
def comp(built, tmp_path) -> Path:
    """A private copy of the compressed directory, its source path pointing at the fixture's source."""
    shutil.copytree(built["comp"], tmp_path / "comp")
    return tmp_path / "comp"


def _sharded(src: Path, tmp_path: Path) -> Path:
    """A two-shard copy of ``src`` with its index."""
    out = tmp_path / "sharded"
    shutil.copytree(src, out)
    tensors = load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:]), 1):
        save_file({n: tensors[n] for n in part}, str(out / f"part{i}.safetensors"))
        weight_map.update({n: f"part{i}.safetensors" for n in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return out


def _point_first(directory: Path, shard: str) -> None:
    index = directory / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = shard
    index.write_text(json.dumps(data))


# ---------------------------------------------------------------------------- the reading rule

def test_fifo_is_refused_before_it_is_opened(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(BadInputError, match="not a regular file"):
        regular_file(fifo)  # opening a FIFO for reading would block until a writer comes
    with pytest.raises(BadInputError, match="not a regular file"):
        open_checkpoint(tmp_path)
    with pytest.raises(BadInputError, match="not a regular file"):
        read_json(fifo, "config")


@pytest.mark.parametrize("where", ["shard", "config", "output-weights"])
def test_a_fifo_never_blocks_a_reader(built, tmp_path, where):
    """A reader that opened the FIFO would hang there: the call runs under a watchdog thread."""
    from collabcompress.hf import from_pretrained

    if where == "shard":
        target = _sharded(built["src"], tmp_path)
        fifo = target / "fifo.safetensors"
        os.mkfifo(fifo)
        _point_first(target, "fifo.safetensors")
    else:  # a regular file of a model or a compressed directory replaced by a FIFO
        source, name = {"config": ("src", "config.json"), "output-weights": ("comp", "model.safetensors")}[where]
        target = tmp_path / source
        shutil.copytree(built[source], target)
        fifo = target / name
        fifo.unlink()
        os.mkfifo(fifo)
    load = from_pretrained if where == "output-weights" else open_checkpoint
    call = lambda: load(target)  # noqa: E731
    outcome = _without_blocking(call, fifo)
    assert isinstance(outcome, BadInputError) and "not a regular file" in str(outcome), repr(outcome)


def _without_blocking(call, fifo: Path, timeout: float = 60.0):
    """``call()``'s exception (or result) from a watchdog thread. A reader that opened the FIFO
    would block there: then a writer end is opened (which wakes the reader with an empty
    read) and the test fails, instead of hanging the suite."""
    import threading

    box: list = []

    def run() -> None:
        try:
            box.append(call())
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(10)
        pytest.fail(f"the reader opened the FIFO {fifo.name} and blocked")
    return box[0]


@pytest.mark.parametrize("shard, message", [
    ("../victim/x.safetensors", "outside"),
    ("/etc/passwd", "outside"),
    ("link.safetensors", "outside"),
    ("./part1.safetensors", "same shard"),
])
def test_hostile_shard_names(built, tmp_path, shard, message):
    victim = tmp_path / "victim"
    victim.mkdir()
    save_file({"x": torch.zeros(1)}, str(victim / "x.safetensors"))
    directory = _sharded(built["src"], tmp_path)
    (directory / "link.safetensors").symlink_to(victim / "x.safetensors")
    data = json.loads((directory / "model.safetensors.index.json").read_text())
    first = next(n for n, f in data["weight_map"].items() if f == "part2.safetensors")
    if shard.startswith("./"):  # the same shard as part1 under a second name
        data["weight_map"][first] = shard
    else:
        data["weight_map"][first] = shard if not shard.startswith("/") else str(victim / "x.safetensors")
    (directory / "model.safetensors.index.json").write_text(json.dumps(data))
    with pytest.raises(BadInputError, match=message):
        open_checkpoint(directory)


def test_symlink_inside_the_directory_is_read(built, tmp_path):
    directory = _sharded(built["src"], tmp_path)
    (directory / "sub").mkdir()
    (directory / "part2.safetensors").rename(directory / "sub" / "p2.safetensors")
    (directory / "part2.safetensors").symlink_to(Path("sub") / "p2.safetensors")
    ckpt = open_checkpoint(directory)
    assert len(ckpt.files) == 2 and ckpt.names()
    ckpt.close()


def test_valid_sharded_checkpoint_reads_like_the_single_file(built, tmp_path):
    single = open_checkpoint(built["src"])
    sharded = open_checkpoint(_sharded(built["src"], tmp_path))
    assert sorted(single.names()) == sorted(sharded.names())
    for name in single.names():
        assert torch.equal(single.load(name), sharded.load(name))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.ckpt"])
def test_a_pickle_is_never_loaded_and_the_message_says_so(built, tmp_path, name):
    directory = tmp_path / "pickled"
    shutil.copytree(built["src"], directory)
    (directory / "model.safetensors").rename(directory / name)
    with pytest.raises(BadInputError, match=rf"holds only {name} \(a pickle, which collabcompress never loads\); "
                                            "convert it to safetensors"):
        open_checkpoint(directory)
    with pytest.raises(BadInputError, match="a pickle, which collabcompress never loads"):
        open_checkpoint(directory / name)


def test_a_pickle_beside_safetensors_is_ignored(built, tmp_path):
    directory = tmp_path / "both"
    shutil.copytree(built["src"], directory)
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x04 never unpickled")
    ckpt = open_checkpoint(directory)
    assert [f.name for f in ckpt.files] == ["model.safetensors"]


def test_rotary_decoder_without_config_is_llama_never_bart(tmp_path):
    d = 32
    names = [f"model.layers.{i}.{m}.weight" for i in range(2) for m in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")]
    save_file({n: torch.randn(d) if "norm" in n else torch.randn(d, d) for n in names},
              str(tmp_path / "model.safetensors"))
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.config is None
    specs = detect(ckpt, heads=4)  # a LLaMA-style rotary decoder, never taken for BART
    assert {s.family for s in specs} == {"llama"} and all(s.rotary for s in specs)
    with pytest.raises(UnsupportedArchitectureError, match="rotary"):
        detect(ckpt, heads=4, arch="bart")


_BART_STYLE = {  # layer prefix, sibling tensors of the real models (no config.json)
    "marian": ("model.encoder.layers.{i}", ("self_attn_layer_norm", "fc1", "fc2", "final_layer_norm")),
    "whisper": ("model.decoder.layers.{i}", ("self_attn_layer_norm", "fc1", "fc2", "final_layer_norm")),
    "clip": ("text_model.encoder.layers.{i}", ("layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2")),
}


@pytest.mark.parametrize("family", sorted(_BART_STYLE))
def test_bart_style_names_without_config_are_still_bart(tmp_path, family):
    prefix, siblings = _BART_STYLE[family]
    d, tensors = 32, {}
    for i in range(2):
        layer = prefix.format(i=i)
        for m in ("q_proj", "k_proj", "v_proj", "out_proj"):
            tensors[f"{layer}.self_attn.{m}.weight"] = torch.randn(d, d)
            tensors[f"{layer}.self_attn.{m}.bias"] = torch.randn(d)
        for m in siblings:
            tensors[f"{layer}.{m}.weight"] = torch.randn(d) if "norm" in m else torch.randn(d, d)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    specs = detect(open_checkpoint(tmp_path), heads=4)
    assert len(specs) == 2 and {s.family for s in specs} == {"bart"}


def test_bart_fixture_without_config_is_still_bart(tmp_path):
    src = make_checkpoint("bart", tmp_path / "bart", with_config=False)
    specs = detect(open_checkpoint(src), heads=4)
    assert specs and {s.family for s in specs} == {"bart"}


# ---------------------------------------------------------------------------- trusting nothing in a manifest

def test_the_built_directory_passes_every_reader(built):
    """The checks accept what compress wrote: a reader that refused every file would fail here."""
    manifest, out = mf.open_output(built["comp"])
    assert manifest.layers and out.names()
    out.close()
    assert verify(built["comp"])["layers"]
    assert build_report(built["comp"]).source_used


def test_changed_output_file_is_refused(comp):
    raw = bytearray((comp / "model.safetensors").read_bytes())
    raw[-1] ^= 1
    (comp / "model.safetensors").write_bytes(bytes(raw))
    for reader in (verify, build_report, mf.open_output):
        with pytest.raises(BadInputError, match="model.safetensors is not the file compress wrote"):
            reader(comp)


def test_changed_output_file_is_refused_by_hf(comp):
    pytest.importorskip("transformers")
    from collabcompress.hf import from_pretrained

    raw = bytearray((comp / "model.safetensors").read_bytes())
    raw[-1] ^= 1
    (comp / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(BadInputError, match="model.safetensors is not the file compress wrote"):
        from_pretrained(comp)


def test_hf_reads_shards_through_io(built, tmp_path):
    """A hostile index in a compressed directory: hf refuses it like verify does (no load_file)."""
    pytest.importorskip("transformers")
    from collabcompress.hf import from_pretrained

    directory = _sharded(built["comp"], tmp_path)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        **json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"],
        "encoder.layer.0.attention.self.collab_key.weight": "../comp/model.safetensors"}}))
    m = mf.read(directory)
    records = [mf.FileRecord(**r) for r in _records(directory)]
    write_manifest(directory, dataclasses.replace(m, outputs=tuple(records)))
    with pytest.raises(BadInputError, match="outside"):
        from_pretrained(directory)
    with pytest.raises(BadInputError, match="outside"):
        verify(directory)


def _records(directory: Path) -> list[dict]:
    from collabcompress.files.output import file_record

    return [file_record(p, directory) for p in sorted(directory.iterdir())
            if p.is_file() and p.name != mf.MANIFEST_NAME]


def test_hf_loads_a_valid_sharded_output(built, tmp_path):
    pytest.importorskip("transformers")
    from collabcompress.hf import from_pretrained

    directory = _sharded(built["comp"], tmp_path)
    m = mf.read(directory)
    write_manifest(directory, dataclasses.replace(m, outputs=tuple(mf.FileRecord(**r) for r in _records(directory))))
    model = from_pretrained(directory)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("architectures", [["os.system"], ["AutoConfig"], ["NotAClass"], [3], "BertModel"])
def test_architectures_that_are_not_model_classes(comp, architectures):
    transformers = pytest.importorskip("transformers")
    from collabcompress.hf import from_pretrained

    config = json.loads((comp / "config.json").read_text())
    config["architectures"] = architectures
    (comp / "config.json").write_text(json.dumps(config))
    rerecord_outputs(comp)
    try:
        model = from_pretrained(comp)
    except BadInputError:
        return  # refused cleanly (exit 3)
    assert isinstance(model, transformers.PreTrainedModel)


def test_model_class_by_name_must_be_a_model_class(built):
    pytest.importorskip("transformers")
    from collabcompress.hf import from_pretrained

    with pytest.raises(BadInputError, match="not a transformers model class"):
        from_pretrained(built["comp"], model_class="AutoConfig")


def test_source_with_no_files_recorded_is_refused(comp, built):
    m = mf.read(comp)
    write_manifest(comp, dataclasses.replace(m, source=dataclasses.replace(m.source, files=())))
    with pytest.raises(BadInputError, match="records no weight file"):
        verify(comp, max_kl=1.0)
    assert not build_report(comp).source_used  # report falls back to the manifest, and says why


def test_another_original_is_refused_naming_the_file(comp, built, tmp_path):
    other = make_checkpoint("bert", tmp_path / "other", seed=7)
    with pytest.raises(BadInputError, match=r"model.safetensors differs"):
        verify(comp, original=other)
    m = mf.read(comp)
    write_manifest(comp, dataclasses.replace(m, source=dataclasses.replace(m.source, path=str(other))))
    with pytest.raises(BadInputError, match=r"model.safetensors differs"):
        verify(comp)


def test_the_recorded_original_moved_elsewhere_is_accepted(comp, built, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(built["src"], moved)
    assert verify(comp, original=moved)["layers"]


def test_layer_listed_twice_is_refused(comp):
    data = json.loads((comp / mf.MANIFEST_NAME).read_text())
    data["layers"].append(data["layers"][0])
    (comp / mf.MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(BadInputError, match="listed twice"):
        verify(comp)


def test_shape_in_manifest_differs_from_tensors(comp):
    m = mf.read(comp)
    layer = dataclasses.replace(m.layers[0], shared_dim=m.layers[0].shared_dim + 1)
    write_manifest(comp, dataclasses.replace(m, layers=(layer, *m.layers[1:])))
    for reader in (verify, build_report, mf.open_output):
        with pytest.raises(BadInputError, match="do not match the manifest"):
            reader(comp)


def test_output_not_recorded_is_refused(comp):
    m = mf.read(comp)
    write_manifest(comp, dataclasses.replace(m, outputs=tuple(o for o in m.outputs if o.name != "config.json")))
    with pytest.raises(BadInputError, match="config.json is not among the outputs"):
        verify(comp)
