"""The rotary method: shared rotary keys for rotary, grouped-query decoders (LLaMA, Mistral, Qwen2).

Per frequency j, the G keys are approximated by R_j <= G complex components shared by all
heads (the rotation is one complex scalar per frequency and commutes with any mixing across
keys); queries keep the original W_Q and mix per component; the key cache holds R = 2 sum_j R_j
reals per token and layer. Fitted per frequency by weighted, whitened SVD
(:func:`collabcompress.maths.rotary.rotary_factors`), refined on the attention KL with
``--refine-steps``. The maths: docs/method.md, "Rotary decoders".
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import BadInputError
from ..files import manifest as _mf
from ..files.arch import AttentionSpec, load_query_key
from ..files.checkpoint import Checkpoint
from ..maths.costs import RotaryLayerCost, rotary_key_params
from ..maths.spectra import choose_rank
from ..options import CompressOptions
from .base import FittedLayer, layer_record, next_token_kl, swapped_curve

__all__ = ["DATA_FREE_WARNING", "ROTARY", "RotaryMethod", "RotarySpectrum", "layer_sensitivities", "model_curves", "rotary_names", "rotary_spectrum_of"]

DATA_FREE_WARNING = (
    "warning: rotary layers compressed without --calibration: the data-free fit is far worse for rotary models "
    "(measured on SmolLM2 at a key cache of 128 of 192: perplexity x25 data-free, +11.6 % whitened; docs/rotary.md); "
    "run `calibrate` and pass --calibration STATS")
CURVE_WINDOWS = 1  # kept windows the next-token KL curves are measured on (one forward each per rung and layer)
CURVE_TOKENS = 256  # leading tokens of each
CURVE_STEPS = 8  # about this many candidate key caches per rotary layer


def rotary_names(module: str) -> dict[str, str]:
    """Tensor names of docs/method.md "Rotary layers" for one module."""
    return {"key": f"{module}.collab_key.weight", "key_bias": f"{module}.collab_key.bias",
            "key_freq": f"{module}.collab_key_freq", "mixing": f"{module}.collab_mixing"}


def _rotary_rank(spec: AttentionSpec, opts: CompressOptions, sv: torch.Tensor | None) -> int:
    """R of a rotary layer: --rank as given (even, <= G*d), or the key cache at --energy, then
    --min-rank, --multiple-of and --max-rank, rounded up to even."""
    from ..maths.rotary import key_cache_at

    full = spec.key_cache
    if opts.rank is not None:
        return opts.rank
    r = choose_rank(key_cache_at(sv, opts.energy), full, min_rank=opts.min_rank, max_rank=opts.max_rank,
                    multiple_of=opts.multiple_of)
    return min(full, max(2, r + r % 2))


def _plain_rotary_error(qk, spec: AttentionSpec, factors, weights: torch.Tensor) -> float:
    """``||diag(w)(B - B_hat)||_F / ||diag(w) B||_F`` with the data-free weights and no whitening."""
    from ..maths.rotary import rotary_pairs

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
    from ..maths import rotary

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
    """The attention KL of a rotary layer on its kept sequences (:class:`collabcompress.maths.refine.RotaryKL`)."""
    from ..files.rope import rope_frequencies
    from ..maths.refine import RotaryKL

    theta, attention_scaling = rope_frequencies(ckpt.config, spec.head_dim)
    return RotaryKL(*sequences, qk.w_query, qk.b_query, qk.w_key, qk.b_key, spec.n_head, spec.n_kv_head,
                    spec.head_dim, theta, spec.scale * attention_scaling ** 2, seed=seed)


def _fit(ckpt: Checkpoint, spec: AttentionSpec, opts: CompressOptions, out_dtype: torch.dtype,
                           moments: tuple[torch.Tensor, torch.Tensor] | None,
                           query_energy: torch.Tensor | None,
                           sequences: tuple[torch.Tensor, torch.Tensor] | None = None,
                           shared_dim: int | None = None) -> FittedLayer:
    """Shared rotary keys (docs/method.md): the data-free fit, or the
    whitened fit weighted by the query energies when calibration moments are given; then
    refined on the attention KL with ``--refine-steps``. ``shared_dim`` overrides the rank
    options (the allocation of ``--budget``)."""
    from ..maths import rotary
    from ..maths.refine import refine_rotary

    start = time.perf_counter()
    qk, free, weights, lower = _rotary_fit_inputs(ckpt, spec, moments, query_energy)
    if shared_dim is None:
        sv = rotary.rotary_spectrum(qk.w_key, qk.b_key, spec.n_kv_head, spec.head_dim, weights, lower) \
            if opts.energy is not None else None
        shared_dim = _rotary_rank(spec, opts, sv)
    counts = None if opts.frequency_counts is None else torch.tensor(opts.frequency_counts)
    factors = rotary.rotary_factors(qk.w_key, qk.b_key, spec.n_kv_head, spec.head_dim, shared_dim,
                                    weights=weights, lower=lower, counts=counts)
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
    return FittedLayer(spec, shared_dim, factors.relative_error, factors.energy, time.perf_counter() - start, tensors,
                       removed, refined, plain)


def _curve(ckpt: Checkpoint, spec: AttentionSpec, opts: CompressOptions,
                  moments: tuple[torch.Tensor, torch.Tensor] | None, query_energy: torch.Tensor | None,
                  sequences: tuple[torch.Tensor, torch.Tensor]) -> dict[int, float]:
    from ..maths.budget import rank_ladder
    from ..maths.rotary import rotary_factors

    qk, _, weights, lower = _rotary_fit_inputs(ckpt, spec, moments, query_energy)
    kl = _rotary_kl(ckpt, spec, qk, sequences, opts.seed)
    curve = {}
    for r in rank_ladder(spec.key_cache, opts.multiple_of, even=True):
        f = rotary_factors(qk.w_key, qk.b_key, spec.n_kv_head, spec.head_dim, r, weights=weights, lower=lower)
        curve[r] = kl(f.key, f.key_bias, f.freq, f.mixing)
    return curve


def curve_tokens(model: torch.nn.Module, ids: torch.Tensor,
                 lengths: torch.Tensor) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
    """The token ids the next-token KL curves are measured on (the first CURVE_TOKENS tokens of the
    first CURVE_WINDOWS kept windows, (n, t)) and a function giving ``model``'s log-probabilities
    on them (n, t, V)."""
    n = min(CURVE_WINDOWS, ids.shape[0])
    x = ids[:n, :min(CURVE_TOKENS, int(lengths[:n].min()))]  # (n, t)

    def log_probs() -> torch.Tensor:
        return torch.log_softmax(model(input_ids=x, use_cache=False).logits.float(), -1)  # (n, t, V)

    return x, log_probs


def model_curves(model: torch.nn.Module, ckpt: Checkpoint, specs: list[AttentionSpec], options: CompressOptions,
                 stats: Mapping[str, Any], ids: torch.Tensor, lengths: torch.Tensor,
                 progress: Callable[[str, int, int], None] | None) -> list[dict[int, float]]:
    """Per rotary layer: key cache R -> the mean next-token KL(original || model) of the whole
    ``model`` (the original causal LM, float32; its key weights are put back after each layer) with only that layer's keys replaced by the calibrated fit at R (as k_proj weights,
    :func:`collabcompress.maths.rotary.key_projection`), on the first CURVE_TOKENS tokens of the first
    CURVE_WINDOWS kept windows. Unlike each layer's attention KL, these add up to (about) the
    model's loss: on SmolLM2 the next-token KL per unit of attention KL differs 50-fold between
    layers (layer 0 is the most sensitive)."""
    from ..maths.budget import rank_ladder
    from ..maths.rotary import key_projection, rotary_factors
    from ..runtime.adapters import find_modules

    _, log_probs = curve_tokens(model, ids, lengths)
    curves = []
    with torch.inference_mode():
        target = log_probs()
        for done, spec in enumerate(specs):
            _, k_proj = find_modules(model, ckpt, spec)
            qk, _, weights, lower = _rotary_fit_inputs(ckpt, spec, *stats.get(spec.module, (None, None)))

            def projection(r: int, qk=qk, spec=spec, weights=weights, lower=lower):
                f = rotary_factors(qk.w_key, qk.b_key, spec.n_kv_head, spec.head_dim, r, weights=weights, lower=lower)
                return key_projection(f, spec.head_dim)

            ladder = rank_ladder(spec.key_cache, options.multiple_of, even=True, steps=CURVE_STEPS)
            curve = swapped_curve(k_proj, spec.key_cache, ladder, projection, lambda: next_token_kl(target, log_probs()))
            curves.append(curve)
            if progress:
                progress(f"loss curve {spec.module}", done + 1, len(specs))
    return curves


def layer_sensitivities(model: torch.nn.Module, ckpt: Checkpoint, specs: list[AttentionSpec],
                        stats: Mapping[str, Any], ids: torch.Tensor, lengths: torch.Tensor, rank: int) -> list[float]:
    """Per layer: the next-token KL(original || model) of the whole ``model`` (the original causal LM,
    float32) with only that layer's keys at their own best fit of width ``rank``, divided by the
    normalised weighted energy that fit loses (on the tokens of :func:`curve_tokens`); the weight of
    the layer in :func:`collabcompress.maths.rotary.shared_counts`."""
    from ..maths.rotary import key_projection, rotary_factors
    from ..runtime.adapters import find_modules

    _, log_probs = curve_tokens(model, ids, lengths)
    out = []
    with torch.inference_mode():
        target = log_probs()
        for spec in specs:
            _, k_proj = find_modules(model, ckpt, spec)
            weight, bias = k_proj.weight.detach().clone(), None if k_proj.bias is None else k_proj.bias.detach().clone()
            qk, _, weights, lower = _rotary_fit_inputs(ckpt, spec, *(stats.get(spec.module) or (None, None)))
            f = rotary_factors(qk.w_key, qk.b_key, spec.n_kv_head, spec.head_dim, rank, weights=weights, lower=lower)
            w_hat, b_hat = key_projection(f, spec.head_dim)
            k_proj.weight.copy_(w_hat)
            if bias is not None:
                k_proj.bias.copy_(b_hat)
            kl = float((target.exp() * (target - log_probs())).sum(-1).mean())
            k_proj.weight.copy_(weight)
            if bias is not None:
                k_proj.bias.copy_(bias)
            out.append(max(kl, 0.0) / max(1.0 - f.energy, 1e-9))
    return out


def _scores(directory: Path, out: Checkpoint, layer: Any, spec: AttentionSpec, qk: Any, x: torch.Tensor,
                   config: dict[str, Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Original and shared-key scores of a rotary layer, rotated at positions 0..N-1 (B, H, N, N)."""
    from ..files.rope import rope_frequencies
    from ..maths.rotary import RotaryFactors, rotary_scores

    if layer.kv_heads != spec.n_kv_head:
        raise BadInputError(f"{directory}: the manifest gives {spec.module} {layer.kv_heads} key/value heads, the "
                            f"original checkpoint {spec.n_kv_head}")
    t = layer.tensors
    try:
        factors = RotaryFactors(out.load(t.key, torch.float64, finite=True),
                                out.load(t.key_bias, torch.float64, finite=True) if t.key_bias else None,
                                out.load(t.key_freq).long(), out.load(t.mixing, torch.float64, finite=True), 0.0, 1.0)
        theta, attention_scaling = rope_frequencies(config, spec.head_dim)
        scale = spec.scale * attention_scaling ** 2
        positions = torch.arange(x.shape[1])
        common = {"n_head": spec.n_head, "head_dim": spec.head_dim, "theta": theta, "positions": positions,
                  "scale": scale}
        s_orig = rotary_scores(x, x, qk.w_query, qk.b_query, None, w_key=qk.w_key, b_key=qk.b_key,
                               n_kv_head=spec.n_kv_head, **common)
        s_coll = rotary_scores(x, x, qk.w_query, qk.b_query, factors, **common)
    except ValueError as e:
        raise BadInputError(f"{directory}: the shared rotary keys of {spec.module} are malformed ({e})") from e
    return s_orig, s_coll


