"""Compress a checkpoint: collaborative re-parametrization of every chosen attention layer.

Reads the source lazily, decomposes one layer at a time, writes the output directory of
SPEC.md section 4 atomically (weights, config.json with a ``collaborative_attention``
block, the source directory's other files, ``collab_manifest.json``).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import re
import time
import warnings
from collections import ChainMap
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .analysis import choose_rank, head_output_energy, layer_spectrum
from .arch import AttentionSpec, detect, load_query_key, load_value_output
from .costs import qk_params, rotary_key_params, stored_qk_params
from .decompose import CPFactors, concatenated, cp_als, relative_error
from .defaults import DEFAULT_MAX_ITER, DEFAULT_TOL
from .dtypes import COMPUTE_NAMES, OUTPUT_NAMES, compute_dtype, dtype_name, to_torch
from .errors import BadInputError
from .io import INDEX_SUFFIX, Checkpoint, open_checkpoint
from . import manifest as _mf
from .manifest import FORMAT, MANIFEST_NAME
from .parallel import default_workers, map_layers
from .refine import RefineResult, refine_factors
from .output import (atomic_directory, check_output_path, copy_other_files, file_record, sha256_file, write_json,
                     write_safetensors)

__all__ = ["CompressOptions", "compress", "curve_loss", "loss_curves", "parse_layers", "MANIFEST_NAME", "FORMAT",
           "collab_names"]

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class CompressOptions:
    """Settings of ``compress`` (SPEC section 3); validated by :meth:`check`."""

    rank: int | None = None
    energy: float | None = None
    min_rank: int = 1
    max_rank: int | None = None
    multiple_of: int = 8
    method: str = "cp-als"
    max_iter: int = DEFAULT_MAX_ITER
    tol: float = DEFAULT_TOL
    seed: int = 0
    device: str = "cpu"
    dtype: str = "auto"
    layers: str | None = None
    calibration: str | None = None
    refine_steps: int = 0
    budget: float | None = None
    heal_steps: int = 0
    heal_dtype: str = "auto"

    def check(self) -> None:
        if sum(v is not None for v in (self.rank, self.energy, self.budget)) != 1:
            raise BadInputError("pass exactly one of --rank and --energy, or --budget alone")
        if self.budget is not None and not (0.0 < self.budget <= 1.0):
            raise BadInputError(f"--budget must be in (0, 1], got {self.budget}")
        if self.budget is not None and not self.calibration:
            raise BadInputError("--budget allocates by the loss measured on kept calibration sequences: "
                                "pass --calibration statistics made with `calibrate --keep-sequences N`")
        if self.rank is not None and self.rank < 1:
            raise BadInputError(f"--rank must be at least 1, got {self.rank}")
        if self.energy is not None and not (0.0 < self.energy <= 1.0):
            raise BadInputError(f"--energy must be in (0, 1], got {self.energy}")
        for name, value in (("--min-rank", self.min_rank), ("--multiple-of", self.multiple_of),
                            ("--max-iter", self.max_iter)):
            if value < 1:
                raise BadInputError(f"{name} must be at least 1, got {value}")
        if self.max_rank is not None and self.max_rank < max(1, self.min_rank):
            raise BadInputError(f"--max-rank {self.max_rank} is below --min-rank {self.min_rank}")
        if not (0.0 <= self.tol < float("inf")):
            raise BadInputError(f"--tol must be a finite number >= 0, got {self.tol}")
        if not (0 <= self.seed < 2**63):
            raise BadInputError(f"--seed must be in [0, 2**63), got {self.seed}")
        if self.refine_steps < 0:
            raise BadInputError(f"--refine-steps must be >= 0, got {self.refine_steps}")
        if self.heal_steps < 0:
            raise BadInputError(f"--heal-steps must be >= 0, got {self.heal_steps}")
        if (self.refine_steps or self.heal_steps) and not self.calibration:
            raise BadInputError("--refine-steps and --heal-steps need --calibration statistics made with "
                                "`calibrate --keep-sequences N`")
        if self.heal_dtype != "auto" and self.heal_dtype not in COMPUTE_NAMES:
            raise BadInputError(f"unknown --heal-dtype {self.heal_dtype!r}; choose auto, {', '.join(COMPUTE_NAMES)}")
        if self.method != "cp-als":
            raise BadInputError(f"unknown --method {self.method!r}; available: cp-als")
        if self.dtype != "auto" and self.dtype not in OUTPUT_NAMES:
            raise BadInputError(f"unknown --dtype {self.dtype!r}; choose auto, float32, float16 or bfloat16")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise BadInputError(f"unknown --device {self.device!r}; choose cpu or cuda")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise BadInputError("--device cuda was asked for but CUDA is not available here")


def parse_layers(spec: str | None, n_layers: int) -> set[int]:
    """``"0,2,4-5"`` -> {0, 2, 4, 5}; ``None`` -> every layer."""
    if spec is None:
        return set(range(n_layers))
    chosen: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise BadInputError(f"--layers {spec!r}: expected indices and ranges like 0,2,4-5")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo > hi or hi >= n_layers:
            raise BadInputError(f"--layers {spec!r}: the model has attention layers 0 to {n_layers - 1}")
        chosen.update(range(lo, hi + 1))
    return chosen


def collab_names(module: str) -> dict[str, str]:
    """Tensor names of SPEC section 4 for one module."""
    return {"query": f"{module}.collab_query.weight", "key": f"{module}.collab_key.weight",
            "mixing": f"{module}.collab_mixing", "content_bias": f"{module}.collab_content_bias.weight",
            "value": f"{module}.collab_value.weight", "value_bias": f"{module}.collab_value.bias"}


@dataclass
class _Layer:
    spec: AttentionSpec
    shared_dim: int
    relative_error: float  # of the fit, in its metric (the factors themselves are not kept: 17 MB a Llama-3-8B layer)
    energy_spectral: float
    seconds: float
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    refined: RefineResult | Any = None  # RotaryRefineResult for a rotary layer
    plain_error: float = 0.0
    curve: dict[int, float] | None = None  # --budget: candidate R -> loss
    curve_loss: str = "attention_kl"  # what the curve measures (curve_loss)
    iterations: int = 0  # CP-ALS sweeps (0 for a rotary layer)


def _content_bias(w_key: torch.Tensor, b_query: torch.Tensor | None, n_head: int) -> torch.Tensor:
    """c_h = W_K^h^T b_Q^h, one row per head."""
    width, d_model = w_key.shape
    if b_query is None:
        return w_key.new_zeros(n_head, d_model)
    k = w_key.reshape(n_head, width // n_head, d_model)  # (H, d, D)
    b = b_query.reshape(n_head, width // n_head, 1)  # (H, d, 1)
    return (k * b).sum(1)  # (H, D)


def _head_weights(ckpt: Checkpoint, spec: AttentionSpec, lower: torch.Tensor) -> torch.Tensor | None:
    """sqrt of each head's expected output energy (see :func:`head_output_energy`), or None."""
    value_output = load_value_output(ckpt, spec)
    if value_output is None:
        return None
    return head_output_energy(*value_output, spec.n_head, lower).sqrt()  # (H,)


