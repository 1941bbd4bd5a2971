"""Collaborative attention modules for transformers models: one adapter per family.

Each compressed attention module of a transformers model is swapped for a subclass of its own
class (:func:`collaborative_module`, :func:`rotary_module`) that keeps its forward signature
and return convention (transformers 5) and computes its scores from the collaborative tensors;
the model's own attention kernel (``eager`` or ``sdpa``) does the rest, so masks, causality,
caches and position biases behave as in the original model. The key has one head axis shared
by all heads (R + H numbers per token, also in the cache), which the kernels broadcast. Rotary
decoders (LLaMA, Mistral, Qwen2) get the module's own queries mixed per component, queries and
the shared key rotated at the components' frequencies, one key head of R numbers per token in
the cache, the original values.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import BadInputError, UnsupportedArchitectureError
from ..files.arch import AttentionSpec
from ..files.checkpoint import Checkpoint
from ..files.families import FAMILIES, Family, find_family
from ..files.manifest import LayerRecord
from ..maths.costs import output_absorbed
from .values import absorbed_output, add_value_parameters, has_shared_values, lift_values
from .attention import CollaborativeAttention, CollaborativeRotaryAttention, collaborative_attention, \
    collaborative_query_states, mixed_query

__all__ = ["ATTN_IMPLEMENTATIONS", "cache_keyword", "find_modules", "check_key_freq", "check_rotary_frequencies",
           "collaborative_module", "collaborative_modules", "loadable_family", "rotary_module"]

ATTN_IMPLEMENTATIONS = ("eager", "sdpa")  # the kernels a collaborative module runs with


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
    _value_attr = "value"  # the value projection (shared values replace it)
    _heads_attr = "num_attention_heads"
    _head_dim_attr = "attention_head_size"
    _eager: Any = None  # the family's eager attention function, set per wrapper class
    _fast = True  # attention by collaborative_attention where exact; False: always transformers' interface

    def _split_heads(self, states: torch.Tensor) -> torch.Tensor:
        """(B, N, H*d) -> (B, H, N, d)."""
        return states.view(*states.shape[:-1], -1, getattr(self, self._head_dim_attr)).transpose(1, 2)

    def _value_states(self, states: torch.Tensor) -> torch.Tensor:
        """Values (B, G, M, d) from the value projection, or with shared values the latent
        (B, 1, M, r_v) all heads read (:mod:`collabcompress.runtime.values`)."""
        if has_shared_values(self):
            return self.collab_value(states)[:, None]
        return self._split_heads(getattr(self, self._value_attr)(states))

    def _keys_values(self, hidden_states, key_value_states, cache, kwargs):
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
        value = self._value_states(states)  # (B, H, M, d), or the shared latent (B, 1, M, r_v)
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
        (:func:`~collabcompress.runtime.attention.collaborative_attention`).

        Runs :func:`~collabcompress.runtime.attention.collaborative_attention` (one product for all heads, no
        per-head key copies) with the interface's own conventions (sdpa: causal when no mask is
        given and weights ``None``; eager: the mask as given and the weights); any other
        implementation or option (e.g. ``head_mask``, ``softcap``) goes through transformers'
        interface with the key broadcast to the value heads (a view).
        """
        implementation = self.config._attn_implementation
        dropout = dropout if self.training else 0.0
        if self._fast and implementation in ATTN_IMPLEMENTATIONS and all(v is None or v is False or k in _NEUTRAL_KWARGS
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
            return self._lifted(out.transpose(1, 2)), weights  # (B, N, H, d), contiguous without autograd
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if mixing is not None:
            query = mixed_query(query, mixing)  # (B, H, N, K)

        interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, type(self)._eager)
        if has_shared_values(self):  # the latent as every value head, a view: the interface repeats groups itself
            value = value.expand(-1, self.collab_value_up.out_features // self._head_dim(), -1, -1)
        key = key.expand(-1, value.shape[1], -1, -1)  # (B, G, M, K), no copy
        out, weights = interface(self, query, key, value, mask, dropout=dropout, scaling=1.0, **kwargs)
        return self._lifted(out), weights

    def _head_dim(self) -> int:
        return getattr(self, self._head_dim_attr)

    def _lifted(self, out: torch.Tensor) -> torch.Tensor:
        """(B, N, H, d): with shared values, each head's weighted latent lifted to its width."""
        return lift_values(out, self.collab_value_up.weight, self._head_dim()) if has_shared_values(self) else out


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
        key, value = self._keys_values(hidden_states, None, cache, kwargs)
        out, weights = self._attend(query, key, value, attention_mask, self.dropout.p, self.query_mixing(), **kwargs)
        return out.reshape(*input_shape, -1).contiguous(), weights  # (B, N, H*d)


class _DistilBert(_Adapter):
    _removed = ("q_lin", "k_lin")
    _value_attr = "v_lin"

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        query, key = self.collab_query(hidden_states), self.key_states(hidden_states)  # (B, N, R), (B, 1, N, R+H)
        value = self._value_states(hidden_states)  # (B, H, N, d) or (B, 1, N, r_v)
        out, weights = self._attend(query, key, value, attention_mask, self.dropout.p, self.query_mixing(), **kwargs)
        return self.out_lin(out.reshape(*input_shape, -1).contiguous()), weights


class _Albert(_Adapter):
    _removed = ("query", "key")

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        query, key = self.collab_query(hidden_states), self.key_states(hidden_states)  # (B, N, R), (B, 1, N, R+H)
        value = self._value_states(hidden_states)  # (B, H, N, d) or (B, 1, N, r_v)
        out, weights = self._attend(query, key, value, attention_mask, self.attention_dropout.p, self.query_mixing(),
                                    **kwargs)
        out = self.output_dropout(self.dense(out.reshape(*input_shape, -1).contiguous()))
        return self.LayerNorm(hidden_states + out), weights


class _ViT(_Adapter):
    _removed = ("q_proj", "k_proj")
    _value_attr = "v_proj"
    _head_dim_attr = "head_dim"

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        query, key = self.collab_query(hidden_states), self.key_states(hidden_states)  # (B, N, R), (B, 1, N, R+H)
        value = self._value_states(hidden_states)  # (B, H, N, d) or (B, 1, N, r_v)
        out, weights = self._attend(query, key, value, attention_mask, self.attention_dropout, self.query_mixing(),
                                    **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class _MPNet(_Adapter):
    """MPNetSelfAttention computes its attention itself (relative position bias added before the mask)."""

    _removed = ("q", "k")
    _value_attr = "v"

    def forward(self, hidden_states, attention_mask=None, position_bias=None, output_attentions=False, **kwargs):
        query, key = self.collab_query(hidden_states), self.key_states(hidden_states)  # (B, N, R), (B, 1, N, R+H)
        value = self._value_states(hidden_states)  # (B, H, N, d) or (B, 1, N, r_v)
        out, probs = collaborative_attention(query, key, value, mixing=self.query_mixing(),
                                             attention_mask=attention_mask, position_bias=position_bias,
                                             dropout=self.dropout.p if self.training else 0.0,
                                             need_weights=bool(output_attentions))
        c = self._lifted(out.permute(0, 2, 1, 3)).contiguous()  # (B, N, H, d), no copy without autograd
        o = self.o(c.view(*c.shape[:-2], -1))  # (B, N, D)
        return (o, probs) if output_attentions else (o,)


class _GPT2(_Adapter):
    """GPT2Attention (self-attention): the fused c_attn is replaced by collab_value, its value slice in
    Conv1D layout, or with shared values the latent (an nn.Linear, D -> r_v) and collab_value_up."""

    _removed = ("c_attn",)
    _value_attr = "collab_value"
    _heads_attr = "num_heads"
    _head_dim_attr = "head_dim"

    def forward(self, hidden_states, cache=None, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, output_attentions=False, **kwargs):
        cache = kwargs.pop("past_key_values", cache)
        if encoder_hidden_states is not None:
            raise NotImplementedError("collaborative GPT-2 cross-attention is not supported")
        key, value = self._keys_values(hidden_states, None, cache, kwargs)
        if self.config._attn_implementation == "eager" and self.reorder_and_upcast_attn:  # scales by itself
            query = collaborative_query_states(hidden_states, self.collab_query.weight, self.collab_mixing)
            # this path reshapes the head axis into the batch: the shared key (and latent) as every head's, views
            value = value.expand(-1, query.shape[1], -1, -1)  # (B, H, M, d), or the latent (B, H, M, r_v)
            key = key.expand(-1, query.shape[1], -1, -1)
            out, weights = self._upcast_and_reordered_attn(query, key, value, attention_mask)
            out = self._lifted(out)  # (B, N, H, d)
        else:
            query = self.collab_query(hidden_states)  # (B, N, R), mixed per head (scale included) by the kernel
            out, weights = self._attend(query, key, value, attention_mask, self.attn_dropout.p, self.query_mixing(),
                                        **kwargs)
        out = self.c_proj(out.reshape(*out.shape[:-2], -1).contiguous())
        return self.resid_dropout(out), weights


class _T5(_Adapter):
    """T5Attention: self- or cross-attention, relative position bias, scale 1; returns (out, bias, weights)."""

    _removed = ("q", "k")
    _value_attr = "v"
    _heads_attr = "n_heads"
    _head_dim_attr = "key_value_proj_dim"

    def forward(self, hidden_states, mask=None, key_value_states=None, position_bias=None, cache=None, **kwargs):
        cache = kwargs.pop("past_key_values", cache)
        input_shape = hidden_states.shape[:-1]
        past_seen = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        past_seen = past_seen.clone() if isinstance(past_seen, torch.Tensor) else past_seen
        query = self.collab_query(hidden_states)  # (B, N, R), mixed per head by the kernel
        key, value = self._keys_values(hidden_states, key_value_states, cache, kwargs)
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
    _value_attr = "v_proj"
    _heads_attr = "num_heads"
    _head_dim_attr = "head_dim"

    def forward(self, hidden_states, key_value_states=None, cache=None, attention_mask=None, **kwargs):
        cache = kwargs.pop("past_key_values", cache)
        input_shape = hidden_states.shape[:-1]
        query = self.collab_query(hidden_states)  # (B, N, R), mixed per head by the kernel
        key, value = self._keys_values(hidden_states, key_value_states, cache, kwargs)
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


def _refuse_unknown_class(original: type[nn.Module], known: tuple[str, ...], how: str, listed: str) -> None:
    """Refuse ``original`` unless it is (or derives from) a class named in ``known``."""
    if not any(c.__name__ in known for c in original.__mro__):
        raise UnsupportedArchitectureError(f"collabcompress.hf cannot run attention modules of class "
                                           f"{original.__name__} {how} (known: {listed})")


@functools.lru_cache(maxsize=None)
def _wrapper_class(original: type[nn.Module], family: Family) -> type[nn.Module]:
    _refuse_unknown_class(original, family.hf_classes, f"as family {family.name!r}",
                          ", ".join(sorted(family.hf_classes)))
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


def collaborative_module(old: nn.Module, layer: LayerRecord, module_name: str, family: Family) -> nn.Module:
    """A copy of ``old`` (same attributes and submodules, shared tensors) with collab_* instead of query/key."""
    cls = _wrapper_class(type(old), family)
    heads, head_dim, d_model, shared = layer.heads, layer.head_dim, layer.d_model, layer.shared_dim
    if getattr(old, cls._heads_attr, heads) != heads or getattr(old, cls._head_dim_attr, head_dim) != head_dim:
        raise BadInputError(f"{module_name}: the manifest says {heads} heads of width {head_dim}, the config builds "
                            f"{getattr(old, cls._heads_attr)} of width {getattr(old, cls._head_dim_attr)}")
    new = _rebuilt_as(old, cls)
    ref = next(iter(old.parameters()))
    new._add_collab_parameters(d_model, heads, shared, device=ref.device, dtype=ref.dtype)
    if cls._removed == ("c_attn",) and layer.value_rank is None:  # GPT-2: the fused tensor's value slice, Conv1D
        from transformers.pytorch_utils import Conv1D

        new.collab_value = Conv1D(heads * head_dim, d_model).to(device=ref.device, dtype=ref.dtype)
    _add_values(new, layer, family, ref)
    new.scale = float(getattr(old, "scaling", None) or layer.scale)
    return new


def _add_values(new: nn.Module, layer: LayerRecord, family: Family | None, ref: torch.Tensor) -> None:
    """Shared values in place of the value projection, when the layer has them (uninitialised)."""
    if layer.value_rank is None:
        return
    if family is None or (family.value is None and not family.fused):
        raise UnsupportedArchitectureError(f"{layer.module}: shared values of family {layer.family!r} (no known "
                                           "value projection) cannot be run")
    add_value_parameters(new, type(new)._value_attr, layer.d_model, layer.value_rank,
                         layer.value_heads * layer.head_dim, bias="bias" in layer.value_tensors(), device=ref.device,
                         dtype=ref.dtype)


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
    _value_attr = "v_proj"
    _head_dim_attr = "head_dim"

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        cache = kwargs.pop("past_key_values", cache)
        input_shape = hidden_states.shape[:-1]
        cos, sin = position_embeddings  # (B, N, d) each
        query = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)  # (B, H, N, d)
        query = self.query_states(query, cos, sin, self.scale)  # (B, H, N, R), scale included
        key = self.key_states(hidden_states, cos, sin)  # (B, 1, N, R)
        value = self._value_states(hidden_states)  # (B, G, N, d), or the shared latent (B, 1, N, r_v)
        if cache is not None:
            if isinstance(cache.layers[self.layer_idx], _static_layer()):
                raise NotImplementedError("a collaborative rotary model needs a dynamic cache: its keys (R per token, "
                                          "one head) do not fit a static cache shaped for G heads of width d; drop "
                                          "cache_implementation='static'")
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)  # (B, 1, M, R), values as above
        sliding = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))
        out, weights = self._attend(query, key, value, attention_mask, self.attention_dropout,
                                    sliding_window=sliding, **kwargs)
        out = out.reshape(*input_shape, -1).contiguous()  # (B, N, H*d), or (B, N, H*r_v) with the lift absorbed
        if self._absorbs():
            return nn.functional.linear(out, self._absorbed_output(), self.o_proj.bias), weights
        return self.o_proj(out), weights

    def _absorbs(self) -> bool:
        """Shared values whose lift is cheaper absorbed into o_proj (:func:`~collabcompress.maths.costs.output_absorbed`)."""
        return has_shared_values(self) and output_absorbed(self.o_proj.out_features, self.head_dim,
                                                           self.collab_value.out_features)

    def _lifted(self, out: torch.Tensor) -> torch.Tensor:
        return out if self._absorbs() else super()._lifted(out)

    def _absorbed_output(self) -> torch.Tensor:
        """o_proj with the lift absorbed (D, H*r_v); cached while neither weight changes (not while training them)."""
        up, output = self.collab_value_up.weight, self.o_proj.weight
        if torch.is_grad_enabled() and (up.requires_grad or output.requires_grad):
            return absorbed_output(up, output, self.head_dim)
        stamp = (up._version, output._version, up.data_ptr(), output.data_ptr(), up.dtype)
        cached = self.__dict__.get("_collab_absorbed")
        if cached is None or cached[0] != stamp:
            cached = self.__dict__["_collab_absorbed"] = (stamp, absorbed_output(up, output, self.head_dim).detach())
        return cached[1]


