"""The tiny family checkpoints of tests/families.py are realistic and load back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open


from families import FAMILIES, REFUSED, REFUSED_FACTS, family_names, make_checkpoint, qk_tensors

ALL = family_names()
LOADABLE = [n for n in ALL if n not in FAMILIES or FAMILIES[n]["model_class"] is not None]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Every checkpoint, built once for the module (building is the slow part)."""
    root = tmp_path_factory.mktemp("families")
    return {name: make_checkpoint(name, root / name) for name in ALL}


from helpers import stored_shapes as _shapes, stored_tensor as _tensor  # noqa: E402


def test_keys_partition():
    assert set(FAMILIES) == {"bert", "roberta", "mpnet", "distilbert", "albert", "vit", "gpt2", "t5", "bart",
                             "timm-vit"}
    assert REFUSED == {"qk-norm": "norm"}
    assert not set(FAMILIES) & set(REFUSED)
    for facts in FAMILIES.values():
        for key in ("arch", "n_modules", "n_head", "head_dim", "d_model", "first_module", "model_class"):
            assert key in facts
        assert facts["arch"] in {"bert", "mpnet", "distilbert", "albert", "vit", "gpt2", "timm-vit", "t5", "bart"}
        assert facts["n_modules"] == len(facts["modules"])
        assert facts["first_module"] == facts["modules"][0]["module"]


@pytest.mark.parametrize("name", ALL)
def test_files_and_tensors(built, name):
    d = built[name]
    assert (d / "model.safetensors").is_file()
    assert (d / "config.json").is_file()
    assert (d / "model.safetensors").stat().st_size < 200_000
    config = json.loads((d / "config.json").read_text())
    shapes = _shapes(d)
    expected = qk_tensors(name)
    for tensor, shape in expected.items():
        assert tensor in shapes, f"{name}: missing {tensor}"
        assert shapes[tensor] == tuple(shape), f"{name}: {tensor} is {shapes[tensor]}, expected {shape}"
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        assert f.metadata().get("format") == "pt"
    if name in FAMILIES:
        facts = FAMILIES[name]
        # the query tensor owner of every module, and no further query tensors than expected
        for m in facts["modules"]:
            assert m["query"].startswith(m["module"] + ".")
            rows, cols = shapes[m["query"]]
            width = {"conv1d": cols // 3, "linear": rows // 3, None: rows}[facts["fused"]]
            assert m["heads"] * m["head_dim"] == width
            assert (cols if facts["fused"] != "conv1d" else rows) == facts["d_model"]
        suffix = facts["modules"][0]["query"][len(facts["modules"][0]["module"]):]
        assert sum(k.endswith(suffix) for k in shapes) == facts["n_modules"]
        # head counts are readable from config.json
        heads = [config.get(k, (config.get("model_args") or {}).get(k)) for k in facts["heads_config"]]
        assert heads[0] == facts["n_head"]
        assert set(heads) == {m["heads"] for m in facts["modules"]}
        # no bias is all zero (the fixture perturbs them so the content bias is exercised)
        for tensor in expected:
            if tensor.endswith(".bias"):
                assert _tensor(d, tensor).abs().max() > 0


def test_family_details(built):
    t5 = json.loads((built["t5"] / "config.json").read_text())
    assert t5["num_heads"] * t5["d_kv"] != t5["d_model"]
    assert not any(k.endswith(".bias") for k in _shapes(built["t5"]) if ".SelfAttention." in k or "EncDec" in k)
    bart = json.loads((built["bart"] / "config.json").read_text())
    assert bart["encoder_attention_heads"] != bart["decoder_attention_heads"]
    gpt2 = _shapes(built["gpt2"])["h.0.attn.c_attn.weight"]
    assert gpt2 == (FAMILIES["gpt2"]["d_model"], 3 * FAMILIES["gpt2"]["d_model"])  # Conv1D (in, 3*out)
    timm = json.loads((built["timm-vit"] / "config.json").read_text())
    assert timm["num_heads"] == FAMILIES["timm-vit"]["n_head"]
    assert {"patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.norm1.weight",
            "blocks.1.attn.proj.bias"} <= set(_shapes(built["timm-vit"]))


def test_refused_are_realistic(built):
    names = _shapes(built["qk-norm"])
    assert any(".q_norm." in k for k in names) and any(".k_norm." in k for k in names)


def test_deterministic(tmp_path):
    a = make_checkpoint("bert", tmp_path / "a", seed=3)
    b = make_checkpoint("bert", tmp_path / "b", seed=3)
    c = make_checkpoint("bert", tmp_path / "c", seed=4)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    t1 = make_checkpoint("timm-vit", tmp_path / "t1", seed=1)
    t2 = make_checkpoint("timm-vit", tmp_path / "t2", seed=1)
    assert (t1 / "model.safetensors").read_bytes() == (t2 / "model.safetensors").read_bytes()


def test_without_config(tmp_path):
    d = make_checkpoint("timm-vit", tmp_path / "x", with_config=False)
    assert (d / "model.safetensors").is_file() and not (d / "config.json").exists()
    with pytest.raises(KeyError):
        make_checkpoint("no-such-family", tmp_path / "y")


@pytest.mark.parametrize("name", LOADABLE)
def test_loads_back_into_transformers(built, name, tmp_path):
    transformers = pytest.importorskip("transformers")
    d = built[name]
    expected_class = FAMILIES[name]["model_class"] if name in FAMILIES else REFUSED_FACTS[name]["model_class"]
    model, info = transformers.AutoModel.from_pretrained(str(d), output_loading_info=True)
    assert type(model).__name__ == expected_class
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info.get("mismatched_keys"), info.get("mismatched_keys")
    # the loaded weights are the saved ones: a save round trip gives them back under the same
    # names (in-memory names may differ: transformers 5 renames ViT's to layers.{i}.attention.q_proj)
    again = tmp_path / "again"
    model.save_pretrained(str(again), safe_serialization=True)
    assert _shapes(again) == _shapes(d)
    for tensor in qk_tensors(name):
        assert torch.equal(_tensor(again, tensor), _tensor(d, tensor)), tensor


def test_in_memory_module_names(built):
    transformers = pytest.importorskip("transformers")
    for name in ("vit", "bert", "gpt2"):
        model = transformers.AutoModel.from_pretrained(str(built[name]))
        modules = dict(model.named_modules())
        assert FAMILIES[name]["in_memory_first_module"] in modules, name
