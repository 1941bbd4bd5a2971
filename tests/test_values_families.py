"""Shared values (``compress --value-rank``, docs/method.md "Shared values") on every family of
tests/families.py that compress accepts, fused GPT-2 ``c_attn`` and timm ``qkv`` included.

Each family is compressed once with keys at full width and values at full width (r_v = G*d),
where the loaded model must reproduce the original's outputs (timm, which no transformers
adapter runs: the written tensors must reproduce the value slice of ``qkv``), and once at half
width, where the manifest's ``value_rank`` and the tensor shapes must follow and the model must
run. Decoders (rotary, GPT-2, BART, T5) decode one cached step as the cache-free forward does,
with r_v numbers per token in the value cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from families import FAMILIES, REFUSED, model_inputs, ROTARY, ROTARY_REFUSED, make_checkpoint, make_rotary_checkpoint, \
    quiet_transformers

transformers = pytest.importorskip("transformers")

from collabcompress import hf  # noqa: E402
from collabcompress.commands.compress import compress  # noqa: E402
from collabcompress.errors import BadInputError, UnsupportedArchitectureError  # noqa: E402
from collabcompress.files import manifest as _mf  # noqa: E402
from collabcompress.options import CompressOptions  # noqa: E402
from collabcompress.runtime.adapters import cache_keyword  # noqa: E402

ACCEPTED = [*ROTARY, *FAMILIES]
NOT_LOADABLE = {"timm-vit"}  # no transformers adapter: compress, report and verify only
DECODERS = {**{name: None for name in ROTARY}, "gpt2": "GPT2LMHeadModel", "t5": "T5ForConditionalGeneration",
            "bart": "BartForConditionalGeneration"}  # name -> the LM class a cached step runs (None: as saved)


def _facts(name: str) -> tuple[int, int, int]:
    """(G, d, D) of the first attention layer (every layer of a fixture has the same value width)."""
    if name in ROTARY:
        f = ROTARY[name]
        return f["kv_heads"], f["head_dim"], f["d_model"]
    f = FAMILIES[name]
    return f["n_head"], f["head_dim"], f["d_model"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> {"source", "full", "half"} directories, each family built and compressed once, on demand."""
    root = tmp_path_factory.mktemp("values")
    cache: dict[str, dict[str, Path]] = {}

    def get(name: str) -> dict[str, Path]:
        if name not in cache:
            make = make_rotary_checkpoint if name in ROTARY else make_checkpoint
            source = make(name, root / name)
            groups, head_dim, _ = _facts(name)
            dirs = {"source": source, "full": root / f"{name}-full", "half": root / f"{name}-half"}
            with quiet_transformers():
                for key, rank in (("full", groups * head_dim), ("half", groups * head_dim // 2)):
                    compress(source, dirs[key], CompressOptions(value_rank=rank, force_data_free=True), workers=1)
            cache[name] = dirs
        return cache[name]

    return get


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _manifest(directory: Path) -> dict:
    return json.loads((directory / "collab_manifest.json").read_text())


def _inputs(name: str, config) -> dict[str, torch.Tensor]:
    return model_inputs(name, low=3, high=60, image_size=getattr(config, "image_size", 32))


def _output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _value_slice(name: str, tensors: dict[str, torch.Tensor], module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The value weight (H*d, D) and bias of a fused layer, sliced here from the source tensors."""
    width = FAMILIES[name]["n_head"] * FAMILIES[name]["head_dim"]
    query = FAMILIES[name]["modules"][0]["query"].rsplit(".", 1)[0].rsplit(".", 1)[1]  # c_attn / qkv
    fused, bias = tensors[f"{module}.{query}.weight"].double(), tensors[f"{module}.{query}.bias"].double()
    if FAMILIES[name]["fused"] == "conv1d":  # (D, 3*H*d), columns [q | k | v]
        return fused[:, 2 * width:].T, bias[2 * width:]
    return fused[2 * width:], bias[2 * width:]  # (3*H*d, D), rows [q | k | v]


# --------------------------------------------------------------------------- full width: exact

@pytest.mark.parametrize("name", ACCEPTED)
def test_full_value_width_reproduces_the_original(built, name):
    dirs = built(name)
    if name in NOT_LOADABLE:
        pytest.skip("not loadable by collabcompress.hf (test_fused_written_values_reproduce_the_value_slice)")
    with quiet_transformers():
        original, model = hf.load_model(dirs["source"]).float(), hf.from_pretrained(dirs["full"]).float()
    inputs = _inputs(name, original.config)
    with torch.no_grad():
        torch.testing.assert_close(_output(model(**inputs)), _output(original(**inputs)), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", [n for n in FAMILIES if FAMILIES[n]["fused"]])
def test_fused_written_values_reproduce_the_value_slice(built, name):
    """up @ (collab_value @ x + bias) == the fused tensor's value slice @ x + its bias, and no slice is written."""
    dirs = built(name)
    source, out = _tensors(dirs["source"]), _tensors(dirs["full"])
    x = torch.randn(7, FAMILIES[name]["d_model"], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for layer in _manifest(dirs["full"])["layers"]:
        t = layer["value"]["tensors"]
        assert layer["tensors"]["value"] is None
        assert not any(n.startswith(f"{layer['module']}.{q}") for n in out for q in ("c_attn", "qkv"))
        w, b = _value_slice(name, source, layer["module"])
        latent = x @ out[t["weight"]].double().T + out[t["bias"]].double()  # (7, r_v)
        got = latent @ out[t["up"]].double().T  # (7, H*d)
        torch.testing.assert_close(got, x @ w.T + b, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- half width: shapes, runs

@pytest.mark.parametrize("name", ACCEPTED)
def test_half_value_width_records_and_runs(built, name):
    dirs = built(name)
    groups, head_dim, d_model = _facts(name)
    rank = groups * head_dim // 2
    manifest, tensors = _manifest(dirs["half"]), _tensors(dirs["half"])
    for layer in manifest["layers"]:
        assert layer["value_rank"] == rank
        t = layer["value"]["tensors"]
        assert tensors[t["weight"]].shape == (rank, d_model)
        assert tensors[t["up"]].shape == ((layer.get("kv_heads") or layer["heads"]) * layer["head_dim"], rank)
        assert t["bias"] is None or tensors[t["bias"]].shape == (rank,)
        assert not set(layer["removed"]) & set(tensors)
        assert layer["tensors"]["value"] is None
    parsed, out = _mf.open_output(dirs["half"])  # the manifest's shapes check passes
    out.close()
    assert all(la.value_rank == rank for la in parsed.layers)
    if name in NOT_LOADABLE:
        return
    with quiet_transformers():
        original, model = hf.load_model(dirs["source"]).float(), hf.from_pretrained(dirs["half"]).float()
    inputs = _inputs(name, original.config)
    with torch.no_grad():
        got, want = _output(model(**inputs)), _output(original(**inputs))
    assert got.shape == want.shape and bool(torch.isfinite(got).all())


def test_refused_families_stay_refused(tmp_path):
    for name in [*REFUSED, *ROTARY_REFUSED]:
        make = make_rotary_checkpoint if name in ROTARY_REFUSED else make_checkpoint
        with pytest.raises(UnsupportedArchitectureError):
            compress(make(name, tmp_path / name), tmp_path / f"{name}-out",
                     CompressOptions(value_rank=8, force_data_free=True))


def test_manifest_refuses_a_value_slice_beside_shared_values(built, tmp_path):
    data = _manifest(built("gpt2")["half"])
    data["layers"][0]["tensors"]["value"] = "h.0.attn.collab_value.weight"
    (tmp_path / _mf.MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(BadInputError, match="replace it"):
        _mf.read(tmp_path)


# --------------------------------------------------------------------------- decoders: the value cache

def _cache_layers(cache) -> list:
    parts = [cache.self_attention_cache, cache.cross_attention_cache] if hasattr(cache, "cross_attention_cache") \
        else [cache]
    return [layer for part in parts for layer in part.layers]


@pytest.mark.parametrize("name", list(DECODERS))
def test_cached_step_equals_cache_free_forward(built, name):
    dirs = built(name)
    groups, head_dim, _ = _facts(name)
    with quiet_transformers():
        model = hf.from_pretrained(dirs["half"], model_class=DECODERS[name]).float()
    g = torch.Generator().manual_seed(4)
    ids, step = torch.randint(3, 60, (2, 7), generator=g), torch.randint(3, 60, (2, 1), generator=g)
    encoder = {} if name not in ("t5", "bart") else {"input_ids": torch.randint(3, 60, (2, 5), generator=g)}
    key = "decoder_input_ids" if encoder else "input_ids"
    with torch.no_grad():
        first = model(**encoder, **{key: ids}, use_cache=True)
        cached = model(**encoder, **{key: step}, **{cache_keyword(model): first.past_key_values}, use_cache=True)
        full = model(**encoder, **{key: torch.cat([ids, step], 1)}, use_cache=False)
    torch.testing.assert_close(cached.logits[:, -1], full.logits[:, -1], rtol=0, atol=1e-5)
    layers = _cache_layers(cached.past_key_values)
    assert layers
    for layer in layers:  # one latent head of r_v numbers per token, for every query head
        assert layer.values.shape[1] == 1 and layer.values.shape[-1] == groups * head_dim // 2


@pytest.mark.parametrize("value_rank", [16, 8])
def test_gpt2_reordered_upcast_attention_with_shared_values(tmp_path, value_rank):
    """GPT-2's eager ``reorder_and_upcast_attn`` path folds heads into the batch: the latent is expanded for it;
    at full width it reproduces the original."""
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32,
                                     reorder_and_upcast_attn=True)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(tmp_path / "gpt2"))
    compress(tmp_path / "gpt2", tmp_path / "collab", CompressOptions(value_rank=value_rank, force_data_free=True))
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(6))
    with quiet_transformers():
        eager = hf.from_pretrained(tmp_path / "collab", model_class="GPT2LMHeadModel", attn_implementation="eager")
        sdpa = hf.from_pretrained(tmp_path / "collab", model_class="GPT2LMHeadModel", attn_implementation="sdpa")
        original = hf.load_model(tmp_path / "gpt2", model_class="GPT2LMHeadModel", attn_implementation="eager")
    assert eager.transformer.h[0].attn.reorder_and_upcast_attn
    assert isinstance(eager.transformer.h[0].attn.collab_value, torch.nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(eager(ids).logits, sdpa(ids).logits, rtol=0, atol=1e-5)
        if value_rank == 16:
            torch.testing.assert_close(eager(ids).logits, original(ids).logits, rtol=0, atol=1e-5)