@functools.lru_cache(maxsize=None)
def _rotary_wrapper_class(original: type[nn.Module]) -> type[nn.Module]:
    known = _rotary_classes()
    _refuse_unknown_class(original, known, "with shared rotary keys", ", ".join(dict.fromkeys(known)))
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
        layer: the manifest's layer record (:class:`~collabcompress.files.manifest.LayerRecord`):
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
    _add_values(new, layer, find_family(layer.family), ref)
    new.scale = float(old.scaling)
    return new


def check_rotary_frequencies(model: nn.Module, directory: Path) -> None:
    """Every loaded collab_key_freq names a frequency of its head (:func:`check_key_freq`)."""
    for name, m in model.named_modules():
        if isinstance(m, CollaborativeRotaryAttention):
            check_key_freq(m.collab_key_freq, m.head_dim, f"{name}.collab_key_freq", directory)


def check_key_freq(freq: torch.Tensor, head_dim: int, name: str, directory: Path) -> None:
    """``freq`` (R/2,) names frequencies of a head of width ``head_dim`` (0 .. d/2-1).

    Raises:
        BadInputError: naming the tensor ``name`` of ``directory``.
    """
    half = head_dim // 2
    if freq.numel() and (int(freq.min()) < 0 or int(freq.max()) >= half):
        raise BadInputError(f"{directory}: {name} holds {int(freq.min())}..{int(freq.max())}, "
                            f"outside the head's frequencies 0..{half - 1}")


