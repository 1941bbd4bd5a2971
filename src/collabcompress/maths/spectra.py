"""Spectral redundancy of attention heads (docs/method.md), pure tensors in and out.

The singular values of the concatenated products P_Q = [P_1 ... P_H] (D x H*D) and
P_K = [P_1^T ... P_H^T] come from the D x D Gram matrices
G_Q = sum_h W_Q^h^T (W_K^h W_K^h^T) W_Q^h and G_K = sum_h W_K^h^T (W_Q^h W_Q^h^T) W_K^h;
P_Q and P_K are never formed. Reference: Cordonnier, Loukas, Jaggi, arXiv 2006.16362.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..defaults import DEFAULT_MULTIPLE_OF

__all__ = ["LayerSpectrum", "layer_spectrum", "gram_matrices", "rank_for_energy", "choose_rank", "check_tau",
           "cumulative_energy", "rank_at_energy"]


def _heads(w: torch.Tensor, n_head: int) -> torch.Tensor:
    width, d_model = w.shape
    if width % n_head:
        raise ValueError(f"n_head={n_head} does not divide the width {width}")
    return w.reshape(n_head, width // n_head, d_model)  # (H, d, D)


def gram_matrices(w_query: torch.Tensor, w_key: torch.Tensor, n_head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Query- and key-side Gram matrices G_Q = P_Q P_Q^T and G_K = P_K P_K^T.

    Args:
        w_query, w_key: (H*d, D) projections in nn.Linear layout.
        n_head: H.

    Returns:
        (G_Q, G_K), each (D, D), symmetric positive semi-definite, in the input dtype.
    """
    q = _heads(w_query, n_head)  # (H, d, D)
    k = _heads(w_key, n_head)  # (H, d, D)
    kk = k @ k.transpose(1, 2)  # (H, d, d)
    qq = q @ q.transpose(1, 2)  # (H, d, d)
    g_q = w_query.T @ (kk @ q).reshape_as(w_query)  # (D, D)
    g_k = w_key.T @ (qq @ k).reshape_as(w_key)  # (D, D)
    return (g_q + g_q.T) / 2, (g_k + g_k.T) / 2


def cumulative_energy(sv: torch.Tensor) -> torch.Tensor:
    power = sv.double() ** 2
    total = power.sum()
    if total <= 0:
        return torch.ones_like(power)
    return (power.cumsum(0) / total).clamp(max=1.0)


def rank_at_energy(energy: torch.Tensor, tau: float) -> int:
    # A tiny slack so that 1.0 - 1e-16 counts as reaching tau = 1.
    return int(torch.searchsorted(energy, torch.tensor(tau - 1e-12, dtype=energy.dtype)).item()) + 1


@dataclass(frozen=True)
class LayerSpectrum:
    """Singular values of one layer's concatenated query-key products.

    Attributes:
        n_head, head_dim, d_model: H, d, D.
        sv_query, sv_key: (H*d,) singular values of P_Q and P_K, descending (zero-padded
            past min(D, H*d)).
        sv_head: (H, d) singular values of each P_h.
    """

    n_head: int
    head_dim: int
    d_model: int
    sv_query: torch.Tensor
    sv_key: torch.Tensor
    sv_head: torch.Tensor

    def __post_init__(self) -> None:
        width = self.n_head * self.head_dim
        if self.sv_query.shape != (width,) or self.sv_key.shape != (width,):
            raise ValueError(f"spectra must have length H*d={width}")
        if self.sv_head.shape != (self.n_head, self.head_dim):
            raise ValueError(f"sv_head must be ({self.n_head}, {self.head_dim})")

    @property
    def width(self) -> int:
        return self.n_head * self.head_dim

    @property
    def energy_query(self) -> torch.Tensor:
        """(H*d,) cumulative energy of P_Q: energy(r) = sum_{i<=r} sigma_i^2 / sum sigma^2."""
        return cumulative_energy(self.sv_query)

    @property
    def energy_key(self) -> torch.Tensor:
        return cumulative_energy(self.sv_key)

    def rank_at_sides(self, tau: float) -> tuple[int, int]:
        """Smallest r with energy(r) >= tau on the query and key sides."""
        check_tau(tau)
        return rank_at_energy(self.energy_query, tau), rank_at_energy(self.energy_key, tau)

    def rank_at(self, tau: float) -> int:
        """Shared rank needed at ``tau``: the max of the two sides."""
        return max(self.rank_at_sides(tau))

    def redundancy(self, tau: float) -> float:
        """1 - rank_at(tau) / (H*d)."""
        return 1.0 - self.rank_at(tau) / self.width

    def head_effective_rank(self, tau: float) -> list[int]:
        """Per head, the smallest r with energy(r) >= tau of P_h (<= d)."""
        check_tau(tau)
        return [rank_at_energy(cumulative_energy(s), tau) for s in self.sv_head]


