"""Shared values at run time (docs/method.md, "Shared values"): one latent per token for all heads.

A layer with shared values holds ``collab_value`` (D -> r_v, the latent c = A y + a, what its
value cache holds: r_v reals per token) and ``collab_value_up`` (r_v -> G*d, the up-projection
B of each value group, no bias). Attention weights the latent (one value head for all query
heads); :func:`lift_values` then maps each head's weighted latent to its width d, before the
output projection. No value is rebuilt per cached token.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["absorbed_output", "add_value_parameters", "has_shared_values", "lift_values"]


def has_shared_values(module: nn.Module) -> bool:
    return "collab_value_up" in module._modules


def add_value_parameters(module: nn.Module, value_attr: str, d_model: int, value_rank: int, rows: int, *,
                         bias: bool, device: torch.device, dtype: torch.dtype) -> None:
    """Replace ``module``'s value projection ``value_attr`` by the shared-value latent and its
    up-projection, uninitialised: load them from the directory."""
    module._modules.pop(value_attr, None)
    module.collab_value = nn.Linear(d_model, value_rank, bias=bias, device=device, dtype=dtype)
    module.collab_value_up = nn.Linear(value_rank, rows, bias=False, device=device, dtype=dtype)


def lift_values(out: torch.Tensor, up: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Each head's weighted latent (B, N, H, r_v) to its value width: (B, N, H, d), head h through
    the up-projection of its group g(h) = h // (H/G); ``up`` (G*d, r_v) holds B_g in rows
    g*d .. (g+1)*d - 1."""
    batch, n, heads, rank = out.shape
    groups = up.shape[0] // head_dim
    per_group = out.reshape(batch, n, groups, heads // groups, rank)
    lifted = torch.einsum("bngpr,gdr->bngpd", per_group, up.view(groups, head_dim, rank).to(out.dtype))
    return lifted.reshape(batch, n, heads, head_dim)


def absorbed_output(up: torch.Tensor, output: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The output projection with each head's lift absorbed: (D, H*r_v), head h's block W_O,h B_g(h),
    from ``up`` (G*d, r_v) and the output weight ``output`` (D, H*d)."""
    rows, rank = up.shape
    groups, heads = rows // head_dim, output.shape[1] // head_dim
    per_head = output.view(output.shape[0], groups, heads // groups, head_dim)  # (D, G, H/G, d)
    return torch.einsum("ogpd,gdr->ogpr", per_head, up.view(groups, head_dim, rank)).reshape(output.shape[0], -1)
