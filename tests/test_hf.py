"""Loading compressed directories as transformers models (collabcompress.hf).

Every family of tests/families.py is compressed twice: at R = H*d, where the loaded model
must reproduce the original model's outputs (padding, causal masks, cross-attention and
T5's position bias included), and at a low R, where every collaborative module's attention
probabilities must equal the SPEC section 2 formula computed by hand from the stored
tensors (verify.collaborative_scores + position bias + causal mask + softmax). Bad
directories fail with the documented exceptions, and exit codes through the CLI.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch


from families import FAMILIES, make_checkpoint, model_inputs
from helpers import rerecord_outputs

transformers = pytest.importorskip("transformers")

from collabcompress.commands.compress import CompressOptions, compress  # noqa: E402
from collabcompress.errors import BadInputError, MissingExtraError, UnsupportedArchitectureError  # noqa: E402
from collabcompress.hf import from_pretrained, write_remote_code  # noqa: E402
from collabcompress.runtime.adapters import cache_keyword, collaborative_modules  # noqa: E402
from collabcompress.runtime.attention import CollaborativeAttention  # noqa: E402
from collabcompress.maths.scores import collaborative_scores  # noqa: E402

LOADABLE = ["bert", "roberta", "mpnet", "distilbert", "albert", "vit", "gpt2", "t5", "bart"]
LOW_RANK = 5


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    yield
    transformers.logging.set_verbosity(verbosity)
    transformers.utils.logging.enable_progress_bar()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """family -> {"source", "full", "low"} directories, built once for the module."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name in [*LOADABLE, "timm-vit"]:
        source = _sharpen(make_checkpoint(name, root / name), name)
        full = FAMILIES[name]["n_head"] * FAMILIES[name]["head_dim"]
        dirs = {"source": source, "full": root / f"{name}-full", "low": root / f"{name}-low"}
        compress(source, dirs["full"], CompressOptions(rank=full))
        if name in LOADABLE:
            compress(source, dirs["low"], CompressOptions(rank=LOW_RANK, max_iter=5))
        out[name] = dirs
    return out


def _sharpen(directory: Path, name: str, factor: float = 6.0) -> Path:
    """Scale the query/key tensors up: random initial weights attend almost uniformly, which
    would let errors in the scores hide in the softmax."""
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    for module in FAMILIES[name]["modules"]:
        for tensor in module["tensors"]:
            tensors[tensor] = tensors[tensor] * factor
    save_file(tensors, str(path), metadata={"format": "pt"})
    return directory


def _inputs(name: str) -> dict[str, torch.Tensor]:
    return model_inputs(name)


def resolve_original(name: str, directory: Path, **kw):
    return getattr(transformers, FAMILIES[name]["model_class"]).from_pretrained(directory, **kw).eval()


@pytest.mark.parametrize("name", LOADABLE)
def test_full_rank_reproduces_original(built, name):
    model = from_pretrained(built[name]["full"])
    manifest = json.loads((built[name]["full"] / "collab_manifest.json").read_text())
    modules = collaborative_modules(model)
    assert len(modules) == len(manifest["layers"])
    first = FAMILIES[name]["in_memory_first_module"]
    assert first in modules
    assert isinstance(modules[first], CollaborativeAttention)
    assert not model.training
    with torch.no_grad():
        expected = resolve_original(name, built[name]["source"])(**_inputs(name))
        got = model(**_inputs(name))
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, rtol=0, atol=1e-4)
    if name in ("t5", "bart"):
        torch.testing.assert_close(got.encoder_last_hidden_state, expected.encoder_last_hidden_state, rtol=0,
                                   atol=1e-4)


def _file_module(name: str, memory: str) -> str:
    if name == "vit":  # transformers 5 renames ViT in memory (see tests/families.py)
        return re.sub(r"^layers\.(\d+)\.attention$", r"encoder.layer.\1.attention.attention", memory)
    return memory