def _layer_cost(directory: Path, rec: dict[str, Any], out: Checkpoint, qk_before: dict[str, int]) -> RotaryLayerCost:
    """A rotary layer's costs; the shapes were checked against the manifest by ``open_output``."""
    t = rec["tensors"]
    n_head, head_dim, d_model = rec["heads"], rec["head_dim"], rec["d_model"]
    query_bias = t["query"][: -len("weight")] + "bias"
    query = out.numel(t["query"]) + (out.numel(query_bias) if query_bias in out else 0)
    key_before = rec["kv_heads"] * head_dim * (d_model + bool(rec.get("key_bias")))
    cost = RotaryLayerCost(rec["module"], rec["index"], n_head, head_dim, d_model, rec["shared_dim"],
                           float(rec["relative_error"]), qk_before.get(rec["module"], query + key_before),
                           n_kv_head=rec["kv_heads"], key_bias=bool(t.get("key_bias")), query_params=query)
    actual = query + sum(out.numel(t[k]) for k in ("key", "mixing", "key_freq", "key_bias") if t.get(k))
    if actual != cost.qk_params(True):
        raise BadInputError(f"{directory}: the shared rotary keys of {rec['module']} hold {actual} parameters, not "
                            f"the {cost.qk_params(True)} of their shapes in the manifest")
    return cost


