"""Tiny checkpoints with each architecture family's real tensor naming, for the tests.

    from families import make_checkpoint, FAMILIES, REFUSED

Each transformers family is a small, randomly initialised transformers model (fixed
``torch.manual_seed``) saved with ``save_pretrained(dir, safe_serialization=True)``, so
``config.json`` sits beside ``model.safetensors`` exactly as in a real checkpoint. After
the initialisation every ``*.bias`` tensor gets small seeded noise (transformers
initialises Linear biases to zero, which would make the content bias c_h = W_K^h^T b_Q^h
and the bias handling untestable). ``timm-vit`` is hand-made with timm's naming. The
refused cases are real rotary / grouped-query / query-key-normalised models.

Tensor names observed with transformers 5.24 (torch 2.13), layer 0; "(in, out)" notes the
Conv1D layout; D = d_model, every file < 200 KB, all thirteen built in about
a second after transformers and its model modules are imported:

  bert       BertModel      encoder.layer.0.attention.self.query.weight (32, 32) + .bias (32,)
                            encoder.layer.0.attention.self.key.weight   (32, 32) + .bias (32,)
                            (no "bert." prefix: a bare BertModel saves without it)
                            config: num_attention_heads=4, hidden_size=32
  roberta    RobertaModel   same names as bert (no "roberta." prefix); config model_type "roberta"
  mpnet      MPNetModel     encoder.layer.0.attention.attn.q.weight (32, 32) + .bias
                            encoder.layer.0.attention.attn.k.weight (32, 32) + .bias
                            plus encoder.relative_attention_bias.weight (32 buckets, 4 heads)
                            config: num_attention_heads=4, hidden_size=32
  distilbert DistilBertModel transformer.layer.0.attention.q_lin.weight (32, 32) + .bias
                            transformer.layer.0.attention.k_lin.weight (32, 32) + .bias
                            config: n_heads=4, dim=32
  albert     AlbertModel    encoder.albert_layer_groups.0.albert_layers.0.attention.query.weight (32, 32) + .bias
                            encoder.albert_layer_groups.0.albert_layers.0.attention.key.weight   (32, 32) + .bias
                            ONE module although num_hidden_layers=2 (num_hidden_groups=1, inner_group_num=1);
                            embedding_size=16 != hidden_size=32 (encoder.embedding_hidden_mapping_in (32, 16))
                            config: num_attention_heads=4, hidden_size=32
  vit        ViTModel       encoder.layer.0.attention.attention.query.weight (32, 32) + .bias
                            encoder.layer.0.attention.attention.key.weight   (32, 32) + .bias
                            config: num_attention_heads=4, hidden_size=32 (qkv_bias=true)
  gpt2       GPT2Model      h.0.attn.c_attn.weight (32, 96) = (in, 3*out), Conv1D, still fused in 5.24
                            h.0.attn.c_attn.bias (96,)   [q | k | v] along the last axis
                            (no "transformer." prefix; no attn.bias/masked_bias buffers saved)
                            config: n_head=4, n_embd=32
  timm-vit   (hand-made)    blocks.0.attn.qkv.weight (96, 32) = (3*out, in), Linear, + .bias (96,)
                            blocks.0.attn.proj.weight (32, 32); config: num_heads=4, embed_dim=32
                            (also in "model_args"; real timm hub configs carry neither, see below)
  t5         T5Model        encoder.block.0.layer.0.SelfAttention.{q,k}.weight   (48, 32)  no bias
                            decoder.block.0.layer.0.SelfAttention.{q,k}.weight   (48, 32)
                            decoder.block.0.layer.1.EncDecAttention.{q,k}.weight (48, 32)
                            .o.weight (32, 48); relative_attention_bias (32, 4) only in block 0 of each side
                            config: num_heads=4, d_kv=12, d_model=32 (H*d = 48 != D = 32; d_kv=12
                            rather than 16 keeps the file under 200 KB)
  bart       BartModel      encoder.layers.0.self_attn.{q,k}_proj.weight     (32, 32) + .bias
                            decoder.layers.0.self_attn.{q,k}_proj.weight     (32, 32) + .bias
                            decoder.layers.0.encoder_attn.{q,k}_proj.weight  (32, 32) + .bias
                            config: encoder_attention_heads=4 (d=8), decoder_attention_heads=2 (d=16), d_model=32
Refused:
  llama      LlamaModel     layers.0.self_attn.{q,k,v,o}_proj.weight (32, 32), no bias;
                            config: model_type "llama", num_attention_heads=4, num_key_value_heads=4,
                            head_dim=8, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}
  llama-gqa  LlamaModel     q_proj (32, 32), k_proj/v_proj (16, 32); num_key_value_heads=2 (< 4)
  qk-norm    Qwen3Model     layers.0.self_attn.q_norm.weight (8,), k_norm.weight (8,) (per head, RMSNorm
                            over head_dim) beside q_proj/k_proj (32, 32); config model_type "qwen3", MHA
                            (num_key_value_heads=4), also rotary.

Surprises / facts worth knowing (transformers 5.24):
  * Bare base models (BertModel, RobertaModel, GPT2Model, ...) save with NO "bert."/"roberta."/
    "transformer." prefix; task-head models (BertForMaskedLM, ...) carry it.
  * Tied tensors are dropped by save_pretrained: T5 and BART save only "shared.weight", not
    encoder.embed_tokens.weight / decoder.embed_tokens.weight; loading re-ties them (no missing keys).
  * T5 projections have no bias and q/k/v/o are not shared between layers; relative_attention_bias
    exists only in block 0 of each stack.
  * ViT is REFACTORED in 5.24: ViTModel has no "encoder" module; in memory the attention is
    layers.{i}.attention.{q,k,v,o}_proj (ViTAttention, scaling head_dim**-0.5). A checkpoint
    conversion mapping (transformers/conversion_mapping.py, "ViTModel") renames the legacy names
    on load (encoder.layer. -> layers., attention.query -> q_proj, ...) and save_pretrained
    writes them back, so files keep the legacy names recorded above, but model.state_dict() /
    named_modules() do not. Code that patches a loaded ViT must map
    "encoder.layer.{i}.attention.attention" -> "layers.{i}.attention" (FAMILIES["vit"]
    ["in_memory_first_module"]). No other family here is renamed in memory (checked against
    state_dict()); T5/BART only add the tied encoder/decoder.embed_tokens.weight.
  * GPT-2 still uses Conv1D (transformers.pytorch_utils.Conv1D): c_attn.weight is (in, 3*out).
  * T5Attention.scaling = 1.0 (scale 1), ViT/BERT-style 1/sqrt(head_dim).
  * Rotary settings moved: configs write "rope_parameters": {"rope_theta", "rope_type"} instead of a
    top-level "rope_theta". Detection must look at rope_parameters (and model_type).
  * Llama-family names (layers.{i}.self_attn.{q,k}_proj) also match the bart-style pattern
    "...self_attn.{q_proj,k_proj}": without config.json a Llama checkpoint looks like BART. The
    only name-level hint is the absence of q/k biases and of encoder/decoder prefixes.
  * The refused checkpoints combine several reasons: llama-gqa is grouped AND rotary, qk-norm
    (Qwen3) is normalised AND rotary. A refusal must mention every reason (or check grouped and
    q/k-norm before rotary) for the REFUSED keywords to be found.
  * Real timm configs (hub config.json) hold "architecture", "num_classes", "num_features",
    "pretrained_cfg" but no head count; the fixture adds num_heads/embed_dim and "model_args".
  * bias init: transformers zero-initialises Linear biases; this module adds seeded noise to them.
"""

