"""Load a compressed output directory as a working transformers model (the ``hf`` extra).

:func:`from_pretrained` builds the source family's transformers model from the output
directory's ``config.json``, swaps every compressed attention module for a collaborative
one (:class:`~collabcompress.nn.CollaborativeAttention` plus the module's own value and
output projections), and loads the weights with strict key checking. The swapped module
is a subclass of the original attention class, keeps its forward signature and return
convention (transformers 5), and computes its scores from the collaborative tensors; the
model's own attention kernel (``eager`` or ``sdpa``) does the rest, so masks, causality,
caches and position biases behave as in the original model. The key has one head axis
shared by all heads (R + H numbers per token, also in the cache), which the kernels
broadcast. Rotary decoders (LLaMA, Mistral, Qwen2; layers marked ``rotary`` in the manifest)
get :func:`rotary_module`: the module's own queries mixed per component, queries and the
shared key rotated at the components' frequencies, one key head of R numbers per token in
the cache, the original values.

:func:`write_remote_code` makes a directory loadable with
``transformers.AutoModel.from_pretrained(DIR, trust_remote_code=True)``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import manifest as _mf
from .dtypes import to_torch
from .errors import BadInputError, UnsupportedArchitectureError
from .extras import require_transformers, unreadable_model_errors
from .families import FAMILIES, Family, find_family
from .io import Checkpoint, open_checkpoint, read_json, staged
from .manifest import MANIFEST_NAME, LayerRecord
from .nn import CollaborativeAttention, CollaborativeRotaryAttention, collaborative_attention, \
    collaborative_query_states, mixed_query

__all__ = ["from_pretrained", "load_model", "write_remote_code", "is_compressed", "collaborative_modules", "loadable_family",
           "rotary_module", "REMOTE_CODE_NAME"]

REMOTE_CODE_NAME = "modeling_collabcompress.py"
_ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
_DTYPES = {name: to_torch(name) for name in ("float32", "float16", "bfloat16", "float64")}


def _transformers():
    return require_transformers("loading a compressed model")


def cache_keyword(model: nn.Module) -> str:
    """The keyword ``model``'s forward takes its key/value cache by: ``cache`` (transformers >= 5.2x)
    or ``past_key_values`` (earlier versions, which pass an unknown ``cache=`` on unseen)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


# --------------------------------------------------------------------------- collaborative attention modules

class _Adapter:
    """Forward of one family's attention class with the query/key side made collaborative.

    A wrapper class is ``(adapter, CollaborativeAttention, original class)``: it keeps every
    attribute and submodule of the original except ``_removed``, adds the ``collab_*``
    parameters, and ``forward`` mirrors the original's signature and return value.
    """

    _removed: tuple[str, ...] = ()
    _heads_attr = "num_attention_heads"
    _head_dim_attr = "attention_head_size"
    _eager: Any = None  # the family's eager attention function, set per wrapper class
    _fast = True  # attention by collaborative_attention where exact; False: always transformers' interface

    def _split_heads(self, states: torch.Tensor) -> torch.Tensor:
        """(B, N, H*d) -> (B, H, N, d)."""
        return states.view(*states.shape[:-1], -1, getattr(self, self._head_dim_attr)).transpose(1, 2)

    def _keys_values(self, hidden_states, key_value_states, cache, value_proj, kwargs):
        """Collaborative keys (B, 1, M, R+H), shared by the heads, and values (B, H, M, d),
        through the model's cache (a cross-attention cache already filled is reused as it is).

        The cache thus holds R + H key numbers per token instead of the original H*d.
        """
        cross = key_value_states is not None
        current, updated = _cache_parts(cache, self.layer_idx, cross)
        if cross and current is not None and updated:
            return current.layers[self.layer_idx].keys, current.layers[self.layer_idx].values
        states = key_value_states if cross else hidden_states
        key = self.key_states(states)  # (B, 1, M, R+H)
        value = self._split_heads(value_proj(states))  # (B, H, M, d)
        if current is not None and isinstance(current.layers[self.layer_idx], _static_layer()):
            raise NotImplementedError("a collaborative model needs a dynamic cache: its keys (R + H per token) do "
                                      "not fit a static cache shaped for H heads of width d; drop "
                                      "cache_implementation='static'")
        if current is not None:
            key, value = current.update(key, value, self.layer_idx, kwargs=kwargs)
            if cross and hasattr(cache, "is_updated"):
                cache.is_updated[self.layer_idx] = True
        return key, value

    def _attend(self, query, key, value, mask, dropout: float, mixing=None, **kwargs):
        """Attention of the scaled query (B, H, N, K) on the shared key (B, 1, M, K) and values (B, G, M, d):
        (output (B, N, H, d), weights or None), as the model's eager or sdpa interface returns them.
        With ``mixing`` (H, K), ``query`` is the shared query (B, N, R), mixed per head
        (:func:`~collabcompress.nn.collaborative_attention`).

        Runs :func:`~collabcompress.nn.collaborative_attention` (one product for all heads, no
        per-head key copies) with the interface's own conventions (sdpa: causal when no mask is
        given and weights ``None``; eager: the mask as given and the weights); any other
        implementation or option (e.g. ``head_mask``, ``softcap``) goes through transformers'
        interface with the key broadcast to the value heads (a view).
        """
        implementation = self.config._attn_implementation
        dropout = dropout if self.training else 0.0
        if self._fast and implementation in _ATTN_IMPLEMENTATIONS and all(v is None or v is False or k in _NEUTRAL_KWARGS
                                                           for k, v in kwargs.items()):
            n_query = query.shape[-2]
            causal = False
            if implementation == "sdpa":
                causal = kwargs.get("is_causal")
                causal = n_query > 1 and mask is None and (getattr(self, "is_causal", True) if causal is None
                                                            else causal)
            out, weights = collaborative_attention(query, key, value, mixing=mixing, attention_mask=mask,
                                                   is_causal=causal, position_bias=kwargs.get("position_bias"),
                                                   dropout=dropout, need_weights=implementation == "eager")
            return out.transpose(1, 2), weights  # (B, N, H, d), contiguous without autograd
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if mixing is not None:
            query = mixed_query(query, mixing)  # (B, H, N, K)

        interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, type(self)._eager)
        key = key.expand(-1, value.shape[1], -1, -1)  # (B, G, M, K), no copy
        return interface(self, query, key, value, mask, dropout=dropout, scaling=1.0, **kwargs)


