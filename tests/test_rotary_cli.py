"""Rotary decoders through the tool (issue 13): detection, refusals, analyze, compress, verify, report.

Tiny random LLaMA, Mistral and Qwen2 (q/k/v biases) checkpoints saved with transformers
(4 heads, 2 key/value heads, head_dim 8, D = 32, 2 layers), one multi-head LLaMA (G = H), and
refused ones (Qwen3's q_norm/k_norm, partial rotary, an interleaved pair layout). Full rank
(R = G*d) must give the original logits through hf.from_pretrained; below it, verify sees a
KL above zero; report's key cache and parameters equal the hand-computed figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from collabcompress.files.arch import detect  # noqa: E402
from collabcompress.files.checkpoint import open_checkpoint  # noqa: E402

D, HEADS, KV, HEAD_DIM, LAYERS, VOCAB = 32, 4, 2, 8, 2, 64
GD = KV * HEAD_DIM  # 16: the original key cache per token and layer
VARIANTS = {  # name -> (causal LM class, config class, extra config)
    "llama": ("LlamaForCausalLM", "LlamaConfig", {"num_key_value_heads": KV}),
    "llama-mha": ("LlamaForCausalLM", "LlamaConfig", {"num_key_value_heads": HEADS}),
    "mistral": ("MistralForCausalLM", "MistralConfig", {"num_key_value_heads": KV}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {"num_key_value_heads": KV}),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {"num_key_value_heads": KV}),
}


def _build(name: str, directory: Path, **config_edits) -> Path:
    model_cls, config_cls, extra = VARIANTS[name]
    config = getattr(transformers, config_cls)(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, head_dim=HEAD_DIM, max_position_embeddings=64, tie_word_embeddings=False, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():  # peaked attention, so that score errors show in the logits
        for pname, p in model.named_parameters():
            if "norm" not in pname:
                gain = 2.0 if ("q_proj" in pname or "k_proj" in pname) else 1.0
                p.normal_(0.0, 1.0 if "embed" in pname else (gain / p.shape[-1] ** 0.5 if p.dim() == 2 else 0.5))
    model.save_pretrained(directory)
    if config_edits:
        cfg = json.loads((directory / "config.json").read_text())
        cfg.update(config_edits)
        (directory / "config.json").write_text(json.dumps(cfg))
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> directory of a tiny saved checkpoint, built once per module."""
    root = tmp_path_factory.mktemp("rotary")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    built = {name: _build(name, root / name) for name in VARIANTS}
    built["partial"] = _build("llama", root / "partial", partial_rotary_factor=0.5)
    built["interleaved"] = _build("llama", root / "interleaved", rope_interleave=True)
    yield built
    transformers.logging.set_verbosity(verbosity)


def _without_config(src: Path, directory: Path) -> Path:
    directory.mkdir()
    save_file(load_file(str(src / "model.safetensors")), str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids()).logits


# --------------------------------------------------------------------------- detection and refusals

@pytest.mark.parametrize("name, family, kv", [("llama", "llama", KV), ("mistral", "mistral", KV),
                                              ("qwen2", "qwen2", KV), ("llama-mha", "llama", HEADS)])
def test_detected_from_config(tiny, name, family, kv):
    specs = detect(open_checkpoint(tiny[name]))
    assert [s.module for s in specs] == [f"model.layers.{i}.self_attn" for i in range(LAYERS)]
    s = specs[0]
    assert (s.family, s.rotary, s.n_head, s.n_kv_head, s.head_dim, s.d_model) == (family, True, HEADS, kv, HEAD_DIM, D)
    assert (s.key_bias is not None) == (name == "qwen2")


def test_detected_without_config_never_as_bart(tiny, tmp_path, cli):
    bare = _without_config(tiny["llama"], tmp_path / "bare")
    result = cli("analyze", bare, "--json", "-")
    assert result.exit_code == 3
    assert "--heads" in result.stderr and "--kv-heads" in result.stderr
    specs = detect(open_checkpoint(bare), heads=HEADS)
    assert specs[0].family == "llama" and specs[0].n_kv_head == KV and specs[0].rotary
    assert detect(open_checkpoint(bare), heads=HEADS, kv_heads=KV)[0].n_kv_head == KV
    result = cli("analyze", bare, "--heads", HEADS, "--kv-heads", 1)
    assert result.exit_code == 3 and "--kv-heads 2" in result.stderr
    result = cli("analyze", bare, "--heads", HEADS, "--arch", "bart")
    assert result.exit_code == 4 and "rotary" in result.stderr


@pytest.mark.parametrize("name, reason", [("qwen3", "q_norm/k_norm"), ("partial", "partial_rotary_factor"),
                                          ("interleaved", "interleaved")])