from __future__ import annotations

import contextlib

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

__all__ = ["make_checkpoint", "FAMILIES", "REFUSED", "qk_tensors", "family_names", "make_rotary_checkpoint",
           "ROTARY", "ROTARY_REFUSED", "rotary_names", "rotary_facts", "rotary_tensors", "make_char_tokenizer",
           "model_inputs"]

VOCAB = 100
D = 32
LAYERS = 2
HEADS = 4
FFN = 64
POSITIONS = 64


# --------------------------------------------------------------------------- expected facts

def _module_list(prefixes: list[str], heads: list[int], head_dims: list[int], query: str, key: str | None,
                 *, bias: bool, d_model: int = D, fused: str | None = None) -> list[dict[str, Any]]:
    """One entry per attention module, in model order (encoder first, then decoder)."""
    out = []
    for m, h, d in zip(prefixes, heads, head_dims):
        entry: dict[str, Any] = {"module": m, "heads": h, "head_dim": d}
        if fused == "conv1d":
            entry["tensors"] = {f"{m}.{query}.weight": (d_model, 3 * h * d), f"{m}.{query}.bias": (3 * h * d,)}
        elif fused == "linear":
            entry["tensors"] = {f"{m}.{query}.weight": (3 * h * d, d_model), f"{m}.{query}.bias": (3 * h * d,)}
        else:
            entry["tensors"] = {f"{m}.{query}.weight": (h * d, d_model), f"{m}.{key}.weight": (h * d, d_model)}
            if bias:
                entry["tensors"].update({f"{m}.{query}.bias": (h * d,), f"{m}.{key}.bias": (h * d,)})
        entry["query"] = f"{m}.{query}.weight"
        entry["key"] = f"{m}.{query if fused else key}.weight"
        out.append(entry)
    return out


