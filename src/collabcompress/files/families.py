"""The family registry: every fact about each architecture family, in one place.

A :class:`Family` holds all the tool knows about one family: how its query/key (or fused)
tensors are named, which config.json keys give its head counts, its fused layout, which
modules are cross-attention, its score scale, where its value/output projections and the
LayerNorm feeding its attention live, and which transformers attention classes
:mod:`collabcompress.hf` can run (with the adapter that runs them). Every other module asks
the registry (:func:`find_family`, :data:`FAMILIES`); adding a family is one
``register(Family(...))``. docs/method.md is the table.

This module imports neither torch nor transformers, so listing families is cheap.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

__all__ = ["Family", "FAMILIES", "register", "find_family", "family_of_model_type", "HEAD_KEYS",
           "REFUSED_ROTARY_MODEL_TYPES", "KV_HEAD_KEYS", "LAYER_KEYS", "WIDTH_KEYS"]

# config.json keys giving the head count, in the order they are tried.
HEAD_KEYS = ("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads")
# config.json keys giving the key/value head count of a grouped-query (rotary) family.
KV_HEAD_KEYS = ("num_key_value_heads",)
# config.json keys giving the number of layers and the width D of the attention input (most families).
LAYER_KEYS = ("num_hidden_layers",)
WIDTH_KEYS = ("hidden_size",)

# Rotary model types whose attention the tool cannot yet re-parametrize (refused with exit code 4):
# the registered rotary families (``Family.model_types``) are the exceptions.
REFUSED_ROTARY_MODEL_TYPES = frozenset({
    "mixtral", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3",
    "gemma3_text", "gptj", "gpt_neox", "phi", "phi3", "falcon", "roformer", "esm", "olmo", "olmo2", "cohere",
    "stablelm", "starcoder2", "deepseek_v2", "deepseek_v3", "internlm2", "baichuan", "chatglm", "persimmon",
    "granite", "nemotron", "codegen", "mpt_rope", "modernbert",
})


@dataclass(frozen=True)
class Family:
    """One architecture family.

    Attributes:
        name: the family name (``--arch``, the manifest's ``source.architecture``).
        models: the models it covers, for ``collabcompress archs``.
        module: regex of the module prefix M that owns the query tensor (any prefix such as
            ``bert.`` may precede it).
        query, key: the query and key tensor names under M; ``key`` is ``None`` when fused.
        example: the naming, as docs/method.md writes it.
        fused: ``"conv1d"`` for GPT-2's (in, 3*out) ``c_attn``, ``"linear"`` for timm's
            (3*out, in) ``qkv``, or ``None`` for separate query and key tensors. Conv1D
            families store every projection (in, out).
        scale_one: the score scale is 1 (T5) instead of 1/sqrt(d).
        note: a short note for ``archs``.
        head_keys: config.json keys that give the head count, in order.
        side_head_keys: (encoder, decoder) config.json keys tried first, by the module's side.
        config_section: a config.json sub-dict whose keys override the top level (timm's
            ``model_args``).
        cross: regex matching the cross-attention modules (queries from the decoder, keys
            from the encoder), or ``None`` when the family has none.
        value, output: the value and output projection weights (``{m}`` = M, ``{parent}`` = M
            without its last component); ``value`` is ``None`` for a fused family (the value
            slice of the fused tensor).
        feeding_norms: templates of the norm whose output feeds the attention, tried in
            order (``{p}`` prefix, ``{i}`` layer, ``{prev}`` layer - 1, ``{side}``
            encoder/decoder, ``{g}``/``{j}`` ALBERT group/layer, ``{j}`` T5 sub-layer).
        hf_classes: names of the transformers attention classes of the family (or of a class
            they derive from); ``hf_adapter``: the name of the adapter class in
            :mod:`collabcompress.hf` that runs them, ``None`` when the family cannot be loaded.
        text: the model reads token ids (``calibrate`` and ``evaluate`` run on text).
        shared_layers: one stored block is applied at every layer (ALBERT).
        rotary: rotary position embeddings with grouped-query attention (docs/method.md,
            "Rotary decoders"): the key side is compressed into shared rotary keys.
        model_types: config.json ``model_type`` values that select the family.
        layer_keys: config.json keys giving the number of layers (attention modules that are
            not cross-attention), tried in order; ``()``: not checked.
        side_layer_keys: (encoder, decoder) keys tried first, by the module's side.
        width_keys: config.json keys giving D, the input width of the query and key
            projections; ``()``: not checked (timm configs describe hierarchical models too).
        attention_bias: whether a rotary family's q/k projections may have biases: ``True``
            (Qwen2), ``False`` (Mistral: never), or the config.json key saying so (LLaMA's
            ``attention_bias``, default false); ``None`` for the other families.
    """

    name: str
    models: str
    module: str
    query: str
    key: str | None
    example: str
    fused: str | None = None
    scale_one: bool = False
    note: str = ""
    head_keys: tuple[str, ...] = HEAD_KEYS
    side_head_keys: tuple[str, str] | None = None
    config_section: str | None = None
    cross: str | None = None
    value: str | None = None
    output: str | None = None
    feeding_norms: tuple[str, ...] = ()
    hf_classes: tuple[str, ...] = ()
    hf_adapter: str | None = None
    text: bool = True
    shared_layers: bool = False
    rotary: bool = False
    model_types: tuple[str, ...] = ()
    layer_keys: tuple[str, ...] = LAYER_KEYS
    side_layer_keys: tuple[str, str] | None = None
    width_keys: tuple[str, ...] = WIDTH_KEYS
    attention_bias: bool | str | None = None
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)
    key_pattern: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pattern = re.compile(rf"^(?P<m>(?:.*?){self.module})\.{re.escape(self.query)}\.weight$")
        object.__setattr__(self, "pattern", pattern)
        key = None if self.key is None else \
            re.compile(rf"^(?P<m>(?:.*?){self.module})\.{re.escape(self.key)}\.weight$")
        object.__setattr__(self, "key_pattern", key)

    @property
    def causal_lm(self) -> bool:
        """A decoder-only causal LM: read text as one stream in windows from an empty context,
        measured by perplexity (the rotary families)."""
        return self.rotary

    def scale(self, head_dim: int) -> float:
        """The score scale s of docs/method.md."""
        return 1.0 if self.scale_one else 1.0 / math.sqrt(head_dim)

    def is_cross(self, module: str) -> bool:
        """Whether ``module`` is a cross-attention module of this family."""
        return self.cross is not None and re.search(self.cross, module) is not None


FAMILIES: list[Family] = []


def register(family: Family) -> Family:
    """Add ``family`` to the registry (detection tries families in registration order)."""
    if find_family(family.name) is not None:
        raise ValueError(f"family {family.name!r} is already registered")
    FAMILIES.append(family)
    return family


def find_family(name: str) -> Family | None:
    """The registered family called ``name``, or ``None``."""
    return next((f for f in FAMILIES if f.name == name), None)


def family_of_model_type(model_type: object) -> Family | None:
    """The registered family whose ``model_types`` hold config.json's ``model_type``, or ``None``."""
    return next((f for f in FAMILIES if isinstance(model_type, str) and model_type in f.model_types), None)


_BERT_NORMS = ("{p}encoder.layer.{prev}.output.LayerNorm", "{p}embeddings.LayerNorm")

register(Family(
    "bert", "BERT, RoBERTa, ELECTRA, XLM-R, MiniLM", r"encoder\.layer\.\d+\.attention\.self", "query", "key",
    "encoder.layer.{i}.attention.self.{query,key}",
    value="{m}.value.weight", output="{parent}.output.dense.weight", feeding_norms=_BERT_NORMS,
    hf_classes=("BertSelfAttention", "RobertaSelfAttention", "ElectraSelfAttention", "XLMRobertaSelfAttention",
                "CamembertSelfAttention"), hf_adapter="_BertSelf"))
register(Family(
    "mpnet", "MPNet", r"encoder\.layer\.\d+\.attention\.attn", "q", "k", "encoder.layer.{i}.attention.attn.{q,k}",
    note="relative position bias is additive and untouched",
    value="{m}.v.weight", output="{m}.o.weight", feeding_norms=_BERT_NORMS,
    hf_classes=("MPNetSelfAttention",), hf_adapter="_MPNet"))
register(Family(
    "distilbert", "DistilBERT", r"transformer\.layer\.\d+\.attention", "q_lin", "k_lin",
    "transformer.layer.{i}.attention.{q_lin,k_lin}", layer_keys=("n_layers",), width_keys=("dim",),
    value="{m}.v_lin.weight", output="{m}.out_lin.weight",
    feeding_norms=("{p}transformer.layer.{prev}.output_layer_norm", "{p}embeddings.LayerNorm"),
    hf_classes=("DistilBertSelfAttention",), hf_adapter="_DistilBert"))
register(Family(
    "albert", "ALBERT", r"encoder\.albert_layer_groups\.\d+\.albert_layers\.\d+\.attention", "query", "key",
    "encoder.albert_layer_groups.{g}.albert_layers.{j}.attention.{query,key}", note="one block shared by all layers",
    value="{m}.value.weight", output="{m}.dense.weight",
    feeding_norms=("{p}encoder.albert_layer_groups.{g}.albert_layers.{j}.full_layer_layer_norm",),
    hf_classes=("AlbertAttention",), hf_adapter="_Albert", shared_layers=True, layer_keys=()))
register(Family(
    "vit", "HF ViT, DeiT", r"encoder\.layer\.\d+\.attention\.attention", "query", "key",
    "encoder.layer.{i}.attention.attention.{query,key}",
    value="{m}.value.weight", output="{parent}.output.dense.weight",
    feeding_norms=("{p}encoder.layer.{i}.layernorm_before",),
    hf_classes=("ViTAttention", "DeiTAttention"), hf_adapter="_ViT", text=False))
register(Family(
    "gpt2", "GPT-2", r"h\.\d+\.attn", "c_attn", None, "h.{i}.attn.c_attn", fused="conv1d",
    note="fused, Conv1D layout (in, 3*out)", layer_keys=("n_layer",), width_keys=("n_embd",),
    output="{m}.c_proj.weight", feeding_norms=("{p}h.{i}.ln_1",),
    hf_classes=("GPT2Attention",), hf_adapter="_GPT2"))
register(Family(
    "timm-vit", "timm ViT", r"blocks\.\d+\.attn", "qkv", None, "blocks.{i}.attn.qkv", fused="linear",
    note="fused, Linear layout (3*out, in); heads from --heads or config",
    config_section="model_args", output="{m}.proj.weight", feeding_norms=("{p}blocks.{i}.norm1",), text=False,
    layer_keys=(), width_keys=()))
register(Family(
    "t5", "T5", r"(?:encoder|decoder)\.block\.\d+\.layer\.\d+\.(?:SelfAttention|EncDecAttention)", "q", "k",
    "{encoder,decoder}.block.{i}.layer.{j}.{SelfAttention,EncDecAttention}.{q,k}",
    scale_one=True, note="no bias, scale 1", cross=r"EncDecAttention",
    layer_keys=(), side_layer_keys=("num_layers", "num_decoder_layers"), width_keys=("d_model",),
    value="{m}.v.weight", output="{m}.o.weight", feeding_norms=("{p}{side}.block.{i}.layer.{j}.layer_norm",),
    hf_classes=("T5Attention", "MT5Attention"), hf_adapter="_T5"))
register(Family(
    "bart", "BART, Marian, Whisper, CLIP", r"(?:self_attn|encoder_attn)", "q_proj", "k_proj",
    "...{self_attn,encoder_attn}.{q_proj,k_proj}", note="per-side head counts from config",
    side_head_keys=("encoder_attention_heads", "decoder_attention_heads"), cross=r"encoder_attn",
    side_layer_keys=("encoder_layers", "decoder_layers"), width_keys=("d_model", "hidden_size"),
    value="{m}.v_proj.weight", output="{m}.out_proj.weight",
    feeding_norms=("{p}{side}.layers.{i}.self_attn_layer_norm", "{p}{side}.layers.{i}.layer_norm1",
                   "{p}{side}.layers.{prev}.final_layer_norm", "{p}{side}.layernorm_embedding"),
    hf_classes=("BartAttention", "MBartAttention", "MarianAttention", "PegasusAttention"), hf_adapter="_Bart"))

_ROTARY_MODULE = r"(?:^|\.)layers\.\d+\.self_attn"
_ROTARY_NORMS = ("{p}layers.{i}.input_layernorm",)
register(Family(
    "llama", "LLaMA 1-3, SmolLM/SmolLM2, TinyLlama", _ROTARY_MODULE, "q_proj", "k_proj",
    "model.layers.{i}.self_attn.{q_proj,k_proj}", note="rotary, grouped-query (shared rotary keys)",
    value="{m}.v_proj.weight", output="{m}.o_proj.weight", feeding_norms=_ROTARY_NORMS,
    hf_classes=("LlamaAttention",), hf_adapter="_LlamaRotary", rotary=True, model_types=("llama",),
    attention_bias="attention_bias"))
register(Family(
    "mistral", "Mistral", _ROTARY_MODULE, "q_proj", "k_proj",
    "model.layers.{i}.self_attn.{q_proj,k_proj}", note="rotary, grouped-query, sliding window",
    value="{m}.v_proj.weight", output="{m}.o_proj.weight", feeding_norms=_ROTARY_NORMS,
    hf_classes=("MistralAttention",), hf_adapter="_LlamaRotary", rotary=True, model_types=("mistral",),
    attention_bias=False))
register(Family(
    "qwen2", "Qwen2, Qwen2.5", _ROTARY_MODULE, "q_proj", "k_proj",
    "model.layers.{i}.self_attn.{q_proj,k_proj}", note="rotary, grouped-query, q/k/v biases",
    value="{m}.v_proj.weight", output="{m}.o_proj.weight", feeding_norms=_ROTARY_NORMS,
    hf_classes=("Qwen2Attention",), hf_adapter="_LlamaRotary", rotary=True, model_types=("qwen2",),
    attention_bias=True))
