"""Architecture families: where the query/key tensors of every attention layer live.

Each family of the registry (:mod:`collabcompress.files.families`) is recognised from tensor
names (any prefix such as ``bert.`` is allowed) and ``config.json``; docs/method.md is
the table. Architectures whose attention cannot be written as one shared bilinear form per
head are refused with the reason.
"""

from __future__ import annotations

from collections.abc import Callable

import json
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..dtypes import FLOATS
from ..errors import BadInputError, UnsupportedArchitectureError
from . import rope
from .families import FAMILIES, Family, find_family
from .checkpoint import Checkpoint

__all__ = ["Family", "AttentionSpec", "QueryKey", "FAMILIES", "find_family", "detect", "load_query_key",
           "load_value_output", "stored_qk_params", "COLLAB_SUFFIXES"]

COLLAB_SUFFIXES = (".collab_query.weight", ".collab_key.weight", ".collab_mixing", ".collab_content_bias.weight",
                   ".collab_key_freq")

_MAX_LAYER_DIGITS = 9  # a longer number in a module name is damage, not a layer index (int() refuses > 4300)
_QK_NORM = re.compile(r"(?:^|\.)(?:q_norm|k_norm|query_norm|key_norm|q_layernorm|k_layernorm)(?:\.|$)")


@dataclass(frozen=True)
class AttentionSpec:
    """One attention module the tool can compress.

    Attributes:
        module: prefix of the module that owns the query tensor (docs/method.md).
        index: position of the module in the model (encoder first), 0-based.
        family: family name.
        n_head, head_dim, d_model: H, d and D of docs/method.md.
        n_kv_head: G, the key/value heads (the manifest's ``kv_heads``); H unless grouped-query.
        rotary: a rotary layer (docs/method.md): its key side becomes
            shared rotary keys; ``key`` has G*d rows.
        scale: the score scale s (1/sqrt(d), or 1 for T5).
        query, key: weight tensor names; for a fused family both name the fused tensor.
        query_bias, key_bias: bias tensor names that exist, else ``None``.
        fused: ``"conv1d"``, ``"linear"`` or ``None``.
    """

    module: str
    index: int
    family: str
    n_head: int
    head_dim: int
    d_model: int
    scale: float
    query: str
    key: str
    query_bias: str | None
    key_bias: str | None
    fused: str | None = None
    n_kv_head: int | None = None
    rotary: bool = False

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            object.__setattr__(self, "n_kv_head", self.n_head)

    @property
    def width(self) -> int:
        """H*d, the concatenated key/query width."""
        return self.n_head * self.head_dim

    @property
    def key_cache(self) -> int:
        """G*d: the original key rows (a rotary layer's key cache per token, reals); H*d unless grouped-query."""
        return self.n_kv_head * self.head_dim


@dataclass(frozen=True)
class QueryKey:
    """The query and key projections of one module, in nn.Linear layout, float64."""

    w_query: torch.Tensor  # (H*d, D)
    w_key: torch.Tensor  # (H*d, D)
    b_query: torch.Tensor | None  # (H*d,)
    b_key: torch.Tensor | None  # (H*d,)


def _natural(s: str, family: Family) -> tuple:
    """Model order: encoder before decoder, layers by number, self- before cross-attention."""
    side = 1 if re.search(r"(?:^|\.)decoder\.", s) else 0
    # Text tokens become (is_cross, text): a decoder layer's ``encoder_attn`` runs after its
    # ``self_attn`` although it sorts before it alphabetically.
    return (side, tuple(int(t) if t.isdigit() else (family.is_cross(t), t) for t in re.split(r"(\d+)", s)))


