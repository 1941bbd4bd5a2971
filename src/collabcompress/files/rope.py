"""Rotary position embeddings in a checkpoint: which rotary family it is, whether its rope
settings can be compressed, its grouped key heads, and its frequencies theta_j.

The file-side home of the rotary method (:mod:`collabcompress.methods.rotary`): the only module
of ``files/`` that tells rotary checkpoints from the others, so :mod:`collabcompress.files.arch`
asks it rather than testing for rotary itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from typing import Any

import torch

from ..errors import BadInputError, UnsupportedArchitectureError
from .checkpoint import Checkpoint
from .families import FAMILIES, KV_HEAD_KEYS, REFUSED_ROTARY_MODEL_TYPES, Family, family_of_model_type, find_family

__all__ = ["rotary_family", "plain_families", "refusal_reasons", "check_key_rows", "head_count_hint",
           "finish_spec", "attention_bias_rule", "check_rope_settings", "rope_frequencies", "rope_setting", "stock_rope",
           "max_positions"]

_ROTARY_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "rotary_dim", "rotary_pct", "rotary_emb_base",
                "rotary_emb_fraction", "partial_rotary_factor")
_INTERLEAVE_KEYS = ("rope_interleave", "rope_interleaved", "rotary_interleave", "rotary_interleaved",
                    "interleaved_rope")
# Numeric rotary settings (top level, in rope_parameters or rope_scaling): finite numbers, the
# first four positive; transformers would otherwise compute NaN or nonsense frequencies.
_ROPE_NUMBERS = ("rope_theta", "factor", "partial_rotary_factor", "original_max_position_embeddings",
                 "low_freq_factor", "high_freq_factor", "attention_factor", "beta_fast", "beta_slow", "mscale",
                 "mscale_all_dim")
_ROPE_POSITIVE = ("rope_theta", "factor", "partial_rotary_factor", "original_max_position_embeddings")
_ROPE_LISTS = ("short_factor", "long_factor")
# rope types known without importing transformers; any other is looked up in transformers' table
_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")


def _rotary_config(cfg: dict[str, Any]) -> bool:
    return (any(k in cfg for k in _ROTARY_KEYS) or cfg.get("position_embedding_type") == "rotary"
            or (isinstance(cfg.get("model_type"), str) and cfg["model_type"] in REFUSED_ROTARY_MODEL_TYPES))


def rope_setting(cfg: dict[str, Any], key: str) -> Any:
    """``cfg[key]``, or the same key inside ``rope_parameters`` / ``rope_scaling``."""
    for where in (cfg, cfg.get("rope_parameters"), cfg.get("rope_scaling")):
        if isinstance(where, dict) and where.get(key) is not None:
            return where[key]
    return None


def _rotary_layout_reasons(cfg: dict[str, Any]) -> list[str]:
    """Why a rotary checkpoint of a registered family still cannot be compressed."""
    reasons = []
    partial = rope_setting(cfg, "partial_rotary_factor")
    if isinstance(partial, (int, float)) and not isinstance(partial, bool) and partial < 1:
        reasons.append(f"partial rotary embeddings (partial_rotary_factor = {partial}): only part of each head is "
                       "rotated, which the shared rotary keys do not model")
    if any(rope_setting(cfg, k) for k in _INTERLEAVE_KEYS):
        reasons.append("an interleaved rotary pair layout (dimension 2j paired with 2j+1): the shared rotary keys "
                       "need transformers' rotate_half layout (j paired with j + d/2)")
    return reasons


def rotary_family(names: list[str], config: dict[str, Any] | None, arch: str | None) -> Family | None:
    """The rotary family of the checkpoint (its rope settings checked: :func:`check_rope_settings`),
    or ``None``."""
    family = _rotary_family(names, config, arch)
    if family is not None:
        check_rope_settings(config)
    return family


def plain_families() -> list[Family]:
    """The families tried on a checkpoint that is not rotary (BART-style names look like LLaMA's)."""
    return [f for f in FAMILIES if not f.rotary]


def refusal_reasons(names: list[str], cfg: dict[str, Any], family: Family | None) -> list[str]:
    """Why the rope of the checkpoint is refused: partial or interleaved rotary in the rotary
    ``family``; without one, any rotary position embeddings."""
    if family is not None:
        return _rotary_layout_reasons(cfg)
    if _rotary_config(cfg) or _looks_rotary(names):
        return ["rotary position embeddings: the rotation between query and key breaks the shared "
                "bilinear form (supported rotary families: "
                f"{', '.join(f.name for f in FAMILIES if f.rotary)})"]
    return []


def check_key_rows(family: Family, kname: str, key_rows: int, qname: str, width: int) -> None:
    """Refuse key rows that differ from the query rows outside the rotary (grouped-query) families."""
    if key_rows != width and not family.rotary:
        raise UnsupportedArchitectureError(
            f"unsupported architecture: {kname} has {key_rows} rows and {qname} {width}: grouped-query or "
            "multi-query attention (key rows differ from query rows)")


def attention_bias_rule(config: dict[str, Any], family: Family) -> bool | str | None:
    """Whether the q/k projections of a rotary ``family`` may have biases (:attr:`Family.attention_bias`)
    by the class transformers builds (config.json's ``model_type``, whatever --arch says); ``None``
    for the other families."""
    return (family_of_model_type(config.get("model_type")) or family).attention_bias if family.rotary else None


def head_count_hint(family: Family) -> str:
    """What a missing head count's message adds for ``family``."""
    return " (and --kv-heads G for a grouped-query rotary model)" if family.rotary else ""


def finish_spec(ckpt: Checkpoint, family: Family, spec: Any, kv_heads: int | None,
                head_count: Callable[[dict[str, Any], str], int | None]) -> Any:
    """The :class:`~collabcompress.files.arch.AttentionSpec` ``spec`` of ``family``: a rotary
    layer with G from its key rows (:func:`_rotary_spec`); any other unchanged. ``head_count``
    reads a head count from config.json."""
    return _rotary_spec(ckpt, spec, kv_heads, head_count) if family.rotary else spec


def _rotary_family(names: list[str], config: dict[str, Any] | None, arch: str | None) -> Family | None:
    """The rotary family of the checkpoint: by ``--arch``, config.json's ``model_type``, or (no
    config, or a config without a model type) LLaMA-style names and siblings."""
    if arch is not None:
        chosen = find_family(arch)
        return chosen if chosen is not None and chosen.rotary else None
    cfg = config or {}
    by_type = family_of_model_type(cfg.get("model_type"))
    if by_type is not None:
        return by_type if by_type.rotary else None
    if cfg.get("model_type") is None and _looks_rotary(names) and any(
            n.endswith(".self_attn.q_proj.weight") or n.startswith("self_attn.q_proj.") for n in names):
        return find_family("llama")
    return None


_LLAMA_SIBLINGS = re.compile(r"^(?P<layer>(?:.*\.)?layers\.\d+)\.(?:self_attn\.o_proj\.weight|mlp\.gate_proj\.weight|"
                             r"input_layernorm\.weight|post_attention_layernorm\.weight)$")


def _looks_rotary(names: list[str]) -> bool:
    """A LLaMA-style rotary decoder told by its tensor names alone (no config needed): a
    ``rotary_emb`` buffer, or a layer whose ``self_attn.q_proj`` sits beside ``self_attn.o_proj``
    (BART-style layers name it ``out_proj``), ``mlp.gate_proj`` or ``input_layernorm``."""
    if any("rotary_emb" in n for n in names):
        return True
    with_query = {n[: -len(".self_attn.q_proj.weight")] for n in names if n.endswith(".self_attn.q_proj.weight")}
    return any((m := _LLAMA_SIBLINGS.match(n)) and m.group("layer") in with_query for n in names)


def _number(value: Any) -> bool:
    """A finite real number (not a bool, not a string), as float() sees it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _rope_places(cfg: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Where rotary settings live: the top level, ``rope_parameters`` and ``rope_scaling`` (and
    their per-layer-type sub-dicts), each with its name as a prefix for messages."""
    places = [("", cfg)]
    for key in ("rope_parameters", "rope_scaling"):
        value = cfg.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise BadInputError(f"config.json gives {key} = {json.dumps(value)[:40]}, not an object; fix config.json")
        places.append((f"{key}.", value))
        places += [(f"{key}.{k}.", v) for k, v in value.items() if isinstance(v, dict)]
    return places


def check_rope_settings(config: dict[str, Any] | None) -> None:
    """Refuse rotary settings transformers would turn into wrong frequencies: a numeric setting
    that is not a finite number (``"10000"``, NaN) or not positive, a ``partial_rotary_factor``
    above 1 (exit 3), a rope type transformers does not know (exit 4), and, where transformers is
    installed, settings its rope initialisation rejects (a yarn without ``factor``: exit 3)."""
    for where, place in _rope_places(config or {}):
        for key in (*_ROPE_NUMBERS, *_ROPE_LISTS):
            value = place.get(key)
            if value is None:
                continue
            if key in _ROPE_LISTS:
                ok = isinstance(value, list) and bool(value) and all(_number(v) and v > 0 for v in value)
            else:
                ok = _number(value) and (key not in _ROPE_POSITIVE or value > 0)
                ok = ok and (key != "partial_rotary_factor" or value <= 1)
            if not ok:
                want = {"partial_rotary_factor": "a number in (0, 1]"}.get(
                    key, "a list of positive numbers" if key in _ROPE_LISTS else
                    "a positive finite number" if key in _ROPE_POSITIVE else "a finite number")
                raise BadInputError(f"config.json gives {where}{key} = {json.dumps(value)[:40]}, not {want}; "
                                    "fix config.json")
        if not where:
            continue
        kind = place.get("rope_type", place.get("type"))
        if kind is None or kind in _ROPE_TYPES:
            continue
        if not isinstance(kind, str):
            raise BadInputError(f"config.json gives {where}rope_type = {json.dumps(kind)[:40]}, not a name; "
                                "fix config.json")
        known = _transformers_rope_types()
        if kind not in known:
            raise UnsupportedArchitectureError(
                f"unsupported architecture: rope type {kind[:40]!r} ({where}rope_type in config.json) is not one "
                f"transformers knows; known: {', '.join(sorted(known))}")
    if (kind := _rope_kind(config or {})) == "default":
        return
    try:
        import transformers  # noqa: F401
    except ImportError:  # the frequencies are refused later by the commands that need them
        return
    _rope_init(config or {}, kind)  # the type's own settings (yarn's factor, llama3's bands), before any work


def _transformers_rope_types() -> set[str]:
    """The rope types of the installed transformers' rope initialisation (only :data:`_ROPE_TYPES`
    without it), imported only for a type outside those."""
    try:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    except ImportError:
        return set(_ROPE_TYPES)
    return set(_ROPE_TYPES) | set(ROPE_INIT_FUNCTIONS)


def _rotary_spec(ckpt: Checkpoint, spec: Any, kv_heads: int | None,
                 head_count: Callable[[dict[str, Any], str], int | None]) -> Any:
    """``spec`` with G from the key rows, checked against --kv-heads, config.json and head_dim."""
    cfg = ckpt.config or {}
    key_rows = ckpt.shape(spec.key)[0]
    if key_rows % spec.head_dim:
        raise BadInputError(f"{spec.key} has {key_rows} rows, not a multiple of head_dim {spec.head_dim} "
                            f"({spec.n_head} heads); check --heads or config.json")
    found = key_rows // spec.head_dim
    given = kv_heads if kv_heads is not None else head_count(cfg, KV_HEAD_KEYS[0])
    if given is None and ckpt.config is not None:
        given = spec.n_head  # transformers' default: num_key_value_heads = num_attention_heads
    if given is not None and given != found:
        where = "--kv-heads" if kv_heads is not None else "config.json (num_key_value_heads)"
        raise BadInputError(f"{where} gives {given} key/value heads, but {spec.key} holds {found} of width "
                            f"{spec.head_dim}; pass --kv-heads {found} or fix --heads")
    if spec.n_head % found:
        raise BadInputError(f"{spec.n_head} query heads are not a multiple of {found} key/value heads in "
                            f"{spec.module}; check --heads and --kv-heads")
    head_dim = cfg.get("head_dim")
    if isinstance(head_dim, int) and not isinstance(head_dim, bool) and head_dim != spec.head_dim:
        raise BadInputError(f"config.json gives head_dim {head_dim}, but {spec.query} has {spec.width} rows for "
                            f"{spec.n_head} heads (width {spec.head_dim}); check --heads or config.json")
    if spec.head_dim % 2:
        raise BadInputError(f"{spec.module}: head width {spec.head_dim} is odd; rotary heads pair their dimensions")
    return dataclasses.replace(spec, n_kv_head=found, rotary=True)


def _rope_kind(cfg: dict[str, Any]) -> Any:
    """The rope type of a config (``rope_parameters``, else the legacy ``rope_scaling``)."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"


def _rope_init(cfg: dict[str, Any], kind: str) -> tuple[torch.Tensor, float]:
    """transformers' own frequencies (d/2,) and attention scaling of a rope type other than the
    default (``ROPE_INIT_FUNCTIONS``), which also checks the type's settings.

    Raises:
        MissingExtraError: transformers is not installed.
        UnsupportedArchitectureError: a rope type this transformers does not know (exit 4).
        BadInputError: rope settings transformers rejects, with its reason.
    """
    from ..extras import quiet_transformers, require_transformers

    transformers = require_transformers(f"the {str(kind)[:40]!r} rope of this model")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if kind not in ROPE_INIT_FUNCTIONS:
        raise UnsupportedArchitectureError(f"rope type {str(kind)[:40]!r} is not one transformers "
                                           f"{transformers.__version__} knows")
    try:
        with quiet_transformers():
            hf_config = transformers.AutoConfig.for_model(cfg.get("model_type") or "llama",
                                                          **{k: v for k, v in cfg.items() if k != "model_type"})
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](hf_config, "cpu")
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
        raise BadInputError(f"config.json: transformers rejects the {kind} rope settings "
                            f"({' '.join(str(e).split())[:160]}); fix config.json") from e
    return inv_freq.to(torch.float64), float(scaling)


def rope_frequencies(config: dict[str, Any] | None, head_dim: int) -> tuple[torch.Tensor, float]:
    """The rotary frequencies theta_j (d/2,) float64 and the attention scaling of a rotary model.

    The default rope is ``theta_j = base^(-2j/d)`` with ``base`` = ``rope_theta`` (default
    10000) and scaling 1; every other rope type goes through transformers' own initialisation
    (:func:`_rope_init`), never a guess: the refinement's and verify's rotations, the bench's
    position embeddings and the stock export's frequency table depend on them.
    """
    cfg = config or {}
    kind = _rope_kind(cfg)
    if kind == "default":
        base = rope_setting(cfg, "rope_theta") or cfg.get("rotary_emb_base") or 10000.0
        j = torch.arange(0, head_dim, 2, dtype=torch.float64)
        return 1.0 / float(base) ** (j / head_dim), 1.0
    inv_freq, scaling = _rope_init(cfg, kind)
    return inv_freq[: head_dim // 2], scaling


def stock_rope(config: dict[str, Any] | None, head_dim: int, key_freq: torch.Tensor) -> dict[str, Any]:
    """The ``rope_parameters`` of the stock export (docs/export.md): a ``longrope`` factor per rotary
    pair r of a head of size R = 2 * len(key_freq), turning pair r at the source's theta_{j(r)}
    (``short_factor`` = ``long_factor``, ``factor`` 1, ``attention_factor`` 1 (the source's attention
    scaling is folded into the queries), ``original_max_position_embeddings`` =
    ``max_position_embeddings``: what transformers and vLLM read without a warning).

    Raises:
        BadInputError: rope settings whose frequencies change with the sequence length (``dynamic``,
            ``longrope`` with different short and long factors), which one table cannot hold.
    """
    from ..maths.stock import longrope_factors

    cfg = config or {}
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = _rope_kind(cfg)
    if kind == "dynamic" or (kind == "longrope" and rope.get("short_factor") != rope.get("long_factor")):
        raise BadInputError(f"the source's rope type {kind!r} changes its frequencies with the sequence length; "
                            "the stock export writes one frequency table and cannot hold it")
    theta, _ = rope_frequencies(cfg, head_dim)
    base = float(rope_setting(cfg, "rope_theta") or cfg.get("rotary_emb_base") or 10000.0)
    positions = max_positions(cfg)
    factors = longrope_factors(theta, key_freq, base)
    return {"rope_type": "longrope", "rope_theta": base, "factor": 1.0, "attention_factor": 1.0,
            "original_max_position_embeddings": positions, "short_factor": factors, "long_factor": list(factors)}


def max_positions(config: dict[str, Any]) -> int:
    """config.json's ``max_position_embeddings``, else the default of its transformers class."""
    value = config.get("max_position_embeddings")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    try:
        import transformers

        return int(transformers.AutoConfig.for_model(config.get("model_type") or "llama").max_position_embeddings)
    except (ImportError, ValueError, AttributeError, TypeError) as e:
        raise BadInputError("config.json gives no max_position_embeddings; add it") from e