def check_tau(tau: float) -> None:
    if not (0.0 < tau <= 1.0) or math.isnan(tau):
        raise ValueError(f"energy threshold must be in (0, 1], got {tau}")


def layer_spectrum(w_query: torch.Tensor, w_key: torch.Tensor, n_head: int) -> LayerSpectrum:
    """Spectral analysis of one attention layer.

    Args:
        w_query, w_key: (H*d, D) projections (nn.Linear layout); computed in float64.
        n_head: H.

    Returns:
        A :class:`LayerSpectrum`.
    """
    w_query, w_key = w_query.double(), w_key.double()
    width, d_model = w_query.shape
    if w_key.shape != w_query.shape:
        raise ValueError(f"query {tuple(w_query.shape)} and key {tuple(w_key.shape)} shapes differ")
    head_dim = width // n_head
    g_q, g_k = gram_matrices(w_query, w_key, n_head)
    sides = []
    for g in (g_q, g_k):
        ev = torch.linalg.eigvalsh(g).flip(0).clamp(min=0.0)  # (D,) descending
        sv = ev.sqrt()[: min(d_model, width)]
        sides.append(torch.cat([sv, sv.new_zeros(width - sv.numel())]))
    # Per head: P_h = W_Q^h^T W_K^h = Qa Ra Rb^T Qb^T, so its spectrum is that of Ra Rb^T (d x d).
    q = _heads(w_query, n_head).transpose(1, 2)  # (H, D, d)
    k = _heads(w_key, n_head).transpose(1, 2)  # (H, D, d)
    r_q = torch.linalg.qr(q, mode="r")[1]  # (H, d, d) when D >= d
    r_k = torch.linalg.qr(k, mode="r")[1]
    sv_head = torch.linalg.svdvals(r_q @ r_k.transpose(1, 2))  # (H, min(D, d))
    if sv_head.shape[1] < head_dim:
        sv_head = torch.cat([sv_head, sv_head.new_zeros(n_head, head_dim - sv_head.shape[1])], dim=1)
    return LayerSpectrum(n_head, head_dim, d_model, sides[0], sides[1], sv_head)


def rank_for_energy(spectrum: LayerSpectrum, tau: float, *, min_rank: int = 1, max_rank: int | None = None,
                    multiple_of: int = DEFAULT_MULTIPLE_OF) -> int:
    """Shared width for ``--energy tau`` (docs/method.md, rank choice).

    rank_at(tau), then at least ``min_rank``, rounded up to a multiple of ``multiple_of``,
    at most ``max_rank`` and H*d.
    """
    return choose_rank(spectrum.rank_at(tau), spectrum.width, min_rank=min_rank, max_rank=max_rank,
                       multiple_of=multiple_of)


def choose_rank(needed: int, width: int, *, min_rank: int = 1, max_rank: int | None = None,
                multiple_of: int = DEFAULT_MULTIPLE_OF) -> int:
    """Apply the rank-choice rules of docs/method.md to a needed rank."""
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
    r = max(needed, min_rank)
    r = -(-r // multiple_of) * multiple_of
    if max_rank is not None:
        r = min(r, max_rank)
    return max(1, min(r, width))


def head_output_energy(w_value: torch.Tensor, w_output: torch.Tensor, n_head: int,
                       lower: torch.Tensor | None = None) -> torch.Tensor:
    """Expected output energy of each head, normalised to mean 1.

    e_h = ||W_O^h W_V^h L||_F^2 with W_O^h the head's column block of the output projection
    and L a factor of the input second moment (identity when None): a logit error in a
    head whose values barely reach the output matters little, so the calibrated
    decomposition weights head h's slice by e_h.

    Args:
        w_value: (H*d_v, D); w_output: (D_out, H*d_v); lower: (D, D) or None.

    Returns:
        (H,) float64, mean 1 (all ones when every head is silent).
    """
    w_value, w_output = w_value.double(), w_output.double()
    v = _heads(w_value, n_head)  # (H, d_v, D)
    o = w_output.T.reshape(n_head, -1, w_output.shape[0])  # (H, d_v, D_out)
    if lower is not None:
        v = v @ lower.double()  # (H, d_v, D)
    # ||O_h^T V_h L||^2 = tr((O_h O_h^T)(V_h L L^T V_h^T))
    energy = ((o @ o.transpose(1, 2)) * (v @ v.transpose(1, 2))).sum((1, 2))  # (H,)
    mean = energy.mean()
    return energy / mean if mean > 0 else torch.ones_like(energy)