def _calibrated_cp_als(spec: AttentionSpec, w_query: torch.Tensor, w_key: torch.Tensor, shared_dim: int,
                       whiten: tuple[torch.Tensor, torch.Tensor], weights: torch.Tensor | None,
                       opts: CompressOptions) -> CPFactors:
    """Whitened CP-ALS with each head's slice weighted by its expected output energy.

    Minimises sum_h e_h ||L_q^T (P_h - P_hat_h) L_k||^2: scaling W_Q^h by sqrt(e_h) before
    the decomposition and dividing the mixing row h by it afterwards. Measured on MiniLM at
    R = 96 (calibrated on lee_background.cor, bundled texts): embedding cosine 0.948 -> 0.956.
    """
    if weights is not None:
        w_query = w_query * weights.repeat_interleave(spec.head_dim)[:, None]
    factors = cp_als(w_query, w_key, spec.n_head, shared_dim, max_iter=opts.max_iter, tol=opts.tol, seed=opts.seed,
                     device=opts.device, whiten_query=whiten[0], whiten_key=whiten[1])
    if weights is not None:
        factors = dataclasses.replace(factors, mixing=factors.mixing / weights[:, None].to(factors.mixing.dtype))
    return factors


def _calibrated_error(spec: AttentionSpec, w_query: torch.Tensor, w_key: torch.Tensor, factors: CPFactors,
                      whiten: tuple[torch.Tensor, torch.Tensor], weights: torch.Tensor | None) -> float:
    """The relative error in the metric :func:`_calibrated_cp_als` minimises."""
    if weights is not None:
        w_query = w_query * weights.repeat_interleave(spec.head_dim)[:, None]
        factors = dataclasses.replace(factors, mixing=factors.mixing * weights[:, None].to(factors.mixing.dtype))
    return relative_error(w_query, w_key, spec.n_head, factors, whiten_query=whiten[0], whiten_key=whiten[1])