def _refusal_reasons(names: list[str], config: dict[str, Any] | None,
                     family: Family | None) -> list[str]:
    """Why the checkpoint is refused (exit 4); ``family``: the rotary family it belongs to, or ``None``."""
    reasons = []
    if any(_QK_NORM.search(n) for n in names):
        reasons.append("per-head query/key normalisation (q_norm/k_norm tensors): the normalisation between the "
                       "projections and the product breaks the shared bilinear form")
    cfg = config or {}
    if family is not None:
        return reasons + rope.refusal_reasons(names, cfg, family)
    heads = cfg.get("num_attention_heads")
    kv = cfg.get("num_key_value_heads")
    if (isinstance(kv, int) and isinstance(heads, int) and kv < heads) or cfg.get("multi_query") is True:
        reasons.append(f"grouped-query or multi-query attention ({kv} key/value heads for {heads} query heads): "
                       "key rows differ from query rows outside the rotary families (llama, mistral, qwen2)")
    return reasons + rope.refusal_reasons(names, cfg, None)


def _config_section(config: dict[str, Any], family: Family, module: str) -> tuple[str, dict[str, Any]]:
    """The part of config.json that describes ``module``: CLIP/Owl-style composite configs give
    each tower a sub-config; timm's ``model_args`` overrides the top level. Returns
    (its name as a prefix for messages, e.g. ``"text_config."``, the settings)."""
    label, cfg = "", config
    for tower, sub in (("text_model", "text_config"), ("vision_model", "vision_config")):
        if (module.startswith(tower) or f".{tower}." in f".{module}") and isinstance(config.get(sub), dict):
            label, cfg = f"{sub}.", config[sub]
    if family.config_section is not None and isinstance(cfg.get(family.config_section), dict):
        cfg = {**cfg, **cfg[family.config_section]}
    return label, cfg


def _side_keys(keys: tuple[str, str] | None, module: str) -> tuple[str, ...]:
    """The (encoder, decoder) key that applies to ``module``, or none."""
    if keys is None:
        return ()
    return (keys[1] if re.search(r"(?:^|\.)decoder\.", module) else keys[0],)


def _config_int(cfg: dict[str, Any], keys: tuple[str, ...], label: str = "",
                hint: str = "fix config.json") -> tuple[str, int] | None:
    """(key, value) of the first of ``keys`` that ``cfg`` holds, or ``None``; a value that is not
    a positive integer below 2**63 is refused, naming ``label + key``."""
    for key in keys:
        value = cfg.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2 ** 63:
            shown = json.dumps(value)[:40] if not isinstance(value, int) or value < 2 ** 63 else "a huge number"
            raise BadInputError(f"config.json gives {label}{key} = {shown}, not a positive integer; {hint}")
        return key, value
    return None


def _config_heads(config: dict[str, Any] | None, family: Family, module: str) -> int | None:
    if not config:
        return None
    label, cfg = _config_section(config, family, module)
    found = _config_int(cfg, (*_side_keys(family.side_head_keys, module), *family.head_keys), label,
                        "fix config.json or pass --heads N")
    return None if found is None else found[1]


def _head_count(cfg: dict[str, Any], key: str) -> int | None:
    """``cfg[key]`` as a head count; ``None`` when absent; a value that is not a positive integer is refused."""
    found = _config_int(cfg, (key,), hint="fix config.json or pass --heads N")
    return None if found is None else found[1]


def _short(name: str) -> str:
    """A tensor name shortened for a one-line message."""
    return name if len(name) <= 100 else f"{name[:60]}...{name[-30:]}"


def _check_layer_numbers(found: list[tuple[str, str]]) -> None:
    """Refuse module names with absurdly long numbers: no model has a billion layers, and
    Python refuses to convert numbers of more than 4,300 digits."""
    for module, qname in found:
        run = max(re.findall(r"\d+", module), key=len, default="")
        if len(run) > _MAX_LAYER_DIGITS:
            raise BadInputError(f"tensor {_short(qname)}: its name holds a number of {len(run)} digits, not a "
                                "layer index; the checkpoint is damaged")


def _incomplete(family: Family, names: list[str]) -> tuple[str, str] | None:
    """(a query or key weight, its missing counterpart) of a module holding only one of the two."""
    if family.key_pattern is None:
        return None
    name_set = set(names)
    for n in names:
        for pattern, other in ((family.pattern, family.key), (family.key_pattern, family.query)):
            if (m := pattern.match(n)) and f"{m.group('m')}.{other}.weight" not in name_set:
                return n, f"{m.group('m')}.{other}.weight"
    return None