@pytest.mark.parametrize("name", LOADABLE)
def test_low_rank_attention_equals_spec_formula(built, name):
    """Each module's attention probabilities = softmax(SPEC scores from the stored tensors [+ bias, causal])."""
    from safetensors.torch import load_file

    directory = built[name]["low"]
    model = from_pretrained(directory, attn_implementation="eager")
    tensors = load_file(str(directory / "model.safetensors"))
    manifest = json.loads((directory / "collab_manifest.json").read_text())
    layers = {layer["module"]: layer for layer in manifest["layers"]}
    captured = {}

    def hook(memory_name):
        def capture(module, args, kwargs, output):
            captured[memory_name] = (module, args, kwargs, output)
        return capture

    modules = collaborative_modules(model)
    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in modules.items()]
    inputs = _inputs(name)
    with torch.no_grad():
        model(**inputs, output_attentions=True)
    for h in handles:
        h.remove()
    assert set(captured) == set(modules)
    for memory_name, (module, args, kwargs, output) in captured.items():
        layer = layers[_file_module(name, memory_name)]
        t = {k: tensors[v].double() for k, v in layer["tensors"].items() if k != "value" and v}
        assert t["query"].shape == (LOW_RANK, layer["d_model"])
        x = (args[0] if args else kwargs["hidden_states"]).double()
        y = kwargs.get("key_value_states")
        cross = y is not None
        y = x if y is None else y.double()
        scores = collaborative_scores(x, y, t["query"], t["key"], t["mixing"], t["content_bias"], layer["scale"])
        if name == "t5":
            scores = scores + output[1].double()  # the relative position bias the module used
        if name == "mpnet":
            bias = kwargs.get("position_bias", args[2] if len(args) > 2 else None)
            scores = scores + bias.double()
        if getattr(module, "is_causal", False) and not cross:
            n, m = scores.shape[-2:]
            scores = scores.masked_fill(~torch.ones(n, m, dtype=torch.bool).tril(), float("-inf"))
        probs = torch.softmax(scores, dim=-1)  # (B, H, N, M)
        weights = output[-1].double()
        # Padded keys (the second sequence's last 3 tokens) are masked in the model: there the hand
        # computation is renormalised over the real keys.
        valid = torch.ones(2, weights.shape[-1], dtype=torch.bool)
        if "attention_mask" in inputs and weights.shape[-1] == inputs["attention_mask"].shape[1]:
            valid = inputs["attention_mask"].bool()
        for b in range(2):
            ref = probs[b].masked_fill(~valid[b], 0.0)
            ref = ref / ref.sum(-1, keepdim=True)
            torch.testing.assert_close(weights[b], ref, rtol=0, atol=1e-5)


def test_low_rank_bert_module_output_by_hand(built):
    """The whole self-attention output of BERT layer 0: softmax(SPEC scores) @ (x W_V^T + b_V)."""
    from safetensors.torch import load_file

    directory = built["bert"]["low"]
    model = from_pretrained(directory)
    tensors = load_file(str(directory / "model.safetensors"))
    module = model.encoder.layer[0].attention.self
    prefix = "encoder.layer.0.attention.self"
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, _ = module(x)
    c = lambda n: tensors[f"{prefix}.{n}"]  # noqa: E731
    probs = torch.softmax(collaborative_scores(x, x, c("collab_query.weight"), c("collab_key.weight"),
                                               c("collab_mixing"), c("collab_content_bias.weight"), 8 ** -0.5), -1)
    value = (x @ c("value.weight").T + c("value.bias")).unflatten(-1, (4, 8)).transpose(1, 2)  # (B, H, N, d)
    expected = (probs @ value).transpose(1, 2).flatten(2)  # (B, N, H*d)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,cls", [("gpt2", "GPT2LMHeadModel"), ("t5", "T5ForConditionalGeneration")])
def test_cached_generation_matches_original(built, name, cls):
    """Incremental decoding with key/value caches (cross-attention caches for T5) at R = H*d."""
    model = from_pretrained(built[name]["full"], model_class=cls)
    original = getattr(transformers, cls).from_pretrained(built[name]["source"]).eval()
    ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(2))
    kw = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "eos_token_id": None,
          "output_scores": True, "return_dict_in_generate": True}
    if name == "t5":
        kw["decoder_start_token_id"] = 0
    a, b = original.generate(ids, **kw), model.generate(ids, **kw)
    assert torch.equal(a.sequences, b.sequences)
    for sa, sb in zip(a.scores, b.scores):
        torch.testing.assert_close(sb, sa, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name,cls", [("gpt2", "GPT2LMHeadModel"), ("t5", "T5ForConditionalGeneration"),
                                      ("bart", "BartForConditionalGeneration")])
