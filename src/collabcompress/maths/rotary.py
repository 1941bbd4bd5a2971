"""Shared rotary keys: the per-frequency factorization of RoPE attention (docs/method.md).

In transformers' rotary layout dimension j of a head pairs with j + d/2 (``rotate_half``),
so each head is d/2 complex coordinates, one per frequency theta_j. With the complex rows
``a_{h,j} = W_Q[h*d + j] + i W_Q[h*d + j + d/2]`` and ``b_{g,j}`` likewise from W_K, the
score of head h (key group g = g(h)) at query position t and key position s is::

    score_h = scale * Re sum_j q_{h,j}(x_t) conj(k_{g,j}(y_s)) e^{i (t - s) theta_j}

The rotation is one complex scalar per frequency, shared by all heads, so a complex linear
map across the G keys of one frequency commutes with it. Per frequency j the G x D key
matrix B_j is replaced by a few shared components ``c_r(y) = beta_r . y`` and a mixing
``U_{g,r}``: ``k_{g,j} ~= sum_{r: j(r) = j} U_{g,r} c_r``. The fit is the best low-rank
approximation of ``diag(w_j) B_j L`` per frequency (Eckart & Young 1936), with
``w_{g,j}^2 = sum_{h in g} E|q_{h,j}|^2`` and L the Cholesky factor of the input's second
moment, components ranked by squared singular value across all frequencies. The tensor
layout and the runtime formula are those of docs/method.md ("Rotary layers").

Pure tensors in and out, float64, deterministic. Shapes: H query heads (``n_head``), G key
heads (``n_kv_head``), d = ``head_dim``, D = ``d_model``, D' = D + 1 with a key bias
(the input augmented by a constant 1), R = the key cache in reals per token (even).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .spectra import check_tau, cumulative_energy, rank_at_energy
from .cp import DEFAULT_SHRINKAGE, whiten, whitening_factor
from .scores import group_size, head_groups

__all__ = [
    "rotation",
    "RotaryFactors",
    "augmented_moment",
    "frequency_energy",
    "group_weights",
    "key_cache_at",
    "key_projection",
    "key_whitening",
    "original_key_cache",
    "original_rotary_keys",
    "query_energy",
    "rotary_energy",
    "rotary_factors",
    "rotary_keys",
    "rotary_pairs",
    "rotary_scores",
    "rotary_spectrum",
    "shared_counts",
]

_F64 = torch.float64
_C128 = torch.complex128
_CPU = torch.device("cpu")


# --------------------------------------------------------------------------- validation


def _count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _head_dim(head_dim) -> int:
    if _count(head_dim, "head_dim") % 2:
        raise ValueError(f"head_dim must be even for rotary pairs, got {head_dim}")
    return head_dim


def _floats(t, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """t as float64 on the CPU after checking its shape, dtype and values."""
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must have shape {shape}, got {got}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    t = t.detach().to(_CPU, _F64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinity")
    return t


def _projection(w, b, n: int, head_dim: int, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Check a (n*d, D) weight and its optional (n*d,) bias; float64 CPU copies."""
    if not isinstance(w, torch.Tensor) or w.ndim != 2:
        raise ValueError(f"{name} weight must be a 2-D tensor (n*head_dim, d_model)")
    w = _floats(w, f"{name} weight", (n * head_dim, w.shape[1]))
    return w, None if b is None else _floats(b, f"{name} bias", (n * head_dim,))


# --------------------------------------------------------------------------- complex rows