def _refuse_incomplete(family: Family, names: list[str]) -> None:
    if (pair := _incomplete(family, names)) is not None:
        raise BadInputError(f"{_short(pair[0])} has no matching {_short(pair[1])}: its layer cannot be compressed; "
                            "the checkpoint is incomplete")


def _check_against_config(config: dict[str, Any] | None, family: Family, specs: list[AttentionSpec],
                          whole_model: bool) -> None:
    """Refuse a config.json that contradicts the weights: the input width D, the number of layers
    (``whole_model``: the checkpoint holds every layer) and, for the rotary families, q/k biases
    that transformers' attention class would not load."""
    if not config:
        return
    # transformers builds the class of config.json's model_type, whatever --arch says
    bias_rule = rope.attention_bias_rule(config, family)
    layers: dict[tuple[str, str, int], list[AttentionSpec]] = {}
    for spec in specs:
        label, cfg = _config_section(config, family, spec.module)
        width = _config_int(cfg, family.width_keys, label)
        if width is not None and width[1] != spec.d_model:
            raise BadInputError(f"config.json gives {label}{width[0]} = {width[1]}, but {_short(spec.query)} takes "
                                f"inputs of width {spec.d_model}; the config and the weights are of different models")
        bias = spec.query_bias or spec.key_bias
        if bias and bias_rule is False:
            raise BadInputError(f"the weights hold {_short(bias)}, but {config.get('model_type') or family.name} "
                                "attention has no query/key biases: transformers would ignore them")
        if bias and isinstance(bias_rule, str) and cfg.get(bias_rule) is not True:
            raise BadInputError(f"the weights hold {_short(bias)}, but config.json gives {label}{bias_rule} = "
                                f"{json.dumps(cfg.get(bias_rule))[:20]}: transformers would ignore the biases; "
                                "set it to true")
        if whole_model and not family.is_cross(spec.module):
            keys = (*_side_keys(family.side_layer_keys, spec.module), *family.layer_keys)
            if (found := _config_int(cfg, keys, label)) is not None:
                layers.setdefault((label, *found), []).append(spec)
    for (label, key, count), group in layers.items():
        if count != len(group):
            raise BadInputError(f"config.json gives {label}{key} = {count}, but the weights hold {len(group)} "
                                f"attention layers ({_short(group[0].query)} to {_short(group[-1].query)}); "
                                "the config and the weights are of different models")


def _detect_family(names: list[str], arch: str | None, chosen: Family | None = None,
                   whole_model: bool = True) -> tuple[Family, list[tuple[str, str]]]:
    """-> (family, [(module prefix, query weight name)]). Only ``chosen`` is tried when the
    checkpoint's rope chose it (:func:`collabcompress.files.rope.rotary_family`), else the
    ``--arch`` family or every family without rope (BART-style names look alike). With
    ``whole_model``, a module of the family holding its query weight without its key weight
    (or the reverse) is refused rather than left out."""
    if chosen is not None:
        candidates = [chosen]
    elif arch is not None:
        chosen = find_family(arch)
        if chosen is None:
            raise BadInputError(f"unknown --arch {arch!r}; choose one of: {', '.join(f.name for f in FAMILIES)}")
        candidates = [chosen]
    else:
        candidates = rope.plain_families()
    best: tuple[Family, list[tuple[str, str]]] | None = None
    for family in candidates:
        found = [(m.group("m"), n) for n in names if (m := family.pattern.match(n))]
        if family.key is not None:
            found = [(m, n) for m, n in found if f"{m}.{family.key}.weight" in names]
        if found and (best is None or len(found) > len(best[1])):
            best = (family, found)
    if whole_model and (best is not None or len(candidates) == 1):
        _refuse_incomplete(best[0] if best is not None else candidates[0], names)
    if best is None:
        if arch is not None or chosen is not None:
            raise BadInputError(f"no attention tensors of family {candidates[0].name!r} found (expected names like "
                                f"{candidates[0].example}); check --arch or run `collabcompress archs`")
        raise UnsupportedArchitectureError(
            "unsupported architecture: no query/key tensors of a known family found; "
            "run `collabcompress archs` for the supported naming, or pass --arch")
    return best