@dataclass(frozen=True)
class RotarySpectrum:
    """The analysis of a rotary layer (docs/method.md), read like a
    :class:`LayerSpectrum`: ``width`` is the original key cache G*d, a "rank" is a key cache R
    in reals per token (even), and the energy curves are the cumulative energy over the
    components ranked by squared weighted singular value across frequencies (entry i: a key
    cache of 2*(i+1)); the query and key curves are the same curve.

    Attributes:
        n_head, n_kv_head, head_dim, d_model: H, G, d, D.
        sv: ``(head_dim/2, n_kv_head)`` per-frequency singular values of diag(w_j) B_j with
            the data-free query-energy weights (:func:`collabcompress.maths.rotary.rotary_spectrum`).
        group_energy: ``(head_dim/2, n_kv_head)`` each group's own weighted key energy
            ``w_{g,j}^2 ||b_{g,j}||^2`` per frequency.
    """

    n_head: int
    n_kv_head: int
    head_dim: int
    d_model: int
    sv: torch.Tensor  # (d/2, G)
    group_energy: torch.Tensor  # (d/2, G)

    @property
    def width(self) -> int:
        return self.n_kv_head * self.head_dim

    @property
    def energy_query(self) -> torch.Tensor:
        from ..maths.rotary import rotary_energy

        return rotary_energy(self.sv)  # (G*d/2,)

    energy_key = energy_query

    @property
    def sv_query(self) -> torch.Tensor:
        return self.sv.flatten().sort(descending=True).values  # (G*d/2,)

    def rank_at(self, tau: float) -> int:
        from ..maths.rotary import key_cache_at

        return key_cache_at(self.sv, tau)

    def rank_at_sides(self, tau: float) -> tuple[int, int]:
        return self.rank_at(tau), self.rank_at(tau)

    def redundancy(self, tau: float) -> float:
        return 1.0 - self.rank_at(tau) / self.width

    def head_effective_rank(self, tau: float) -> list[int]:
        """Per key/value group g: the reals per token (2 per frequency) that keep ``tau`` of its
        own weighted key energy, taking its strongest frequencies first."""
        from ..maths.rotary import key_cache_at

        return [key_cache_at(g[:, None], tau) for g in self.group_energy.sqrt().T]

    def frequency_energy(self) -> torch.Tensor:
        from ..maths.rotary import frequency_energy

        return frequency_energy(self.sv)  # (d/2, G)