def _facts(arch: str, model_class: str | None, modules: list[dict[str, Any]], *, d_model: int = D,
           heads_config: tuple[str, ...], scale_one: bool = False, fused: str | None = None,
           qk_bias: bool = True) -> dict[str, Any]:
    first = modules[0]
    return {
        "arch": arch,
        "model_class": model_class,
        "n_modules": len(modules),
        "n_head": first["heads"],
        "head_dim": first["head_dim"],
        "d_model": d_model,
        "first_module": first["module"],
        # extras
        "modules": modules,                      # every module in model order, with its heads and tensors
        "heads_config": heads_config,            # config.json keys that give the head count(s)
        "scale": 1.0 if scale_one else None,     # None: 1/sqrt(head_dim)
        "fused": fused,                          # "conv1d", "linear" or None
        "qk_bias": qk_bias,
        # module prefix of the first attention module in a loaded transformers model (differs for vit)
        "in_memory_first_module": first["module"],
    }


def _layers(fmt: str, n: int = LAYERS) -> list[str]:
    return [fmt.format(i=i) for i in range(n)]


_T5_HEADS, _T5_DKV = 4, 12
_BART_ENC_HEADS, _BART_DEC_HEADS = 4, 2

FAMILIES: dict[str, dict[str, Any]] = {
    "bert": _facts("bert", "BertModel", _module_list(
        _layers("encoder.layer.{i}.attention.self"), [HEADS] * 2, [D // HEADS] * 2, "query", "key", bias=True),
        heads_config=("num_attention_heads",)),
    "roberta": _facts("bert", "RobertaModel", _module_list(
        _layers("encoder.layer.{i}.attention.self"), [HEADS] * 2, [D // HEADS] * 2, "query", "key", bias=True),
        heads_config=("num_attention_heads",)),
    "mpnet": _facts("mpnet", "MPNetModel", _module_list(
        _layers("encoder.layer.{i}.attention.attn"), [HEADS] * 2, [D // HEADS] * 2, "q", "k", bias=True),
        heads_config=("num_attention_heads",)),
    "distilbert": _facts("distilbert", "DistilBertModel", _module_list(
        _layers("transformer.layer.{i}.attention"), [HEADS] * 2, [D // HEADS] * 2, "q_lin", "k_lin", bias=True),
        heads_config=("n_heads",)),
    "albert": _facts("albert", "AlbertModel", _module_list(
        ["encoder.albert_layer_groups.0.albert_layers.0.attention"], [HEADS], [D // HEADS], "query", "key",
        bias=True), heads_config=("num_attention_heads",)),
    "vit": _facts("vit", "ViTModel", _module_list(
        _layers("encoder.layer.{i}.attention.attention"), [HEADS] * 2, [D // HEADS] * 2, "query", "key",
        bias=True), heads_config=("num_attention_heads",)),
    "gpt2": _facts("gpt2", "GPT2Model", _module_list(
        _layers("h.{i}.attn"), [HEADS] * 2, [D // HEADS] * 2, "c_attn", None, bias=True, fused="conv1d"),
        heads_config=("n_head",), fused="conv1d"),
    "timm-vit": _facts("timm-vit", None, _module_list(
        _layers("blocks.{i}.attn"), [HEADS] * 2, [D // HEADS] * 2, "qkv", None, bias=True, fused="linear"),
        heads_config=("num_heads",), fused="linear"),
    "t5": _facts("t5", "T5Model", _module_list(
        _layers("encoder.block.{i}.layer.0.SelfAttention")
        + [m for i in range(LAYERS) for m in (f"decoder.block.{i}.layer.0.SelfAttention",
                                               f"decoder.block.{i}.layer.1.EncDecAttention")],
        [_T5_HEADS] * 6, [_T5_DKV] * 6, "q", "k", bias=False),
        heads_config=("num_heads",), scale_one=True, qk_bias=False),
    "bart": _facts("bart", "BartModel", _module_list(
        _layers("encoder.layers.{i}.self_attn")
        + [m for i in range(LAYERS) for m in (f"decoder.layers.{i}.self_attn", f"decoder.layers.{i}.encoder_attn")],
        [_BART_ENC_HEADS] * 2 + [_BART_DEC_HEADS] * 4,
        [D // _BART_ENC_HEADS] * 2 + [D // _BART_DEC_HEADS] * 4, "q_proj", "k_proj", bias=True),
        heads_config=("encoder_attention_heads", "decoder_attention_heads")),
}

FAMILIES["vit"]["in_memory_first_module"] = "layers.0.attention"  # q_proj / k_proj in memory

# llama and llama-gqa are supported since issue 13 (rotary families; tests/test_rotary_cli.py);
# their builders stay for tests that want a LLaMA checkpoint.
REFUSED: dict[str, str] = {
    "qk-norm": "norm",
}

# transformers class of each refused checkpoint, and its query/key weight shapes in layer 0
REFUSED_FACTS: dict[str, dict[str, Any]] = {
    "llama": {"model_class": "LlamaModel", "tensors": {
        "layers.0.self_attn.q_proj.weight": (D, D), "layers.0.self_attn.k_proj.weight": (D, D)}},
    "llama-gqa": {"model_class": "LlamaModel", "tensors": {
        "layers.0.self_attn.q_proj.weight": (D, D), "layers.0.self_attn.k_proj.weight": (D // 2, D)}},
    "qk-norm": {"model_class": "Qwen3Model", "tensors": {
        "layers.0.self_attn.q_proj.weight": (D, D), "layers.0.self_attn.k_proj.weight": (D, D),
        "layers.0.self_attn.q_norm.weight": (D // HEADS,), "layers.0.self_attn.k_norm.weight": (D // HEADS,)}},
}


def family_names() -> list[str]:
    """Every checkpoint name make_checkpoint accepts."""
    return [*FAMILIES, *REFUSED]


def qk_tensors(name: str) -> dict[str, tuple[int, ...]]:
    """Expected query/key (or fused) tensor names -> shapes of checkpoint ``name``."""
    if name in FAMILIES:
        out: dict[str, tuple[int, ...]] = {}
        for m in FAMILIES[name]["modules"]:
            out.update(m["tensors"])
        return out
    return dict(REFUSED_FACTS[name]["tensors"])


# --------------------------------------------------------------------------- builders

def _transformers_model(name: str):
    import transformers as T

    common = dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  intermediate_size=FFN, max_position_embeddings=POSITIONS)
    if name == "bert":
        return T.BertModel(T.BertConfig(**common))
    if name == "roberta":
        return T.RobertaModel(T.RobertaConfig(**common))
    if name == "mpnet":
        return T.MPNetModel(T.MPNetConfig(**common))
    if name == "distilbert":
        return T.DistilBertModel(T.DistilBertConfig(vocab_size=VOCAB, dim=D, n_layers=LAYERS, n_heads=HEADS,
                                                    hidden_dim=FFN, max_position_embeddings=POSITIONS))
    if name == "albert":
        return T.AlbertModel(T.AlbertConfig(**common, embedding_size=16))
    if name == "vit":
        return T.ViTModel(T.ViTConfig(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                      intermediate_size=FFN, image_size=32, patch_size=8, num_channels=3))
    if name == "gpt2":
        return T.GPT2Model(T.GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=LAYERS, n_head=HEADS,
                                        n_positions=POSITIONS, n_inner=FFN, bos_token_id=0, eos_token_id=0))
    if name == "t5":
        return T.T5Model(T.T5Config(vocab_size=VOCAB, d_model=D, d_kv=_T5_DKV, d_ff=FFN // 4, num_layers=LAYERS,
                                    num_decoder_layers=LAYERS, num_heads=_T5_HEADS))
    if name == "bart":
        return T.BartModel(T.BartConfig(vocab_size=VOCAB, d_model=D, encoder_layers=LAYERS, decoder_layers=LAYERS,
                                        encoder_attention_heads=_BART_ENC_HEADS,
                                        decoder_attention_heads=_BART_DEC_HEADS,
                                        encoder_ffn_dim=FFN // 2, decoder_ffn_dim=FFN // 2,
                                        max_position_embeddings=POSITIONS // 2))
    if name in ("llama", "llama-gqa"):
        return T.LlamaModel(T.LlamaConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS,
                                          num_attention_heads=HEADS,
                                          num_key_value_heads=HEADS if name == "llama" else HEADS // 2,
                                          intermediate_size=FFN, max_position_embeddings=POSITIONS))
    if name == "qk-norm":
        return T.Qwen3Model(T.Qwen3Config(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS,
                                          num_attention_heads=HEADS, num_key_value_heads=HEADS, head_dim=D // HEADS,
                                          intermediate_size=FFN, max_position_embeddings=POSITIONS))
    raise KeyError(name)


def _perturb_biases(model: torch.nn.Module, seed: int, scale: float = 0.02) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters()):
            if pname.endswith("bias") and p.is_floating_point():
                p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _timm_vit(directory: Path, seed: int) -> None:
    """A timm VisionTransformer state dict (vit_tiny-style naming), D=32, 4 heads, 2 blocks."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (std * torch.randn(*shape, generator=gen)).contiguous()

    patch, img, channels, classes = 8, 32, 3, 10
    n_tokens = (img // patch) ** 2 + 1
    t: dict[str, torch.Tensor] = {
        "cls_token": rnd(1, 1, D),
        "pos_embed": rnd(1, n_tokens, D),
        "patch_embed.proj.weight": rnd(D, channels, patch, patch),
        "patch_embed.proj.bias": rnd(D),
        "norm.weight": 1.0 + rnd(D),
        "norm.bias": rnd(D),
        "head.weight": rnd(classes, D),
        "head.bias": rnd(classes),
    }
    for i in range(LAYERS):
        b = f"blocks.{i}"
        t.update({
            f"{b}.norm1.weight": 1.0 + rnd(D), f"{b}.norm1.bias": rnd(D),
            f"{b}.attn.qkv.weight": rnd(3 * D, D, std=1 / math.sqrt(D)), f"{b}.attn.qkv.bias": rnd(3 * D),
            f"{b}.attn.proj.weight": rnd(D, D, std=1 / math.sqrt(D)), f"{b}.attn.proj.bias": rnd(D),
            f"{b}.norm2.weight": 1.0 + rnd(D), f"{b}.norm2.bias": rnd(D),
            f"{b}.mlp.fc1.weight": rnd(FFN, D), f"{b}.mlp.fc1.bias": rnd(FFN),
            f"{b}.mlp.fc2.weight": rnd(D, FFN), f"{b}.mlp.fc2.bias": rnd(D),
        })
    save_file(dict(sorted(t.items())), str(directory / "model.safetensors"), metadata={"format": "pt"})
    model_args = {"img_size": img, "patch_size": patch, "embed_dim": D, "depth": LAYERS, "num_heads": HEADS,
                  "mlp_ratio": FFN / D, "qkv_bias": True}
    config = {
        "architecture": "vit_tiny_patch16_224",
        "num_classes": classes,
        "num_features": D,
        "global_pool": "token",
        "num_heads": HEADS,
        "embed_dim": D,
        "depth": LAYERS,
        "model_args": model_args,
        "pretrained_cfg": {
            "tag": "collabcompress_fixture", "custom_load": False, "input_size": [channels, img, img],
            "fixed_input_size": True, "interpolation": "bicubic", "crop_pct": 0.9, "crop_mode": "center",
            "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "num_classes": classes, "pool_size": None,
            "first_conv": "patch_embed.proj", "classifier": "head",
        },
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def quiet_transformers():
    """transformers' logging at error level and no progress bars, restored afterwards."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    progress = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if progress:
            transformers.utils.logging.enable_progress_bar()


def make_checkpoint(family: str, directory: Path, *, seed: int = 0, with_config: bool = True) -> Path:
    """Build the tiny checkpoint ``family`` (a key of FAMILIES or REFUSED) in ``directory``.

    Writes ``model.safetensors`` and ``config.json`` (dropped when ``with_config`` is false,
    to test the "--heads needed" path). Same family and seed give the same tensors.
    Returns ``directory``.
    """
    directory = Path(directory)
    if family not in FAMILIES and family not in REFUSED:
        raise KeyError(f"unknown fixture family {family!r}; known: {', '.join(family_names())}")
    directory.mkdir(parents=True, exist_ok=True)
    if family == "timm-vit":
        _timm_vit(directory, seed)
    else:
        with quiet_transformers():
            torch.manual_seed(seed)
            model = _transformers_model(family)
            _perturb_biases(model, seed)
            model.eval()
            model.save_pretrained(str(directory), safe_serialization=True)
    if not with_config:
        (directory / "config.json").unlink(missing_ok=True)
    return directory



# --------------------------------------------------------------------------- rotary decoders (issue 13)
#
# Tiny causal LMs (``*ForCausalLM``, so the names carry the real "model." prefix:
# model.layers.{i}.self_attn.{q,k,v,o}_proj) of the rotary families, saved with
# save_pretrained (model.safetensors, config.json, generation_config.json) plus a tiny
# character-level tokenizer (tokenizer.json, tokenizer_config.json) so evaluate/perplexity
# run on them. D = 32, H = 4 query heads, G = 2 key/value heads (g(h) = h // 2), d = 8
# (4 frequencies), 2 layers, vocabulary 64, every file < 100 KB, each built in ~0.05 s.
# initializer_range = 0.2 (transformers' 0.02 gives near-uniform attention, where a wrong
# rotation would hardly change the output); biases get seeded noise of the same scale.
#
# Facts observed with transformers 5.24:
#   * every config writes "rope_parameters": {"rope_theta", "rope_type", ...}; a
#     partial_rotary_factor goes INTO rope_parameters too (StableLM), not top level.
#   * yarn has attention_scaling 1 + 0.1 ln(factor) (1.0693 for factor 2): transformers
#     multiplies cos and sin by it, so q.k scores carry its square.
#   * tied embeddings (llama here, as SmolLM2): only model.embed_tokens.weight is saved.
#   * Qwen2 has q/k/v biases and no o_proj bias; Mistral adds "sliding_window": 4096.
#   * Cohere pairs dimensions (2i, 2i+1) (interleaved rotate_half) with the SAME tensor
#     names as llama and no config flag: only model_type "cohere" tells; without
#     config.json it is indistinguishable from llama by names (it has no
#     post_attention_layernorm, a weak hint).
#   * AutoTokenizer ignores tokenizer_config.json for model_type "qwen2" and builds its own
#     byte-level Qwen2Tokenizer from tokenizer.json: on the qwen2 fixture it drops spaces and
#     upper-case letters (ids stay < 64). PreTrainedTokenizerFast.from_pretrained reads the
#     character tokenizer exactly.

ROTARY_D, ROTARY_HEADS, ROTARY_KV_HEADS, ROTARY_HEAD_DIM, ROTARY_VOCAB, ROTARY_LAYERS = 32, 4, 2, 8, 64, 2
ROTARY_INIT = 0.2


def _rotary(model_class: str, model_type: str, *, kv_heads: int = ROTARY_KV_HEADS, bias: bool = False,
            tied: bool = False, rope: dict[str, Any] | None = None, **config: Any) -> dict[str, Any]:
    rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, **(rope or {})}
    return {
        "model_class": model_class,             # transformers class (config "architectures")
        "model_type": model_type,
        "n_layers": ROTARY_LAYERS,
        "n_head": ROTARY_HEADS,                 # H
        "kv_heads": kv_heads,                   # G
        "head_dim": ROTARY_HEAD_DIM,            # d
        "d_model": ROTARY_D,                    # D
        "bias": bias,                           # q/k/v_proj biases (Qwen2)
        "tied": tied,                           # lm_head tied to the embedding
        "rope_parameters": rope_parameters,
        "config": config,                       # further config keys of the builder
        "first_module": "model.layers.0.self_attn",
    }


# supported: name -> facts
ROTARY: dict[str, dict[str, Any]] = {
    "llama": _rotary("LlamaForCausalLM", "llama", tied=True),
    "llama-mha": _rotary("LlamaForCausalLM", "llama", kv_heads=ROTARY_HEADS),
    "llama-rope-linear": _rotary("LlamaForCausalLM", "llama", rope={"rope_type": "linear", "factor": 2.0}),
    "llama-rope-llama3": _rotary("LlamaForCausalLM", "llama", rope={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "llama-rope-yarn": _rotary("LlamaForCausalLM", "llama", rope={
        "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}),
    "mistral": _rotary("MistralForCausalLM", "mistral"),
    "qwen2": _rotary("Qwen2ForCausalLM", "qwen2", bias=True),
}

# refused with exit code 4: name -> a word the refusal message must contain
ROTARY_REFUSED: dict[str, str] = {
    "qwen3": "norm",                 # q_norm / k_norm per head (Qwen3ForCausalLM)
    "stablelm-partial": "partial",   # partial_rotary_factor 0.5 (StableLmForCausalLM)
    "cohere-interleaved": "interleaved",  # pairs (2i, 2i+1) (CohereForCausalLM)
}
ROTARY_REFUSED_FACTS: dict[str, dict[str, Any]] = {
    "qwen3": _rotary("Qwen3ForCausalLM", "qwen3"),
    "stablelm-partial": _rotary("StableLmForCausalLM", "stablelm", rope={"partial_rotary_factor": 0.5}),
    "cohere-interleaved": _rotary("CohereForCausalLM", "cohere", bos_token_id=1, eos_token_id=2, pad_token_id=0),
}


def rotary_names() -> list[str]:
    """Every checkpoint name make_rotary_checkpoint accepts (supported first, then refused)."""
    return [*ROTARY, *ROTARY_REFUSED]


def rotary_facts(name: str) -> dict[str, Any]:
    """The facts of rotary checkpoint ``name`` (ROTARY or ROTARY_REFUSED_FACTS)."""
    return ROTARY[name] if name in ROTARY else ROTARY_REFUSED_FACTS[name]


def rotary_tensors(name: str) -> dict[str, tuple[int, ...]]:
    """Expected attention tensor names -> shapes of rotary checkpoint ``name``, every layer."""
    f = rotary_facts(name)
    q, kv = f["n_head"] * f["head_dim"], f["kv_heads"] * f["head_dim"]
    out: dict[str, tuple[int, ...]] = {}
    for i in range(f["n_layers"]):
        m = f"model.layers.{i}.self_attn"
        out.update({f"{m}.q_proj.weight": (q, f["d_model"]), f"{m}.k_proj.weight": (kv, f["d_model"]),
                    f"{m}.v_proj.weight": (kv, f["d_model"]), f"{m}.o_proj.weight": (f["d_model"], q)})
        if f["bias"]:
            out.update({f"{m}.q_proj.bias": (q,), f"{m}.k_proj.bias": (kv,), f"{m}.v_proj.bias": (kv,)})
        if f["model_type"] == "qwen3":
            out.update({f"{m}.q_norm.weight": (f["head_dim"],), f"{m}.k_norm.weight": (f["head_dim"],)})
    return out


# the tiny tokenizer: one token per character (lower-cased), unknown characters -> <unk>
TOKENIZER_SPECIALS = ("<unk>", "<s>", "</s>")
TOKENIZER_CHARS = " \nabcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()$%&/+*=#@[]_"


def make_char_tokenizer(directory: Path) -> Path:
    """Save a 64-token character-level ``PreTrainedTokenizerFast`` in ``directory``.

    Ids: <unk> 0, <s> 1, </s> 2, then TOKENIZER_CHARS in order (text is lower-cased first;
    other characters map to <unk>). No special tokens are added when encoding; decoding
    concatenates the characters. Loadable with ``AutoTokenizer.from_pretrained(directory)``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*TOKENIZER_SPECIALS, *TOKENIZER_CHARS])}
    if len(vocab) != ROTARY_VOCAB:
        raise AssertionError(f"the character tokenizer has {len(vocab)} tokens, not {ROTARY_VOCAB}")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.save_pretrained(str(directory))
    return directory


def _rotary_model(name: str):
    import transformers as T

    f = rotary_facts(name)
    common = dict(vocab_size=ROTARY_VOCAB, hidden_size=f["d_model"], num_hidden_layers=f["n_layers"],
                  num_attention_heads=f["n_head"], num_key_value_heads=f["kv_heads"], head_dim=f["head_dim"],
                  intermediate_size=2 * f["d_model"], max_position_embeddings=POSITIONS,
                  initializer_range=ROTARY_INIT, tie_word_embeddings=f["tied"],
                  rope_parameters=dict(f["rope_parameters"]), **f["config"])
    model_class = getattr(T, f["model_class"])
    config_class = getattr(T, f["model_class"].replace("ForCausalLM", "Config"))
    return model_class(config_class(**common))


def make_rotary_checkpoint(name: str, directory: Path, *, seed: int = 0, with_config: bool = True,
                           tokenizer: bool = True) -> Path:
    """Build the tiny rotary decoder ``name`` (a key of ROTARY or ROTARY_REFUSED) in ``directory``.

    Writes what ``save_pretrained`` writes for a ``*ForCausalLM`` (model.safetensors,
    config.json, generation_config.json) and, with ``tokenizer``, the 64-token character
    tokenizer (``make_char_tokenizer``). ``with_config=False`` removes config.json and
    generation_config.json (a bare checkpoint: heads must come from ``--heads``/``--kv-heads``).
    Same name and seed give the same bytes. Returns ``directory``.
    """
    directory = Path(directory)
    if name not in ROTARY and name not in ROTARY_REFUSED:
        raise KeyError(f"unknown rotary fixture {name!r}; known: {', '.join(rotary_names())}")
    directory.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        torch.manual_seed(seed)
        model = _rotary_model(name)
        _perturb_biases(model, seed, scale=ROTARY_INIT)
        model.eval()
        model.save_pretrained(str(directory), safe_serialization=True)
        if tokenizer:
            make_char_tokenizer(directory)
    if not with_config:
        (directory / "config.json").unlink(missing_ok=True)
        (directory / "generation_config.json").unlink(missing_ok=True)
    return directory


def model_inputs(name: str, *, low: int = 1, high: int = 100, image_size: int = 32) -> dict[str, torch.Tensor]:
    """Seeded inputs for the family fixture ``name``: pixels for vit; else token ids in [low, high)
    with padding in the second sequence (and decoder ids for t5 and bart)."""
    g = torch.Generator().manual_seed(0)
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, image_size, image_size, generator=g)}
    ids = torch.randint(low, high, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding in the second sequence
    inputs = {"input_ids": ids, "attention_mask": mask}
    if name in ("t5", "bart"):
        inputs["decoder_input_ids"] = torch.randint(low, high, (2, 5), generator=g)
    return inputs
