"""Running compressed rotary decoders (collabcompress.runtime.adapters.rotary_module, runtime.attention.CollaborativeRotaryAttention).

Tiny random LLaMA, Mistral (sliding window) and Qwen2 (q/k/v biases) models, grouped-query
(4 heads, 2 key/value heads, head_dim 8) and one multi-head LLaMA (kv heads = heads), get
their attention modules swapped for shared-key modules whose tensors are written here
directly in the layout of SPEC section 4:

- the exact full-rank layout (R = G*d, component r = j*G + g, identity mixing) must give the
  original logits, with and without cache, eager and sdpa, and the same greedy tokens;
- a random low-rank layout must match SPEC's formula computed slowly, head by head and
  component by component with complex numbers, in this file;
- a cached decoding step must equal the cache-free forward;
- the cache must hold one key head of R numbers per token and layer (measured).
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from collabcompress.errors import BadInputError, UnsupportedArchitectureError  # noqa: E402
from collabcompress.files.families import FAMILIES, Family, register  # noqa: E402
from collabcompress.hf import from_pretrained  # noqa: E402
from collabcompress.runtime.adapters import cache_keyword, collaborative_modules, rotary_module  # noqa: E402
from collabcompress.files.manifest import LayerRecord, LayerTensors  # noqa: E402
from collabcompress.runtime.attention import CollaborativeRotaryAttention  # noqa: E402

D, HEADS, HEAD_DIM, LAYERS, VOCAB = 32, 4, 8, 2, 64
LOW_RANK = 6  # 3 complex components, against G*d = 16
VARIANTS = {  # name -> (causal LM class, config class, extra config)
    "llama": ("LlamaForCausalLM", "LlamaConfig", {"num_key_value_heads": 2}),
    "llama-mha": ("LlamaForCausalLM", "LlamaConfig", {"num_key_value_heads": HEADS}),
    "mistral": ("MistralForCausalLM", "MistralConfig", {"num_key_value_heads": 2, "sliding_window": 6}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {"num_key_value_heads": 2}),
}


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(verbosity)


def _tiny(name: str, attn: str = "eager") -> torch.nn.Module:
    """A tiny random model whose attention is peaked enough for score errors to show in the logits."""
    model_cls, config_cls, extra = VARIANTS[name]
    config = getattr(transformers, config_cls)(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=2 * D, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, head_dim=HEAD_DIM, max_position_embeddings=64, tie_word_embeddings=False,
        attn_implementation=attn, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                continue
            gain = 2.0 if ("q_proj" in pname or "k_proj" in pname) else 1.0
            std = gain / p.shape[-1] ** 0.5 if p.dim() == 2 else 0.5
            p.normal_(0.0, 1.0 if "embed" in pname else std)
    return model.eval()


def _record(attn, shared: int, module: str = "self_attn", index: int = 0) -> LayerRecord:
    """The manifest's typed layer record of a rotary layer."""
    cfg = attn.config
    key = attn.k_proj if "k_proj" in attn._modules else attn.collab_key  # before or after the swap
    bias = key.bias is not None
    return LayerRecord(
        module=module, index=index, heads=cfg.num_attention_heads, head_dim=attn.head_dim, d_model=cfg.hidden_size,
        shared_dim=shared, scale=attn.scaling, relative_error=0.0, relative_error_plain=0.0, energy_spectral=1.0,
        iterations=0, seconds=0.0,
        tensors=LayerTensors(f"{module}.q_proj.weight", f"{module}.collab_key.weight", f"{module}.collab_mixing",
                             None, None, f"{module}.collab_key_freq", f"{module}.collab_key.bias" if bias else None),
        removed=(f"{module}.k_proj.weight", *([f"{module}.k_proj.bias"] * bias)), family="test-rotary",
        query_bias=attn.q_proj.bias is not None, key_bias=bias, kv_heads=cfg.num_key_value_heads, rotary=True)


def _exact_tensors(attn) -> dict[str, torch.Tensor]:
    """SPEC's full-rank layout: component r = j*G + g is group g's key at frequency j, identity mixing."""
    kv, d, half = attn.config.num_key_value_heads, attn.head_dim, attn.head_dim // 2
    w = attn.k_proj.weight.view(kv, d, -1)  # (G, d, D)
    out = {"collab_key.weight": torch.cat([w[:, :half].transpose(0, 1).reshape(half * kv, -1),
                                           w[:, half:].transpose(0, 1).reshape(half * kv, -1)]),  # (R, D)
           "collab_key_freq": torch.arange(half).repeat_interleave(kv),
           "collab_mixing": torch.stack([torch.eye(kv).repeat(1, half), torch.zeros(kv, half * kv)], dim=-1)}
    if attn.k_proj.bias is not None:
        b = attn.k_proj.bias.view(kv, d)
        out["collab_key.bias"] = torch.cat([b[:, :half].T.reshape(-1), b[:, half:].T.reshape(-1)])
    return out