def test_refusals_name_the_reason(tiny, cli, name, reason, tmp_path):
    for args in (["analyze", tiny[name]], ["compress", tiny[name], "--out", tmp_path / "out", "--rank", 8]):
        result = cli(*args)
        assert result.exit_code == 4, result.stderr
        assert result.stderr.startswith("error: ") and reason in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_other_rotary_model_types_are_refused(tiny, tmp_path, cli):
    src = _without_config(tiny["llama"], tmp_path / "phi3")
    (src / "config.json").write_text(json.dumps({"model_type": "phi3", "num_attention_heads": HEADS}))
    result = cli("analyze", src)
    assert result.exit_code == 4 and "rotary" in result.stderr


# --------------------------------------------------------------------------- analyze

def test_analyze_json(tiny, cli):
    result = cli("analyze", tiny["qwen2"], "--json", "-", "--energy", "0.9", "--energy", "1.0")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["architecture"] == "qwen2"
    for layer in data["layers"]:
        assert (layer["heads"], layer["kv_heads"], layer["head_dim"], layer["rotary"]) == (HEADS, KV, HEAD_DIM, True)
        energy = torch.tensor(layer["frequency_energy"])
        assert energy.shape == (HEAD_DIM // 2, KV) and abs(float(energy.sum()) - 1) < 1e-6
        assert len(layer["energy_key"]) == GD // 2 and layer["energy_key"][-1] == pytest.approx(1.0)
        assert layer["rank_at"]["1"] == GD and layer["rank_at"]["0.9"] % 2 == 0
        assert layer["rank_at"]["0.9"] < GD
        assert layer["redundancy"]["0.9"] == pytest.approx(1 - layer["rank_at"]["0.9"] / GD, abs=1e-6)
        assert all(r % 2 == 0 and r <= HEAD_DIM for r in layer["head_effective_rank"]["0.9"])
    table = cli("analyze", tiny["qwen2"])
    assert table.exit_code == 0 and "key cache" in table.stdout and "G*d" in table.stdout


# --------------------------------------------------------------------------- compress

def _tensors(directory: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_tensor(k).dtype) for k in f.keys()}


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "llama-mha"])
def test_full_rank_is_the_original_through_from_pretrained(tiny, tmp_path, cli, name):
    from collabcompress.hf import from_pretrained

    kv = HEADS if name == "llama-mha" else KV
    out = tmp_path / "out"
    result = cli("compress", tiny[name], "--out", out, "--rank", kv * HEAD_DIM, "--json", "-")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads(result.stdout)
    layer = manifest["layers"][0]
    m = "model.layers.0.self_attn"
    assert (layer["kv_heads"], layer["rotary"], layer["shared_dim"], layer["relative_error"]) == (kv, True, kv * HEAD_DIM, 0)
    assert layer["tensors"] == {"query": f"{m}.q_proj.weight", "key": f"{m}.collab_key.weight",
                                "mixing": f"{m}.collab_mixing", "content_bias": None, "value": None,
                                "key_freq": f"{m}.collab_key_freq",
                                "key_bias": f"{m}.collab_key.bias" if name == "qwen2" else None}
    config = json.loads((out / "config.json").read_text())["collaborative_attention"]["layers"][m]
    assert (config["kv_heads"], config["rotary"]) == (kv, True)
    original = transformers.AutoModelForCausalLM.from_pretrained(tiny[name]).eval()
    loaded = from_pretrained(out)
    assert type(loaded).__name__ == VARIANTS[name][0]
    torch.testing.assert_close(_logits(loaded), _logits(original), rtol=0, atol=1e-5)