def detect(ckpt: Checkpoint, *, heads: int | None = None, arch: str | None = None,
           kv_heads: int | None = None, whole_model: bool = True) -> list[AttentionSpec]:
    """Find every attention module of ``ckpt`` that the tool can compress.

    Args:
        ckpt: an opened checkpoint (headers only are read).
        heads: head count override (``--heads``), else from ``config.json``.
        arch: family name override (``--arch``), else detected from tensor names.
        kv_heads: key/value head count of a rotary family (``--kv-heads``), else from
            ``config.json`` (``num_key_value_heads``, default the head count), else from the
            key rows; a value that contradicts the key rows is refused.
        whole_model: ``ckpt`` holds the whole model, so every layer config.json counts must be
            there with both its query and key weights; ``False`` for a part of a model (the
            uncompressed layers of a ``compress --layers`` output).

    Returns:
        One :class:`AttentionSpec` per module, encoder before decoder, in layer order.

    Raises:
        UnsupportedArchitectureError: rotary or grouped-query outside the rotary families, q/k-norm,
            partial or interleaved rotary, or an unknown family.
        BadInputError: no head count, a head count that does not divide the width,
            inconsistent shapes, non-float weights, an already compressed checkpoint, a layer
            with a query but no key weight (or the reverse), a config.json that contradicts
            the weights (layer count, width, biases) or gives unusable rotary settings.
    """
    names = ckpt.names()
    if any(n.endswith(COLLAB_SUFFIXES) for n in names):
        raise BadInputError(f"{ckpt.path} is already compressed by collabcompress (it holds collab_* tensors); "
                            "use the original checkpoint")
    chosen = rope.rotary_family(names, ckpt.config, arch)
    reasons = _refusal_reasons(names, ckpt.config, chosen)
    if reasons:
        model_type = (ckpt.config or {}).get("model_type")
        what = f"model_type {model_type!r}" if model_type else str(ckpt.path)
        raise UnsupportedArchitectureError(f"unsupported architecture ({what}): " + "; ".join(reasons))
    if heads is not None and heads < 1:
        raise BadInputError(f"--heads must be a positive integer, got {heads}")
    if kv_heads is not None and kv_heads < 1:
        raise BadInputError(f"--kv-heads must be a positive integer, got {kv_heads}")
    family, found = _detect_family(names, arch, chosen, whole_model)
    _check_layer_numbers(found)
    name_set = set(names)
    specs = []
    for index, (module, qname) in enumerate(sorted(found, key=lambda f: _natural(f[0], family))):
        spec = _spec(ckpt, family, module, qname, index, heads, name_set)
        specs.append(rope.finish_spec(ckpt, family, spec, kv_heads, _head_count))
    _check_against_config(ckpt.config, family, specs, whole_model)
    return specs


def _spec(ckpt: Checkpoint, family: Family, module: str, qname: str, index: int,
          heads: int | None, names: set[str]) -> AttentionSpec:
    kname = qname if family.fused else f"{module}.{family.key}.weight"
    for n in {qname, kname}:
        if ckpt.dtype(n) not in FLOATS:
            raise BadInputError(f"tensor {n!r} has dtype {ckpt.dtype(n)}; expected float32, float16 or bfloat16")
        if len(ckpt.shape(n)) != 2 or 0 in ckpt.shape(n):
            raise BadInputError(f"tensor {n!r} has shape {list(ckpt.shape(n))}; expected a non-empty 2-D weight")
    qshape = ckpt.shape(qname)
    if family.fused == "conv1d":
        d_model, three = qshape
        width = three // 3
    elif family.fused == "linear":
        three, d_model = qshape
        width = three // 3
    else:
        width, d_model = qshape
        kshape = ckpt.shape(kname)
        if kshape[1] != d_model:
            raise BadInputError(f"{kname} has shape {list(kshape)} but {qname} has {list(qshape)}")
        rope.check_key_rows(family, kname, kshape[0], qname, width)
    if family.fused and three % 3:
        raise BadInputError(f"fused tensor {qname!r} of shape {list(qshape)} is not three equal blocks")
    n_head = heads if heads is not None else _config_heads(ckpt.config, family, module)
    if n_head is None:
        where = ("config.json beside the weights gives none (num_attention_heads, n_head, n_heads or num_heads)"
                 if ckpt.config is not None else "no config.json beside the weights")
        raise BadInputError(f"no head count for {module}: {where}; pass --heads N{rope.head_count_hint(family)}")
    if width % n_head:
        raise BadInputError(f"head count {n_head} does not divide the query width {width} of {module}; "
                            "check --heads or config.json")
    head_dim = width // n_head
    qb = f"{qname[:-len('weight')]}bias"
    kb = f"{kname[:-len('weight')]}bias"
    return AttentionSpec(
        module=module, index=index, family=family.name, n_head=n_head, head_dim=head_dim, d_model=d_model,
        scale=family.scale(head_dim),
        query=qname, key=kname,
        query_bias=qb if qb in names else None, key_bias=kb if kb in names else None,
        fused=family.fused,
    )