def _random_tensors(attn, shared: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    kv, half, comps = attn.config.num_key_value_heads, attn.head_dim // 2, shared // 2
    out = {"collab_key.weight": 2.0 * torch.randn(shared, D, generator=g) / D ** 0.5,
           "collab_key_freq": torch.randint(0, half, (comps,), generator=g).sort().values,
           "collab_mixing": torch.randn(kv, comps, 2, generator=g)}
    if attn.k_proj.bias is not None:
        out["collab_key.bias"] = 0.5 * torch.randn(shared, generator=g)
    return out


def _compressed(model, shared: int | None = None, seed: int = 0):
    """A copy of ``model`` with every attention module swapped; exact layout when ``shared`` is None."""
    model = copy.deepcopy(model)
    for i, layer in enumerate(model.model.layers):
        old = layer.self_attn
        tensors = _exact_tensors(old) if shared is None else _random_tensors(old, shared, seed + i)
        new = rotary_module(old, _record(old, tensors["collab_key.weight"].shape[0]))
        missing = new.load_state_dict(tensors, strict=False).missing_keys
        assert not [k for k in missing if k.startswith("collab_")]
        layer.self_attn = new
    return model.eval()


def _ids(batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- exact at full rank

@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_full_rank_layout_is_the_original(name, attn):
    original = _tiny(name, attn)
    collab = _compressed(original)
    ids = _ids(length=10)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        want = original(ids, attention_mask=mask).logits
        torch.testing.assert_close(collab(ids, attention_mask=mask).logits, want, rtol=0, atol=1e-5)
        # with cache: prefill, then one token at a time
        cache, got = None, []
        for start, stop in ((0, 6), (6, 7), (7, 8), (8, 10)):
            out = collab(ids[:, start:stop], attention_mask=mask[:, :stop], **{cache_keyword(collab): cache},
                         use_cache=True)
            cache = out.past_key_values
            got.append(out.logits)
        torch.testing.assert_close(torch.cat(got, dim=1)[mask.bool()], want[mask.bool()], rtol=0, atol=1e-5)
        collab.model.layers[0].self_attn.collab_mixing[..., 1] += 0.1  # a slightly wrong score shows
        assert (collab(ids, attention_mask=mask).logits - want).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
def test_full_rank_generates_the_same_tokens(name):
    original = _tiny(name, "sdpa")
    collab = _compressed(original)
    ids = _ids(batch=2, length=5, seed=3)
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(collab.generate(ids, **kw), original.generate(ids, **kw))


# --------------------------------------------------------------------------- SPEC's formula, by hand

def _spec_attention(attn, x: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC section 2 "Rotary decoders", one head and one component at a time, in complex128; causal."""
    batch, n, _ = x.shape
    heads, kv, d = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim
    half, comps = d // 2, attn.collab_mixing.shape[1]
    x64 = x.double()
    q = F.linear(x64, attn.q_proj.weight.double(), _double(attn.q_proj.bias)).view(batch, n, heads, d)
    q = torch.complex(q[..., :half], q[..., half:])  # (B, N, H, d/2): q_{h,j}
    c = F.linear(x64, attn.collab_key.weight.double(), _double(attn.collab_key.bias))  # (B, N, R)
    c = torch.complex(c[..., :comps], c[..., comps:])  # (B, N, R/2): c_r
    u = torch.complex(attn.collab_mixing[..., 0].double(), attn.collab_mixing[..., 1].double())  # (G, R/2)
    t = torch.arange(n, dtype=torch.float64)
    scores = torch.zeros(batch, heads, n, n, dtype=torch.float64)
    for h in range(heads):
        g = h // (heads // kv)
        for r in range(comps):
            j = int(attn.collab_key_freq[r])
            rot = torch.exp(1j * t * theta[j].double())  # (N,)
            q_r = q[:, :, h, j] * u[g, r].conj() * rot  # (B, N)
            k_r = c[:, :, r] * rot  # (B, N)
            scores[:, h] += (q_r[:, :, None] * k_r[:, None, :].conj()).real
    scores = attn.scaling * scores
    scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    probs = scores.softmax(-1)  # (B, H, N, N)
    v = F.linear(x64, attn.v_proj.weight.double(), _double(attn.v_proj.bias)).view(batch, n, kv, d)
    v = v.transpose(1, 2).repeat_interleave(heads // kv, dim=1)  # (B, H, N, d)
    out = (probs @ v).transpose(1, 2).reshape(batch, n, heads * d)
    return F.linear(out, attn.o_proj.weight.double(), _double(attn.o_proj.bias)), probs


def _double(t):
    return None if t is None else t.double()


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_low_rank_matches_spec_formula(name, attn_impl):
    model = _compressed(_tiny(name, attn_impl), shared=LOW_RANK, seed=7)
    attn = model.model.layers[0].self_attn
    assert attn.collab_key.weight.shape == (LOW_RANK, D)
    x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(2))
    positions = torch.arange(7).unsqueeze(0)
    cos, sin = model.model.rotary_emb(x, positions)
    causal = torch.zeros(7, 7).masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), torch.finfo(torch.float32).min)
    with torch.no_grad():
        out, weights = attn(x, position_embeddings=(cos, sin), attention_mask=causal[None, None])
        want, probs = _spec_attention(attn, x, model.model.rotary_emb.inv_freq)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5)
    if attn_impl == "eager":
        torch.testing.assert_close(weights.double(), probs, rtol=0, atol=1e-5)
    assert probs.max() > 0.9  # peaked attention: the test sees the scores


# --------------------------------------------------------------------------- cache

@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cached_step_equals_cache_free_forward(name, attn):
    model = _compressed(_tiny(name, attn), shared=LOW_RANK, seed=3)
    ids = _ids(length=9, seed=4)
    with torch.no_grad():
        want = model(ids).logits[:, -1]
        past = model(ids[:, :-1], use_cache=True).past_key_values
        got = model(ids[:, -1:], **{cache_keyword(model): past}, use_cache=True).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_trains_after_inference_mode():
    """Run under torch.inference_mode, then trained (as healing does after an evaluation): the
    cached frequency index must not be an inference tensor that autograd cannot save."""
    model = _compressed(_tiny("llama"), shared=LOW_RANK, seed=5)
    ids = _ids(length=9, seed=6)
    with torch.inference_mode():
        want = model(ids).logits
    key = model.model.layers[0].self_attn.collab_key.weight
    key.requires_grad_(True)
    out = model(ids).logits
    out.square().mean().backward()
    assert key.grad is not None and bool(key.grad.abs().sum() > 0)
    torch.testing.assert_close(out.detach(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "qwen2", "llama-mha"])
def test_generate_caches_one_key_head_of_width_r(name):
    original = _tiny(name, "sdpa")
    model = _compressed(original, shared=LOW_RANK, seed=5)
    ids = _ids(batch=2, length=6, seed=6)
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "return_dict_in_generate": True}
    with torch.no_grad():
        out = model.generate(ids, **kw)
        before = original.generate(ids, **kw).past_key_values
    cache = out.past_key_values
    batch, cached = 2, out.sequences.shape[1] - 1  # the last generated token is never fed back
    kv = original.config.num_key_value_heads
    for i in range(LAYERS):
        keys, values = cache.layers[i].keys, cache.layers[i].values
        assert keys.shape == (batch, 1, cached, LOW_RANK)
        assert keys.numel() * keys.element_size() == batch * cached * LOW_RANK * 4
        assert values.shape == (batch, kv, cached, HEAD_DIM)
        original_keys = before.layers[i].keys
        assert original_keys.numel() * original_keys.element_size() == batch * cached * kv * HEAD_DIM * 4


def test_static_cache_refused_clearly():
    model = _compressed(_tiny("llama", "sdpa"), shared=LOW_RANK)
    with pytest.raises(NotImplementedError, match="needs a dynamic cache"):
        model.generate(_ids(batch=1, length=4), max_new_tokens=2, cache_implementation="static", do_sample=False,
                       pad_token_id=0)


# --------------------------------------------------------------------------- module, names, refusals

def test_compressed_names_follow_spec():
    model = _compressed(_tiny("qwen2"), shared=LOW_RANK)
    names = model.state_dict()
    prefix = "model.layers.1.self_attn."
    assert names[prefix + "collab_key.weight"].shape == (LOW_RANK, D)
    assert names[prefix + "collab_key.bias"].shape == (LOW_RANK,)
    assert names[prefix + "collab_key_freq"].dtype == torch.int64
    assert names[prefix + "collab_mixing"].shape == (2, LOW_RANK // 2, 2)
    assert not [k for k in names if ".k_proj." in k]
    assert prefix + "q_proj.bias" in names and prefix + "v_proj.weight" in names
    modules = collaborative_modules(model)
    assert sorted(modules) == [f"model.layers.{i}.self_attn" for i in range(LAYERS)]
    assert all(isinstance(m, CollaborativeRotaryAttention) for m in modules.values())
    assert isinstance(modules[prefix[:-1]], transformers.models.qwen2.modeling_qwen2.Qwen2Attention)


def test_rotary_module_refuses_records_that_do_not_fit():
    attn = _tiny("llama").model.layers[0].self_attn
    with pytest.raises(BadInputError, match="config builds 4 heads, 2 key/value heads"):
        rotary_module(attn, dataclasses.replace(_record(attn, 8, module="m"), kv_heads=4))
    for shared in (7, 0, 18):
        with pytest.raises(BadInputError, match="must be even, between 2 and 16"):
            rotary_module(attn, _record(attn, shared))
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                                                          intermediate_size=32, vocab_size=10))
    with pytest.raises(UnsupportedArchitectureError, match="BertSelfAttention"):
        rotary_module(bert.encoder.layer[0].attention.self, _record(attn, 8))


# --------------------------------------------------------------------------- from_pretrained

@pytest.fixture()
def rotary_family():
    """A test-only registered family whose layers from_pretrained runs with the rotary adapter."""
    family = register(Family("test-rotary", "test-only LLaMA", r"model\.layers\.\d+\.self_attn", "q_proj", "k_proj",
                             "model.layers.{i}.self_attn.{q_proj,k_proj}",
                             hf_classes=("LlamaAttention", "MistralAttention", "Qwen2Attention"),
                             hf_adapter="_LlamaRotary"))
    yield family
    FAMILIES.remove(family)


def _write_directory(model, original, directory) -> None:
    """What compress writes for a rotary model: weights, config with its block, a typed manifest
    (manifest.write) recording every output with its sha256."""
    from safetensors.torch import save_file

    from collabcompress.files import manifest as mf

    from collabcompress.files.output import write_manifest
    from collabcompress.files.output import file_record

    directory.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    original.config.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config["architectures"] = [type(original).__name__]
    config["collaborative_attention"] = {"format": "collabcompress/1"}
    (directory / "config.json").write_text(json.dumps(config))
    layers = tuple(_record(layer.self_attn, layer.self_attn.collab_key.weight.shape[0], f"model.layers.{i}.self_attn", i)
                   for i, layer in enumerate(model.model.layers))
    outputs = tuple(mf.FileRecord(**file_record(directory / n, directory)) for n in ("model.safetensors", "config.json"))
    write_manifest(directory, mf.Manifest(
        tool=mf.Tool("collabcompress", "test"), created_utc="2025-01-01T00:00:00Z",
        source=mf.SourceRecord("tiny", (), "test-rotary", "float32"), settings=mf.Settings({}), layers=layers,
        totals=mf.Totals(0, 0, 0, 0, 0, 0), outputs=outputs))


def _rewrite_weights(directory, weights) -> None:
    """Replace the weights and record their new sha256 (the manifest trusts only what it records)."""
    from safetensors.torch import save_file

    from collabcompress.files import manifest as mf

    from collabcompress.files.output import write_manifest
    from collabcompress.files.output import file_record

    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    manifest = mf.read(directory)
    outputs = tuple(mf.FileRecord(**file_record(directory / o.name, directory)) for o in manifest.outputs)
    write_manifest(directory, dataclasses.replace(manifest, outputs=outputs))


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_from_pretrained_runs_rotary_layers(name, rotary_family, tmp_path):
    original = _tiny(name, "sdpa")
    model = _compressed(original, shared=LOW_RANK, seed=9)
    _write_directory(model, original, tmp_path / "collab")
    ids = _ids(seed=8)
    with torch.no_grad():
        want = model(ids).logits
        for attn in ("eager", "sdpa"):
            loaded = from_pretrained(tmp_path / "collab", attn_implementation=attn)
            assert type(loaded).__name__ == VARIANTS[name][0]
            assert len(collaborative_modules(loaded)) == LAYERS
            torch.testing.assert_close(loaded(ids).logits, want, rtol=0, atol=1e-5)


def test_from_pretrained_refuses_frequencies_outside_the_head(rotary_family, tmp_path):
    from safetensors.torch import load_file

    original = _tiny("llama")
    _write_directory(_compressed(original, shared=LOW_RANK), original, tmp_path / "collab")
    weights = load_file(str(tmp_path / "collab" / "model.safetensors"))
    weights["model.layers.1.self_attn.collab_key_freq"] = torch.tensor([0, 2, 4])
    _rewrite_weights(tmp_path / "collab", weights)
    with pytest.raises(BadInputError, match=r"model.layers.1.self_attn.collab_key_freq holds 0..4, outside the "
                                            r"head's frequencies 0..3"):
        from_pretrained(tmp_path / "collab")