def test_low_rank_tensors_follow_spec(tiny, tmp_path, cli):
    out = tmp_path / "out"
    result = cli("compress", tiny["qwen2"], "--out", out, "--rank", 6)
    assert result.exit_code == 0, result.stderr
    assert "data-free fit is far worse" in result.stdout and "x25" in result.stdout
    tensors = _tensors(out)
    source = _tensors(tiny["qwen2"])
    for i in range(LAYERS):
        m = f"model.layers.{i}.self_attn"
        assert tensors[f"{m}.collab_key.weight"] == ((6, D), torch.float32)
        assert tensors[f"{m}.collab_key.bias"] == ((6,), torch.float32)
        assert tensors[f"{m}.collab_key_freq"] == ((3,), torch.int64)
        assert tensors[f"{m}.collab_mixing"] == ((KV, 3, 2), torch.float32)
        assert f"{m}.k_proj.weight" not in tensors and f"{m}.k_proj.bias" not in tensors
        for kept in ("q_proj.weight", "q_proj.bias", "v_proj.weight", "o_proj.weight"):
            assert tensors[f"{m}.{kept}"] == source[f"{m}.{kept}"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        freq = f.get_tensor("model.layers.0.self_attn.collab_key_freq")
    assert bool((freq.diff() >= 0).all()) and int(freq.max()) < HEAD_DIM // 2


@pytest.mark.parametrize("rank, words", [(7, "even"), (GD + 2, f"at most G*d = {GD}")])
def test_bad_rotary_rank(tiny, tmp_path, cli, rank, words):
    result = cli("compress", tiny["llama"], "--out", tmp_path / "out", "--rank", rank)
    assert result.exit_code == 3 and words in result.stderr
    assert not (tmp_path / "out").exists()


def test_refine_steps_for_rotary_need_statistics(tiny, tmp_path, cli):
    result = cli("compress", tiny["llama"], "--out", tmp_path / "out", "--rank", 8, "--refine-steps", 2,
                 "--calibration", tmp_path / "none.safetensors")
    assert result.exit_code == 3 and "none.safetensors" in result.stderr


def test_energy_gives_even_ranks(tiny, tmp_path, cli):
    result = cli("compress", tiny["llama"], "--out", tmp_path / "out", "--energy", "0.8", "--multiple-of", "1",
                 "--json", "-")
    assert result.exit_code == 0, result.stderr
    ranks = [la["shared_dim"] for la in json.loads(result.stdout)["layers"]]
    assert all(r % 2 == 0 and 2 <= r <= GD for r in ranks) and min(ranks) < GD


def test_encoder_manifest_keys_unchanged(sample_dir, tmp_path, cli):
    result = cli("compress", sample_dir, "--out", tmp_path / "out", "--rank", 8, "--json", "-")
    assert result.exit_code == 0, result.stderr
    layer = json.loads(result.stdout)["layers"][0]
    assert "kv_heads" not in layer and "rotary" not in layer and "key_freq" not in layer["tensors"]


# --------------------------------------------------------------------------- verify and report

@pytest.fixture(scope="module")
def compressed(tiny, tmp_path_factory):
    from helpers import run_cli

    root = tmp_path_factory.mktemp("rotary-out")
    for rank in (GD, 6):
        assert run_cli("compress", tiny["qwen2"], "--out", root / f"r{rank}", "--rank", rank).exit_code == 0
    return root


def test_verify_kl(compressed, cli):
    full = json.loads(cli("verify", compressed / f"r{GD}", "--json", "-").stdout)
    assert full["overall"]["kl_max"] < 1e-10 and full["overall"]["relative_score_error"] < 1e-10
    low = cli("verify", compressed / "r6", "--json", "-", "--max-kl", "0")
    assert low.exit_code == 5
    data = json.loads(low.stdout)
    assert data["overall"]["kl_mean"] > 0 and data["overall"]["relative_score_error"] > 0.1


def test_report_figures(compressed, cli):
    result = cli("report", compressed / "r6", "--seq-len", "100", "--json", "-")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    layer = data["layers"][0]
    assert (layer["rotary"], layer["kv_heads"]) == (True, KV)
    assert layer["key_cache_elements_per_token_before"] == GD and layer["key_cache_elements_per_token_after"] == 6
    assert layer["key_cache_bytes_per_token_before"] == 4 * GD and layer["key_cache_bytes_per_token_after"] == 24
    q_params = HEADS * HEAD_DIM * (D + 1)  # q_proj weight and bias, unchanged
    assert layer["qk_params_before"] == q_params + GD * (D + 1)
    assert layer["qk_params_after"] == q_params + 6 * (D + 1) + KV * 6 + 3
    at = layer["at_seq_len"]["100"]
    assert at["qk_score_flops_per_token_before"] == 2 * 100 * HEADS * HEAD_DIM
    assert at["qk_score_flops_per_token_after"] == 2 * 100 * HEADS * 6
    assert layer["qk_proj_flops_per_token_before"] == 2 * D * HEADS * HEAD_DIM + 2 * D * GD
    assert layer["qk_proj_flops_per_token_after"] == 2 * D * HEADS * HEAD_DIM + 2 * D * 6 + 4 * HEADS * 6
    assert data["model"]["key_cache_elements_per_token_after"] == 6 * LAYERS
    table = cli("report", compressed / "r6", "--seq-len", "100")
    assert "Rotary layers" in table.stdout and "100 tokens: 12,800 → 4,800 bytes" in table.stdout


def test_remote_code_loads_with_plain_transformers(tiny, tmp_path, cli):
    """`--remote-code`: AutoModelForCausalLM(trust_remote_code=True) gives the collaborative model."""
    from collabcompress.runtime.adapters import collaborative_modules

    out = tmp_path / "out"
    result = cli("compress", tiny["qwen2"], "--out", out, "--rank", KV * HEAD_DIM, "--remote-code")
    assert result.exit_code == 0, result.stderr
    auto_map = json.loads((out / "config.json").read_text())["auto_map"]
    assert set(auto_map) >= {"AutoModel", "AutoModelForCausalLM"}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    assert len(collaborative_modules(loaded)) == 2
    original = transformers.AutoModelForCausalLM.from_pretrained(tiny["qwen2"]).eval()
    torch.testing.assert_close(_logits(loaded), _logits(original), rtol=0, atol=1e-5)