def load_query_key(ckpt: Checkpoint, spec: AttentionSpec, dtype: torch.dtype = torch.float64) -> QueryKey:
    """Read the query and key projections of one module (and nothing else), in nn.Linear layout.

    NaN or Inf in a weight is refused with the tensor's name.
    """
    w = spec.width
    if spec.fused:
        fused = ckpt.load(spec.query, dtype, finite=True)
        if spec.fused == "conv1d":
            fused = fused.T  # (3*H*d, D)
        w_q, w_k = fused[:w].contiguous(), fused[w:2 * w].contiguous()
        b_q = b_k = None
        if spec.query_bias:
            bias = ckpt.load(spec.query_bias, dtype, finite=True)  # (3*H*d,)
            b_q, b_k = bias[:w].contiguous(), bias[w:2 * w].contiguous()
    else:
        w_q = ckpt.load(spec.query, dtype, finite=True)
        w_k = ckpt.load(spec.key, dtype, finite=True)
        b_q = ckpt.load(spec.query_bias, dtype, finite=True) if spec.query_bias else None
        b_k = ckpt.load(spec.key_bias, dtype, finite=True) if spec.key_bias else None
    return QueryKey(w_q, w_k, b_q, b_k)


def load_value_output(ckpt: Checkpoint, spec: AttentionSpec,
                      dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The value projection (H*d, D) and the output projection (D_out, H*d) of a module,
    in nn.Linear layout, or ``None`` when the checkpoint does not hold them (e.g. a sample
    with the attention tensors only, or value heads of another width)."""
    family = find_family(spec.family)
    if family is None or family.output is None:
        return None
    value_t, out_t = family.value, family.output
    fields = {"m": spec.module, "parent": spec.module.rsplit(".", 1)[0]}
    out_name = out_t.format(**fields)
    if out_name not in ckpt:
        return None
    if value_t is None:
        fused = ckpt.load(spec.query, dtype)
        fused = fused.T if spec.fused == "conv1d" else fused  # (3*H*d, D)
        value = fused[2 * spec.width:]
    else:
        value_name = value_t.format(**fields)
        if value_name not in ckpt:
            return None
        value = ckpt.load(value_name, dtype)
    output = ckpt.load(out_name, dtype)
    output = output.T if family.fused == "conv1d" else output  # (D_out, H*d)
    if value.shape != (spec.width, spec.d_model) or output.dim() != 2 or output.shape[1] != spec.width:
        return None
    return value, output


def stored_qk_params(spec: AttentionSpec, numel: Callable[[str], int]) -> int:
    """Key/query parameters of one stored attention layer, its query/key biases included.

    Args:
        spec: the layer (:class:`AttentionSpec`).
        numel: element count of a tensor by name (``Checkpoint.numel``); for a fused layer
            the query/key two thirds of its bias are counted from the shapes instead.
    """
    if spec.fused:
        bias = 2 * spec.width if spec.query_bias else 0
    else:
        bias = sum(numel(n) for n in (spec.query_bias, spec.key_bias) if n)
    return (spec.width + spec.key_cache) * spec.d_model + bias  # H*d query rows, G*d key rows