def rotary_pairs(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Complex rows of a rotary projection: ``w[h*d + j] + i w[h*d + j + d/2]``.

    Args:
        w: ``(n_heads*head_dim, d_model)`` weight (nn.Linear layout) or ``(n_heads*head_dim,)``
            bias of q_proj or k_proj.
        n_heads: heads of that projection (H for the query, G for the key).
        head_dim: d, even.

    Returns:
        complex128 ``(n_heads, d/2, d_model)`` rows ``a_{h,j}`` / ``b_{g,j}`` (docs/method.md),
        or ``(n_heads, d/2)`` for a bias.
    """
    _count(n_heads, "n_heads")
    half = _head_dim(head_dim) // 2
    if not isinstance(w, torch.Tensor) or w.ndim not in (1, 2) or w.shape[0] != n_heads * head_dim:
        got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"expected {n_heads * head_dim} rows (n_heads*head_dim), got {got}")
    heads = w.detach().to(_CPU, _F64).reshape(n_heads, 2, half, *w.shape[1:])  # (n, 2, d/2[, D])
    return torch.complex(heads[:, 0], heads[:, 1])  # (n, d/2[, D])


def _rows(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """[w | b]: the weight acting on the input augmented by a constant 1 when there is a bias."""
    return w if b is None else torch.cat([w, b[:, None]], dim=1)  # (n*d, D')


# --------------------------------------------------------------------------- query energies


def query_energy(
    w_query: torch.Tensor,
    b_query: torch.Tensor | None,
    n_head: int,
    head_dim: int,
    second_moment: torch.Tensor | None = None,
    mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """Expected energy ``E|q_{h,j}(x)|^2`` of each head's query at each frequency.

    ``E|a.x + a0|^2 = Re a C a^H + 2 Re(conj(a0) a.mu) + |a0|^2`` with ``C = E[x x^T]`` and
    ``mu = E[x]``; the rotation does not change ``|q|``. Data-free (no moment):
    ``||a_{h,j}||^2 + |a0_{h,j}|^2``, i.e. ``C = I``, ``mu = 0``.

    Args:
        w_query: ``(n_head*head_dim, d_model)``; b_query: ``(n_head*head_dim,)`` or None.
        n_head, head_dim: H, d.
        second_moment: ``(d_model, d_model)`` ``E[x x^T]`` of the layer input, or None.
        mean: ``(d_model,)`` ``E[x]``; required with a second moment and a query bias.

    Returns:
        ``(n_head, head_dim/2)`` float64, non-negative.
    """
    _count(n_head, "n_head")
    _head_dim(head_dim)
    w, b = _projection(w_query, b_query, n_head, head_dim, "query")
    d_model = w.shape[1]
    a = rotary_pairs(w, n_head, head_dim)  # (H, d/2, D)
    if second_moment is None:
        energy = a.abs().square().sum(-1)  # (H, d/2)
        mu = None
    else:
        moment = _floats(second_moment, "second_moment", (d_model, d_model))
        moment = 0.5 * (moment + moment.mT)
        energy = ((a.real @ moment) * a.real).sum(-1) + ((a.imag @ moment) * a.imag).sum(-1)  # (H, d/2)
        if b is not None and mean is None:
            raise ValueError("a query bias with a second moment needs the mean of the inputs too")
        mu = None if mean is None else _floats(mean, "mean", (d_model,))
    if b is not None:
        a0 = rotary_pairs(b, n_head, head_dim)  # (H, d/2)
        energy = energy + a0.abs().square()
        if mu is not None:
            energy = energy + 2.0 * (a0.conj() * (a @ mu.to(_C128))).real
    return energy.clamp_min(0.0)


def group_weights(query_energy: torch.Tensor, n_kv_head: int) -> torch.Tensor:
    """Squared fit weights ``w_{g,j}^2 = sum_{h in g} E|q_{h,j}|^2`` (heads h with h // (H/G) = g).

    Args:
        query_energy: ``(n_head, head_dim/2)`` from :func:`query_energy` (or calibration).
        n_kv_head: G, dividing n_head.

    Returns:
        ``(n_kv_head, head_dim/2)`` float64, the ``weights`` of :func:`rotary_spectrum` and
        :func:`rotary_factors`.
    """
    _count(n_kv_head, "n_kv_head")
    if not isinstance(query_energy, torch.Tensor) or query_energy.ndim != 2:
        raise ValueError("query_energy must be a 2-D tensor (n_head, head_dim/2)")
    n_head, half = query_energy.shape
    group = group_size(n_head, n_kv_head)
    energy = _floats(query_energy, "query_energy", (n_head, half))
    if bool((energy < 0).any()):
        raise ValueError("query_energy must be non-negative")
    return energy.view(n_kv_head, group, half).sum(1)  # (G, d/2)


# --------------------------------------------------------------------------- whitening


def augmented_moment(second_moment: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``[[C, mu], [mu^T, 1]]``: the second moment of the input augmented by a constant 1.

    Args:
        second_moment: ``(d_model, d_model)`` ``E[y y^T]``; mean: ``(d_model,)`` ``E[y]``.

    Returns:
        ``(d_model+1, d_model+1)`` float64.
    """
    if not isinstance(second_moment, torch.Tensor) or second_moment.ndim != 2:
        raise ValueError("second_moment must be a 2-D tensor (d_model, d_model)")
    d_model = second_moment.shape[0]
    moment = _floats(second_moment, "second_moment", (d_model, d_model))
    mu = _floats(mean, "mean", (d_model,))
    top = torch.cat([moment, mu[:, None]], dim=1)  # (D, D+1)
    bottom = torch.cat([mu, mu.new_ones(1)])[None]  # (1, D+1)
    return torch.cat([top, bottom])  # (D+1, D+1)


def key_whitening(
    second_moment: torch.Tensor,
    mean: torch.Tensor | None = None,
    *,
    bias: bool = False,
    shrinkage: float = DEFAULT_SHRINKAGE,
) -> torch.Tensor:
    """The ``lower`` factor for a whitened rotary fit: :func:`~collabcompress.maths.cp.whitening_factor`
    of ``E[y y^T]``, or of :func:`augmented_moment` when the key has a bias.

    Args:
        second_moment: ``(d_model, d_model)``; mean: ``(d_model,)``, required when ``bias``.
        bias: whether k_proj has a bias (then the factor is ``(d_model+1, d_model+1)``).
        shrinkage: as in ``whitening_factor``.
    """
    if bias:
        if mean is None:
            raise ValueError("a key bias needs the mean of the inputs for the whitened fit")
        return whitening_factor(augmented_moment(second_moment, mean), shrinkage=shrinkage)
    return whitening_factor(second_moment, shrinkage=shrinkage)


# --------------------------------------------------------------------------- the fit


def _weighted_keys(w_key, b_key, n_kv_head, head_dim, weights, lower) -> tuple[torch.Tensor, torch.Tensor]:
    """(B_j L, diag(w_j) B_j L), both complex (d/2, G, D')."""
    _count(n_kv_head, "n_kv_head")
    half = _head_dim(head_dim) // 2
    w, b = _projection(w_key, b_key, n_kv_head, head_dim, "key")
    rows = _rows(w, b)  # (G*d, D')
    rows, _ = whiten(rows, lower, rows.shape[1], "lower", _CPU)  # (G*d, D') = [W_K | b_K] L
    keys = rotary_pairs(rows, n_kv_head, head_dim).transpose(0, 1)  # (d/2, G, D')
    if weights is None:
        return keys, keys
    w2 = _floats(weights, "weights", (n_kv_head, half))
    if bool((w2 < 0).any()):
        raise ValueError("weights (squared, from group_weights) must be non-negative")
    return keys, keys * w2.sqrt().mT[..., None].to(_C128)  # (d/2, G, D')


def rotary_spectrum(
    w_key: torch.Tensor,
    b_key: torch.Tensor | None,
    n_kv_head: int,
    head_dim: int,
    weights: torch.Tensor | None = None,
    lower: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-frequency singular values of ``diag(w_j) B_j L`` (docs/method.md, rotary fit).

    Args:
        w_key: ``(n_kv_head*head_dim, d_model)`` k_proj weight; b_key: its bias or None
            (then the input is augmented by a constant 1 and B_j gains the bias column).
        n_kv_head, head_dim: G, d.
        weights: ``(n_kv_head, head_dim/2)`` squared weights ``w_{g,j}^2`` from
            :func:`group_weights`, or None for all ones.
        lower: lower-triangular ``(D', D')`` factor (:func:`key_whitening`), or None = I.

    Returns:
        ``(head_dim/2, n_kv_head)`` float64, descending along each row (zero-padded when
        D' < G).
    """
    _, weighted = _weighted_keys(w_key, b_key, n_kv_head, head_dim, weights, lower)
    sv = torch.linalg.svdvals(weighted)  # (d/2, min(G, D'))
    return torch.cat([sv, sv.new_zeros(sv.shape[0], n_kv_head - sv.shape[1])], dim=1)  # (d/2, G)


def rotary_energy(sv: torch.Tensor) -> torch.Tensor:
    """Cumulative energy over components ranked by squared singular value across frequencies.

    Args:
        sv: ``(head_dim/2, n_kv_head)`` from :func:`rotary_spectrum`.

    Returns:
        ``(head_dim/2 * n_kv_head,)`` float64, non-decreasing, ending at 1 (all ones when sv is
        zero): entry i is the energy kept by i+1 components, a key cache of 2*(i+1) reals.
    """
    return cumulative_energy(sv.flatten().sort(descending=True).values)


def key_cache_at(sv: torch.Tensor, tau: float) -> int:
    """Smallest key cache R (reals per token, even) whose components reach energy ``tau``."""
    check_tau(tau)
    return 2 * rank_at_energy(rotary_energy(sv), tau)


def original_key_cache(n_kv_head: int, head_dim: int) -> int:
    """The original key cache in reals per token and layer: G*d."""
    return _count(n_kv_head, "n_kv_head") * _count(head_dim, "head_dim")


def frequency_energy(sv: torch.Tensor) -> torch.Tensor:
    """``sv^2 / sum sv^2``: each component's share of the layer's weighted key energy, (d/2, G)."""
    power = sv.to(_F64).square()
    total = power.sum()
    return power / total if float(total) > 0 else power


@dataclass(frozen=True)
class RotaryFactors:
    """Shared rotary keys of one layer (docs/method.md).

    Component r is ``c_r(y) = beta_r . y + beta0_r`` at frequency ``freq[r]``, and
    ``k_{g,j}(y) ~= sum_{r: freq[r] = j} U_{g,r} c_r(y)``.

    Attributes:
        key: ``(R, D)`` ``[Re beta ; Im beta]``; stored as ``M.collab_key.weight``.
        key_bias: ``(R,)`` ``[Re beta0 ; Im beta0]`` or None; ``M.collab_key.bias``.
        freq: ``(R/2,)`` int64 frequency index j(r), ascending; ``M.collab_key_freq``.
        mixing: ``(G, R/2, 2)`` ``U_{g,r}`` as (real, imaginary); ``M.collab_mixing``.
        relative_error: ``||diag(w)(B - B_hat)L||_F / ||diag(w) B L||_F`` over all
            frequencies, in the fitted metric (0 for the exact layout).
        energy: kept fraction of the squared weighted singular values, ``1 - error^2``.

    Raises:
        ValueError: on inconsistent shapes or dtypes.
    """

    key: torch.Tensor  # (R, D)
    key_bias: torch.Tensor | None  # (R,)
    freq: torch.Tensor  # (R/2,)
    mixing: torch.Tensor  # (G, R/2, 2)
    relative_error: float
    energy: float

    def __post_init__(self) -> None:
        key = self.key
        if not isinstance(key, torch.Tensor) or key.ndim != 2 or key.shape[0] < 2 or key.shape[0] % 2:
            raise ValueError("RotaryFactors.key must be a 2-D tensor (R, d_model) with R even and >= 2")
        rank, half = key.shape[0], key.shape[0] // 2
        if self.key_bias is not None and (
            not isinstance(self.key_bias, torch.Tensor) or tuple(self.key_bias.shape) != (rank,)
        ):
            raise ValueError(f"RotaryFactors.key_bias must have shape ({rank},) like the key rows")
        if not isinstance(self.freq, torch.Tensor) or tuple(self.freq.shape) != (half,) or (
            self.freq.dtype != torch.int64
        ):
            raise ValueError(f"RotaryFactors.freq must be an int64 tensor of shape ({half},)")
        if bool((self.freq < 0).any()) or bool((self.freq.diff() < 0).any()):
            raise ValueError("RotaryFactors.freq must be non-negative and ascending")
        mixing = self.mixing
        if not isinstance(mixing, torch.Tensor) or mixing.ndim != 3 or tuple(mixing.shape[1:]) != (half, 2):
            raise ValueError(f"RotaryFactors.mixing must have shape (n_kv_head, {half}, 2)")
        object.__setattr__(self, "relative_error", float(self.relative_error))
        object.__setattr__(self, "energy", float(self.energy))

    @property
    def rank(self) -> int:
        """R: the key cache in reals per token."""
        return self.key.shape[0]

    @property
    def n_kv_head(self) -> int:
        return self.mixing.shape[0]

    @property
    def d_model(self) -> int:
        return self.key.shape[1]

    def beta(self) -> torch.Tensor:
        """Complex component rows ``(R/2, D)``."""
        half = self.rank // 2
        key = self.key.to(_F64)
        return torch.complex(key[:half], key[half:])  # (R/2, D)

    def beta0(self) -> torch.Tensor | None:
        """Complex component biases ``(R/2,)`` or None."""
        if self.key_bias is None:
            return None
        half = self.rank // 2
        bias = self.key_bias.to(_F64)
        return torch.complex(bias[:half], bias[half:])  # (R/2,)

    def mixing_complex(self) -> torch.Tensor:
        """``U`` as a complex ``(G, R/2)`` tensor."""
        return torch.view_as_complex(self.mixing.to(_F64).contiguous())  # (G, R/2)


def _check_rank(rank, full: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"the rotary key cache R must be an integer, got {rank!r}")
    if rank % 2 or not 2 <= rank <= full:
        raise ValueError(
            f"the rotary key cache R must be even, between 2 and G*d={full} "
            f"(reals per token and layer), got {rank}"
        )
    return rank


def _pack(beta: torch.Tensor, d_model: int, bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Complex (R/2, D') component rows -> real key (R, D) and key bias (R,) | None."""
    key = torch.cat([beta.real[:, :d_model], beta.imag[:, :d_model]]).contiguous()  # (R, D)
    if not bias:
        return key, None
    return key, torch.cat([beta.real[:, d_model], beta.imag[:, d_model]]).contiguous()  # (R,)


def _exact(w: torch.Tensor, b: torch.Tensor | None, n_kv_head: int, head_dim: int) -> RotaryFactors:
    """The original keys as R = G*d components: r = j*G + g is group g's key at frequency j."""
    half = head_dim // 2
    rows = rotary_pairs(_rows(w, b), n_kv_head, head_dim)  # (G, d/2, D')
    beta = rows.transpose(0, 1).reshape(half * n_kv_head, -1)  # (d/2*G, D'), row j*G + g
    key, key_bias = _pack(beta, w.shape[1], b is not None)
    freq = torch.arange(half).repeat_interleave(n_kv_head)  # (d/2*G,)
    eye = torch.eye(n_kv_head, dtype=_F64).repeat(1, half)  # (G, d/2*G): 1 at r = j*G + g
    mixing = torch.stack([eye, torch.zeros_like(eye)], dim=-1)  # (G, d/2*G, 2)
    return RotaryFactors(key, key_bias, freq, mixing, relative_error=0.0, energy=1.0)


def _counted(counts, rank: int, per_freq: int, n_kv_head: int, head_dim: int) -> torch.Tensor:
    """The kept slots j*k + i (i < R_j) of a fixed allocation ``counts``, checked."""
    if not isinstance(counts, torch.Tensor) or tuple(counts.shape) != (head_dim // 2,) or counts.is_floating_point():
        raise ValueError(f"counts must be an integer tensor of shape ({head_dim // 2},)")
    if bool((counts < 0).any()) or bool((counts > min(per_freq, n_kv_head)).any()) or int(counts.sum()) != rank // 2:
        raise ValueError(f"counts must be between 0 and {min(per_freq, n_kv_head)} per frequency and sum to R/2 = "
                         f"{rank // 2}, got {counts.tolist()}")
    return torch.cat([j * per_freq + torch.arange(int(c)) for j, c in enumerate(counts.tolist())])


def shared_counts(spectra: list[torch.Tensor], rank: int, layer_weights: list[float] | None = None) -> torch.Tensor:
    """One allocation R_j of ``rank/2`` components over the frequencies for several layers (the
    stock export's single frequency table): slots (j, i) ranked by their squared singular value
    summed over the layers, each layer's spectrum normalised to total 1 first
    (:func:`frequency_energy`) and multiplied by its weight: the loss it causes per unit of
    normalised energy it loses (measured: next-token KL over lost energy at its own best
    allocation), so that the table minimises the layers' summed loss rather than their energy.

    Args:
        spectra: per layer ``(head_dim/2, n_kv_head)`` from :func:`rotary_spectrum`, same shape.
        rank: R, even.
        layer_weights: one non-negative weight per layer, or None for all ones.

    Returns:
        ``(head_dim/2,)`` int64 R_j, summing to ``rank/2``.
    """
    if not spectra or any(s.shape != spectra[0].shape for s in spectra):
        raise ValueError("shared_counts needs one or more spectra of the same shape")
    half, n_kv_head = spectra[0].shape
    _check_rank(rank, half * 2 * n_kv_head)
    weights = [1.0] * len(spectra) if layer_weights is None else [float(w) for w in layer_weights]
    if len(weights) != len(spectra) or not all(math.isfinite(w) and w >= 0 for w in weights):
        raise ValueError("layer_weights must be one finite non-negative number per spectrum")
    total = sum(w * frequency_energy(s) for w, s in zip(weights, spectra))  # (d/2, G), descending along each row
    chosen = total.flatten().sort(descending=True, stable=True).indices[: rank // 2]  # (R/2,) j*G + i
    return torch.bincount(chosen // n_kv_head, minlength=half)  # (d/2,)


def rotary_factors(
    w_key: torch.Tensor,
    b_key: torch.Tensor | None,
    n_kv_head: int,
    head_dim: int,
    rank: int,
    *,
    weights: torch.Tensor | None = None,
    lower: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> RotaryFactors:
    """Shared rotary keys with a key cache of ``rank`` reals per token (docs/method.md).

    Per frequency j, the SVD ``diag(w_j) B_j L = U_j S_j V_j^H`` (B_j: rows b_{g,j}, with the
    bias column when ``b_key`` is given); the ``rank/2`` components with the largest
    squared singular values across all frequencies are kept (Eckart-Young per frequency,
    so the weighted error is the smallest for every allocation it implies). Component
    ``(j, k)`` gets ``beta = v_k^H L^{-1}`` (unit variance in the fitted metric; the phase
    makes the largest entry of v_k real positive) and mixing ``U_{g,r} = b_{g,j} L v_k``,
    the least-squares coefficients of each group's key on the kept components. Order:
    frequency ascending, then by singular value.

    At ``rank == G*d`` the exact layout is returned without any SVD: ``beta_r = b_{g,j}``
    for ``r = j*G + g``, ``U`` the identity per frequency; its key rows are W_K's rows,
    permuted, so the layer is the original one exactly.

    Args:
        w_key: ``(n_kv_head*head_dim, d_model)`` k_proj weight; b_key: ``(n_kv_head*head_dim,)``
            or None.
        n_kv_head, head_dim: G and d (even).
        rank: R, even, ``2 <= R <= G*d``.
        weights: ``(n_kv_head, head_dim/2)`` squared weights from :func:`group_weights`, or
            None for the plain (unweighted) fit.
        lower: lower-triangular ``(D', D')`` from :func:`key_whitening`, or None = I.
        counts: ``(head_dim/2,)`` integers R_j summing to ``rank/2``: keep exactly the R_j leading
            components of each frequency j (a frequency table fixed beforehand, e.g. one for all
            layers: :func:`shared_counts`), instead of ranking them across frequencies.

    Returns:
        :class:`RotaryFactors`, float64 CPU tensors; bitwise identical for the same inputs.

    Raises:
        ValueError: on inconsistent shapes, bad weights or factor, R odd or out of range.
    """
    _count(n_kv_head, "n_kv_head")
    _head_dim(head_dim)
    rank = _check_rank(rank, n_kv_head * head_dim)
    w, b = _projection(w_key, b_key, n_kv_head, head_dim, "key")
    if rank == n_kv_head * head_dim:
        return _exact(w, b, n_kv_head, head_dim)
    keys, weighted = _weighted_keys(w, b, n_kv_head, head_dim, weights, lower)  # (d/2, G, D')
    _, sv, vh = torch.linalg.svd(weighted, full_matrices=False)  # (d/2, k), (d/2, k, D')
    per_freq = sv.shape[1]
    if rank // 2 > sv.numel():
        raise ValueError(f"R={rank} needs {rank // 2} components; d_model allows only {sv.numel()}")
    power = sv.square().flatten()  # (d/2*k,), index j*k + i
    order = power.sort(descending=True, stable=True).indices[: rank // 2] if counts is None else \
        _counted(counts, rank, per_freq, n_kv_head, head_dim)
    chosen = order.sort().values  # (R/2,) frequency ascending, then by singular value
    freq = chosen // per_freq  # (R/2,)
    v = vh.flatten(0, 1)[chosen].conj()  # (R/2, D') the kept right singular vectors v_k
    pivot = v.gather(1, v.abs().argmax(dim=1, keepdim=True))  # (R/2, 1)
    v = v * (pivot.conj() / pivot.abs())  # fixed phase: the largest entry real positive
    mixing = torch.einsum("rgd,rd->gr", keys[freq], v)  # (G, R/2) U = B_j L v
    beta = v.conj()  # (R/2, D') v^H, whitened
    if lower is not None:
        factor = lower.detach().to(_CPU, _F64).to(_C128)  # (D', D')
        beta = torch.linalg.solve_triangular(factor.mT, beta.mT, upper=True).mT  # v^H L^{-1}
    total = float(power.sum())
    kept = float(power[chosen].sum())
    energy = min(kept / total, 1.0) if total > 0 else 1.0
    key, key_bias = _pack(beta, w.shape[1], b is not None)
    return RotaryFactors(
        key=key,
        key_bias=key_bias,
        freq=freq,
        mixing=torch.view_as_real(mixing).contiguous(),  # (G, R/2, 2)
        relative_error=math.sqrt(max(1.0 - energy, 0.0)),
        energy=energy,
    )


# --------------------------------------------------------------------------- reference scores


def _inputs(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 3:
        raise ValueError(f"{name} must be a 3-D tensor (batch, tokens, d_model)")
    return x.detach().to(_CPU, _F64)


def _positions(p, name: str, tokens: int) -> torch.Tensor:
    """Integer or float positions (tokens,) as float64."""
    if isinstance(p, torch.Tensor) and not p.is_floating_point() and not p.is_complex():
        p = p.to(_F64)
    return _floats(p, name, (tokens,))


def _project(x, w, b, n: int, head_dim: int) -> torch.Tensor:
    """Complex per-head projections (B, N, n, d/2) of inputs (B, N, D)."""
    rows = rotary_pairs(w, n, head_dim)  # (n, d/2, D)
    out = torch.einsum("bnd,hjd->bnhj", x.to(_C128), rows)  # (B, N, n, d/2)
    return out if b is None else out + rotary_pairs(b, n, head_dim)


def rotation(positions: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """e^{i p theta}: complex (..., n) for integer positions (...) and frequencies (n,)."""
    phase = positions[..., None] * angle  # (..., n)
    return torch.polar(torch.ones_like(phase), phase)


def key_projection(factors: RotaryFactors, head_dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The k_proj weight ``(G*d, D)`` and bias ``(G*d,)`` or None whose keys are the shared
    keys' ``sum_{r: j(r)=j} U_{g,r} c_r(y)`` (rotate_half layout, float64).

    The rotation is one complex scalar per frequency, so a model whose k_proj holds these
    weights computes exactly the compressed layer's scores; at the exact layout (R = G*d)
    they are the source's k_proj, up to rounding.
    """
    half = _head_dim(head_dim) // 2
    _check_freq(factors, half)
    beta = factors.beta() if factors.key_bias is None else torch.cat([factors.beta(), factors.beta0()[:, None]], 1)
    parts = factors.mixing_complex()[:, :, None] * beta  # (G, R/2, D')
    keys = parts.new_zeros(factors.n_kv_head, half, beta.shape[1]).index_add_(1, factors.freq, parts)  # (G, d/2, D')
    rows = torch.cat([keys.real, keys.imag], dim=1).reshape(factors.n_kv_head * head_dim, -1)  # (G*d, D')
    d_model = factors.d_model
    return rows[:, :d_model].contiguous(), (rows[:, d_model].contiguous() if factors.key_bias is not None else None)


def original_rotary_keys(
    w_key: torch.Tensor, b_key: torch.Tensor | None, n_kv_head: int, head_dim: int, y: torch.Tensor
) -> torch.Tensor:
    """The source layer's complex keys ``k_{g,j}(y)`` before rotation, ``(B, N, G, d/2)``."""
    return _project(_inputs(y, "y"), w_key, b_key, n_kv_head, head_dim)


def _check_freq(factors: RotaryFactors, half: int) -> None:
    top = int(factors.freq.max())
    if top >= half:
        raise ValueError(f"the factors use frequency index {top}, past head_dim/2={half}")


def _components(factors: RotaryFactors, y: torch.Tensor) -> torch.Tensor:
    """c_r(y), complex (B, N, R/2)."""
    y = _inputs(y, "y")
    if y.shape[-1] != factors.d_model:
        raise ValueError(f"y has width {y.shape[-1]}; the factors expect d_model={factors.d_model}")
    c = y.to(_C128) @ factors.beta().mT  # (B, N, R/2)
    beta0 = factors.beta0()
    return c if beta0 is None else c + beta0


def rotary_keys(factors: RotaryFactors, y: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The compressed layer's complex keys ``sum_{r: j(r)=j} U_{g,r} c_r(y)``, ``(B, N, G, d/2)``."""
    half = _head_dim(head_dim) // 2
    _check_freq(factors, half)
    c = _components(factors, y)  # (B, N, R/2)
    parts = c[:, :, None, :] * factors.mixing_complex()  # (B, N, G, R/2)
    keys = parts.new_zeros(*parts.shape[:3], half)  # (B, N, G, d/2)
    return keys.index_add_(-1, factors.freq, parts)


def rotary_scores(
    x: torch.Tensor,
    y: torch.Tensor,
    w_query: torch.Tensor,
    b_query: torch.Tensor | None,
    factors: RotaryFactors | None,
    *,
    n_head: int,
    head_dim: int,
    theta: torch.Tensor,
    positions: torch.Tensor,
    key_positions: torch.Tensor | None = None,
    w_key: torch.Tensor | None = None,
    b_key: torch.Tensor | None = None,
    n_kv_head: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference attention scores (before the softmax and mask) of a rotary layer, float64.

    With ``factors=None``, the original layer (``w_key``, ``b_key``, ``n_kv_head`` needed)::

        scale * Re sum_j q_{h,j}(x_t) e^{i t theta_j} conj(k_{g(h),j}(y_s) e^{i s theta_j})

    With factors, docs/method.md's runtime: ``q'_{h,r} = q_{h,j(r)} conj(U_{g(h),r})`` and
    ``scale * Re sum_r (q'_{h,r} e^{i t theta_j(r)}) conj(c_r(y_s) e^{i s theta_j(r)})``.

    Args:
        x: ``(B, T, D)`` query-side inputs; y: ``(B, S, D)`` key-side inputs.
        w_query, b_query: q_proj weight ``(n_head*head_dim, D)`` and bias or None.
        factors: :class:`RotaryFactors` or None for the original keys.
        n_head, head_dim: H, d.
        theta: ``(head_dim/2,)`` frequencies (transformers' ``inv_freq``). A rope
            ``attention_scaling`` a multiplies the scores by a^2: pass it in ``scale``.
        positions: ``(T,)`` query positions; key_positions: ``(S,)``, default ``positions``.
        scale: default ``1/sqrt(head_dim)``.

    Returns:
        ``(B, n_head, T, S)`` float64.
    """
    _count(n_head, "n_head")
    half = _head_dim(head_dim) // 2
    x, y = _inputs(x, "x"), _inputs(y, "y")
    theta = _floats(theta, "theta", (half,))
    key_positions = positions if key_positions is None else key_positions
    t = _positions(positions, "positions", x.shape[1])  # (T,)
    s = _positions(key_positions, "key_positions", y.shape[1])  # (S,)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    q = _project(x, w_query, b_query, n_head, head_dim)  # (B, T, H, d/2)
    if factors is None:
        if n_kv_head is None or w_key is None:
            raise ValueError("the original scores need w_key and n_kv_head")
        groups = head_groups(n_head, n_kv_head)  # (H,) g(h)
        k = original_rotary_keys(w_key, b_key, n_kv_head, head_dim, y)[:, :, groups]  # (B, S, H, d/2)
        q_rot = q * rotation(t, theta)[:, None]  # (B, T, H, d/2)
        k_rot = k * rotation(s, theta)[:, None]  # (B, S, H, d/2)
        return scale * torch.einsum("bthj,bshj->bhts", q_rot, k_rot.conj()).real  # (B, H, T, S)
    groups = head_groups(n_head, factors.n_kv_head)  # (H,) g(h)
    _check_freq(factors, half)
    angle = theta[factors.freq]  # (R/2,)
    q_mixed = q[..., factors.freq] * factors.mixing_complex()[groups].conj()  # (B, T, H, R/2) q'
    q_rot = q_mixed * rotation(t, angle)[:, None]  # (B, T, H, R/2)
    c_rot = _components(factors, y) * rotation(s, angle)  # (B, S, R/2)
    return scale * torch.einsum("bthr,bsr->bhts", q_rot, c_rot.conj()).real  # (B, H, T, S)
