"""Shared values: a value latent shared by all heads of a layer (docs/method.md, "Shared values").

Per layer, the G value heads v_g(y) = W_V,g y + b_g are replaced by one latent
c(y) = A y + a of r_v reals per token (what a value cache then holds) and one up-projection
per group, v_g ~= B_g c. Head h's output is B_g(h) sum_s p_hs c(y_s): the latent is weighted
by the attention, then lifted, so no value is rebuilt per cached token.

The fit is one SVD of the augmented value rows W' = [W_V, b] (G*d x D'), weighted on the
output side by each group's output projection (K_g = sum_{h in g} W_O,h^T W_O,h) and
whitened on the input side by the second moment of what the latent feeds into the output:
the attention-weighted inputs z_h = sum_s p_hs [y_s; 1], summed over heads. It minimises
sum_h E||W_O,h (W'_g - B_g A') z_h||^2 with one moment for all groups. Exact at
r_v = G*d. No file I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cp import whitening_factor
from .spectra import cumulative_energy, rank_at_energy

__all__ = ["ValueFactors", "output_weights", "value_factors", "value_spectrum", "value_rank_at",
           "value_moment"]


@dataclass(frozen=True)
class ValueFactors:
    """A fitted value latent.

    Attributes:
        down: A (r_v, D), the latent's projection; ``down_bias``: a (r_v,) or ``None``.
        up: B (G*d, r_v), rows of group g are B_g.
        relative_error: the fit's error in its own metric (weighted, whitened when calibrated).
        energy: the share of the weighted value energy kept.
    """

    down: torch.Tensor
    down_bias: torch.Tensor | None
    up: torch.Tensor
    relative_error: float
    energy: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def output_weights(w_output: torch.Tensor, n_head: int, n_kv_head: int, head_dim: int) -> torch.Tensor:
    """Per value group the d x d square root of K_g = sum_{h in g} W_O,h^T W_O,h (G, d, d).

    ``w_output`` is the output projection (D_out, H*d) in nn.Linear layout; W_O,h are its
    columns of head h. ||W_O,h u||^2 summed over a group's heads is ||K_g^{1/2} u||^2.
    """
    per_group = n_head // n_kv_head
    blocks = w_output.double().reshape(w_output.shape[0], n_kv_head, per_group, head_dim)  # (D_out, G, H/G, d)
    gram = torch.einsum("ogpi,ogpj->gij", blocks, blocks)  # (G, d, d)
    vals, vecs = torch.linalg.eigh(gram)
    return (vecs * vals.clamp_min(0).sqrt()[:, None, :]) @ vecs.transpose(-1, -2)


def value_moment(second: torch.Tensor, mean: torch.Tensor, n_head: int, bias: bool) -> torch.Tensor:
    """The moment the value fit whitens by (D, D): E[sum_h z_h z_h^T] over the heads, augmented
    with E[sum_h z_h] and the head count (each z_h carries a 1 for the bias: attention weights
    sum to 1) when the values have a bias.

    Args:
        second: (D, D) the sum over the heads of E[z_h z_h^T]; mean: (D,) the sum of E[z_h].
    """
    s, m = second.double(), mean.double()
    if not bias:
        return s
    d = s.shape[0]
    out = s.new_empty(d + 1, d + 1)
    out[:d, :d], out[:d, d], out[d, :d], out[d, d] = s, m, m, float(n_head)
    return out


def _weighted_rows(w_value, b_value, out_weights, n_kv_head, head_dim) -> torch.Tensor:
    """diag(K_g^{1/2}) W' (G*d, D')."""
    rows = w_value.double() if b_value is None else torch.cat([w_value.double(), b_value.double()[:, None]], 1)
    if out_weights is None:
        return rows
    per = rows.reshape(n_kv_head, head_dim, -1)
    return torch.bmm(out_weights.double(), per).reshape(n_kv_head * head_dim, -1)


def value_spectrum(w_value: torch.Tensor, b_value: torch.Tensor | None, out_weights: torch.Tensor | None,
                   n_kv_head: int, head_dim: int, moment: torch.Tensor | None = None) -> torch.Tensor:
    """The singular values (descending, G*d of them at most) the value fit truncates: of
    diag(K_g^{1/2}) W' L (L: whitening factor of ``moment``, the identity without it). Without
    a moment and bias this is the spectrum of the concatenated W_O,h W_V,h."""
    x = _weighted_rows(w_value, b_value, out_weights, n_kv_head, head_dim)
    if moment is not None:
        x = x @ whitening_factor(moment)
    return torch.linalg.svdvals(x)


def value_rank_at(sv: torch.Tensor, tau: float) -> int:
    """The smallest r_v whose latent keeps ``tau`` of the energy of the singular values ``sv``."""
    return rank_at_energy(cumulative_energy(sv), tau)


def value_factors(w_value: torch.Tensor, b_value: torch.Tensor | None, rank: int, *,
                  out_weights: torch.Tensor | None = None, n_kv_head: int = 1, head_dim: int | None = None,
                  moment: torch.Tensor | None = None) -> ValueFactors:
    """The rank-``rank`` value latent (see the module doc).

    Args:
        w_value: (G*d, D) value weight (nn.Linear layout); b_value: (G*d,) or ``None``.
        rank: r_v, 1 <= r_v <= G*d.
        out_weights: (G, d, d) from :func:`output_weights`, or ``None`` (unweighted).
        n_kv_head, head_dim: G and d (needed with ``out_weights``).
        moment: (D', D') from :func:`value_moment` (D' = D + 1 with a bias), or ``None`` (the identity).

    Raises:
        ValueError: a rank out of range or inputs that do not fit together.
    """
    full = w_value.shape[0]
    if not 1 <= rank <= full:
        raise ValueError(f"value rank {rank} must be between 1 and {full}")
    head_dim = head_dim or full // n_kv_head
    if n_kv_head * head_dim != full:
        raise ValueError(f"{full} value rows are not {n_kv_head} groups of {head_dim}")
    x = _weighted_rows(w_value, b_value, out_weights, n_kv_head, head_dim)  # (G*d, D')
    lower = whitening_factor(moment) if moment is not None else None
    if lower is not None:
        if lower.shape[0] != x.shape[1]:
            raise ValueError(f"a moment of width {lower.shape[0]} for value rows of width {x.shape[1]}")
        x = x @ lower
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    if rank > s.numel():  # wider than the input (G*d > D'): the extra components are zeros, exact already
        extra = rank - s.numel()
        u, s = torch.cat([u, u.new_zeros(u.shape[0], extra)], 1), torch.cat([s, s.new_zeros(extra)])
        vh = torch.cat([vh, vh.new_zeros(extra, vh.shape[1])])
    down = vh[:rank]  # (r, D') in whitened coordinates
    if lower is not None:  # A' L = V_r^T  ->  A' = V_r^T L^{-1}
        down = torch.linalg.solve_triangular(lower, down, upper=False, left=False)
    # B = W' A'^+ restricted: in weighted coordinates U_r S_r; undo the output weighting per group
    up = u[:, :rank] * s[:rank]
    if out_weights is not None:
        per = up.reshape(n_kv_head, head_dim, rank)
        up = torch.linalg.lstsq(out_weights.double(), per).solution.reshape(full, rank)
    energy = s.square()
    total = float(energy.sum())
    kept = float(energy[:rank].sum()) / total if total > 0 else 1.0
    error = max(0.0, 1.0 - kept) ** 0.5
    bias = down[:, -1].contiguous() if b_value is not None else None
    down = down[:, :-1].contiguous() if b_value is not None else down.contiguous()
    return ValueFactors(down, bias, up.contiguous(), error, kept)