def _value_slices(ckpt: Checkpoint, spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = spec.width
    fused = ckpt.load(spec.query)
    value = fused[:, 2 * w:] if spec.fused == "conv1d" else fused[2 * w:]  # orientation of the fused tensor
    bias = ckpt.load(spec.query_bias)[2 * w:] if spec.query_bias else None
    return value.contiguous(), (bias.contiguous() if bias is not None else None)


def rotary_names(module: str) -> dict[str, str]:
    """Tensor names of SPEC section 4 "Rotary layers" for one module."""
    return {"key": f"{module}.collab_key.weight", "key_bias": f"{module}.collab_key.bias",
            "key_freq": f"{module}.collab_key_freq", "mixing": f"{module}.collab_mixing"}


def _rotary_rank(spec: AttentionSpec, opts: CompressOptions, sv: torch.Tensor | None) -> int:
    """R of a rotary layer: --rank as given (even, <= G*d), or the key cache at --energy, then
    --min-rank, --multiple-of and --max-rank, rounded up to even."""
    from .rotary import key_cache_at

    full = spec.key_cache
    if opts.rank is not None:
        return opts.rank
    r = choose_rank(key_cache_at(sv, opts.energy), full, min_rank=opts.min_rank, max_rank=opts.max_rank,
                    multiple_of=opts.multiple_of)
    return min(full, max(2, r + r % 2))


def _plain_rotary_error(qk, spec: AttentionSpec, factors, weights: torch.Tensor) -> float:
    """``||diag(w)(B - B_hat)||_F / ||diag(w) B||_F`` with the data-free weights and no whitening."""
    from .rotary import rotary_pairs

    rows = qk.w_key if qk.b_key is None else torch.cat([qk.w_key, qk.b_key[:, None]], dim=1)  # (G*d, D')
    keys = rotary_pairs(rows, spec.n_kv_head, spec.head_dim)  # (G, d/2, D')
    beta = factors.beta() if factors.key_bias is None else torch.cat([factors.beta(), factors.beta0()[:, None]], 1)
    parts = factors.mixing_complex()[:, :, None] * beta  # (G, R/2, D')
    approx = torch.zeros_like(keys).index_add_(1, factors.freq, parts)  # (G, d/2, D')
    w = weights.sqrt()[..., None]  # (G, d/2, 1)
    den = float((w * keys).abs().square().sum())
    return (float((w * (keys - approx)).abs().square().sum()) / den) ** 0.5 if den > 0 else 0.0


def _rotary_fit_inputs(ckpt: Checkpoint, spec: AttentionSpec, moments: tuple[torch.Tensor, torch.Tensor] | None,
                       query_energy: torch.Tensor | None):
    """The source tensors of a rotary layer, the data-free weights, and the fit's weights and
    whitening (calibrated when moments are given)."""
    from . import rotary

    qk = load_query_key(ckpt, spec)
    free = rotary.group_weights(rotary.query_energy(qk.w_query, qk.b_query, spec.n_head, spec.head_dim),
                                spec.n_kv_head)  # (G, d/2)
    weights, lower = free, None
    if moments is not None:
        mean, second = moments
        if query_energy is None:
            query_energy = rotary.query_energy(qk.w_query, qk.b_query, spec.n_head, spec.head_dim, second, mean)
        weights = rotary.group_weights(query_energy, spec.n_kv_head)
        try:
            lower = rotary.key_whitening(second, mean, bias=qk.b_key is not None)
        except ValueError as e:
            raise BadInputError(f"calibration statistics: the moments of {spec.module} are unusable ({e})") from e
    return qk, free, weights, lower


def _rotary_kl(ckpt: Checkpoint, spec: AttentionSpec, qk, sequences: tuple[torch.Tensor, torch.Tensor], seed: int):
    """The attention KL of a rotary layer on its kept sequences (:class:`collabcompress.refine.RotaryKL`)."""
    from .arch import rope_frequencies
    from .refine import RotaryKL

    theta, attention_scaling = rope_frequencies(ckpt.config, spec.head_dim)
    return RotaryKL(*sequences, qk.w_query, qk.b_query, qk.w_key, qk.b_key, spec.n_head, spec.n_kv_head,
                    spec.head_dim, theta, spec.scale * attention_scaling ** 2, seed=seed)


def _compress_rotary_layer(ckpt: Checkpoint, spec: AttentionSpec, opts: CompressOptions, out_dtype: torch.dtype,
                           moments: tuple[torch.Tensor, torch.Tensor] | None,
                           query_energy: torch.Tensor | None,
                           sequences: tuple[torch.Tensor, torch.Tensor] | None = None,
                           shared_dim: int | None = None) -> _Layer:
    """Shared rotary keys (SPEC section 2, "Rotary decoders"): the data-free fit, or the
    whitened fit weighted by the query energies when calibration moments are given; then
    refined on the attention KL with ``--refine-steps``. ``shared_dim`` overrides the rank
    options (the allocation of ``--budget``)."""
    from . import rotary
    from .refine import refine_rotary

    start = time.perf_counter()
    qk, free, weights, lower = _rotary_fit_inputs(ckpt, spec, moments, query_energy)
    if shared_dim is None:
        sv = rotary.rotary_spectrum(qk.w_key, qk.b_key, spec.n_kv_head, spec.head_dim, weights, lower) \
            if opts.energy is not None else None
        shared_dim = _rotary_rank(spec, opts, sv)
    factors = rotary.rotary_factors(qk.w_key, qk.b_key, spec.n_kv_head, spec.head_dim, shared_dim,
                                    weights=weights, lower=lower)
    refined = None
    if opts.refine_steps and sequences is not None:
        kl = _rotary_kl(ckpt, spec, qk, sequences, opts.seed)
        refined = refine_rotary(kl, factors.key, factors.key_bias, factors.freq, factors.mixing,
                                steps=opts.refine_steps, seed=opts.seed)
        factors = dataclasses.replace(factors, key=refined.key.double(), mixing=refined.mixing.double(),
                                      key_bias=None if refined.key_bias is None else refined.key_bias.double())
    plain = factors.relative_error if moments is None else _plain_rotary_error(qk, spec, factors, free)
    names = rotary_names(spec.module)
    tensors = {names["key"]: factors.key.to(out_dtype).contiguous(),  # (R, D)
               names["key_freq"]: factors.freq.contiguous(),  # (R/2,) int64
               names["mixing"]: factors.mixing.to(out_dtype).contiguous()}  # (G, R/2, 2)
    if factors.key_bias is not None:
        tensors[names["key_bias"]] = factors.key_bias.to(out_dtype).contiguous()  # (R,)
    removed = [n for n in (spec.key, spec.key_bias) if n]
    return _Layer(spec, shared_dim, factors.relative_error, factors.energy, time.perf_counter() - start, tensors,
                  removed, refined, plain)


def _rotary_curve(ckpt: Checkpoint, spec: AttentionSpec, opts: CompressOptions,
                  moments: tuple[torch.Tensor, torch.Tensor] | None, query_energy: torch.Tensor | None,
                  sequences: tuple[torch.Tensor, torch.Tensor]) -> dict[int, float]:
    from .budget import rank_ladder
    from .rotary import rotary_factors

    qk, _, weights, lower = _rotary_fit_inputs(ckpt, spec, moments, query_energy)
    kl = _rotary_kl(ckpt, spec, qk, sequences, opts.seed)
    curve = {}
    for r in rank_ladder(spec.key_cache, opts.multiple_of, even=True):
        f = rotary_factors(qk.w_key, qk.b_key, spec.n_kv_head, spec.head_dim, r, weights=weights, lower=lower)
        curve[r] = kl(f.key, f.key_bias, f.freq, f.mixing)
    return curve


def _plain_curve(ckpt: Checkpoint, spec: AttentionSpec, opts: CompressOptions,
                 whiten: tuple[torch.Tensor, torch.Tensor], sequences: tuple[torch.Tensor, torch.Tensor]) -> dict[int, float]:
    from .budget import rank_ladder

    qk = load_query_key(ckpt, spec)
    weights = _head_weights(ckpt, spec, whiten[0])
    content = _content_bias(qk.w_key, qk.b_query, spec.n_head)  # (H, D)
    curve = {}
    for r in rank_ladder(spec.width, opts.multiple_of):
        f = concatenated(qk.w_query, qk.w_key, spec.n_head) if r == spec.width else \
            _calibrated_cp_als(spec, qk.w_query, qk.w_key, r, whiten, weights, opts)
        curve[r] = refine_factors(f.query, f.key, f.mixing, content, qk.w_query, qk.w_key, qk.b_query, qk.b_key,
                                  spec.n_head, spec.scale, *sequences, steps=0).kl_before
    return curve


def _compress_layer(ckpt: Checkpoint, spec: AttentionSpec, opts: CompressOptions, out_dtype: torch.dtype,
                    whiten: tuple[torch.Tensor, torch.Tensor] | None,
                    sequences: tuple[torch.Tensor, torch.Tensor] | None, shared_dim: int | None = None) -> _Layer:
    start = time.perf_counter()
    qk = load_query_key(ckpt, spec)
    spectrum = layer_spectrum(qk.w_query, qk.w_key, spec.n_head)
    if shared_dim is None and opts.rank is not None:
        if opts.rank > spec.width:
            raise BadInputError(f"--rank {opts.rank} is above H*d = {spec.width} of {spec.module}; "
                                "a rank above H*d compresses nothing")
        shared_dim = opts.rank
    elif shared_dim is None:
        shared_dim = choose_rank(spectrum.rank_at(opts.energy), spec.width, min_rank=opts.min_rank,
                                 max_rank=opts.max_rank, multiple_of=opts.multiple_of)
    weights = _head_weights(ckpt, spec, whiten[0]) if whiten is not None else None
    if shared_dim == spec.width and whiten is None:
        factors = concatenated(qk.w_query, qk.w_key, spec.n_head)
    elif whiten is None:
        factors = cp_als(qk.w_query, qk.w_key, spec.n_head, shared_dim, max_iter=opts.max_iter, tol=opts.tol,
                         seed=opts.seed, device=opts.device)
    else:
        factors = _calibrated_cp_als(spec, qk.w_query, qk.w_key, shared_dim, whiten, weights, opts)
    energy = min(float(spectrum.energy_query[shared_dim - 1]), float(spectrum.energy_key[shared_dim - 1]))
    names = collab_names(spec.module)
    content = _content_bias(qk.w_key, qk.b_query, spec.n_head)  # (H, D)
    query, key, mixing, refined = factors.query, factors.key, factors.mixing, None
    if opts.refine_steps and sequences is not None:
        refined = refine_factors(query, key, mixing, content, qk.w_query, qk.w_key, qk.b_query, qk.b_key,
                                 spec.n_head, spec.scale, *sequences, steps=opts.refine_steps, seed=opts.seed)
        query, key, mixing = refined.query, refined.key, refined.mixing
        # the manifest's error describes the tensors written, in the decomposition's metric
        factors = dataclasses.replace(factors, query=query.double(), key=key.double(), mixing=mixing.double())
        factors = dataclasses.replace(factors, relative_error=_calibrated_error(
            spec, qk.w_query, qk.w_key, factors, whiten, weights) if whiten is not None else
            relative_error(qk.w_query, qk.w_key, spec.n_head, factors))
    plain_error = factors.relative_error if whiten is None else relative_error(
        qk.w_query, qk.w_key, spec.n_head, factors)
    tensors = {
        names["query"]: query,  # (R, D)
        names["key"]: key,  # (R, D)
        names["mixing"]: mixing,  # (H, R)
        names["content_bias"]: content,  # (H, D)
    }
    tensors = {k: v.to(out_dtype).contiguous() for k, v in tensors.items()}
    if spec.fused:
        value, value_bias = _value_slices(ckpt, spec)
        tensors[names["value"]] = value.to(out_dtype if opts.dtype != "auto" else value.dtype)
        if value_bias is not None:
            tensors[names["value_bias"]] = value_bias.to(out_dtype if opts.dtype != "auto" else value_bias.dtype)
        removed = [spec.query] + ([spec.query_bias] if spec.query_bias else [])
    else:
        removed = [n for n in (spec.query, spec.query_bias, spec.key, spec.key_bias) if n]
    return _Layer(spec, shared_dim, factors.relative_error, energy, time.perf_counter() - start, tensors, removed,
                  refined, plain_error, iterations=factors.iterations)




def _layer_record(layer: _Layer) -> _mf.LayerRecord:
    spec, names = layer.spec, collab_names(layer.spec.module)
    if spec.rotary:
        rn = rotary_names(spec.module)
        return _mf.LayerRecord(
            module=spec.module, index=spec.index, heads=spec.n_head, head_dim=spec.head_dim,
            d_model=spec.d_model, shared_dim=layer.shared_dim, scale=spec.scale,
            relative_error=round(layer.relative_error, 8), relative_error_plain=round(layer.plain_error, 8),
            energy_spectral=round(layer.energy_spectral, 8), iterations=0, seconds=round(layer.seconds, 4),
            tensors=_mf.LayerTensors(spec.query, rn["key"], rn["mixing"], None, None, rn["key_freq"],
                                     rn["key_bias"] if spec.key_bias else None),
            removed=tuple(layer.removed), family=spec.family, fused=None,
            query_bias=spec.query_bias is not None, key_bias=spec.key_bias is not None,
            refine=_refine_record(layer), kv_heads=spec.n_kv_head, rotary=True, allocation=_allocation_record(layer))
    return _mf.LayerRecord(
        module=spec.module, index=spec.index, heads=spec.n_head, head_dim=spec.head_dim,
        d_model=spec.d_model, shared_dim=layer.shared_dim, scale=spec.scale,
        relative_error=round(layer.relative_error, 8), relative_error_plain=round(layer.plain_error, 8),
        energy_spectral=round(layer.energy_spectral, 8),
        iterations=layer.iterations, seconds=round(layer.seconds, 4),
        tensors=_mf.LayerTensors(names["query"], names["key"], names["mixing"], names["content_bias"],
                                 names["value"] if spec.fused else None),
        removed=tuple(layer.removed), family=spec.family, fused=spec.fused,
        query_bias=spec.query_bias is not None, key_bias=spec.key_bias is not None,
        refine=_refine_record(layer), allocation=_allocation_record(layer),
    )


def _refine_record(layer: _Layer) -> dict[str, Any] | None:
    r = layer.refined
    return None if r is None else {"steps": r.steps, "kl_before": round(r.kl_before, 8),
                                   "kl_after": round(r.kl_after, 8)}


def _allocation_record(layer: _Layer) -> dict[str, Any] | None:
    """``--budget``: the measured loss curve (key cache R -> loss) and the loss at the chosen R."""
    if layer.curve is None:
        return None
    return {"loss": layer.curve_loss, "losses": {str(r): round(v, 8) for r, v in sorted(layer.curve.items())},
            "chosen_loss": round(layer.curve[layer.shared_dim], 8)}


def _write_weights(ckpt: Checkpoint, layers: list[_Layer], tmp: Path) -> list[Path]:
    """Every source tensor except the removed ones, plus the new ones; same shard layout as the source.

    Tensors are streamed one at a time, so memory stays bounded by the largest tensor.
    """
    removed = {n for layer in layers for n in layer.removed}
    new_by_file: dict[Path, dict[str, torch.Tensor]] = {f: {} for f in ckpt.files}
    for layer in layers:
        new_by_file[ckpt.weight_map[layer.spec.query]].update(layer.tensors)
    written: list[Path] = []
    weight_map: dict[str, str] = {}
    total = 0
    for file in ckpt.files:
        entries = [(n, ckpt.shape(n), to_torch(ckpt.dtype(n)) or ckpt.load(n).dtype,
                    lambda n=n: ckpt.load(n))
                   for n, f in ckpt.weight_map.items() if f == file and n not in removed]
        entries += [(n, tuple(t.shape), t.dtype, lambda t=t: t) for n, t in new_by_file[file].items()]
        name = file.name if ckpt.sharded else "model.safetensors"
        metadata = dict(ckpt.metadata(file))
        metadata.update({"format": "pt", "collabcompress": __version__})
        total += write_safetensors(tmp / name, entries, metadata)
        written.append(tmp / name)
        weight_map.update({e[0]: name for e in entries})
    if ckpt.sharded:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        target = tmp / f"model{INDEX_SUFFIX}"
        write_json(index, target)
        written.append(target)
    return written


def _config_block(layers: list[_Layer], family: str) -> dict[str, Any]:
    def one(layer: _Layer) -> dict[str, Any]:
        spec = layer.spec
        rotary = {"kv_heads": spec.n_kv_head, "rotary": True} if spec.rotary else {}
        return {"index": spec.index, "shared_dim": layer.shared_dim, "heads": spec.n_head, **rotary,
                "head_dim": spec.head_dim, "d_model": spec.d_model, "scale": spec.scale,
                "fused": spec.fused, "key_bias": spec.key_bias is not None}

    return {"format": FORMAT, "version": __version__, "family": family,
            "layers": {layer.spec.module: one(layer) for layer in layers}}


def _run_layers(ckpt: Checkpoint, specs: list[AttentionSpec], options: CompressOptions, out_dtype: torch.dtype,
                whitening: Mapping[str, Any], sequences: dict[str, Any], workers: int,
                progress: Progress | None, energies: dict[str, Any] | None = None,
                ranks: dict[str, int] | None = None) -> list[_Layer]:
    def one(spec: AttentionSpec) -> _Layer:
        rank = (ranks or {}).get(spec.module)
        if spec.rotary:
            return _compress_rotary_layer(ckpt, spec, options, out_dtype, whitening.get(spec.module),
                                          (energies or {}).get(spec.module), sequences.get(spec.module), rank)
        return _compress_layer(ckpt, spec, options, out_dtype, whitening.get(spec.module), sequences.get(spec.module),
                               rank)

    step = (lambda spec, done, total: progress(spec.module, done, total)) if progress else None
    return map_layers(one, specs, workers=1 if options.device != "cpu" else workers, progress=step)


def _loss_curves(ckpt: Checkpoint, specs: list[AttentionSpec], options: CompressOptions, whitening: Mapping[str, Any],
                 sequences: dict[str, Any], energies: dict[str, Any], workers: int,
                 progress: Progress | None) -> list[dict[int, float]]:
    """Per layer: candidate key cache R -> attention KL on the kept sequences (see :mod:`collabcompress.budget`)."""
    def one(spec: AttentionSpec) -> dict[int, float]:
        if spec.rotary:
            return _rotary_curve(ckpt, spec, options, whitening.get(spec.module), energies.get(spec.module),
                                 sequences[spec.module])
        return _plain_curve(ckpt, spec, options, whitening[spec.module], sequences[spec.module])

    step = (lambda spec, done, total: progress(f"loss curve {spec.module}", done, total)) if progress else None
    return map_layers(one, specs, workers=1 if options.device != "cpu" else workers, progress=step)


CURVE_WINDOWS = 1  # kept windows the next-token KL curves are measured on (one forward each per rung and layer)
CURVE_TOKENS = 256  # leading tokens of each
CURVE_STEPS = 8  # about this many candidate key caches per rotary layer


def curve_loss(ckpt: Checkpoint, specs: list[AttentionSpec], refine_steps: int = 0) -> str:
    """What the ``--budget`` curves measure: ``next_token_kl`` (the whole model's, with one layer
    compressed at a time) for a rotary causal LM that can be run (a model directory with
    config.json) and no refinement, else ``attention_kl`` (each layer's own attention KL).

    Measured on SmolLM2 (lee_background.cor, 8 kept windows): without refinement the
    next-token KL allocates better (half the key cache: perplexity 42.13 against 42.48 by
    attention KL, 43.38 uniform); with ``--refine-steps 100`` worse (half: 36.17 against 35.98;
    a third: 45.21 against 41.82): it gives the sensitive early layers their full key cache and
    starves the later ones, whose losses refinement would have recovered.
    """
    import importlib.util

    runnable = ckpt.config is not None and (ckpt.directory / "config.json").is_file() \
        and importlib.util.find_spec("transformers") is not None
    return "next_token_kl" if runnable and not refine_steps and all(s.rotary for s in specs) else "attention_kl"


def _model_curves(ckpt: Checkpoint, specs: list[AttentionSpec], options: CompressOptions, moments: Mapping[str, Any],
                  energies: dict[str, Any], ids: torch.Tensor, lengths: torch.Tensor,
                  progress: Progress | None) -> list[dict[int, float]]:
    """Per rotary layer: key cache R -> the mean next-token KL(original || model) of the whole
    model with only that layer's keys replaced by the calibrated fit at R (as k_proj weights,
    :func:`collabcompress.rotary.key_projection`), on the first CURVE_TOKENS tokens of the first
    CURVE_WINDOWS kept windows. Unlike each layer's attention KL, these add up to (about) the
    model's loss: on SmolLM2 the next-token KL per unit of attention KL differs 50-fold between
    layers (layer 0 is the most sensitive)."""
    from .budget import rank_ladder
    from .calibration import _find_modules
    from .evaluate import _load_original, _quiet_transformers
    from .extras import require_transformers
    from .rotary import key_projection, rotary_factors

    transformers = require_transformers("--budget on a causal LM")
    with _quiet_transformers():
        model = _load_original(ckpt.directory, transformers.AutoModelForCausalLM).float()
    n = min(CURVE_WINDOWS, ids.shape[0])
    t = min(CURVE_TOKENS, int(lengths[:n].min()))
    x = ids[:n, :t]  # (n, t)

    def log_probs() -> torch.Tensor:
        return torch.log_softmax(model(input_ids=x, use_cache=False).logits.float(), -1)  # (n, t, V)

    curves = []
    with torch.inference_mode():
        target = log_probs()
        for done, spec in enumerate(specs):
            _, k_proj = _find_modules(model, ckpt, spec)
            weight, bias = k_proj.weight.detach().clone(), None if k_proj.bias is None else k_proj.bias.detach().clone()
            qk, _, weights, lower = _rotary_fit_inputs(ckpt, spec, moments.get(spec.module),
                                                       energies.get(spec.module))
            ladder = rank_ladder(spec.key_cache, options.multiple_of, even=True, steps=CURVE_STEPS)
            curve = {spec.key_cache: 0.0}  # the exact layout is the original layer
            for r in ladder[:-1]:
                f = rotary_factors(qk.w_key, qk.b_key, spec.n_kv_head, spec.head_dim, r, weights=weights, lower=lower)
                w_hat, b_hat = key_projection(f, spec.head_dim)
                k_proj.weight.copy_(w_hat)
                if bias is not None:
                    k_proj.bias.copy_(b_hat)
                curve[r] = float((target.exp() * (target - log_probs())).sum(-1).mean())
            k_proj.weight.copy_(weight)
            if bias is not None:
                k_proj.bias.copy_(bias)
            curves.append(dict(sorted(curve.items())))
            if progress:
                progress(f"loss curve {spec.module}", done + 1, len(specs))
    return curves


def _budget_curves(ckpt: Checkpoint, specs: list[AttentionSpec], options: CompressOptions, whitening: Mapping[str, Any],
                   sequences: dict[str, Any], energies: dict[str, Any], workers: int,
                   progress: Progress | None) -> tuple[str, list[dict[int, float]]]:
    """The loss :func:`curve_loss` names and its curves, one per layer."""
    from .calibration import load_input_ids

    loss = curve_loss(ckpt, specs, options.refine_steps)
    if loss == "next_token_kl":
        ids, lengths = load_input_ids(Path(options.calibration), ckpt, specs)
        return loss, _model_curves(ckpt, specs, options, whitening, energies, ids, lengths, progress)
    return loss, _loss_curves(ckpt, specs, options, whitening, sequences, energies, workers, progress)


def loss_curves(ckpt: Checkpoint, specs: list[AttentionSpec], calibration: Path, *, multiple_of: int = 8,
                seed: int = 0, workers: int = 1, refine_steps: int = 0) -> tuple[str, list[dict[int, float]]]:
    """The loss ``--budget`` allocates by (:func:`curve_loss`) and its curves (candidate key cache
    R -> loss on the kept calibration windows), one per layer of ``specs``; what
    ``analyze --calibration`` shows (those of ``compress --budget`` without refinement)."""
    from .calibration import load_moments, load_query_energies, load_sequences, load_whitening

    plain, rotary = [s for s in specs if not s.rotary], [s for s in specs if s.rotary]
    whitening = load_whitening(calibration, ckpt, plain) if plain else {}
    energies = {}
    if rotary:  # the moments are read layer by layer, when each layer asks (ChainMap does not copy them)
        whitening = ChainMap(whitening, load_moments(calibration, ckpt, rotary))
        energies = load_query_energies(calibration, ckpt, rotary)
    options = CompressOptions(rank=1, multiple_of=multiple_of, seed=seed, calibration=str(calibration),
                              refine_steps=refine_steps)
    attention = curve_loss(ckpt, specs, refine_steps) == "attention_kl"
    sequences = load_sequences(calibration, ckpt, specs) if attention else {}
    return _budget_curves(ckpt, specs, options, whitening, sequences, energies, workers, None)


def _allocation(specs: list[AttentionSpec], curves: list[dict[int, float]], budget: float) -> dict[str, int]:
    """The key cache R of each layer under ``budget`` (a fraction of the layers' original key cache)."""
    from .budget import allocate

    full = sum(s.key_cache if s.rotary else s.width for s in specs)
    try:
        ranks = allocate(curves, int(budget * full + 1e-9))
    except ValueError as e:
        raise BadInputError(f"--budget {budget}: {e}; the smallest key cache per layer is "
                            f"{min(curves[0])} of {full // len(specs)}") from e
    return {s.module: r for s, r in zip(specs, ranks)}


def compress(checkpoint: str | Path, out: str | Path, options: CompressOptions, *, heads: int | None = None,
             arch: str | None = None, force: bool = False, workers: int | None = None,
             remote_code: bool = False, progress: Progress | None = None,
             kv_heads: int | None = None) -> dict[str, Any]:
    """Compress ``checkpoint`` into the output directory ``out``; returns the manifest.

    Args:
        checkpoint: file, sharded index or directory (see :func:`open_checkpoint`).
        out: the output directory; refused if it exists unless ``force``.
        options: rank choice and decomposition settings.
        heads, arch: overrides for the head count and the family.
        kv_heads: key/value head count of a rotary model without config.json (``--kv-heads``).
        workers: layers decomposed in parallel (default: the usable CPU cores); the output
            does not depend on it.
        remote_code: also write the modeling file that makes the output load with
            ``transformers.AutoModel.from_pretrained(DIR, trust_remote_code=True)`` (hf extra).

    Raises:
        BadInputError, UnsupportedArchitectureError: see SPEC section 3.
    """
    options.check()
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise BadInputError(f"--workers must be at least 1, got {workers}")
    out = Path(out)
    ckpt = open_checkpoint(checkpoint)
    check_output_path(out, ckpt.files + ([ckpt.index_file] if ckpt.index_file else []), ckpt.directory
                      if Path(checkpoint).is_dir() or ckpt.sharded else None, force=force)
    specs = detect(ckpt, heads=heads, arch=arch, kv_heads=kv_heads)
    chosen = parse_layers(options.layers, len(specs))
    specs = [s for s in specs if s.index in chosen]
    if options.rank is not None:
        for s in specs:
            if s.rotary:
                if options.rank % 2 or options.rank > s.key_cache:
                    raise BadInputError(f"--rank {options.rank} for the rotary layer {s.module}: the key cache R must "
                                        f"be even (reals per token: [Re | Im] of R/2 complex components) and at "
                                        f"most G*d = {s.key_cache}")
            elif options.rank > s.width:
                raise BadInputError(f"--rank {options.rank} is above H*d = {s.width} of {s.module}; "
                                    "a rank above H*d compresses nothing")
    rotary = [s for s in specs if s.rotary]
    whitening, sequences, energies = {}, {}, {}
    if options.calibration:
        from .calibration import load_moments, load_query_energies, load_sequences, load_whitening

        plain = [s for s in specs if not s.rotary]
        whitening = load_whitening(Path(options.calibration), ckpt, plain) if plain else {}
        if rotary:  # read layer by layer, when each layer asks (ChainMap does not copy them)
            whitening = ChainMap(whitening, load_moments(Path(options.calibration), ckpt, rotary))
            energies = load_query_energies(Path(options.calibration), ckpt, rotary)
        if options.refine_steps or options.budget is not None or options.heal_steps:
            sequences = load_sequences(Path(options.calibration), ckpt, specs)
    source_dtype = ckpt.dtype(specs[0].query)
    out_dtype = to_torch(options.dtype if options.dtype != "auto" else source_dtype)
    curves, ranks = None, None
    if options.budget is not None:
        curve_name, curves = _budget_curves(ckpt, specs, options, whitening, sequences, energies, workers, progress)
        ranks = _allocation(specs, curves, options.budget)
    layers = _run_layers(ckpt, specs, options, out_dtype, whitening, sequences, workers, progress, energies, ranks)
    if curves is not None:
        for layer, curve in zip(layers, curves):
            layer.curve, layer.curve_loss = curve, curve_name
    source_files = ckpt.files + ([ckpt.index_file] if ckpt.index_file else [])
    config_path = ckpt.directory / "config.json"
    if ckpt.config is not None:
        source_files.append(config_path)
    with atomic_directory(out, force=force) as tmp:
        outputs = _write_weights(ckpt, layers, tmp)
        if ckpt.config is not None:
            config = dict(ckpt.config)
            config["collaborative_attention"] = _config_block(layers, specs[0].family)
            write_json(config, tmp / "config.json")
            outputs.append(tmp / "config.json")
        if Path(checkpoint).is_dir() or ckpt.sharded or ckpt.config is not None:
            outputs.extend(copy_other_files(ckpt.directory, tmp, set(source_files)))
        manifest = _manifest(ckpt, checkpoint, specs, layers, options, source_files, outputs, tmp, heads, arch,
                             kv_heads)
        _mf.write(tmp, manifest)
        if options.heal_steps:
            healed = _heal(ckpt, Path(checkpoint), tmp, layers, options, specs, out_dtype, progress)
            _write_weights(ckpt, layers, tmp)
            manifest = _manifest(ckpt, checkpoint, specs, layers, options, source_files, outputs, tmp, heads, arch,
                                 kv_heads, healed)
            _mf.write(tmp, manifest)
        if remote_code:
            from .hf import write_remote_code

            write_remote_code(tmp)
            manifest = _mf.read(tmp)
        _publishable(tmp)
    ckpt.close()
    return manifest.to_json()


def _heal(ckpt: Checkpoint, checkpoint: Path, tmp: Path, layers: list[_Layer], options: CompressOptions,
          specs: list[AttentionSpec], out_dtype: torch.dtype, progress: Progress | None) -> dict[str, Any]:
    """``--heal-steps``: load the written model, distil the original into its new tensors on the
    calibration windows (:func:`collabcompress.heal.heal`), and put them back into ``layers``.

    It trains on every window the statistics ran (files from before they stored them: the kept
    windows) except the last few kept ones (:func:`collabcompress.heal.held_out_count`), which
    are held out. A causal LM also trains on the training windows' sentences shuffled
    (:func:`collabcompress.lm.shuffled_sentences`) and on text the original samples from their
    sentences' starts (:func:`_own_text`), and holds out the held-out windows' sentences
    shuffled, so no sentence is on both sides."""
    from . import hf
    from .calibration import load_input_ids, load_window_ids
    from .evaluate import _load_original, _quiet_transformers
    from .heal import heal, held_out_count, trainable
    from .lm import padded_rows, shuffled_sentences
    from .texts import load_tokenizer

    if ckpt.config is None or not checkpoint.is_dir():
        raise BadInputError("--heal-steps runs the model: pass a model directory with config.json")
    ids, lengths = load_input_ids(Path(options.calibration), ckpt, specs)
    if ids.shape[0] < 2:
        raise BadInputError("--heal-steps holds one kept window out: run `calibrate --keep-sequences N` with N >= 2")
    held = held_out_count(ids.shape[0])
    windows = load_window_ids(Path(options.calibration), ckpt, specs)
    if windows is not None:  # every window but the held-out ones trains; those stay last
        all_ids, all_lengths, kept = windows
        held_windows = kept[-held:].tolist()
        order = [w for w in range(all_ids.shape[0]) if w not in held_windows and int(all_lengths[w]) >= 2] + held_windows
        ids, lengths = all_ids[order], all_lengths[order]
    causal = bool(specs[0].rotary)
    with _quiet_transformers():
        model = hf.from_pretrained(tmp).float()
        original = next(c for c in type(model).__mro__ if c.__module__.startswith("transformers.models."))
        reference = _load_original(checkpoint, original).float()
    shuffled = generated = 0  # windows of shuffled sentences and of the original's own text trained on
    sampling = 0.0  # seconds
    try:
        tokenizer = load_tokenizer([checkpoint]) if causal else None
    except BadInputError as e:
        warnings.warn(f"healing trains on the calibration windows only (no shuffled sentences, no sampled text): {e}",
                      stacklevel=2)
        tokenizer = None
    if tokenizer is not None:
        rows = [ids[i, : int(lengths[i])] for i in range(ids.shape[0])]
        more = [shuffled_sentences(tokenizer, part, window=ids.shape[1], seed=options.seed)
                for part in (rows[:-held], rows[-held:])]
        if all(more):  # training windows, shuffled ones, the original's text, held-out windows, shuffled ones
            if progress:
                progress("healing: sampling the original's text", 0, 1)
            start = time.perf_counter()
            own = _own_text(reference, tokenizer, rows[:-held], window=ids.shape[1], seed=options.seed)
            sampling = time.perf_counter() - start
            rows = rows[:-held] + more[0] + own + rows[-held:] + more[1]
            shuffled, generated, held = len(more[0]), len(own), held + len(more[1])
            ids, lengths = padded_rows(rows)
    step = (lambda i, n, loss: progress(f"healing (held-out loss {loss:.4f})", i, n)) if progress else None
    torch.manual_seed(options.seed)
    arithmetic = compute_dtype(options.heal_dtype)  # healing runs on the CPU
    result = heal(reference, model, ids, lengths, steps=options.heal_steps, causal=causal, seed=options.seed,
                  held_out=held, compute=to_torch(arithmetic), progress=step)
    healed = {name: p.detach() for name, p in trainable(model).items()}
    for layer in layers:
        for name in list(layer.tensors):
            match = [t for k, t in healed.items() if k == name or k.endswith("." + name) or name.endswith("." + k)]
            if len(match) == 1:
                layer.tensors[name] = match[0].to(out_dtype).contiguous()
    return {"steps": result.steps, "accepted": result.accepted, "loss": "next_token_kl" if causal else "1-cosine",
            "dtype": arithmetic, "windows": int(ids.shape[0]) - held, "shuffled_windows": shuffled,
            "generated_windows": generated, "held_out_windows": held,
            "held_out_before": round(result.held_out_before, 8), "held_out_after": round(result.held_out_after, 8),
            "seconds": round(result.seconds + sampling, 2)}


def _own_text(reference: torch.nn.Module, tokenizer: Any, windows: list[torch.Tensor], *, window: int,
              seed: int) -> list[torch.Tensor]:
    """The original's own text to heal on: :data:`collabcompress.heal.GENERATED` windows of
    ``window`` tokens sampled from it (:func:`collabcompress.lm.sampled_continuations`), each
    from the first :data:`~collabcompress.heal.PROMPT_TOKENS` tokens of a seeded choice of the
    training ``windows``' sentences; none when they have no sentence."""
    from .heal import GENERATED, PROMPT_TOKENS, TOP_P
    from .lm import sampled_continuations, sentences, token_ids

    found = sentences(tokenizer, windows)
    starts = [token_ids(tokenizer, s)[:PROMPT_TOKENS] for s in found]
    starts = [s for s in starts if s.numel() == PROMPT_TOKENS]
    if not starts:
        return []
    pick = torch.randperm(len(starts), generator=torch.Generator().manual_seed(seed))[:GENERATED].tolist()
    return sampled_continuations(reference, torch.stack([starts[i] for i in pick]), length=window, seed=seed,
                                 top_p=TOP_P)


def _qk_after(layer: _Layer, ckpt: Checkpoint) -> int:
    """Key/query parameters after: SPEC 5's formula, or a rotary layer's unchanged query plus its shared keys."""
    spec = layer.spec
    if spec.rotary:
        query = ckpt.numel(spec.query) + (ckpt.numel(spec.query_bias) if spec.query_bias else 0)
        return query + rotary_key_params(spec.d_model, spec.n_kv_head, spec.head_dim, layer.shared_dim,
                                         key_bias=spec.key_bias is not None)
    return qk_params(spec.d_model, spec.n_head, spec.head_dim, layer.shared_dim)


def _publishable(tmp: Path) -> None:
    """Give written files the usual permissions (safetensors creates them owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    for p in tmp.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
    os.chmod(tmp, 0o777 & ~umask)



def _manifest(ckpt: Checkpoint, checkpoint: str | Path, specs: list[AttentionSpec], layers: list[_Layer],
              options: CompressOptions, source_files: list[Path], outputs: list[Path], tmp: Path,
              heads: int | None, arch: str | None, kv_heads: int | None = None,
              healed: dict[str, Any] | None = None) -> _mf.Manifest:
    params_before = sum(ckpt.numel(n) for n in ckpt.names())
    removed = sum(ckpt.numel(n) for layer in layers for n in layer.removed)
    added = sum(t.numel() for layer in layers for t in layer.tensors.values())
    qk_after = sum(_qk_after(layer, ckpt) for layer in layers)
    weights_out = [p for p in outputs if p.name.endswith((".safetensors", INDEX_SUFFIX))]
    calibration = None
    if options.calibration:
        calibration = {"file": str(Path(options.calibration).resolve()), "sha256": sha256_file(Path(options.calibration))}
    settings = asdict(options)
    settings["calibration"] = calibration
    healing = options.heal_steps > 0  # recorded only when used: older manifests stay as they were
    for key, used in (("budget", options.budget is not None), ("heal_steps", healing), ("heal_dtype", healing)):
        if not used:
            del settings[key]
    if kv_heads is not None:
        settings["kv_heads"] = kv_heads
    return _mf.Manifest(
        tool=_mf.Tool("collabcompress", __version__),
        created_utc=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        source=_mf.SourceRecord(
            path=str(Path(checkpoint).resolve()),
            files=tuple(_mf.FileRecord(**file_record(f, ckpt.directory)) for f in source_files),
            architecture=specs[0].family,
            dtype=dtype_name(ckpt.dtype(specs[0].query)),
        ),
        settings=_mf.Settings(settings, heads=heads, arch=arch),
        layers=tuple(_layer_record(layer) for layer in layers),
        totals=_mf.Totals(
            params_before=params_before,
            params_after=params_before - removed + added,
            qk_params_before=sum(stored_qk_params(layer.spec, ckpt.numel) for layer in layers),
            qk_params_after=qk_after,
            bytes_before=sum(f.stat().st_size for f in ckpt.files + ([ckpt.index_file] if ckpt.index_file else [])),
            bytes_after=sum(p.stat().st_size for p in weights_out),
        ),
        outputs=tuple(_mf.FileRecord(**file_record(p, tmp)) for p in outputs),
        heal=healed,
    )
