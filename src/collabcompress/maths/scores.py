"""Attention score formulas: the original heads', the collaborative ones, and the KL between them.

Tensors in, tensors out: ``verify`` and the tests compare the two on the same inputs.
"""

from __future__ import annotations

import torch

__all__ = ["original_scores", "collaborative_scores", "attention_kl", "group_size", "head_groups"]


def group_size(n_head: int, n_kv_head: int) -> int:
    """H/G, the heads of a key/value group."""
    if n_kv_head < 1 or n_head % n_kv_head:
        raise ValueError(f"n_head={n_head} is not a multiple of n_kv_head={n_kv_head}")
    return n_head // n_kv_head


def head_groups(n_head: int, n_kv_head: int) -> torch.Tensor:
    """g(h), the key/value group of every head (H,) int64: consecutive heads share a group."""
    return torch.arange(n_head) // group_size(n_head, n_kv_head)


def original_scores(x: torch.Tensor, y: torch.Tensor, w_query: torch.Tensor, w_key: torch.Tensor,
                    b_query: torch.Tensor | None, b_key: torch.Tensor | None, n_head: int,
                    scale: float) -> torch.Tensor:
    """s * (W_Q^h x + b_Q^h) . (W_K^h y + b_K^h) for every head: (B, N, D) -> (B, H, N, M)."""
    q = x @ w_query.T + (b_query if b_query is not None else 0.0)  # (B, N, H*d)
    k = y @ w_key.T + (b_key if b_key is not None else 0.0)  # (B, M, H*d)
    q = q.unflatten(-1, (n_head, -1)).transpose(1, 2)  # (B, H, N, d)
    k = k.unflatten(-1, (n_head, -1)).transpose(1, 2)  # (B, H, M, d)
    return scale * q @ k.transpose(-1, -2)  # (B, H, N, M)


def collaborative_scores(x: torch.Tensor, y: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                         mixing: torch.Tensor, content_bias: torch.Tensor, scale: float) -> torch.Tensor:
    """s * [(U^T x) . (m_h * (V^T y)) + c_h . y]: (B, N, D) -> (B, H, N, M).

    ``query`` = U^T (R, D), ``key`` = V^T (R, D), ``mixing`` = M (H, R), ``content_bias`` (H, D).
    """
    qx = x @ query.T  # (B, N, R)
    ky = y @ key.T  # (B, M, R)
    mixed = qx.unsqueeze(1) * mixing[None, :, None, :]  # (B, H, N, R)
    bilinear = mixed @ ky.unsqueeze(1).transpose(-1, -2)  # (B, H, N, M)
    content = (y @ content_bias.T).transpose(1, 2).unsqueeze(2)  # (B, H, 1, M)
    return scale * (bilinear + content)


def attention_kl(scores_p: torch.Tensor, scores_q: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) || softmax(q)) along the last axis, one value per query row."""
    log_p = torch.log_softmax(scores_p, dim=-1)
    log_q = torch.log_softmax(scores_q, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).clamp(min=0.0)