# transformers keyword arguments that do not change the attention maths (or that _attend handles)
_NEUTRAL_KWARGS = frozenset({"position_bias", "is_causal", "sliding_window", "output_attentions",
                             "output_hidden_states", "use_cache", "cache_position", "position_ids", "return_dict"})


def _static_layer() -> type:
    """transformers' preallocated cache layer (shaped for H heads of width d)."""
    from transformers.cache_utils import StaticLayer

    return StaticLayer


def _cache_parts(cache, layer_idx, cross: bool):
    """(cache to update, whether cross-attention keys are already in it), transformers 5 conventions."""
    from transformers.cache_utils import EncoderDecoderCache

    if cache is None:
        return None, False
    if isinstance(cache, EncoderDecoderCache):
        updated = bool(cache.is_updated.get(layer_idx))
        return (cache.cross_attention_cache if cross else cache.self_attention_cache), updated
    return cache, False


class _BertSelf(_Adapter):
    """BertSelfAttention and its copies (RoBERTa, ELECTRA, XLM-R, ...): (context, weights)."""

    _removed = ("query", "key")

    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
        cache = kwargs.pop("past_key_values", cache)
        input_shape = hidden_states.shape[:-1]
        query = self.collab_query(hidden_states)  # (B, N, R), mixed per head by the kernel
        key, value = self._keys_values(hidden_states, None, cache, self.value, kwargs)
        out, weights = self._attend(query, key, value, attention_mask, self.dropout.p, self.query_mixing(), **kwargs)
        return out.reshape(*input_shape, -1).contiguous(), weights  # (B, N, H*d)


class _DistilBert(_Adapter):
    _removed = ("q_lin", "k_lin")

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        query, key = self.collab_query(hidden_states), self.key_states(hidden_states)  # (B, N, R), (B, 1, N, R+H)
        value = self._split_heads(self.v_lin(hidden_states))  # (B, H, N, d)
        out, weights = self._attend(query, key, value, attention_mask, self.dropout.p, self.query_mixing(), **kwargs)
        return self.out_lin(out.reshape(*input_shape, -1).contiguous()), weights


class _Albert(_Adapter):
    _removed = ("query", "key")

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        query, key = self.collab_query(hidden_states), self.key_states(hidden_states)  # (B, N, R), (B, 1, N, R+H)
        value = self._split_heads(self.value(hidden_states))  # (B, H, N, d)
        out, weights = self._attend(query, key, value, attention_mask, self.attention_dropout.p, self.query_mixing(),
                                    **kwargs)
        out = self.output_dropout(self.dense(out.reshape(*input_shape, -1).contiguous()))
        return self.LayerNorm(hidden_states + out), weights


