"""The tiny rotary decoders of tests/families.py are realistic, load back and differ as intended."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


from families import (
    ROTARY, ROTARY_REFUSED, ROTARY_REFUSED_FACTS, ROTARY_VOCAB, TOKENIZER_CHARS, make_rotary_checkpoint,
    rotary_facts, rotary_names, rotary_tensors,
)

transformers = pytest.importorskip("transformers")


from helpers import stored_shapes as _shapes, stored_tensor as _tensor  # noqa: E402


def _load(directory: Path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(directory), output_loading_info=True)
    return model.eval(), info


def test_registry():
    assert set(ROTARY) == {"llama", "llama-mha", "llama-rope-linear", "llama-rope-llama3", "llama-rope-yarn",
                           "mistral", "qwen2"}
    assert ROTARY_REFUSED == {"qwen3": "norm", "stablelm-partial": "partial", "cohere-interleaved": "interleaved"}
    assert set(ROTARY_REFUSED) == set(ROTARY_REFUSED_FACTS) and not set(ROTARY) & set(ROTARY_REFUSED)
    assert rotary_names() == [*ROTARY, *ROTARY_REFUSED]
    for name in rotary_names():
        f = rotary_facts(name)
        assert f["n_head"] % f["kv_heads"] == 0 and f["head_dim"] % 2 == 0
    assert ROTARY["llama-mha"]["kv_heads"] == ROTARY["llama-mha"]["n_head"]
    assert ROTARY["llama"]["kv_heads"] < ROTARY["llama"]["n_head"]
    with pytest.raises(KeyError, match="unknown rotary fixture"):
        make_rotary_checkpoint("bert", Path("/nonexistent"))


@pytest.mark.parametrize("name", rotary_names())
def test_files_config_and_tensors(rotary_checkpoints, name):
    d, f = rotary_checkpoints[name], rotary_facts(name)
    for file in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (d / file).is_file(), file
    assert (d / "model.safetensors").stat().st_size < 200_000
    config = json.loads((d / "config.json").read_text())
    assert config["model_type"] == f["model_type"]
    assert config["architectures"] == [f["model_class"]]
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"],
            config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (
        f["n_head"], f["kv_heads"], f["head_dim"], f["d_model"], f["n_layers"], ROTARY_VOCAB)
    for key, value in f["rope_parameters"].items():  # transformers 5 keeps every rope setting here
        assert config["rope_parameters"][key] == value, key
    shapes = _shapes(d)
    for tensor, shape in rotary_tensors(name).items():
        assert shapes.get(tensor) == shape, f"{tensor}: {shapes.get(tensor)} != {shape}"
        if tensor.endswith(".bias"):
            assert _tensor(d, tensor).abs().max() > 0.05  # seeded noise, not transformers' zeros
    biases = {k for k in shapes if ".self_attn." in k and k.endswith(".bias")}
    assert bool(biases) == f["bias"]
    assert ("lm_head.weight" in shapes) != f["tied"]  # a tied head is saved once, as the embedding


@pytest.mark.parametrize("name", rotary_names())
def test_loads_back(rotary_checkpoints, name):
    model, info = _load(rotary_checkpoints[name])
    assert type(model).__name__ == rotary_facts(name)["model_class"]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys")
    modules = dict(model.named_modules())
    assert {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj"} <= set(modules)


def test_refused_reasons_are_real(rotary_checkpoints):
    assert any(".q_norm." in k for k in _shapes(rotary_checkpoints["qwen3"]))
    partial = json.loads((rotary_checkpoints["stablelm-partial"] / "config.json").read_text())
    # transformers 5.2x writes the factor only inside rope_parameters; 5.1x also a top-level default
    assert partial["rope_parameters"]["partial_rotary_factor"] == 0.5
    stablelm, _ = _load(rotary_checkpoints["stablelm-partial"])
    assert stablelm.model.rotary_emb.inv_freq.numel() == ROTARY_REFUSED_FACTS["stablelm-partial"]["head_dim"] // 4
    # Cohere rotates interleaved pairs (2i, 2i+1): same names as llama, only model_type tells
    cohere = json.loads((rotary_checkpoints["cohere-interleaved"] / "config.json").read_text())
    assert cohere["model_type"] == "cohere"
    assert {k.replace("model.", "") for k in _shapes(rotary_checkpoints["cohere-interleaved"]) if "self_attn" in k} \
        == {k.replace("model.", "") for k in _shapes(rotary_checkpoints["llama"]) if "self_attn" in k}
    from transformers.models.cohere import modeling_cohere

    x = torch.arange(4.0)
    assert torch.equal(modeling_cohere.rotate_half(x), torch.tensor([-1.0, 0.0, -3.0, 2.0]))


def test_rope_types_give_different_frequencies(rotary_checkpoints):
    freqs, scaling = {}, {}
    for name in ("llama", "llama-rope-linear", "llama-rope-llama3", "llama-rope-yarn"):
        rot = _load(rotary_checkpoints[name])[0].model.rotary_emb
        freqs[name], scaling[name] = rot.inv_freq.clone(), float(rot.attention_scaling)
    assert torch.allclose(freqs["llama-rope-linear"], freqs["llama"] / 2)
    assert not torch.allclose(freqs["llama-rope-llama3"], freqs["llama"])
    assert not torch.allclose(freqs["llama-rope-llama3"], freqs["llama"] / 8)  # per-frequency, not one factor
    assert scaling["llama"] == 1.0 and scaling["llama-rope-yarn"] > 1.05  # yarn scales cos and sin


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_rotation_matters(rotary_checkpoints, name):
    """Attention is far from uniform, so a wrong rotation changes the logits visibly."""
    model, _ = _load(rotary_checkpoints[name])
    ids = torch.randint(3, ROTARY_VOCAB, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        model.model.rotary_emb.inv_freq.mul_(1.5)
        after = model(input_ids=ids).logits
    assert (before - after).abs().max() > 0.1


def test_same_seed_same_bytes(tmp_path, rotary_checkpoints):
    a = make_rotary_checkpoint("qwen2", tmp_path / "a", tokenizer=False)
    b = make_rotary_checkpoint("qwen2", tmp_path / "b", seed=1, tokenizer=False)
    assert not (a / "tokenizer.json").exists()
    assert (a / "model.safetensors").read_bytes() == (rotary_checkpoints["qwen2"] / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()


def test_without_config(rotary_checkpoints):
    bare, full = rotary_checkpoints["llama-noconfig"], rotary_checkpoints["llama"]
    assert not (bare / "config.json").exists() and not (bare / "generation_config.json").exists()
    assert (bare / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()


def test_character_tokenizer(rotary_checkpoints):
    tok = transformers.AutoTokenizer.from_pretrained(str(rotary_checkpoints["llama"]))
    assert len(tok) == ROTARY_VOCAB
    text = "The cat, 42 (sat)!\nNext line."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and max(ids) < ROTARY_VOCAB and 0 not in ids
    assert tok.decode(ids) == text.lower()
    assert tok("é", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]
    assert set(TOKENIZER_CHARS) <= set(tok.get_vocab())