def test_key_cache_holds_r_plus_h_numbers_per_token(built, name, cls):
    """The cache keeps [V^T y, C y] (R + H per token), and decoding from it equals the full forward."""
    model = from_pretrained(built[name]["low"], model_class=cls)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 100, (2, 7), generator=g)
    step = torch.randint(1, 100, (2, 1), generator=g)
    encoder = {} if name == "gpt2" else {"input_ids": torch.randint(1, 100, (2, 5), generator=g)}
    key = "input_ids" if name == "gpt2" else "decoder_input_ids"
    with torch.no_grad():
        first = model(**encoder, **{key: ids}, use_cache=True)
        cached = model(**encoder, **{key: step}, **{cache_keyword(model): first.past_key_values}, use_cache=True)
        full = model(**encoder, **{key: torch.cat([ids, step], 1)}, use_cache=False)
    torch.testing.assert_close(cached.logits[:, -1], full.logits[:, -1], rtol=0, atol=1e-4)
    cache = cached.past_key_values
    caches = [cache] if name == "gpt2" else [cache.self_attention_cache, cache.cross_attention_cache]
    for part, length in zip(caches, (8, 5)):
        for layer in part.layers:
            heads = layer.values.shape[1]  # (B, H, M, d)
            assert layer.keys.shape == (2, 1, length, LOW_RANK + heads) and heads > 1


def test_gpt2_reordered_upcast_attention_with_the_shared_key(tmp_path):
    """GPT-2's eager ``reorder_and_upcast_attn`` path folds heads into the batch: the shared key is expanded for it."""
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=64,
                                     reorder_and_upcast_attn=True)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(tmp_path / "gpt2"))
    compress(tmp_path / "gpt2", tmp_path / "collab", CompressOptions(rank=8, max_iter=2))
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(6))
    eager = from_pretrained(tmp_path / "collab", model_class="GPT2LMHeadModel", attn_implementation="eager")
    sdpa = from_pretrained(tmp_path / "collab", model_class="GPT2LMHeadModel", attn_implementation="sdpa")
    assert eager.transformer.h[0].attn.reorder_and_upcast_attn
    with torch.no_grad():
        torch.testing.assert_close(eager(ids).logits, sdpa(ids).logits, rtol=0, atol=1e-5)


def test_static_cache_refused_clearly(built):
    model = from_pretrained(built["gpt2"]["low"], model_class="GPT2LMHeadModel")
    ids = torch.randint(1, 100, (1, 5), generator=torch.Generator().manual_seed(5))
    with pytest.raises(NotImplementedError, match="needs a dynamic cache"):
        model.generate(ids, max_new_tokens=2, cache_implementation="static", do_sample=False, pad_token_id=0)


def test_remote_code_loads_with_automodel(built, tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    directory = tmp_path / "bert"
    shutil.copytree(built["bert"]["low"], directory)
    code = write_remote_code(directory)
    assert code.name == "modeling_collabcompress.py"
    config = json.loads((directory / "config.json").read_text())
    assert config["auto_map"] == {"AutoModel": "modeling_collabcompress.CollaborativeBertModel"}
    outputs = {o["name"] for o in json.loads((directory / "collab_manifest.json").read_text())["outputs"]}
    assert {"config.json", "modeling_collabcompress.py"} <= outputs
    model = transformers.AutoModel.from_pretrained(str(directory), trust_remote_code=True)
    assert len(collaborative_modules(model)) == 2
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, from_pretrained(directory)(ids).last_hidden_state)


# --------------------------------------------------------------------------- failures


def test_not_compressed_is_refused(built, tmp_path):
    with pytest.raises(BadInputError, match="is not a model compressed by collabcompress"):
        from_pretrained(built["bert"]["source"])
    with pytest.raises(BadInputError, match="not found"):
        from_pretrained(tmp_path / "nothing")


def test_unsupported_family_is_refused(built):
    with pytest.raises(UnsupportedArchitectureError, match="family 'timm-vit' cannot be loaded"):
        from_pretrained(built["timm-vit"]["full"])