class _ViT(_Adapter):
    _removed = ("q_proj", "k_proj")
    _head_dim_attr = "head_dim"

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        query, key = self.collab_query(hidden_states), self.key_states(hidden_states)  # (B, N, R), (B, 1, N, R+H)
        value = self._split_heads(self.v_proj(hidden_states))  # (B, H, N, d)
        out, weights = self._attend(query, key, value, attention_mask, self.attention_dropout, self.query_mixing(),
                                    **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class _MPNet(_Adapter):
    """MPNetSelfAttention computes its attention itself (relative position bias added before the mask)."""

    _removed = ("q", "k")

    def forward(self, hidden_states, attention_mask=None, position_bias=None, output_attentions=False, **kwargs):
        query, key = self.collab_query(hidden_states), self.key_states(hidden_states)  # (B, N, R), (B, 1, N, R+H)
        value = self._split_heads(self.v(hidden_states))  # (B, H, N, d)
        out, probs = collaborative_attention(query, key, value, mixing=self.query_mixing(),
                                             attention_mask=attention_mask, position_bias=position_bias,
                                             dropout=self.dropout.p if self.training else 0.0,
                                             need_weights=bool(output_attentions))
        c = out.permute(0, 2, 1, 3).contiguous()  # (B, N, H, d), no copy without autograd
        o = self.o(c.view(*c.shape[:-2], -1))  # (B, N, D)
        return (o, probs) if output_attentions else (o,)


class _GPT2(_Adapter):
    """GPT2Attention (self-attention; the fused c_attn is replaced by collab_value, Conv1D layout)."""

    _removed = ("c_attn",)
    _heads_attr = "num_heads"
    _head_dim_attr = "head_dim"

    def forward(self, hidden_states, cache=None, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, output_attentions=False, **kwargs):
        cache = kwargs.pop("past_key_values", cache)
        if encoder_hidden_states is not None:
            raise NotImplementedError("collaborative GPT-2 cross-attention is not supported")
        key, value = self._keys_values(hidden_states, None, cache, self.collab_value, kwargs)
        if self.config._attn_implementation == "eager" and self.reorder_and_upcast_attn:  # scales by itself
            query = collaborative_query_states(hidden_states, self.collab_query.weight, self.collab_mixing)
            key = key.expand(-1, value.shape[1], -1, -1)  # this path reshapes the head axis into the batch
            out, weights = self._upcast_and_reordered_attn(query, key, value, attention_mask)
        else:
            query = self.collab_query(hidden_states)  # (B, N, R), mixed per head (scale included) by the kernel
            out, weights = self._attend(query, key, value, attention_mask, self.attn_dropout.p, self.query_mixing(),
                                        **kwargs)
        out = self.c_proj(out.reshape(*out.shape[:-2], -1).contiguous())
        return self.resid_dropout(out), weights


class _T5(_Adapter):
    """T5Attention: self- or cross-attention, relative position bias, scale 1; returns (out, bias, weights)."""

    _removed = ("q", "k")
    _heads_attr = "n_heads"
    _head_dim_attr = "key_value_proj_dim"

    def forward(self, hidden_states, mask=None, key_value_states=None, position_bias=None, cache=None, **kwargs):
        cache = kwargs.pop("past_key_values", cache)
        input_shape = hidden_states.shape[:-1]
        past_seen = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        past_seen = past_seen.clone() if isinstance(past_seen, torch.Tensor) else past_seen
        query = self.collab_query(hidden_states)  # (B, N, R), mixed per head by the kernel
        key, value = self._keys_values(hidden_states, key_value_states, cache, self.v, kwargs)
        if position_bias is None:
            key_length = key.shape[-2]
            if not self.has_relative_attention_bias:
                position_bias = torch.zeros((1, self.n_heads, input_shape[1], key_length), device=query.device,
                                            dtype=query.dtype)
                if self.gradient_checkpointing and self.training:
                    position_bias.requires_grad = True
            else:
                position_bias = self.compute_bias(input_shape[1], key_length, device=query.device,
                                                  past_seen_tokens=past_seen)
        out, weights = self._attend(query, key, value, mask, self.dropout, self.query_mixing(),
                                    position_bias=position_bias, **kwargs)
        out = self.o(out.reshape(*input_shape, -1).contiguous())
        return out, position_bias, weights


class _Bart(_Adapter):
    """BartAttention and its copies: self- or cross-attention with caches; returns (out, weights)."""

    _removed = ("q_proj", "k_proj")
    _heads_attr = "num_heads"
    _head_dim_attr = "head_dim"

    def forward(self, hidden_states, key_value_states=None, cache=None, attention_mask=None, **kwargs):
        cache = kwargs.pop("past_key_values", cache)
        input_shape = hidden_states.shape[:-1]
        query = self.collab_query(hidden_states)  # (B, N, R), mixed per head by the kernel
        key, value = self._keys_values(hidden_states, key_value_states, cache, self.v_proj, kwargs)
        out, weights = self._attend(query, key, value, attention_mask, self.dropout, self.query_mixing(), **kwargs)
        return self.out_proj(out.reshape(*input_shape, -1).contiguous()), weights


def loadable_family(name: str, directory: str | os.PathLike) -> Family:
    """The registered family ``name`` of the compressed ``directory``, refused unless this module can run it."""
    family = find_family(name)
    if family is None or family.hf_adapter is None:
        supported = ", ".join(f.name for f in FAMILIES if f.hf_adapter is not None)
        raise UnsupportedArchitectureError(f"{directory}: family {name!r} cannot be loaded as a transformers model "
                                           f"(supported: {supported})")
    return family


@functools.lru_cache(maxsize=None)
def _wrapper_class(original: type[nn.Module], family: Family) -> type[nn.Module]:
    if not any(c.__name__ in family.hf_classes for c in original.__mro__):
        raise UnsupportedArchitectureError(f"collabcompress.hf cannot run attention modules of class "
                                           f"{original.__name__} as family {family.name!r} (known: "
                                           f"{', '.join(sorted(family.hf_classes))})")
    adapter = globals()[family.hf_adapter]
    eager = getattr(sys.modules[original.__module__], "eager_attention_forward", None)
    return type(f"Collaborative{original.__name__}", (adapter, CollaborativeAttention, original),
                {"__module__": __name__, "_eager": staticmethod(eager) if eager else None,
                 "__doc__": f"{original.__name__} with collaborative query/key projections (collabcompress)."})


def _rebuilt_as(old: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """An instance of the wrapper ``cls`` sharing ``old``'s attributes, parameters, buffers and
    submodules, without the submodules the wrapper replaces (``cls._removed``)."""
    new = cls.__new__(cls)
    new.__dict__.update(old.__dict__)
    for slot in ("_parameters", "_buffers", "_modules"):
        setattr(new, slot, dict(getattr(old, slot)))
    for name in cls._removed:
        new._modules.pop(name, None)
    return new


def _collaborative_module(old: nn.Module, layer: LayerRecord, module_name: str, family: Family) -> nn.Module:
    """A copy of ``old`` (same attributes and submodules, shared tensors) with collab_* instead of query/key."""
    cls = _wrapper_class(type(old), family)
    heads, head_dim, d_model, shared = layer.heads, layer.head_dim, layer.d_model, layer.shared_dim
    if getattr(old, cls._heads_attr, heads) != heads or getattr(old, cls._head_dim_attr, head_dim) != head_dim:
        raise BadInputError(f"{module_name}: the manifest says {heads} heads of width {head_dim}, the config builds "
                            f"{getattr(old, cls._heads_attr)} of width {getattr(old, cls._head_dim_attr)}")
    new = _rebuilt_as(old, cls)
    ref = next(iter(old.parameters()))
    new._add_collab_parameters(d_model, heads, shared, device=ref.device, dtype=ref.dtype)
    if cls._removed == ("c_attn",):  # GPT-2: the value slice of the fused tensor, same Conv1D layout
        from transformers.pytorch_utils import Conv1D

        new.collab_value = Conv1D(heads * head_dim, d_model).to(device=ref.device, dtype=ref.dtype)
    new.scale = float(getattr(old, "scaling", None) or layer.scale)
    return new


def collaborative_modules(model: nn.Module) -> dict[str, CollaborativeAttention | CollaborativeRotaryAttention]:
    """The collaborative attention modules of a loaded model, by in-memory module name."""
    kinds = (CollaborativeAttention, CollaborativeRotaryAttention)
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


# --------------------------------------------------------------------------- rotary decoders (RoPE, GQA)

def _rotary_classes() -> tuple[str, ...]:
    """The transformers attention classes of the registered rotary families."""
    return tuple(c for f in FAMILIES if f.hf_adapter == "_LlamaRotary" for c in f.hf_classes)



class _LlamaRotary(_Adapter):
    """LlamaAttention, MistralAttention, Qwen2Attention with shared rotary keys: (output, weights).

    Queries come from the module's own ``q_proj``, are mixed per component and rotated; the
    shared key (B, 1, M, R) goes through the cache with the original values (B, G, M, d); the
    scores of all heads are one product with that one key head and the weights of each
    group meet its value head without repeating keys or values (:meth:`_Adapter._attend`).
    """

    _removed = ("k_proj",)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        cache = kwargs.pop("past_key_values", cache)
        input_shape = hidden_states.shape[:-1]
        cos, sin = position_embeddings  # (B, N, d) each
        query = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)  # (B, H, N, d)
        query = self.query_states(query, cos, sin, self.scale)  # (B, H, N, R), scale included
        key = self.key_states(hidden_states, cos, sin)  # (B, 1, N, R)
        value = self.v_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)  # (B, G, N, d)
        if cache is not None:
            if isinstance(cache.layers[self.layer_idx], _static_layer()):
                raise NotImplementedError("a collaborative rotary model needs a dynamic cache: its keys (R per token, "
                                          "one head) do not fit a static cache shaped for G heads of width d; drop "
                                          "cache_implementation='static'")
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)  # (B, 1, M, R), (B, G, M, d)
        sliding = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))
        out, weights = self._attend(query, key, value, attention_mask, self.attention_dropout,
                                    sliding_window=sliding, **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


@functools.lru_cache(maxsize=None)
def _rotary_wrapper_class(original: type[nn.Module]) -> type[nn.Module]:
    if not any(c.__name__ in _rotary_classes() for c in original.__mro__):
        raise UnsupportedArchitectureError(f"collabcompress.hf cannot run attention modules of class "
                                           f"{original.__name__} with shared rotary keys (known: "
                                           f"{', '.join(dict.fromkeys(_rotary_classes()))})")
    eager = getattr(sys.modules[original.__module__], "eager_attention_forward", None)
    return type(f"Collaborative{original.__name__}", (_LlamaRotary, CollaborativeRotaryAttention, original),
                {"__module__": __name__, "_eager": staticmethod(eager) if eager else None,
                 "__doc__": f"{original.__name__} with shared rotary keys (collabcompress)."})


def rotary_module(old: nn.Module, layer: LayerRecord) -> nn.Module:
    """A copy of the rotary attention module ``old`` with shared keys instead of ``k_proj``.

    The copy keeps every attribute and submodule of ``old`` (tensors shared) except
    ``k_proj``, and adds ``collab_key`` (with a bias when ``k_proj`` had one),
    ``collab_key_freq`` and ``collab_mixing``, uninitialised: load them from the directory.

    Args:
        old: a transformers ``LlamaAttention``, ``MistralAttention`` or ``Qwen2Attention``.
        layer: the manifest's layer record (:class:`~collabcompress.manifest.LayerRecord`):
            ``module``, ``heads`` (H), ``kv_heads`` (G), ``head_dim``, ``d_model`` and
            ``shared_dim`` (R) are read.

    Raises:
        UnsupportedArchitectureError: another attention class; BadInputError: a record
        that does not fit ``old`` (head counts, widths, R odd or above G*d).
    """
    cls = _rotary_wrapper_class(type(old))
    name = layer.module
    heads, kv_heads, head_dim = layer.heads, layer.kv_heads, layer.head_dim
    d_model, shared = layer.d_model, layer.shared_dim
    built = (old.config.num_attention_heads, old.config.num_key_value_heads, old.head_dim, old.q_proj.in_features)
    if built != (heads, kv_heads, head_dim, d_model):
        raise BadInputError(f"{name}: the manifest says {heads} heads, {kv_heads} key/value heads of width {head_dim}, "
                            f"d_model {d_model}; the config builds {built[0]} heads, {built[1]} key/value heads of width "
                            f"{built[2]}, d_model {built[3]}")
    if not 2 <= shared <= kv_heads * head_dim or shared % 2:
        raise BadInputError(f"{name}: shared_dim {shared} must be even, between 2 and {kv_heads * head_dim} "
                            f"(key/value heads x head_dim)")
    new = _rebuilt_as(old, cls)
    ref = old.q_proj.weight
    new._add_collab_parameters(d_model, kv_heads, shared, key_bias=old.k_proj.bias is not None, device=ref.device,
                               dtype=ref.dtype)
    new.scale = float(old.scaling)
    return new


def _check_rotary_frequencies(model: nn.Module, directory: Path) -> None:
    """Every loaded collab_key_freq names a frequency of its head (0 .. d/2-1)."""
    for name, m in model.named_modules():
        if isinstance(m, CollaborativeRotaryAttention) and m.collab_key_freq.numel():
            freq, half = m.collab_key_freq, m.head_dim // 2
            if int(freq.min()) < 0 or int(freq.max()) >= half:
                raise BadInputError(f"{directory}: {name}.collab_key_freq holds {int(freq.min())}..{int(freq.max())}, "
                                    f"outside the head's frequencies 0..{half - 1}")


# --------------------------------------------------------------------------- loading

def is_compressed(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` is an output directory of ``compress`` (it holds the manifest)."""
    return (Path(directory) / MANIFEST_NAME).is_file()


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise BadInputError(f"{directory} has no config.json: a transformers model cannot be built from it "
                            "(compress a directory that holds config.json)")
    config = read_json(path, "config", directory)
    if not isinstance(config, dict) or not isinstance(config.get("collaborative_attention"), dict):
        raise BadInputError(f"{path} has no 'collaborative_attention' block; is {directory} an output of "
                            "`collabcompress compress`?")
    return config


def _named_model_class(transformers, name: Any) -> type | None:
    """The transformers model class called ``name``, or ``None`` (``os.system``, ``AutoConfig``, not a string)."""
    found = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    return found if isinstance(found, type) and issubclass(found, transformers.PreTrainedModel) else None


def _of_config(cls: type, config, directory: Path, what: str) -> type:
    """``cls``, refused unless it is a model class of ``config``'s type (not a class of another family)."""
    expected = getattr(cls, "config_class", None)
    if isinstance(expected, type) and not isinstance(config, expected):
        raise BadInputError(f"{what} {cls.__name__} is a model class for {getattr(expected, 'model_type', '') or expected.__name__!r} "
                            f"configs, but {directory / 'config.json'} has model_type {config.model_type!r}")
    return cls


# Task classes tried, in order, when config.json names no architecture: the model type's LM heads.
_HEAD_AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForSeq2SeqLM")


def _head_names(cls: type, config) -> set[str]:
    """The parameters of task class ``cls`` outside its base model that no tie derives from a base
    model weight (a tied LM head is held by the embedding it shares), nor transformers lets go missing."""
    prefix = getattr(cls, "base_model_prefix", "") or ""
    with torch.device("meta"):  # names and ties only: no memory, no initialisation cost
        task = cls(config)
    tied = _tied_names(task)
    _, ignore_missing = _ignored_patterns(task)
    inside = f"{prefix}."
    return {n for n, _ in task.named_parameters(remove_duplicate=False)
            if not n.startswith(inside) and not any(t.startswith(inside) for t in tied.get(n, ()))
            and not (ignore_missing and ignore_missing.search(n))}


def _model_class(transformers, config, model_class, names, directory: Path) -> type:
    """The class to build: ``model_class`` as given; else config.json's ``architectures``, or its
    base model class when the weights hold none of the named class's head (a sentence-transformers
    export names ``BertForMaskedLM`` but holds the bare ``BertModel``); else, without
    ``architectures``, the weights decide: the model type's LM head class whose head is in the
    weights or tied to them, else its base model class. Never a guess: weights that fit none of
    these are refused when they are loaded."""
    if model_class is not None:
        found = _named_model_class(transformers, model_class) if isinstance(model_class, str) else model_class
        mapping = getattr(found, "_model_mapping", None)  # an Auto class: its class for this config
        if isinstance(found, type) and mapping is not None and found.__module__.startswith("transformers."):
            found = mapping.get(type(config), None)
            if found is None:
                raise BadInputError(f"{directory}: transformers has no {model_class.__name__} class for "
                                    f"model_type {config.model_type!r}")
        if not (isinstance(found, type) and issubclass(found, transformers.PreTrainedModel)):
            raise BadInputError(f"{str(model_class)[:80]!r} is not a transformers model class")
        return _of_config(found, config, directory, "model_class")
    base = transformers.AutoModel._model_mapping.get(type(config), None)
    if base is None:
        raise UnsupportedArchitectureError(f"transformers has no model class for model_type {config.model_type!r}")
    names = set(names)
    architectures = getattr(config, "architectures", None)
    for name in architectures if isinstance(architectures, list) else []:
        if (found := _named_model_class(transformers, name)) is not None:
            cls = _of_config(found, config, directory, "architectures names")
            if getattr(cls, "base_model_prefix", "") and cls is not base:
                head = _head_names(cls, config)
                if head and not head & names:
                    return base
            return cls
    for auto in _HEAD_AUTO_CLASSES:
        cls = getattr(transformers, auto)._model_mapping.get(type(config), None)
        if cls is not None and cls is not base and _head_names(cls, config) <= names:
            return cls
    return base


def _renamer(model: nn.Module):
    """file tensor name -> in-memory name, with transformers' own load-time renames (e.g. ViT in 5.x)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # older transformers: names in memory are the file names
        return lambda key, known: key
    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None) or None

    def rename(key: str, known: dict[str, Any]) -> str:
        new, converter = rename_source_key(key, renamings, converters, prefix, known)
        if converter is not None:
            raise UnsupportedArchitectureError(f"tensor {key!r} needs transformers' weight conversion "
                                               f"({converter}); collabcompress.hf cannot load this model")
        return new

    return rename


def _load_tensors(out: Checkpoint) -> dict[str, torch.Tensor]:
    """Every tensor of the output, each read once through :mod:`collabcompress.io`."""
    return {name: out.load(name) for name in out.names()}


def _ignored_patterns(model: nn.Module) -> tuple[re.Pattern[str] | None, re.Pattern[str] | None]:
    """transformers' own exceptions to strict loading: (unexpected, missing) regexes of the model class."""
    unexpected = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    missing = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
    buffers = [name for name, _ in model.named_buffers()]
    if any(b.endswith("position_ids") for b in buffers):  # persistent in old checkpoints, not any more
        unexpected.add(r"(^|\.)position_ids$")
    if any(b.endswith("rotary_emb.inv_freq") for b in buffers):
        unexpected.add(r"rotary_emb\.inv_freq")

    def compile_(patterns: set[str]) -> re.Pattern[str] | None:
        return re.compile("|".join(f"({p})" for p in sorted(patterns))) if patterns else None

    return compile_(unexpected), compile_(missing)


def _tied_names(model: nn.Module) -> dict[str, set[str]]:
    """name -> every name of the same parameter object (tied weights)."""
    groups: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), set()).add(name)
    return {name: group for group in groups.values() for name in group}


def _short(names) -> str:
    names = sorted(names)
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def from_pretrained(directory: str | os.PathLike, *, model_class: type | str | None = None,
                    dtype: torch.dtype | str | None = None, attn_implementation: str | None = None,
                    device: torch.device | str = "cpu") -> nn.Module:
    """Load a ``compress`` output directory as a transformers model with collaborative attention.

    Builds the class :func:`_model_class` chooses (config.json's ``architectures``, or its base
    model class when the weights hold no task head, as a sentence-transformers export that names
    ``BertForMaskedLM`` but holds the bare ``BertModel``; without ``architectures``, the LM head
    class whose head is in the weights or tied to them, else the base class), replaces every
    attention module listed in the manifest with a collaborative one (an instance of the original
    attention class and of :class:`~collabcompress.nn.CollaborativeAttention`), and loads every
    tensor of the directory; a tensor the model does not take, or a model weight the directory
    lacks (other than weights tied to a loaded one, under either name), is an error.

    Args:
        directory: output directory of ``collabcompress compress``.
        model_class: a transformers model class (or its name) to build instead, e.g.
            ``"BertModel"`` for the bare encoder of a ``BertForMaskedLM`` checkpoint; obeyed
            as given.
        dtype: dtype of the model (default: the source checkpoint's, from the manifest).
        attn_implementation: ``"sdpa"`` (default where transformers picks it) or ``"eager"``
            (needed for ``output_attentions=True``).
        device: where the model is built.

    Returns:
        The model, in eval mode.

    Raises:
        MissingExtraError: transformers is not installed (``pip install 'collabcompress[hf]'``).
        BadInputError: not a compressed directory (no manifest or no ``collaborative_attention``
            block), unreadable files, or weights that do not fit the model.
        UnsupportedArchitectureError: a family this loader does not run (e.g. ``timm-vit``).
    """
    directory = Path(directory)
    manifest = _mf.read(directory)
    family = loadable_family(manifest.source.architecture, directory)
    _read_config(directory)
    transformers = _transformers()
    dtype, device = _torch_dtype(dtype), _torch_device(device)
    manifest, out = _mf.open_output(directory)  # every output file checked against its recorded hash
    try:
        tensors = _load_tensors(out)
    finally:
        out.close()
    config = _auto_config(transformers, directory, attn_implementation)
    if family.model_types and config.model_type not in family.model_types:
        raise BadInputError(f"{directory / 'config.json'} has model_type {config.model_type!r}, but the manifest "
                            f"records the {family.name} family ({', '.join(family.model_types)})")
    cls = _model_class(transformers, config, model_class, tensors, directory)
    if dtype is None:
        dtype = _DTYPES.get(manifest.source.dtype) if manifest.source.dtype else None
    model = _build(cls, config, dtype, device, directory)
    rename = _renamer(model)
    plain_names = dict.fromkeys(model.state_dict(), True)
    memory_module: dict[str, str] = {}
    for layer in manifest.layers:
        file_module = layer.module
        query_name = layer.removed[0] if layer.removed else f"{file_module}.query.weight"
        in_memory = rename(query_name, plain_names)
        if in_memory not in plain_names:
            raise BadInputError(f"{directory}: compressed module {file_module} has no counterpart in "
                                f"{cls.__name__} built from config.json (expected {in_memory})")
        mem = in_memory.rsplit(".", 2)[0]
        memory_module[file_module] = mem
        parent, _, child = mem.rpartition(".")
        old = model.get_submodule(mem)
        try:
            new = rotary_module(old, layer) if layer.rotary else _collaborative_module(old, layer, mem, family)
        except UnsupportedArchitectureError as e:  # the family was loadable: config.json contradicts the manifest
            raise BadInputError(f"{directory / 'config.json'} (model_type {config.model_type!r}) does not build the "
                                f"{family.name} family the manifest records: {e}") from e
        setattr(model.get_submodule(parent) if parent else model, child, new)
    _load_state(model, tensors, memory_module, rename, directory)
    _check_rotary_frequencies(model, directory)
    model.eval()
    return model


def load_model(directory: str | os.PathLike, *, model_class: type | str | None = None,
               dtype: torch.dtype | str | None = None, attn_implementation: str | None = None,
               device: torch.device | str = "cpu") -> nn.Module:
    """Load a model directory, compressed or not, under the same rules as :func:`from_pretrained`.

    An uncompressed directory (``config.json`` and safetensors weights) is read through
    :mod:`collabcompress.io` and built as the class :func:`from_pretrained` would choose: every
    weight of the model comes from the file or from a tie transformers documents (a tied LM head
    stored as ``lm_head.weight`` alone is the embedding), and a weight missing or left over is an
    error naming it, never a random initialisation. ``dtype`` defaults to the weights' own.

    Returns:
        The model, in eval mode.

    Raises:
        BadInputError: unreadable files, weights that do not fit the model, bad ``dtype`` or
            ``device``; MissingExtraError: transformers is not installed.
    """
    directory = Path(directory)
    if is_compressed(directory):
        return from_pretrained(directory, model_class=model_class, dtype=dtype,
                               attn_implementation=attn_implementation, device=device)
    transformers = _transformers()
    dtype, device = _torch_dtype(dtype), _torch_device(device)
    if not (directory / "config.json").is_file() and not (directory / "config.json").is_symlink():
        raise BadInputError(f"{directory} has no config.json: a transformers model cannot be built from it")
    ckpt = open_checkpoint(directory)
    try:
        tensors = _load_tensors(ckpt)
    finally:
        ckpt.close()
    config = _auto_config(transformers, directory, attn_implementation)
    cls = _model_class(transformers, config, model_class, tensors, directory)
    if dtype is None:
        floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
        dtype = max(set(floats), key=floats.count) if floats else None
    model = _build(cls, config, dtype, device, directory)
    _load_state(model, tensors, {}, _renamer(model), directory)
    return model.eval()


def _torch_dtype(dtype: Any) -> torch.dtype | None:
    """``dtype`` as a torch dtype (``None``: the weights' own), refusing what a model cannot take."""
    if dtype is None or dtype == "auto":
        return None
    found = _DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if found not in _DTYPES.values():
        raise BadInputError(f"dtype {str(dtype)[:80]!r} is not supported; choose {', '.join(_DTYPES)} or 'auto'")
    return found


def _torch_device(device: Any) -> torch.device:
    """``device`` as a torch device where weights can be loaded (not ``meta``), or a clear error."""
    try:
        found = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise BadInputError(f"device {str(device)[:80]!r} is not a device: {str(e).splitlines()[0]}") from e
    if found.type == "meta":
        raise BadInputError("device 'meta' holds no weights; load on 'cpu' or 'cuda'")
    if found.type != "cpu":
        module = getattr(torch, found.type, None)
        if module is None or not module.is_available():
            raise BadInputError(f"device {str(found)!r} is not available on this machine")
        if found.index is not None and found.index >= module.device_count():
            raise BadInputError(f"device {str(found)!r} does not exist ({module.device_count()} available)")
    return found


def _auto_config(transformers, directory: Path, attn_implementation: str | None):
    """transformers' config of ``directory``, read from a checked copy of its config.json."""
    if attn_implementation is not None and attn_implementation not in _ATTN_IMPLEMENTATIONS:
        raise BadInputError(f"attn_implementation {str(attn_implementation)[:40]!r} is not supported with "
                            f"collaborative attention (query/key width differs from the value width); use "
                            f"{' or '.join(_ATTN_IMPLEMENTATIONS)}")
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with staged(directory, ("config.json",)) as copy:
        try:
            return transformers.AutoConfig.from_pretrained(str(copy), local_files_only=True, **kw)
        except unreadable_model_errors() as e:
            message = str(e).splitlines()[0].replace(str(copy), str(directory)) if str(e) else type(e).__name__
            raise BadInputError(f"transformers cannot read {directory / 'config.json'}: {message}") from e


def _build(cls: type, config, dtype: torch.dtype | None, device: torch.device, directory: Path) -> nn.Module:
    """An instance of ``cls`` with its ties made and no random initialisation (every weight is loaded next)."""
    try:
        with torch.device(device), _skip_init():
            model = cls(config)
        model.tie_weights()  # part of the initialisation transformers 5 skipped
    except (ValueError, ImportError, TypeError, AttributeError) as e:  # e.g. an attn_implementation the class lacks
        raise BadInputError(f"transformers cannot build {cls.__name__} from {directory / 'config.json'}: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if dtype is not None:
        model = model.to(dtype)
    if model.config._attn_implementation not in _ATTN_IMPLEMENTATIONS:  # e.g. flash kernels from config.json
        model.config._attn_implementation = "eager"
    return model


def _skip_init():
    """transformers' context that skips random initialisation when building a model whose every
    weight is loaded afterwards (SmolLM2: 3.1 s of a 4.5 s load); buffers are still computed."""
    from transformers.initialization import no_init_weights

    return no_init_weights()


def _load_state(model: nn.Module, tensors: dict[str, torch.Tensor], memory_module: dict[str, str], rename,
                directory: Path) -> None:
    expected = model.state_dict()
    known = dict.fromkeys(expected, True)
    by_file_module = sorted(memory_module, key=len, reverse=True)
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        module = next((m for m in by_file_module if key.startswith(f"{m}.collab_")), None)
        new = memory_module[module] + key[len(module):] if module is not None else rename(key, known)
        mapped[new] = tensor
    ignore_unexpected, ignore_missing = _ignored_patterns(model)
    for key in [k for k in mapped if k not in expected and ignore_unexpected and ignore_unexpected.search(k)]:
        del mapped[key]  # legacy tensors transformers also drops (e.g. old persistent position_ids)
    unexpected = sorted(set(mapped) - set(expected))
    if unexpected:
        raise BadInputError(f"{directory}: tensors the model does not take: {_short(unexpected)}")
    tied = _tied_names(model)
    missing = [k for k in expected if k not in mapped and not (tied.get(k, set()) & set(mapped))
               and not (ignore_missing and ignore_missing.search(k))]
    if missing:
        raise BadInputError(f"{directory}: model weights missing from the directory: {_short(missing)}")
    wrong = [f"{k} {tuple(t.shape)} (model {tuple(expected[k].shape)})" for k, t in mapped.items()
             if t.shape != expected[k].shape]
    if wrong:
        raise BadInputError(f"{directory}: tensors with shapes that do not fit the model: {_short(wrong)}")
    model.load_state_dict(mapped, strict=False)


# --------------------------------------------------------------------------- trust_remote_code

_REMOTE_CODE = '''"""Load this collabcompress output directory with transformers' AutoModel (trust_remote_code=True).

Written by collabcompress {version}. The collaborative attention modules and the weight
loading live in the collabcompress package, which must be installed:
pip install 'collabcompress[hf]'.
"""

from transformers import {base}


class Collaborative{base}({base}):
    """{base} whose attention modules are collaborative (arXiv 2006.16362); see collabcompress.hf."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        from collabcompress.hf import from_pretrained, is_compressed

        if not is_compressed(pretrained_model_name_or_path):
            return {base}.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        return from_pretrained(pretrained_model_name_or_path, model_class={base},
                               dtype=None if dtype == "auto" else dtype,
                               attn_implementation=kwargs.get("attn_implementation"))
'''


def write_remote_code(directory: str | os.PathLike) -> Path:
    """Make ``directory`` load with ``AutoModel.from_pretrained(DIR, trust_remote_code=True)``.

    Writes ``modeling_collabcompress.py`` (a subclass of the source model class whose
    ``from_pretrained`` calls :func:`from_pretrained`; it needs collabcompress installed
    where it is loaded) and adds ``"auto_map": {"AutoModel": ...}`` to ``config.json`` (and
    ``AutoModelForCausalLM`` for a causal LM).
    The manifest's ``outputs`` records are updated. Without ``trust_remote_code`` transformers
    loads its own class instead and initialises the missing query/key weights randomly (it
    warns about them), so load with ``trust_remote_code=True`` or with :func:`from_pretrained`.

    Returns:
        The path of the modeling file.

    Raises:
        BadInputError: not a compressed directory; UnsupportedArchitectureError: family not loadable.
    """
    from . import __version__
    from .output import write_json

    from .output import file_record

    directory = Path(directory)
    manifest = _mf.read(directory)
    loadable_family(manifest.source.architecture, directory)
    config = _read_config(directory)
    transformers = _transformers()
    cfg = _auto_config(transformers, directory, None)
    out = open_checkpoint(directory)
    try:
        names = out.names()
    finally:
        out.close()
    base = _model_class(transformers, cfg, None, names, directory).__name__
    code = directory / REMOTE_CODE_NAME
    module = REMOTE_CODE_NAME.removesuffix(".py")
    try:
        code.write_text(_REMOTE_CODE.format(base=base, version=__version__), encoding="utf-8")
        auto = {"AutoModel": f"{module}.Collaborative{base}"}
        if base.endswith("ForCausalLM"):
            auto["AutoModelForCausalLM"] = auto["AutoModel"]
        config["auto_map"] = {**(config.get("auto_map") or {}), **auto}
        write_json(config, directory / "config.json")
        outputs = [o for o in manifest.outputs if o.name not in ("config.json", REMOTE_CODE_NAME)]
        outputs += [_mf.FileRecord(**file_record(path, directory)) for path in (directory / "config.json", code)]
        _mf.write(directory, dataclasses.replace(manifest, outputs=tuple(outputs)))
    except OSError as e:
        raise BadInputError(f"cannot write the remote code into {directory}: {e}") from e
    return code
