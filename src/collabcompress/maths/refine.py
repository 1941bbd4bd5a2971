"""Refine collaborative factors to match the original attention distributions on real inputs.

After the (whitened) CP decomposition, U, V and M of one layer are tuned with a small,
seeded Adam loop to minimise KL(p_original || p_collaborative) of the attention
distributions on kept calibration sequences (docs/method.md scores; the content bias
stays exact). Pure tensors in and out; deterministic on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .rotary import rotation
from .scores import head_groups, original_scores

__all__ = ["RefineResult", "RotaryKL", "RotaryRefineResult", "refine_factors", "refine_rotary",
           "rotary_collab_logits", "rotary_original_logits"]


@dataclass(frozen=True)
class RefineResult:
    """Refined factors and the mean KL on the refinement inputs before and after."""

    query: torch.Tensor  # (R, D)
    key: torch.Tensor  # (R, D)
    mixing: torch.Tensor  # (H, R)
    kl_before: float
    kl_after: float
    steps: int


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
            target = original_scores(x, x, w_q, w_k, b_q, b_k, n_head, scale)  # (B, H, T, T)
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


# --------------------------------------------------------------------------- rotary layers


@dataclass(frozen=True)
class RotaryRefineResult:
    """Refined shared rotary keys (docs/method.md layout) and the mean KL before and after."""

    key: torch.Tensor  # (R, D)
    key_bias: torch.Tensor | None  # (R,)
    mixing: torch.Tensor  # (G, R/2, 2)
    kl_before: float
    kl_after: float
    steps: int


def _complex_heads(x, w, b, n, head_dim):
    """Per-head complex coordinates (B, T, n, d/2) of x @ w.T + b in rotate_half layout."""
    y = x @ w.T + (b if b is not None else 0.0)  # (B, T, n*d)
    y = y.unflatten(-1, (n, head_dim))  # (B, T, n, d)
    return torch.complex(y[..., : head_dim // 2], y[..., head_dim // 2:])


def rotary_original_logits(x, rows, w_query, b_query, w_key, b_key, n_head, n_kv_head, head_dim, theta, scale):
    """Scores of the source rotary layer for query positions ``rows`` (B, Tq) against every key
    position of ``x`` (B, T, D), float32: ``(B, H, Tq, T)`` (docs/method.md)."""
    t = x.shape[1]
    xq = torch.gather(x, 1, rows[..., None].expand(-1, -1, x.shape[-1]))  # (B, Tq, D)
    q = _complex_heads(xq, w_query, b_query, n_head, head_dim) * rotation(rows, theta)[:, :, None]  # (B, Tq, H, d/2)
    k = _complex_heads(x, w_key, b_key, n_kv_head, head_dim) * rotation(torch.arange(t), theta)[:, None]
    k = k[:, :, head_groups(n_head, n_kv_head)]  # (B, T, H, d/2)
    return scale * torch.einsum("bthj,bshj->bhts", q, k.conj()).real


def rotary_collab_logits(x, rows, w_query, b_query, key, key_bias, freq, mixing, n_head, head_dim, theta, scale):
    """Scores of the shared rotary keys (docs/method.md runtime) for query positions ``rows``
    (B, Tq) against every key position of ``x``: ``(B, H, Tq, T)``, differentiable in ``key``,
    ``key_bias`` and ``mixing``."""
    t, half_r = x.shape[1], key.shape[0] // 2
    xq = torch.gather(x, 1, rows[..., None].expand(-1, -1, x.shape[-1]))  # (B, Tq, D)
    angle = theta[freq]  # (R/2,)
    u = torch.complex(mixing[..., 0], mixing[..., 1])[head_groups(n_head, mixing.shape[0])]  # (H, R/2)
    q = _complex_heads(xq, w_query, b_query, n_head, head_dim)[..., freq] * u.conj()  # (B, Tq, H, R/2)
    q = q * rotation(rows, angle)[:, :, None]
    c = x @ key.T + (key_bias if key_bias is not None else 0.0)  # (B, T, R)
    c = torch.complex(c[..., :half_r], c[..., half_r:]) * rotation(torch.arange(t), angle)  # (B, T, R/2)
    return scale * torch.einsum("bthr,bsr->bhts", q, c.conj()).real


def _causal_mask(rows: torch.Tensor, lengths: torch.Tensor, t: int) -> torch.Tensor:
    """Keys a query at ``rows`` (B, Tq) may attend to: s <= t and s < length, (B, 1, Tq, T)."""
    s = torch.arange(t)
    return ((s[None, None, :] <= rows[..., None]) & (s[None, None, :] < lengths[:, None, None]))[:, None]


class RotaryKL:
    """The attention KL of one rotary layer on kept sequences, against fixed targets.

    The original layer's attention distributions at ``query_rows`` seeded query positions per
    sequence (all positions when the sequences are shorter) are computed once; :meth:`__call__`
    gives the mean KL(p_original || p_shared) over heads and queries for candidate tensors.
    """

    def __init__(self, sequences, lengths, w_query, b_query, w_key, b_key, n_head, n_kv_head, head_dim, theta,
                 scale, *, query_rows: int = 128, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = sequences.float()  # (N, T, D)
        n, t, _ = self.x.shape
        if query_rows < t:
            u = torch.rand(n, query_rows, generator=g)
            self.rows = (u * lengths[:, None].float()).long().clamp(max=t - 1)  # (N, Tq)
        else:
            self.rows = torch.arange(t).expand(n, t).clamp(max=lengths[:, None] - 1)
        self.mask = _causal_mask(self.rows, lengths, t)  # (N, 1, Tq, T)
        self.w_query = w_query.float()
        self.b_query = b_query.float() if b_query is not None else None
        self.n_head, self.head_dim, self.scale = n_head, head_dim, scale
        self.theta = theta.float()
        with torch.no_grad():
            target = rotary_original_logits(self.x, self.rows, self.w_query, self.b_query, w_key.float(),
                                            b_key.float() if b_key is not None else None, n_head, n_kv_head,
                                            head_dim, self.theta, scale)
            self.target_log = torch.log_softmax(target.masked_fill(~self.mask, float("-inf")), dim=-1)

    def loss(self, idx, key, key_bias, freq, mixing) -> torch.Tensor:
        logits = rotary_collab_logits(self.x[idx], self.rows[idx], self.w_query, self.b_query, key, key_bias, freq,
                                      mixing, self.n_head, self.head_dim, self.theta, self.scale)
        return _kl(self.target_log[idx], logits, self.mask[idx]).mean()

    def __call__(self, key, key_bias, freq, mixing, batch: int = 4) -> float:
        n = self.x.shape[0]
        with torch.no_grad():
            return sum(float(self.loss(torch.arange(s, min(s + batch, n)), key.float(),
                                       key_bias.float() if key_bias is not None else None, freq, mixing.float()))
                       * (min(s + batch, n) - s) for s in range(0, n, batch)) / n


def refine_rotary(kl: RotaryKL, key: torch.Tensor, key_bias: torch.Tensor | None, freq: torch.Tensor,
                  mixing: torch.Tensor, *, steps: int, lr: float = 1e-2, batch: int = 2,
                  seed: int = 0) -> RotaryRefineResult:
    """Minimise a rotary layer's attention KL (rotation applied, causal) over its shared keys,
    key bias and mixing with seeded Adam; the frequencies and the queries stay fixed.

    Args:
        kl: the layer's :class:`RotaryKL` on its kept calibration sequences.
        key, key_bias, freq, mixing: the fitted tensors of docs/method.md ((R, D), (R,), (R/2,), (G, R/2, 2)).
        steps: Adam steps; lr: step size relative to each tensor's RMS; batch: sequences per step.

    Returns:
        A :class:`RotaryRefineResult` (float32); the input tensors when refinement made the KL worse.
    """
    g = torch.Generator().manual_seed(seed)
    params = [p.detach().float().clone().requires_grad_(True) for p in (key, mixing)]
    if key_bias is not None:
        params.append(key_bias.detach().float().clone().requires_grad_(True))
    opt = torch.optim.Adam([{"params": [p], "lr": lr * float(p.detach().pow(2).mean().sqrt().clamp(min=1e-8))}
                            for p in params])
    bias = (lambda: params[2]) if key_bias is not None else (lambda: None)
    before = kl(key, key_bias, freq, mixing)
    n = kl.x.shape[0]
    for _ in range(steps):
        idx = torch.randperm(n, generator=g)[:batch]
        opt.zero_grad(set_to_none=True)
        kl.loss(idx, params[0], bias(), freq, params[1]).backward()
        opt.step()
    after = kl(params[0].detach(), bias().detach() if key_bias is not None else None, freq, params[1].detach())
    if after > before:
        return RotaryRefineResult(key.float(), key_bias.float() if key_bias is not None else None, mixing.float(),
                                  before, before, steps)
    return RotaryRefineResult(params[0].detach(), bias().detach() if key_bias is not None else None,
                              params[1].detach(), before, after, steps)