def rotary_spectrum_of(qk: Any, spec: AttentionSpec) -> RotarySpectrum:
    from ..maths.rotary import group_weights, query_energy, rotary_pairs, rotary_spectrum

    weights = group_weights(query_energy(qk.w_query, qk.b_query, spec.n_head, spec.head_dim), spec.n_kv_head)
    sv = rotary_spectrum(qk.w_key, qk.b_key, spec.n_kv_head, spec.head_dim, weights)  # (d/2, G)
    rows = qk.w_key if qk.b_key is None else torch.cat([qk.w_key, qk.b_key[:, None]], dim=1)  # (G*d, D')
    keys = rotary_pairs(rows, spec.n_kv_head, spec.head_dim)  # (G, d/2, D')
    group_energy = (weights * keys.abs().square().sum(-1)).T  # (d/2, G)
    return RotarySpectrum(spec.n_head, spec.n_kv_head, spec.head_dim, spec.d_model, sv, group_energy)


class RotaryMethod:
    """The :class:`~collabcompress.methods.base.LayerMethod` of the rotary families."""

    name = "rotary"
    causal_lm = True
    stock = True  # `export --format stock` can write its layers as multi-query attention (docs/export.md)
    width_label = "G*d"
    needed = "key cache needed (reals per token)"
    analysis_caption = (
        "Rotary layers: G = key/value heads; r@tau = the key cache R (reals per token and layer, even) whose "
        "shared rotary components keep tau of the weighted per-frequency key energy (data-free query-energy "
        "weights), against the original G*d; red = 1 - R/(G*d); spectrum = the per-frequency singular "
        "values, all frequencies ranked together.")
    analysis_columns = ("G",)
    energy_plot = "frequency"
    key_cache_text = "G*d before, R after"

    def claims(self, layer: AttentionSpec | _mf.LayerRecord | dict[str, Any]) -> bool:
        """A rotary layer: the spec's or record's ``rotary`` flag (the manifest's ``"rotary": true``)."""
        return bool(layer.get("rotary") if isinstance(layer, dict) else layer.rotary)

    def analysis_fields(self, spectrum: Any) -> dict[str, Any]:
        """G, the rotary flag and the per-frequency energy (d/2 rows of G)."""
        return {"kv_heads": spectrum.n_kv_head, "rotary": True,
                "frequency_energy": [[round(float(e), 8) for e in row] for row in spectrum.frequency_energy()]}

    def analysis_cells(self, spec: AttentionSpec) -> tuple[str, ...]:
        return (str(spec.n_kv_head),)

    def key_width(self, rec: dict[str, Any]) -> int:
        return rec["kv_heads"] * rec["head_dim"]

    def sweeps(self, rec: dict[str, Any]) -> str:
        return "-"  # a rotary fit is one SVD per frequency

    def compress_notes(self, manifest: dict[str, Any]) -> list[str]:
        """What R means for rotary layers, and the data-free warning."""
        notes = ["Rotary layers: G*d is the original key cache (reals per token and layer), R the shared rotary key "
                 "cache; energy@R and rel. error are those of the weighted per-frequency fit (docs/method.md)."]
        if not manifest["settings"].get("calibration"):
            notes.append(DATA_FREE_WARNING)
        return notes

    def report_caption(self, key_cache: str) -> str:
        return ("\nRotary layers: G×d = the original key cache G*d (reals per token and layer); R = the shared rotary "
                "key cache; params = q_proj + k_proj before, q_proj (unchanged) + shared keys, mixing and frequency "
                "indices after; the scores cost H*R instead of H*d multiply-adds per query and cached token. Key "
                f"cache at {key_cache} over these layers.")

    def full_width(self, spec: AttentionSpec) -> int:
        return spec.key_cache

    def memory(self, spec: AttentionSpec, calibrated: bool) -> tuple[int, int]:
        """Running: the projections (4 G*d*D) and, with calibration, the layer's D x D second moment
        (read when the layer asks, not held for the run)."""
        d_model = spec.d_model
        return 8 * (4 * spec.width * d_model + (d_model ** 2 if calibrated else 0)), 0

    def spectrum(self, ckpt: Checkpoint, spec: AttentionSpec) -> Any:
        return rotary_spectrum_of(load_query_key(ckpt, spec), spec)

    def check_rank(self, spec: AttentionSpec, rank: int) -> None:
        if rank % 2 or rank > spec.key_cache:
            raise BadInputError(f"--rank {rank} for the rotary layer {spec.module}: the key cache R must "
                                f"be even (reals per token: [Re | Im] of R/2 complex components) and at "
                                f"most G*d = {spec.key_cache}")

    def load_statistics(self, path: Path, ckpt: Checkpoint, specs: list[AttentionSpec]) -> Mapping[str, Any]:
        """module -> (moments (mean, second moment), query energies (H, d/2))."""
        from ..files.statistics import load_moments, load_query_energies, per_module

        moments, energies = load_moments(path, ckpt, specs), load_query_energies(path, ckpt, specs)
        # the moments are read when a layer asks for them, not held for all layers (Llama-3-8B: 32 x 134 MB)
        return per_module([s.module for s in specs], lambda module: (moments[module], energies.get(module)))

    def fit(self, ckpt: Checkpoint, spec: AttentionSpec, opts: CompressOptions, out_dtype: torch.dtype,
            stats: Any, sequences: tuple[torch.Tensor, torch.Tensor] | None,
            shared_dim: int | None = None) -> FittedLayer:
        moments, energy = stats if stats is not None else (None, None)
        return _fit(ckpt, spec, opts, out_dtype, moments, energy, sequences, shared_dim)

    def stock_counts(self, ckpt: Checkpoint, specs: list[AttentionSpec], opts: CompressOptions,
                     stats: Mapping[str, Any], model: torch.nn.Module | None = None,
                     ids: torch.Tensor | None = None, lengths: torch.Tensor | None = None) -> list[int]:
        """--stock: the R_j of the one frequency table all layers keep (``--rank`` R), chosen jointly
        over the layers from their weighted (calibrated: whitened) spectra
        (:func:`collabcompress.maths.rotary.shared_counts`); with the original causal LM ``model``
        and kept token ids, each layer weighted by its next-token KL per unit of lost energy
        (:func:`layer_sensitivities`). Measured on SmolLM2 at R = 128 with r_v = 128: perplexity
        38.63 weighted, 41.07 unweighted, 38.00 with a table per layer."""
        from ..maths import rotary

        shapes = {(s.n_kv_head, s.head_dim) for s in specs}
        if len(shapes) > 1:
            raise BadInputError("--stock needs the same key heads and head width in every layer")
        spectra = []
        for spec in specs:
            moments, energy = stats.get(spec.module) or (None, None)
            qk, _, weights, lower = _rotary_fit_inputs(ckpt, spec, moments, energy)
            spectra.append(rotary.rotary_spectrum(qk.w_key, qk.b_key, spec.n_kv_head, spec.head_dim, weights, lower))
        weights = None if model is None else layer_sensitivities(model, ckpt, specs, stats, ids, lengths, opts.rank)
        return rotary.shared_counts(spectra, opts.rank, weights).tolist()

    def loss_curve(self, ckpt: Checkpoint, spec: AttentionSpec, opts: CompressOptions, stats: Any,
                   sequences: tuple[torch.Tensor, torch.Tensor]) -> dict[int, float]:
        moments, energy = stats if stats is not None else (None, None)
        return _curve(ckpt, spec, opts, moments, energy, sequences)

    def record(self, layer: FittedLayer) -> _mf.LayerRecord:
        spec, rn = layer.spec, rotary_names(layer.spec.module)
        tensors = _mf.LayerTensors(spec.query, rn["key"], rn["mixing"], None, None, rn["key_freq"],
                                   rn["key_bias"] if spec.key_bias else None)
        return layer_record(layer, tensors, iterations=0, fused=None, kv_heads=spec.n_kv_head, rotary=True)

    def config_entry(self, layer: FittedLayer) -> dict[str, Any]:
        spec = layer.spec
        return {"index": spec.index, "shared_dim": layer.shared_dim, "heads": spec.n_head,
                "kv_heads": spec.n_kv_head, "rotary": True, "head_dim": spec.head_dim, "d_model": spec.d_model,
                "scale": spec.scale, "fused": spec.fused, "key_bias": spec.key_bias is not None}

    def qk_params_after(self, layer: FittedLayer, ckpt: Checkpoint) -> int:
        """The unchanged query plus the shared keys."""
        spec = layer.spec
        query = ckpt.numel(spec.query) + (ckpt.numel(spec.query_bias) if spec.query_bias else 0)
        return query + rotary_key_params(spec.d_model, spec.n_kv_head, spec.head_dim, layer.shared_dim,
                                         key_bias=spec.key_bias is not None)


    def scores(self, directory: Path, out: Checkpoint, layer: _mf.LayerRecord, spec: AttentionSpec, qk: Any,
               x: torch.Tensor, config: dict[str, Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
        return _scores(directory, out, layer, spec, qk, x, config)

    def layer_cost(self, directory: Path, rec: dict[str, Any], out: Checkpoint,
                   qk_before: dict[str, int]) -> RotaryLayerCost:
        return _layer_cost(directory, rec, out, qk_before)

    def output_module(self, out: Checkpoint, layer: _mf.LayerRecord, spec: AttentionSpec) -> torch.nn.Module:
        from ..runtime.attention import CollaborativeRotaryAttention

        t = layer.tensors
        module = CollaborativeRotaryAttention(layer.d_model, layer.kv_heads, layer.shared_dim, key_bias=bool(t.key_bias))
        state = {"collab_key.weight": out.load(t.key, torch.float32, finite=True),
                 "collab_key_freq": out.load(t.key_freq).long(),
                 "collab_mixing": out.load(t.mixing, torch.float32, finite=True)}
        if t.key_bias:
            state["collab_key.bias"] = out.load(t.key_bias, torch.float32, finite=True)
        module.load_state_dict(state)
        return module.eval()

    def runtime_module(self, old: torch.nn.Module, layer: _mf.LayerRecord, module_name: str,
                       family: Any) -> torch.nn.Module:
        """``old`` (a LLaMA-family attention module) with shared rotary keys (:mod:`collabcompress.runtime.adapters`)."""
        from ..runtime.adapters import rotary_module

        return rotary_module(old, layer)

    def query_statistic(self, spec: AttentionSpec) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """The query energies: the sum over tokens of |q_{h,j}|^2, (H, d/2)."""
        from ..maths.rotary import rotary_pairs

        def term(q: torch.Tensor) -> torch.Tensor:
            return rotary_pairs(q.T, spec.n_head, spec.head_dim).abs().square().sum(-1)  # (H, d/2)
        return torch.zeros(spec.n_head, spec.head_dim // 2, dtype=torch.float64), term

    def value_projection(self, ckpt: Checkpoint, spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The value weight (G*d, D) and its bias, by the family's value name."""
        from ..files.families import find_family

        family = find_family(spec.family)
        if family is None or family.value is None:
            return None
        name = family.value.format(m=spec.module, parent=spec.module.rsplit(".", 1)[0])
        bias = name[: -len("weight")] + "bias"
        if name not in ckpt:
            return None
        return ckpt.load(name, torch.float32, finite=True), (ckpt.load(bias, torch.float32) if bias in ckpt else None)

    def position_embeddings(self, config: dict[str, Any] | None, head_dim: int, seq_len: int, dtype: torch.dtype,
                            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' position embeddings (cos, sin), (1, N, d) each, attention scaling included."""
        from ..files.rope import rope_frequencies

        theta, scaling = rope_frequencies(config, head_dim)  # (d/2,)
        angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * theta[None, :]  # (N, d/2)
        emb = torch.cat([angles, angles], dim=-1)  # (N, d)
        return ((emb.cos() * scaling).to(dtype=dtype, device=device)[None],
                (emb.sin() * scaling).to(dtype=dtype, device=device)[None])


ROTARY = RotaryMethod()
