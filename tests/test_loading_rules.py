"""Every weight a model defines is loaded from the file or derived by a documented tie, or the
command refuses naming it; the class follows ``architectures``, else the weights; tokenizer and
config files obey the one reading rule; the Python API's arguments fail as bad input.

Checked on the tiny tied LLaMA decoder of tests/families.py, in the layouts real checkpoints
come in: the tied matrix stored as ``model.embed_tokens.weight`` (save_pretrained) or only as
``lm_head.weight`` (safetensors' ``save_model``), with and without ``architectures``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from families import ROTARY_HEAD_DIM, ROTARY_KV_HEADS
from helpers import assert_clean_failure, digest, rerecord_outputs

pytest.importorskip("transformers")

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
TEXT = "\n".join(f"the quick brown fox {i} jumps over the lazy dog {i % 7}" for i in range(40))


def _rewrite(src: Path, dst: Path, *, tensors=None, config=None) -> Path:
    """A copy of ``src`` whose weights ``tensors(dict)`` and config ``config(dict)`` edited."""
    shutil.copytree(src, dst)
    if tensors is not None:
        t = load_file(dst / "model.safetensors")
        tensors(t)
        save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        c = json.loads((dst / "config.json").read_text())
        config(c)
        (dst / "config.json").write_text(json.dumps(c))
    return dst


def _head_only(t: dict) -> None:  # what safetensors.torch.save_model keeps of a tied pair
    t[HEAD] = t.pop(EMBED)


def _no_architectures(c: dict) -> None:
    c.pop("architectures", None)


@pytest.fixture(scope="module")
def llama(rotary_checkpoints) -> Path:
    return rotary_checkpoints["llama"]


@pytest.fixture(scope="module")
def layouts(llama, tmp_path_factory) -> dict[str, Path]:
    """The tied llama in every layout: name -> directory (shared, never modified)."""
    root = tmp_path_factory.mktemp("layouts")
    return {
        "embed": llama,
        "head": _rewrite(llama, root / "head", tensors=_head_only),
        "embed-noarch": _rewrite(llama, root / "embed-noarch", config=_no_architectures),
        "head-noarch": _rewrite(llama, root / "head-noarch", tensors=_head_only, config=_no_architectures),
    }


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("layout", ["head", "embed-noarch", "head-noarch"])
def test_every_layout_loads_the_same_model(layouts, layout):
    from collabcompress import hf

    reference, model = hf.load_model(layouts["embed"]), hf.load_model(layouts[layout])
    assert type(model).__name__ == "LlamaForCausalLM"  # a head present or tied: never the bare LlamaModel
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.arange(1, 17)[None]
    assert torch.equal(_logits(reference, ids), _logits(model, ids))


def _calibrate(cli, model: Path, out: Path, texts: Path):
    return cli("calibrate", model, "--texts", texts, "--out", out, "--max-tokens", "300", "--max-length", "32")


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("texts") / "texts.txt"
    path.write_text(TEXT)
    return path


def test_calibrate_reads_the_tied_head_as_the_embedding(cli, layouts, texts, tmp_path):
    """The statistics of the lm_head-only layout are those of the original layout (they were made
    with the embedding at its random initialisation, exit 0)."""
    stats = {}
    for layout in ("embed", "head-noarch"):
        result = _calibrate(cli, layouts[layout], tmp_path / f"{layout}.safetensors", texts)
        assert result.exit_code == 0, result.stderr
        stats[layout] = load_file(tmp_path / f"{layout}.safetensors")
    assert stats["embed"].keys() == stats["head-noarch"].keys()
    for name, t in stats["embed"].items():
        assert torch.equal(t, stats["head-noarch"][name]), name


@pytest.mark.parametrize("layout", ["head", "head-noarch", "embed-noarch"])
def test_compressed_tied_layouts_load_and_evaluate(cli, layouts, layout, tmp_path):
    """compress keeps the file's names; hf and evaluate accept the tie under either name."""
    from collabcompress import hf

    out = tmp_path / "out"
    assert cli("compress", layouts[layout], "--out", out, "--rank", "16").exit_code == 0
    model = hf.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    result = cli("evaluate", layouts[layout], out, "--texts", _lines(tmp_path), "--max-tokens", "64",
                 "--window", "32", "--prompts", "1", "--new-tokens", "4", "--json", "-")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["perplexity"]["original"] > 0


@pytest.mark.parametrize("layout", ["head", "head-noarch", "embed-noarch"])
def test_tied_layouts_export_the_original_at_full_width(cli, layouts, layout, tmp_path):
    """export takes the tie under either name and writes a model plain transformers loads, tied,
    with the original's logits."""
    import transformers

    from collabcompress import hf

    out, exported = tmp_path / "out", tmp_path / "export"
    width = json.loads((layouts[layout] / "config.json").read_text())["hidden_size"] // 2  # G*d of the fixture
    result = cli("compress", layouts[layout], "--out", out, "--stock", "--rank", width, "--force-data-free")
    assert result.exit_code == 0, result.stderr
    assert (result := cli("export", out, "--out", exported)).exit_code == 0, result.stderr
    model = transformers.AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.arange(1, 17)[None]
    assert torch.allclose(_logits(model, ids), _logits(hf.load_model(layouts["embed"]), ids), atol=1e-5)


def _lines(tmp_path: Path) -> Path:
    path = tmp_path / "eval.txt"
    path.write_text(TEXT)
    return path


