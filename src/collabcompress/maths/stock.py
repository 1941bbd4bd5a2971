"""The stock (multi-query) form of a layer with shared rotary keys and shared values (docs/export.md).

A rotary layer whose shared keys have width R and whose value latent has width r_v = R is
exactly a multi-query attention layer of head size R (one key/value head):

- ``k_proj`` = the shared key rows ``[Re beta ; Im beta]`` (R x D), already laid out half-split
  as transformers' ``rotate_half`` pairs dimension r with r + R/2;
- ``q_proj`` = each head's mixed query ``q'_{h,r} = a_{h,j(r)} conj(U_{g(h),r})`` (H*R x D): Re in
  row r and Im in row r + R/2 of head h's block, times ``scale * sqrt(R)`` so that the stock
  scale ``R^-1/2`` gives the layer's own scale (``d^-1/2`` times the rope attention scaling
  squared: the stock rope is written with attention factor 1);
- ``v_proj`` = the latent A (R x D), ``o_proj`` = ``[W_O,h B_{g(h)}]`` (D x H*R);
- each pair r turns at theta_{j(r)}: a ``longrope`` factor per pair,
  ``factor_r = base^(-2r/R) / theta_{j(r)}`` (transformers and vLLM compute
  ``inv_freq_r = 1 / (factor_r * base^(2r/R))``).

Pure tensors in and out, float64. Shapes: H = ``n_head``, G = ``n_kv_head``, d = ``head_dim``,
D = ``d_model``, R = ``shared_dim``.
"""

from __future__ import annotations

import math

import torch

from .rotary import rotary_pairs
from .scores import head_groups

__all__ = ["longrope_factors", "stock_output", "stock_query"]

_F64 = torch.float64


def stock_query(w_query: torch.Tensor, b_query: torch.Tensor | None, freq: torch.Tensor, mixing: torch.Tensor,
                n_head: int, head_dim: int, scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The stock ``q_proj`` of a layer with shared rotary keys.

    Args:
        w_query: ``(n_head*head_dim, d_model)`` the unchanged q_proj weight; b_query: its bias or None.
        freq: ``(R/2,)`` int64 j(r) (``M.collab_key_freq``).
        mixing: ``(G, R/2, 2)`` U as (real, imaginary) (``M.collab_mixing``).
        n_head, head_dim: H, d.
        scale: the layer's score scale (``d^-1/2`` times the rope attention scaling squared).

    Returns:
        float64 weight ``(n_head*R, d_model)`` and bias ``(n_head*R,)`` or None; the stock layer
        multiplies its scores by ``R^-1/2``, so the rows carry ``scale * sqrt(R)``.
    """
    half = freq.shape[0]
    if mixing.ndim != 3 or tuple(mixing.shape[1:]) != (half, 2):
        raise ValueError(f"mixing must have shape (n_kv_head, {half}, 2), got {tuple(mixing.shape)}")
    if half and int(freq.max()) >= head_dim // 2:
        raise ValueError(f"frequency index {int(freq.max())} is past head_dim/2 = {head_dim // 2}")
    groups = head_groups(n_head, mixing.shape[0])
    u = torch.view_as_complex(mixing.to(_F64).contiguous())[groups].conj()  # (H, R/2) conj U_{g(h),r}
    factor = scale * math.sqrt(2 * half)

    def fold(rows: torch.Tensor) -> torch.Tensor:
        mixed = rows[:, freq] * (u if rows.ndim == 2 else u[..., None])  # (H, R/2[, D]) q'_{h,r}
        return factor * torch.cat([mixed.real, mixed.imag], dim=1).flatten(0, 1)  # (H*R[, D])

    weight = fold(rotary_pairs(w_query, n_head, head_dim))  # (H*R, D)
    return weight, None if b_query is None else fold(rotary_pairs(b_query, n_head, head_dim))  # (H*R,)


def stock_output(w_out: torch.Tensor, up: torch.Tensor, n_head: int, head_dim: int) -> torch.Tensor:
    """The stock ``o_proj`` weight ``[W_O,h B_{g(h)}]``.

    Args:
        w_out: ``(d_model, n_head*head_dim)`` the o_proj weight.
        up: ``(G*head_dim, r_v)`` the value up-projection B (``M.collab_value_up.weight``; rows
            ``g*d .. (g+1)*d - 1`` are B_g).
        n_head, head_dim: H, d.

    Returns:
        float64 ``(d_model, n_head*r_v)``.
    """
    d_model = w_out.shape[0]
    if tuple(w_out.shape) != (d_model, n_head * head_dim) or up.ndim != 2 or up.shape[0] % head_dim:
        raise ValueError(f"o_proj {tuple(w_out.shape)} and up-projection {tuple(up.shape)} do not fit "
                         f"{n_head} heads of width {head_dim}")
    groups = head_groups(n_head, up.shape[0] // head_dim)
    heads = w_out.to(_F64).view(d_model, n_head, head_dim).transpose(0, 1)  # (H, D, d)
    per_group = up.to(_F64).view(-1, head_dim, up.shape[1])[groups]  # (H, d, r_v)
    return (heads @ per_group).transpose(0, 1).reshape(d_model, -1)  # (D, H*r_v)


def longrope_factors(theta: torch.Tensor, freq: torch.Tensor, base: float) -> list[float]:
    """Per-pair ``longrope`` factors giving pair r the frequency ``theta[freq[r]]`` in a head of
    size R = 2 * len(freq): ``base^(-2r/R) / theta_{j(r)}``.

    Args:
        theta: ``(head_dim/2,)`` the source's frequencies (transformers' ``inv_freq``).
        freq: ``(R/2,)`` j(r).
        base: the rope base (``rope_theta``).
    """
    half = freq.shape[0]
    stock = float(base) ** (-torch.arange(half, dtype=_F64) * 2 / (2 * half))  # (R/2,) base^(-2r/R)
    return (stock / theta.to(_F64)[freq]).tolist()
