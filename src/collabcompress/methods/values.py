"""Shared values: the value side of a layer as one latent shared by all heads (docs/method.md,
"Shared values"), fitted after the layer's key method and added to its :class:`FittedLayer`.

The value tensor (``v_proj`` or the family's) goes; ``{M}.collab_value.weight`` (r_v, D),
``{M}.collab_value.bias`` (r_v, where the values had a bias) and ``{M}.collab_value_up.weight``
(G*d, r_v) come, nn.Linear layout in every family. A fused family (GPT-2 ``c_attn``, timm ``qkv``)
takes its values from the value slice of the fused tensor and bias; the key method already removes
the fused tensor, and the shared values replace the value slice it writes under the same names. The fit (:func:`collabcompress.maths.values.value_factors`) weighs each group by
its heads' output projections and, with calibration statistics, whitens by the moments of the
attention-weighted inputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import BadInputError, UnsupportedArchitectureError
from ..files.arch import AttentionSpec
from ..files.checkpoint import Checkpoint
from ..files.families import find_family
from ..maths.spectra import choose_rank
from ..options import CompressOptions
from .base import next_token_kl, swapped_curve

__all__ = ["VALUES", "ValueFit", "ValueMethod", "value_names", "value_sources"]


def value_names(module: str) -> dict[str, str]:
    """Tensor names of a layer's shared values (docs/method.md)."""
    return {"weight": f"{module}.collab_value.weight", "bias": f"{module}.collab_value.bias",
            "up": f"{module}.collab_value_up.weight"}