@pytest.mark.parametrize("command", ["calibrate", "evaluate"])
def test_a_missing_weight_is_named_not_initialised(cli, llama, texts, tmp_path, command):
    """A norm weight absent from the file was silently initialised (to ones) by transformers."""
    broken = _rewrite(llama, tmp_path / "broken", tensors=lambda t: t.pop("model.norm.weight"))
    before = digest(broken)
    if command == "calibrate":
        result = _calibrate(cli, broken, tmp_path / "stats.safetensors", texts)
    else:
        out = tmp_path / "out"
        assert cli("compress", llama, "--out", out, "--rank", "16").exit_code == 0
        result = cli("evaluate", broken, out, "--texts", texts, "--max-tokens", "64", "--window", "32")
    assert_clean_failure(result, 3, "model.norm.weight", "missing")
    assert digest(broken) == before
    assert not (tmp_path / "stats.safetensors").exists()


def test_weights_no_class_takes_are_refused(cli, llama, texts, tmp_path):
    """A task head no candidate class holds (a classifier's score.weight) is named, not dropped."""
    odd = _rewrite(llama, tmp_path / "odd", tensors=lambda t: t.update({"score.weight": torch.zeros(3, 32)}),
                   config=_no_architectures)
    result = _calibrate(cli, odd, tmp_path / "stats.safetensors", texts)
    assert_clean_failure(result, 3, "score.weight", "does not take")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), architectures=st.booleans(), head_only=st.booleans())
def test_property_every_weight_loaded_or_named(layouts, tmp_path_factory, data, architectures, head_only):
    """Remove any non-empty set of tensors: the loader refuses naming one of them; otherwise the
    model equals the file (the tie read under either name)."""
    from collabcompress import hf
    from collabcompress.errors import BadInputError

    base = layouts[("head" if head_only else "embed") + ("" if architectures else "-noarch")]
    names = sorted(load_file(base / "model.safetensors"))
    removed = data.draw(st.sets(st.sampled_from(names), min_size=1, max_size=4))
    broken = _rewrite(base, tmp_path_factory.mktemp("prop") / "m",
                      tensors=lambda t: [t.pop(n) for n in removed])
    with pytest.raises(BadInputError) as info:
        hf.load_model(broken)
    message = str(info.value)
    assert any(n.split(".")[-2] in message or n in message for n in removed) or "missing" in message, message


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
@pytest.mark.parametrize("command", ["calibrate", "evaluate"])
def test_tokenizer_file_linking_outside_is_not_read(cli, llama, texts, tmp_path, name, command):
    outside = tmp_path / "secret"
    outside.mkdir()
    shutil.copy(llama / name, outside / name)
    linked = _rewrite(llama, tmp_path / "linked")
    (linked / name).unlink()
    (linked / name).symlink_to(outside / name)
    if command == "calibrate":
        result = _calibrate(cli, linked, tmp_path / "stats.safetensors", texts)
    else:
        out = tmp_path / "out"
        assert cli("compress", llama, "--out", out, "--rank", "16").exit_code == 0
        result = cli("evaluate", linked, out, "--texts", texts, "--max-tokens", "64", "--window", "32")
    assert_clean_failure(result, 3, name, "outside")


def test_tokenizer_link_inside_is_followed(cli, llama, texts, tmp_path):
    linked = _rewrite(llama, tmp_path / "linked")
    (linked / "tokenizer.json").rename(linked / "real-tokenizer.json")
    (linked / "tokenizer.json").symlink_to("real-tokenizer.json")
    assert _calibrate(cli, linked, tmp_path / "stats.safetensors", texts).exit_code == 0


@pytest.fixture(scope="module")
def compressed(llama, tmp_path_factory) -> Path:
    from collabcompress.commands.compress import CompressOptions, compress

    out = tmp_path_factory.mktemp("compressed") / "out"
    compress(llama, out, CompressOptions(rank=16))
    return out


@pytest.mark.parametrize("kwargs, needle", [
    ({"model_class": "BertModel"}, "model_type 'llama'"),
    ({"model_class": "GPT2LMHeadModel"}, "model_type 'llama'"),
    ({"dtype": "int8"}, "dtype"),
    ({"dtype": torch.int64}, "dtype"),
    ({"dtype": 3}, "dtype"),
    ({"device": "gpu"}, "device"),
    ({"device": "meta"}, "meta"),
    ({"device": "cuda:7"}, "cuda"),
    ({"device": 3.5}, "device"),
])
@pytest.mark.parametrize("loader", ["from_pretrained", "load_model"])
def test_python_api_arguments_are_bad_input(compressed, llama, kwargs, needle, loader):
    from collabcompress import hf
    from collabcompress.errors import BadInputError

    with pytest.raises(BadInputError, match=needle):
        getattr(hf, loader)(compressed if loader == "from_pretrained" else llama, **kwargs)


@pytest.mark.parametrize("model_type, architectures", [("bert", ["BertModel"]), ("gpt2", None), ("qwen3", None),
                                                       ("gemma2", None), ("mistral", ["MistralForCausalLM"])])
def test_output_config_edited_to_another_family(cli, llama, compressed, tmp_path, model_type, architectures):
    """config.json changed to another family (and the manifest's hashes re-recorded to match)."""
    out = Path(shutil.copytree(compressed, tmp_path / "out"))
    config = json.loads((out / "config.json").read_text())
    config["model_type"] = model_type
    if architectures is None:
        config.pop("architectures")
    else:
        config["architectures"] = architectures
    (out / "config.json").write_text(json.dumps(config))
    rerecord_outputs(out)
    before = digest(out)
    result = cli("evaluate", llama, out, "--max-tokens", "64",
                 "--window", "32", "--texts", _lines(tmp_path))
    assert_clean_failure(result, 3)
    assert digest(out) == before