def _copy_with(built, tmp_path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    directory = tmp_path / "edited"
    shutil.copytree(built["bert"]["low"], directory)
    tensors = load_file(str(directory / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"))
    rerecord_outputs(directory)
    return directory


def test_unexpected_tensor_is_refused(built, tmp_path):
    directory = _copy_with(built, tmp_path, lambda t: t.update({"extra.weight": torch.zeros(2)}))
    with pytest.raises(BadInputError, match="tensors the model does not take: extra.weight"):
        from_pretrained(directory)


def test_missing_tensor_is_refused(built, tmp_path):
    directory = _copy_with(built, tmp_path, lambda t: t.pop("encoder.layer.1.attention.self.collab_mixing"))
    with pytest.raises(BadInputError, match="missing tensor 'encoder.layer.1.attention.self.collab_mixing' named in"):
        from_pretrained(directory)


def test_wrong_shape_is_refused(built, tmp_path):
    directory = _copy_with(built, tmp_path, lambda t: t.update(
        {"encoder.layer.0.attention.self.value.weight": torch.zeros(31, 32)}))
    with pytest.raises(BadInputError, match="shapes that do not fit the model"):
        from_pretrained(directory)


def test_config_without_block_is_refused(built, tmp_path):
    directory = tmp_path / "noblock"
    shutil.copytree(built["bert"]["low"], directory)
    config = json.loads((directory / "config.json").read_text())
    del config["collaborative_attention"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadInputError, match="has no 'collaborative_attention' block"):
        from_pretrained(directory)


def test_flash_attention_is_refused(built):
    with pytest.raises(BadInputError, match="attn_implementation 'flash_attention_2' is not supported"):
        from_pretrained(built["bert"]["low"], attn_implementation="flash_attention_2")


def test_missing_extra(built, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'collabcompress\[hf\]'"):
        from_pretrained(built["bert"]["low"])


def test_cli_exit_codes(built, cli):
    result = cli("evaluate", built["bert"]["source"], built["bert"]["source"])
    assert result.exit_code == 3, result.stderr
    assert "is not a model compressed by collabcompress" in result.stderr
    assert "Traceback" not in result.stderr
    result = cli("evaluate", built["timm-vit"]["source"], built["timm-vit"]["full"])
    assert result.exit_code == 4, result.stderr
    assert "timm-vit" in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------- the class follows the weights


def _masked_lm_config(directory: Path) -> Path:
    """Make config.json name BertForMaskedLM, whatever its weights hold (as sentence-transformers exports do)."""
    config = json.loads((directory / "config.json").read_text())
    config["architectures"] = ["BertForMaskedLM"]
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def bare_with_task_config(tmp_path_factory) -> dict[str, Path]:
    """A bare BertModel (with its pooler) whose config names BertForMaskedLM, compressed at R = H*d."""
    root = tmp_path_factory.mktemp("bare")
    source = _masked_lm_config(make_checkpoint("bert", root / "source"))
    (source / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghij"]) + "\n")
    full = root / "full"
    compress(source, full, CompressOptions(rank=FAMILIES["bert"]["n_head"] * FAMILIES["bert"]["head_dim"]))
    return {"source": source, "full": full}


def test_bare_weights_load_the_base_model_whatever_the_config_names(bare_with_task_config):
    from safetensors import safe_open

    with safe_open(str(bare_with_task_config["source"] / "model.safetensors"), "pt") as f:
        assert "pooler.dense.weight" in f.keys() and not any(k.startswith(("bert.", "cls.")) for k in f.keys())
    model = from_pretrained(bare_with_task_config["full"])
    assert type(model) is transformers.BertModel
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = transformers.BertModel.from_pretrained(bare_with_task_config["source"]).eval()(ids)
        torch.testing.assert_close(model(ids).pooler_output, expected.pooler_output, rtol=0, atol=1e-4)
    # an explicit class is still obeyed (and refused when the weights do not fit it)
    with pytest.raises(BadInputError, match="tensors the model does not take: pooler.dense.bias"):
        from_pretrained(bare_with_task_config["full"], model_class="BertForMaskedLM")


def test_bare_weights_evaluate_and_remote_code(bare_with_task_config, tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dynamic

    from collabcompress.commands.evaluate import evaluate

    result = evaluate(bare_with_task_config["source"], bare_with_task_config["full"], ["a b c", "d e f g"],
                      lee=False, max_length=16)
    assert result["model_class"] == "BertModel"
    assert result["cosine_min"] == pytest.approx(1.0, abs=1e-6)
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    directory = tmp_path / "remote"
    shutil.copytree(bare_with_task_config["full"], directory)
    write_remote_code(directory)
    config = json.loads((directory / "config.json").read_text())
    assert config["auto_map"] == {"AutoModel": "modeling_collabcompress.CollaborativeBertModel"}
    model = transformers.AutoModel.from_pretrained(str(directory), trust_remote_code=True)
    assert isinstance(model, transformers.BertModel) and len(collaborative_modules(model)) == 2


def test_task_head_weights_load_the_task_class(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    transformers.BertForMaskedLM(config).eval().save_pretrained(str(tmp_path / "source"))
    compress(tmp_path / "source", tmp_path / "full", CompressOptions(rank=32))
    model = from_pretrained(tmp_path / "full")
    assert type(model) is transformers.BertForMaskedLM
    assert set(collaborative_modules(model)) == {f"bert.encoder.layer.{i}.attention.self" for i in range(2)}
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = transformers.BertForMaskedLM.from_pretrained(tmp_path / "source").eval()(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-4)
