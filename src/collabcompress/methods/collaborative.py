"""The collaborative method: shared query and key projections plus one mixing vector per head.

P_h ~= U diag(m_h) V^T for every head h (Cordonnier, Loukas, Jaggi, arXiv 2006.16362), fitted by
CP-ALS in factored form (:func:`collabcompress.maths.cp.cp_als`), whitened by the calibration
moments when given, then refined on the attention KL with ``--refine-steps``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import BadInputError
from ..files import manifest as _mf
from ..files.arch import AttentionSpec, load_query_key, load_value_output
from ..files.checkpoint import Checkpoint
from ..maths.costs import LayerCost, qk_params
from ..maths.cp import CPFactors, concatenated, cp_als, relative_error
from ..maths.refine import refine_factors
from ..maths.scores import collaborative_scores, original_scores
from ..maths.spectra import choose_rank, head_output_energy, layer_spectrum
from ..options import CompressOptions
from .base import FittedLayer, layer_record

__all__ = ["COLLABORATIVE", "CollaborativeMethod", "collab_names"]


def collab_names(module: str) -> dict[str, str]:
    """Tensor names of docs/method.md for one module."""
    return {"query": f"{module}.collab_query.weight", "key": f"{module}.collab_key.weight",
            "mixing": f"{module}.collab_mixing", "content_bias": f"{module}.collab_content_bias.weight",
            "value": f"{module}.collab_value.weight", "value_bias": f"{module}.collab_value.bias"}


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


def _curve(ckpt: Checkpoint, spec: AttentionSpec, opts: CompressOptions,
                 whiten: tuple[torch.Tensor, torch.Tensor], sequences: tuple[torch.Tensor, torch.Tensor]) -> dict[int, float]:
    from ..maths.budget import rank_ladder

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


def _fit(ckpt: Checkpoint, spec: AttentionSpec, opts: CompressOptions, out_dtype: torch.dtype,
                    whiten: tuple[torch.Tensor, torch.Tensor] | None,
                    sequences: tuple[torch.Tensor, torch.Tensor] | None, shared_dim: int | None = None) -> FittedLayer:
    start = time.perf_counter()
    qk = load_query_key(ckpt, spec)
    spectrum = layer_spectrum(qk.w_query, qk.w_key, spec.n_head)
    if shared_dim is None and opts.rank is not None:  # checked by CollaborativeMethod.check_rank
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
    return FittedLayer(spec, shared_dim, factors.relative_error, energy, time.perf_counter() - start, tensors, removed,
                       refined, plain_error, iterations=factors.iterations)


class CollaborativeMethod:
    """The :class:`~collabcompress.methods.base.LayerMethod` of every non-rotary family."""

    name = "collaborative"
    causal_lm = False
    stock = False
    width_label = "H*d"
    needed = "shared width needed"
    analysis_caption = None
    analysis_columns = ()
    energy_plot = "query_key"
    key_cache_text = "H*d before, R + H after"

    def claims(self, layer: AttentionSpec | _mf.LayerRecord | dict[str, Any]) -> bool:
        return True  # the method of every layer no other method claims

    def analysis_fields(self, spectrum: Any) -> dict[str, Any]:
        return {}

    def analysis_cells(self, spec: AttentionSpec) -> tuple[str, ...]:
        return ()

    def key_width(self, rec: dict[str, Any]) -> int:
        return rec["heads"] * rec["head_dim"]

    def sweeps(self, rec: dict[str, Any]) -> str:
        return str(rec["iterations"])

    def compress_notes(self, manifest: dict[str, Any]) -> list[str]:
        return []

    def report_caption(self, key_cache: str) -> str:
        return ""

    def full_width(self, spec: AttentionSpec) -> int:
        return spec.width

    def memory(self, spec: AttentionSpec, calibrated: bool) -> tuple[int, int]:
        """Running: two D x D Gram matrices, their symmetrised copies and the eigensolver's (4 D^2),
        and the projections (4 H*d*D); held with calibration: the two D x D whitening factors."""
        d_model = spec.d_model
        return 8 * (4 * spec.width * d_model + 4 * d_model ** 2), 8 * 2 * d_model ** 2 if calibrated else 0

    def spectrum(self, ckpt: Checkpoint, spec: AttentionSpec) -> Any:
        qk = load_query_key(ckpt, spec)
        return layer_spectrum(qk.w_query, qk.w_key, spec.n_head)

    def check_rank(self, spec: AttentionSpec, rank: int) -> None:
        if rank > spec.width:
            raise BadInputError(f"--rank {rank} is above H*d = {spec.width} of {spec.module}; "
                                "a rank above H*d compresses nothing")

    def load_statistics(self, path: Path, ckpt: Checkpoint, specs: list[AttentionSpec]) -> dict[str, Any]:
        from ..files.statistics import load_whitening

        return load_whitening(path, ckpt, specs)

    def fit(self, ckpt: Checkpoint, spec: AttentionSpec, opts: CompressOptions, out_dtype: torch.dtype,
            stats: Any, sequences: tuple[torch.Tensor, torch.Tensor] | None,
            shared_dim: int | None = None) -> FittedLayer:
        return _fit(ckpt, spec, opts, out_dtype, stats, sequences, shared_dim)

    def loss_curve(self, ckpt: Checkpoint, spec: AttentionSpec, opts: CompressOptions, stats: Any,
                   sequences: tuple[torch.Tensor, torch.Tensor]) -> dict[int, float]:
        return _curve(ckpt, spec, opts, stats, sequences)

    def record(self, layer: FittedLayer) -> _mf.LayerRecord:
        spec, names = layer.spec, collab_names(layer.spec.module)
        # a fused layer's value slice, unless shared values replaced it (their names are in ``value``)
        tensors = _mf.LayerTensors(names["query"], names["key"], names["mixing"], names["content_bias"],
                                   names["value"] if spec.fused and layer.values is None else None)
        return layer_record(layer, tensors, iterations=layer.iterations, fused=spec.fused)

    def config_entry(self, layer: FittedLayer) -> dict[str, Any]:
        spec = layer.spec
        return {"index": spec.index, "shared_dim": layer.shared_dim, "heads": spec.n_head,
                "head_dim": spec.head_dim, "d_model": spec.d_model, "scale": spec.scale,
                "fused": spec.fused, "key_bias": spec.key_bias is not None}

    def qk_params_after(self, layer: FittedLayer, ckpt: Checkpoint) -> int:
        """The formula of docs/method.md: 2*D*R + H*R + H*D."""
        spec = layer.spec
        return qk_params(spec.d_model, spec.n_head, spec.head_dim, layer.shared_dim)


    def scores(self, directory: Path, out: Checkpoint, layer: _mf.LayerRecord, spec: AttentionSpec, qk: Any,
               x: torch.Tensor, config: dict[str, Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Original and collaborative scores of the layer on the probe ``x`` (B, H, N, N)."""
        t = layer.tensors
        query, key = out.load(t.query, torch.float64, finite=True), out.load(t.key, torch.float64, finite=True)
        mixing = out.load(t.mixing, torch.float64, finite=True)
        content = out.load(t.content_bias, torch.float64, finite=True)
        s_orig = original_scores(x, x, qk.w_query, qk.w_key, qk.b_query, qk.b_key, spec.n_head, spec.scale)
        return s_orig, collaborative_scores(x, x, query, key, mixing, content, spec.scale)

    def layer_cost(self, directory: Path, rec: dict[str, Any], out: Checkpoint, qk_before: dict[str, int]) -> LayerCost:
        """The layer's costs (``report``), its tensors checked against the manifest's shapes."""
        t = rec["tensors"]
        for key in ("query", "key", "mixing", "content_bias"):
            if t[key] not in out:
                raise BadInputError(f"{directory} is missing tensor {t[key]!r} named in its manifest")
        n_head, head_dim, d_model, r = rec["heads"], rec["head_dim"], rec["d_model"], rec["shared_dim"]
        if out.shape(t["query"]) != (r, d_model) or out.shape(t["mixing"]) != (n_head, r):
            raise BadInputError(f"{directory}: the collab tensors of {rec['module']} have shapes that do not match "
                                "the manifest")
        if rec["module"] in qk_before:
            before = qk_before[rec["module"]]
        else:
            bias = n_head * head_dim * (bool(rec.get("query_bias")) + bool(rec.get("key_bias")))
            before = qk_params(d_model, n_head, head_dim, bias_elements=bias)
        cost = LayerCost(rec["module"], rec["index"], n_head, head_dim, d_model, r, float(rec["relative_error"]), before)
        actual = sum(out.numel(t[k]) for k in ("query", "key", "mixing", "content_bias"))
        if actual != cost.qk_params(True):
            raise BadInputError(f"{directory}: the collab tensors of {rec['module']} hold {actual} parameters, "
                                f"not the {cost.qk_params(True)} of their shapes in the manifest")
        return cost

    def output_module(self, out: Checkpoint, layer: _mf.LayerRecord, spec: AttentionSpec) -> torch.nn.Module:
        from ..runtime.attention import CollaborativeAttention

        t = layer.tensors
        return CollaborativeAttention.from_tensors(
            out.load(t.query, torch.float32, finite=True), out.load(t.key, torch.float32, finite=True),
            out.load(t.mixing, torch.float32, finite=True), out.load(t.content_bias, torch.float32, finite=True),
            spec.scale).eval()

    def runtime_module(self, old: torch.nn.Module, layer: _mf.LayerRecord, module_name: str,
                       family: Any) -> torch.nn.Module:
        """``old`` (a transformers attention module) made collaborative (:mod:`collabcompress.runtime.adapters`)."""
        from ..runtime.adapters import collaborative_module

        return collaborative_module(old, layer, module_name, family)

    def query_statistic(self, spec: AttentionSpec) -> None:
        return None

    def value_projection(self, ckpt: Checkpoint, spec: AttentionSpec) -> tuple[torch.Tensor, None] | None:
        """The value weight (H*d, D) of the value/output pair, without its bias."""
        value_output = load_value_output(ckpt, spec, torch.float32)
        return None if value_output is None else (value_output[0], None)

    def position_embeddings(self, config: dict[str, Any] | None, head_dim: int, seq_len: int, dtype: torch.dtype,
                            device: torch.device) -> None:
        return None


COLLABORATIVE = CollaborativeMethod()