@dataclass(frozen=True)
class ValueSources:
    """Where a layer's values live in the checkpoint: the value weight and bias names and the
    output projection weight name. A fused family's values are the last third of its fused
    query/key/value tensor ``weight`` (and bias), laid out as ``fused`` says (``"conv1d"``:
    (D, 3*H*d), ``"linear"``: (3*H*d, D)); its output projection is in the same layout."""

    weight: str
    bias: str | None
    output: str
    fused: str | None = None

    def load(self, ckpt: Checkpoint, spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(value weight (G*d, D), value bias (G*d,) or ``None``, output weight (D_out, H*d)), nn.Linear
        layout, float64; NaN or Inf refused with the tensor's name."""
        w = ckpt.load(self.weight, torch.float64, finite=True)
        b = ckpt.load(self.bias, torch.float64, finite=True) if self.bias else None
        w_out = ckpt.load(self.output, torch.float64, finite=True)
        if self.fused == "conv1d":
            w, w_out = w.T, w_out.T  # (3*H*d, D), (D_out, H*d)
        if self.fused:
            rows = 2 * spec.width  # queries and keys come first
            w, b = w[rows:], (b[rows:] if b is not None else None)  # (H*d, D), (H*d,)
        return w.contiguous(), (b.contiguous() if b is not None else None), w_out.contiguous()


def _fused_sources(ckpt: Checkpoint, spec: AttentionSpec, output: str) -> ValueSources:
    """The value slice of the fused tensor ``spec.query`` (its last H*d rows, or columns in
    Conv1D layout) and its output projection, checked against the layer's shapes."""
    rows, d_model = 3 * spec.width, spec.d_model
    fused_shape = (d_model, rows) if spec.fused == "conv1d" else (rows, d_model)
    if ckpt.shape(spec.query) != fused_shape:
        raise BadInputError(f"shared values: {spec.query} has shape {list(ckpt.shape(spec.query))}, expected "
                            f"{list(fused_shape)} (queries, keys and values of {spec.n_head} heads of width "
                            f"{spec.head_dim})")
    out_shape = ckpt.shape(output)
    want_in = 0 if spec.fused == "conv1d" else 1  # the axis of the output projection's input
    if len(out_shape) != 2 or out_shape[want_in] != spec.width:
        expected = f"[{spec.width}, *]" if spec.fused == "conv1d" else f"[*, {spec.width}]"
        raise BadInputError(f"shared values: {output} has shape {list(out_shape)}, expected {expected}")
    return ValueSources(spec.query, spec.query_bias, output, spec.fused)


def value_sources(ckpt: Checkpoint, spec: AttentionSpec) -> ValueSources:
    """The value and output tensors of ``spec``, checked against its shapes.

    Raises:
        UnsupportedArchitectureError: a family whose value or output projection is not registered.
        BadInputError: the checkpoint lacks them or they do not fit the layer.
    """
    family = find_family(spec.family)
    if family is None or family.output is None or (family.value is None and not family.fused):
        raise UnsupportedArchitectureError(f"shared values: {spec.module} ({spec.family}): the family's value or "
                                           "output projection is not known")
    fields = {"m": spec.module, "parent": spec.module.rsplit(".", 1)[0]}
    output = family.output.format(**fields)
    if output not in ckpt:
        raise BadInputError(f"shared values: {spec.module} has no tensor {output} in {ckpt.path}")
    if family.value is None:
        return _fused_sources(ckpt, spec, output)
    weight = family.value.format(**fields)
    bias = weight[: -len("weight")] + "bias"
    if weight not in ckpt:
        raise BadInputError(f"shared values: {spec.module} has no tensor {weight} in {ckpt.path}")
    rows = spec.n_kv_head * spec.head_dim
    if ckpt.shape(weight) != (rows, spec.d_model):
        raise BadInputError(f"shared values: {weight} has shape {list(ckpt.shape(weight))}, expected "
                            f"[{rows}, {spec.d_model}] ({spec.n_kv_head} value heads of width {spec.head_dim})")
    out_shape = ckpt.shape(output)
    if len(out_shape) != 2 or out_shape[1] != spec.width:
        raise BadInputError(f"shared values: {output} has shape {list(out_shape)}, expected [*, {spec.width}]")
    if bias in ckpt and ckpt.shape(bias) != (rows,):
        raise BadInputError(f"shared values: {bias} has shape {list(ckpt.shape(bias))}, expected [{rows}]")
    return ValueSources(weight, bias if bias in ckpt else None, output)


@dataclass
class ValueFit:
    """A layer's fitted shared values, as ``compress`` writes and records them."""

    rank: int
    relative_error: float
    energy: float
    seconds: float
    tensors: dict[str, torch.Tensor]
    removed: list[str]
    names: dict[str, str | None]
    replaced: list[str] = field(default_factory=list)  # the key method's tensors these replace (a fused value slice)
    curve: dict[int, float] | None = None  # --budget-of kv: value width -> next-token KL

    def record(self) -> dict[str, Any]:
        """The manifest's ``value`` object of the layer (its ``value_rank`` sits beside it)."""
        out = {"relative_error": round(self.relative_error, 8), "energy_spectral": round(self.energy, 8),
               "seconds": round(self.seconds, 4), "tensors": dict(self.names)}
        if self.curve is not None:
            out["allocation"] = {"loss": "next_token_kl",
                                 "losses": {str(r): round(v, 8) for r, v in sorted(self.curve.items())},
                                 "chosen_loss": round(self.curve[self.rank], 8)}
        return out


class ValueMethod:
    """Shared values of one layer: statistics, spectrum, rank choice and fit."""

    name = "values"

    def full_width(self, spec: AttentionSpec) -> int:
        """G*d: the original value cache per token and layer."""
        return spec.n_kv_head * spec.head_dim

    def check_rank(self, spec: AttentionSpec, rank: int) -> None:
        if not 1 <= rank <= self.full_width(spec):
            raise BadInputError(f"--value-rank {rank} for {spec.module}: at most the value width "
                                f"G*d = {self.full_width(spec)}")

    def load_statistics(self, path: Path, ckpt: Checkpoint, specs: list[AttentionSpec]) -> Mapping[str, Any]:
        from ..files.statistics import load_value_moments

        return load_value_moments(path, ckpt, specs)

    def _inputs(self, ckpt: Checkpoint, spec: AttentionSpec, moments: tuple[torch.Tensor, torch.Tensor] | None):
        from ..maths.values import output_weights, value_moment

        src = value_sources(ckpt, spec)
        w, b, w_out = src.load(ckpt, spec)  # (G*d, D), (G*d,) or None, (D_out, H*d)
        weights = output_weights(w_out, spec.n_head, spec.n_kv_head, spec.head_dim)
        moment = None if moments is None else value_moment(moments[1], moments[0], spec.n_head, b is not None)
        return src, w, b, weights, moment

    def spectrum(self, ckpt: Checkpoint, spec: AttentionSpec,
                 moments: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The singular values the layer's value fit truncates (data-free: of the concatenated W_O,h W_V,h)."""
        from ..maths.values import value_spectrum

        _, w, b, weights, moment = self._inputs(ckpt, spec, moments)
        return value_spectrum(w, b if moment is not None else None, weights, spec.n_kv_head, spec.head_dim, moment)

    def rank(self, spec: AttentionSpec, opts: CompressOptions, sv: torch.Tensor | None) -> int:
        """r_v: --value-rank, or the rank at --value-energy then --multiple-of, at most G*d."""
        from ..maths.values import value_rank_at

        full = self.full_width(spec)
        if opts.value_rank is not None:
            return opts.value_rank
        return choose_rank(value_rank_at(sv, opts.value_energy), full, min_rank=1, max_rank=None,
                           multiple_of=opts.multiple_of)

    def fit(self, ckpt: Checkpoint, spec: AttentionSpec, opts: CompressOptions, out_dtype: torch.dtype,
            moments: tuple[torch.Tensor, torch.Tensor] | None, rank: int | None = None) -> ValueFit:
        from ..maths.values import value_factors, value_spectrum

        start = time.perf_counter()
        src, w, b, weights, moment = self._inputs(ckpt, spec, moments)
        if rank is None:
            sv = value_spectrum(w, b, weights, spec.n_kv_head, spec.head_dim, moment) \
                if opts.value_energy is not None else None
            rank = self.rank(spec, opts, sv)
        try:
            f = value_factors(w, b, rank, out_weights=weights, n_kv_head=spec.n_kv_head, head_dim=spec.head_dim,
                              moment=moment)
        except ValueError as e:
            raise BadInputError(f"shared values of {spec.module}: {e}") from e
        names = value_names(spec.module)
        tensors = {names["weight"]: f.down.to(out_dtype).contiguous(), names["up"]: f.up.to(out_dtype).contiguous()}
        if f.down_bias is not None:
            tensors[names["bias"]] = f.down_bias.to(out_dtype).contiguous()
        recorded = {"weight": names["weight"], "bias": names["bias"] if f.down_bias is not None else None,
                    "up": names["up"]}
        if src.fused:  # the key method removed the fused tensor and wrote its value slice: these replace the slice
            removed, replaced = [], [names["weight"], names["bias"]]
        else:
            removed, replaced = [n for n in (src.weight, src.bias) if n], []
        return ValueFit(rank, f.relative_error, f.energy, time.perf_counter() - start, tensors, removed, recorded,
                        replaced)


    def output_error(self, ckpt: Checkpoint, spec: AttentionSpec, out: Checkpoint, layer: Any,
                     x: torch.Tensor) -> tuple[float, float]:
        """(squared error, squared norm) of the heads' value outputs W_O,h v_g(x) on the probe ``x``
        (B, N, D), original against the shared values that ``out`` holds for ``layer`` (``verify``)."""
        _, w, b, weights, _ = self._inputs(ckpt, spec, None)
        named = layer.value_tensors()
        try:
            down, up = out.load(named["weight"], torch.float64, finite=True), out.load(named["up"], torch.float64,
                                                                                      finite=True)
            bias = out.load(named["bias"], torch.float64, finite=True) if "bias" in named else None
        except KeyError as e:
            raise BadInputError(f"{out.path}: the manifest names no {e} tensor for the shared values of "
                                f"{spec.module}") from e
        v = x @ w.T + (b if b is not None else 0.0)  # (B, N, G*d)
        latent = x @ down.T + (bias if bias is not None else 0.0)  # (B, N, r_v)
        diff = (v - latent @ up.T).reshape(*v.shape[:-1], spec.n_kv_head, spec.head_dim)
        ref = v.reshape(diff.shape)
        err = torch.einsum("gij,bngj->bngi", weights, diff).square().sum()
        norm = torch.einsum("gij,bngj->bngi", weights, ref).square().sum()
        return float(err), float(norm)

    def model_curves(self, model: torch.nn.Module, ckpt: Checkpoint, specs: list[AttentionSpec],
                     options: CompressOptions, stats: Mapping[str, Any] | None, target: torch.Tensor,
                     log_probs: Callable[[], torch.Tensor], progress: Callable[[str, int, int], None] | None,
                     steps: int) -> list[dict[int, float]]:
        """Per layer: value width r_v -> the mean next-token KL(original || model) of the whole causal
        LM ``model`` with only that layer's values replaced by the fit at r_v (as value weights
        B A and bias B a, which compute what the latent computes): ``log_probs()`` against the
        original's ``target``; the weights are put back after each layer."""
        from ..maths.budget import rank_ladder
        from ..maths.values import value_factors

        curves = []
        for done, spec in enumerate(specs):
            _, w, b, weights, moment = self._inputs(ckpt, spec, None if stats is None else stats[spec.module])

            def projection(r: int, w=w, b=b, weights=weights, moment=moment, spec=spec):
                f = value_factors(w, b, r, out_weights=weights, n_kv_head=spec.n_kv_head, head_dim=spec.head_dim,
                                  moment=moment)
                return f.up @ f.down, (None if f.down_bias is None else f.up @ f.down_bias)

            full = self.full_width(spec)
            curves.append(swapped_curve(_value_module(model, ckpt, spec), full,
                                        rank_ladder(full, options.multiple_of, even=True, steps=steps), projection,
                                        lambda: next_token_kl(target, log_probs())))
            if progress:
                progress(f"value loss curve {spec.module}", done + 1, len(specs))
        return curves


def _value_module(model: torch.nn.Module, ckpt: Checkpoint, spec: AttentionSpec) -> torch.nn.Module:
    """The value projection module of ``spec`` in a loaded transformers ``model`` (the sibling of its query)."""
    from ..runtime.adapters import find_modules

    q_mod, _ = find_modules(model, ckpt, spec)
    parent = {id(c): m for m in model.modules() for c in m.children()}[id(q_mod)]
    for name in ("v_proj", "value", "v", "v_lin"):
        module = getattr(parent, name, None)
        if isinstance(module, torch.nn.Linear):
            return module
    raise BadInputError(f"--budget-of kv: cannot find the value projection of {spec.module} in the model")


VALUES = ValueMethod()