# --------------------------------------------------------------------------- finding modules

def find_modules(model: torch.nn.Module, ckpt: Checkpoint, spec: AttentionSpec) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The in-memory modules computing the query and the key projection of ``spec``.

    Found by weight identity, so prefixes and in-memory renames (ViT in transformers 5)
    do not matter. Candidates are picked by shape and their first numbers, and only those are
    compared in full: a full comparison with every same-shaped weight made calibrating a
    30-layer model quadratic (SmolLM2: 1,800 comparisons, 11 s).
    """
    candidates: dict[tuple, list[torch.nn.Module]] = {}
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.numel():
            candidates.setdefault(_fingerprint(w), []).append(module)
    found = []
    for name in (spec.query, spec.key) if not spec.fused else (spec.query,):
        target = ckpt.load(name, torch.float32)
        hit = next((m for m in candidates.get(_fingerprint(target), ())
                    if torch.equal(m.weight.detach().float(), target)), None)
        if hit is None:
            raise UnsupportedArchitectureError(f"cannot find the module computing {name} in the transformers model")
        found.append(hit)
    return (found[0], found[-1])


def _fingerprint(weight: torch.Tensor) -> tuple:
    """Shape and first 16 numbers (as float32) of a weight: equal weights have equal fingerprints."""
    return tuple(weight.shape), tuple(weight.detach().reshape(-1)[:16].float().tolist())
