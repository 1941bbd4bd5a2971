"""Refine collaborative factors to match the original attention distributions on real inputs.

After the (whitened) CP decomposition, U, V and M of one layer are tuned with a small,
seeded Adam loop to minimise KL(p_original || p_collaborative) of the attention
distributions on kept calibration sequences (SPEC.md section 2 scores; the content bias
stays exact). Pure tensors in and out; deterministic on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RefineResult", "refine_factors"]


@dataclass(frozen=True)
class RefineResult:
    """Refined factors and the mean KL on the refinement inputs before and after."""

    query: torch.Tensor  # (R, D)
    key: torch.Tensor  # (R, D)
    mixing: torch.Tensor  # (H, R)
    kl_before: float
    kl_after: float
    steps: int


def _original_logits(x, w_query, w_key, b_query, b_key, n_head, scale):
    q = x @ w_query.T + (b_query if b_query is not None else 0.0)  # (B, T, H*d)
    k = x @ w_key.T + (b_key if b_key is not None else 0.0)
    q = q.unflatten(-1, (n_head, -1)).transpose(1, 2)  # (B, H, T, d)
    k = k.unflatten(-1, (n_head, -1)).transpose(1, 2)
    return scale * q @ k.transpose(-1, -2)  # (B, H, T, T)


def _collab_logits(xq, x, query, key, mixing, content_bias, scale):
    qx = (xq @ query.T).unsqueeze(1) * mixing[None, :, None, :]  # (B, H, Tq, R)
    kx = (x @ key.T).unsqueeze(1)  # (B, 1, T, R)
    content = (x @ content_bias.T).transpose(1, 2).unsqueeze(2)  # (B, H, 1, T)
    return scale * (qx @ kx.transpose(-1, -2) + content)  # (B, H, Tq, T)


def _kl(target_log, logits, key_mask):
    log_q = torch.log_softmax(logits.masked_fill(~key_mask, float("-inf")), dim=-1)
    p = target_log.exp()
    terms = torch.where(key_mask, p * (target_log - log_q), torch.zeros((), dtype=logits.dtype))
    return terms.sum(-1)  # (B, H, Tq)


def refine_factors(query: torch.Tensor, key: torch.Tensor, mixing: torch.Tensor, content_bias: torch.Tensor,
                   w_query: torch.Tensor, w_key: torch.Tensor, b_query: torch.Tensor | None,
                   b_key: torch.Tensor | None, n_head: int, scale: float, sequences: torch.Tensor,
                   lengths: torch.Tensor, *, steps: int, lr: float = 3e-3, batch: int = 8, query_rows: int = 64,
                   seed: int = 0) -> RefineResult:
    """Minimise the attention KL divergence of one layer over its collaborative factors.

    Args:
        query, key, mixing: the starting factors U^T (R, D), V^T (R, D), M (H, R).
        content_bias: (H, D), kept fixed (it is exact).
        w_query, w_key, b_query, b_key: the original projections (H*d, D) and biases.
        sequences: (N, T, D) kept inputs of the layer, zero-padded; lengths: (N,).
        steps: Adam steps; lr: step size relative to each tensor's RMS.
        batch, query_rows: sequences per step and sampled query positions per sequence.

    Returns:
        A :class:`RefineResult`; the factors are float32.
    """
    g = torch.Generator().manual_seed(seed)
    x_all = sequences.float()  # (N, T, D)
    n, t, _ = x_all.shape
    valid = torch.arange(t)[None, :] < lengths[:, None]  # (N, T)
    w_q, w_k = w_query.float(), w_key.float()
    b_q = b_query.float() if b_query is not None else None
    b_k = b_key.float() if b_key is not None else None
    c = content_bias.float()
    params = [query.detach().float().clone().requires_grad_(True), key.detach().float().clone().requires_grad_(True),
              mixing.detach().float().clone().requires_grad_(True)]
    groups = [{"params": [p], "lr": lr * float(p.detach().pow(2).mean().sqrt().clamp(min=1e-8))} for p in params]
    opt = torch.optim.Adam(groups)

    def loss_on(idx: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        x, mask = x_all[idx], valid[idx]  # (B, T, D), (B, T)
        xq = x if rows is None else torch.gather(x, 1, rows[..., None].expand(-1, -1, x.shape[-1]))
        qmask = mask if rows is None else torch.gather(mask, 1, rows)
        key_mask = mask[:, None, None, :]  # (B, 1, 1, T)
        with torch.no_grad():
            target = _original_logits(x, w_q, w_k, b_q, b_k, n_head, scale)  # (B, H, T, T)
            if rows is not None:
                target = torch.gather(target, 2, rows[:, None, :, None].expand(-1, n_head, -1, t))
            target_log = torch.log_softmax(target.masked_fill(~key_mask, float("-inf")), dim=-1)
        logits = _collab_logits(xq, x, params[0], params[1], params[2], c, scale)
        kl = _kl(target_log, logits, key_mask)  # (B, H, Tq)
        weight = qmask[:, None, :].expand_as(kl).float()
        return (kl * weight).sum() / weight.sum().clamp(min=1)

    def full_kl() -> float:
        with torch.no_grad():
            total, count = 0.0, 0
            for start in range(0, n, batch):
                idx = torch.arange(start, min(start + batch, n))
                m = valid[idx]
                total += float(loss_on(idx, None)) * float(m.sum()) * n_head
                count += int(m.sum()) * n_head
            return total / max(count, 1)

    before = full_kl()
    order = torch.randperm(n, generator=g)
    for step in range(steps):
        start = (step * batch) % n
        idx = order[start:start + batch] if start + batch <= n else torch.cat([order[start:], order[: start + batch - n]])
        rows = None
        if query_rows < t:
            # sample valid query positions per sequence (seeded, with replacement)
            u = torch.rand(len(idx), query_rows, generator=g)
            rows = (u * lengths[idx, None].float()).long().clamp(max=t - 1)  # (B, Tq)
        opt.zero_grad(set_to_none=True)
        loss = loss_on(idx, rows)
        loss.backward()
        opt.step()
    after = full_kl()
    if after > before:  # never hand back something worse than the decomposition
        return RefineResult(query.float(), key.float(), mixing.float(), before, before, steps)
    return RefineResult(params[0].detach(), params[1].detach(), params[2].detach(), before, after, steps)
