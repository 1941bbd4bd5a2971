"""Collaborative multi-head attention as a torch module (SPEC.md sections 2 and 4).

All heads share one query projection U^T and one key projection V^T of width R
(``shared_dim``); head h keeps a mixing vector m_h and the exact content bias c_h:

    score_h(x, y) = s * [ (U^T x) . (m_h * (V^T y))  +  c_h . y ]

(Cordonnier, Loukas, Jaggi, "Multi-Head Attention: Collaborate Instead of Concatenate",
arXiv 2006.16362). The module folds the mixing vector into the query and the content
bias into one shared key,

    q'_h = [m_h * U^T x, e_h]        k' = [V^T y, C y]      (e_h: one-hot of head h)

so q'_h . k' = (U^T x) . (m_h * (V^T y)) + c_h . y. The key k' (R + H numbers per token)
is the same for every head: it has a head axis of size 1 that broadcasts over the H query
heads, which is also all that a key cache has to hold. Any attention kernel that
broadcasts the head axis, e.g. the fused
``torch.nn.functional.scaled_dot_product_attention(q', k', v, mask, scale=s)``, computes
the attention; masks, causal attention, cross-attention and additive position biases
work as for standard attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CollaborativeAttention", "collaborative_query_states", "collaborative_key_states",
           "CollaborativeRotaryAttention", "rotary_query_states", "rotary_rotate"]

MIXING_INITS = ("concatenate", "ones", "uniform")


def collaborative_query_states(x: torch.Tensor, query_weight: torch.Tensor, mixing: torch.Tensor) -> torch.Tensor:
    """q'_h = [m_h * U^T x, e_h] for every head: (B, N, D) -> (B, H, N, R+H).

    ``query_weight`` is U^T (R, D), ``mixing`` is M (H, R); e_h is the one-hot row of head
    h, which picks head h's content-bias term out of the shared key.
    """
    qx = F.linear(x, query_weight)  # (B, N, R)
    mixed = qx.unsqueeze(-3) * mixing.to(qx.dtype).unsqueeze(-2)  # (B, H, N, R)
    n_head = mixing.shape[0]
    onehot = torch.eye(n_head, dtype=qx.dtype, device=qx.device).unsqueeze(-2)  # (H, 1, H)
    return torch.cat([mixed, onehot.expand(*mixed.shape[:-1], n_head)], dim=-1)  # (B, H, N, R+H)


def collaborative_key_states(y: torch.Tensor, key_weight: torch.Tensor, content_bias: torch.Tensor) -> torch.Tensor:
    """k' = [V^T y, C y], shared by every head: (B, M, D) -> (B, 1, M, R+H).

    ``key_weight`` is V^T (R, D), ``content_bias`` holds the rows c_h (H, D). These R + H
    numbers per token are what a key cache holds (SPEC.md section 5).
    """
    return torch.cat([F.linear(y, key_weight), F.linear(y, content_bias)], dim=-1).unsqueeze(-3)


def _combined_mask(attention_mask: torch.Tensor | None, position_bias: torch.Tensor | None, is_causal: bool,
                   n_query: int, n_key: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """One additive float mask (or a boolean one, or None) holding mask, causality and position bias."""
    if position_bias is None and not is_causal:
        return attention_mask
    mask = attention_mask
    if is_causal:
        # Top-left aligned like SDPA's is_causal: query i sees keys 0..i.
        causal = torch.ones(n_query, n_key, dtype=torch.bool, device=device).tril()  # (N, M)
        mask = causal if mask is None else (mask & causal if mask.dtype == torch.bool
                                            else mask.masked_fill(~causal, torch.finfo(mask.dtype).min))
    if position_bias is None:
        return mask
    bias = position_bias.to(dtype)
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, torch.finfo(dtype).min)
    return bias + mask.to(dtype)


class CollaborativeAttention(nn.Module):
    """Attention scores of SPEC.md section 2 from the tensors of section 4, for every head at once.

    Parameters (names as in the output directory, under the attention module's prefix):

    - ``collab_query``: ``nn.Linear(d_model, shared_dim, bias=False)``, weight (R, D) = U^T
    - ``collab_key``: ``nn.Linear(d_model, shared_dim, bias=False)``, weight (R, D) = V^T
    - ``collab_mixing``: ``nn.Parameter`` (H, R) = M
    - ``collab_content_bias``: ``nn.Linear(d_model, n_head, bias=False)``, weight (H, D), rows c_h

    Value and output projections are not part of this module: :meth:`forward` takes
    the per-head values, so it slots into any attention layer in place of its q/k side.

    Created fresh (for training from scratch), U and V get Xavier-uniform initialisation,
    the content bias starts at zero (as transformers initialises query biases), and the
    mixing matrix follows ``mixing_init``:

    - ``"concatenate"`` (default): block one-hot, dimension r belongs to head
      ``floor(r * H / R)``, so the layer starts as standard multi-head attention with
      R/H dimensions per head (the concatenated solution of the paper, section 3);
      when R < H, head h uses dimension ``floor(h * R / H)``;
    - ``"ones"``: every head sees every shared dimension (all heads start equal);
    - ``"uniform"``: U(0, 1) entries (random, distinct heads from the start).

    Args:
        d_model: input width D.
        n_head: number of heads H.
        shared_dim: shared key/query width R.
        scale: the score scale s; default ``1/sqrt(max(1, R/H))``, the usual 1/sqrt(head
            width) for the per-head width of the concatenated initialisation. Pass the
            original model's scale (1/sqrt(d) of the original head_dim, 1 for T5) when the
            tensors come from a compressed checkpoint.
        mixing_init: ``"concatenate"``, ``"ones"`` or ``"uniform"``.

    Example::

        attn = CollaborativeAttention(d_model=384, n_head=12, shared_dim=192)
        v = value_proj(x).unflatten(-1, (12, -1)).transpose(1, 2)   # (B, H, N, d)
        out, _ = attn(x, v, attention_mask=mask)                     # (B, H, N, d)
    """

    def __init__(self, d_model: int, n_head: int, shared_dim: int, *, scale: float | None = None,
                 mixing_init: str = "concatenate", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("n_head", n_head), ("shared_dim", shared_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if mixing_init not in MIXING_INITS:
            raise ValueError(f"mixing_init must be one of {', '.join(MIXING_INITS)}, got {mixing_init!r}")
        self._add_collab_parameters(d_model, n_head, shared_dim, device=device, dtype=dtype)
        self.scale = float(scale) if scale is not None else 1.0 / math.sqrt(max(1.0, shared_dim / n_head))
        self.mixing_init = mixing_init
        self.reset_parameters()

    def _add_collab_parameters(self, d_model: int, n_head: int, shared_dim: int, *,
                               device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        """Register the four collab_* parameters (uninitialised); also used by the transformers wrappers."""
        kw = {"device": device, "dtype": dtype}
        self.collab_query = nn.Linear(d_model, shared_dim, bias=False, **kw)
        self.collab_key = nn.Linear(d_model, shared_dim, bias=False, **kw)
        self.collab_mixing = nn.Parameter(torch.empty(n_head, shared_dim, **kw))
        self.collab_content_bias = nn.Linear(d_model, n_head, bias=False, **kw)

    @classmethod
    def from_tensors(cls, query: torch.Tensor, key: torch.Tensor, mixing: torch.Tensor, content_bias: torch.Tensor,
                     scale: float) -> CollaborativeAttention:
        """A module holding copies of the tensors of SPEC section 4 (U^T, V^T, M, c) with scale s."""
        n_head, shared_dim = mixing.shape
        d_model = query.shape[1]
        if query.shape != (shared_dim, d_model) or key.shape != (shared_dim, d_model) \
                or content_bias.shape != (n_head, d_model):
            raise ValueError(f"inconsistent shapes: query {tuple(query.shape)}, key {tuple(key.shape)}, "
                             f"mixing {tuple(mixing.shape)}, content_bias {tuple(content_bias.shape)}")
        module = cls(d_model, n_head, shared_dim, scale=scale, device=query.device, dtype=query.dtype)
        with torch.no_grad():
            module.collab_query.weight.copy_(query)
            module.collab_key.weight.copy_(key)
            module.collab_mixing.copy_(mixing)
            module.collab_content_bias.weight.copy_(content_bias)
        return module

    @property
    def n_head(self) -> int:
        """H, the number of heads."""
        return self.collab_mixing.shape[0]

    @property
    def shared_dim(self) -> int:
        """R, the shared key/query width."""
        return self.collab_mixing.shape[1]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Fresh initialisation for training from scratch (see the class docstring)."""
        nn.init.xavier_uniform_(self.collab_query.weight)
        nn.init.xavier_uniform_(self.collab_key.weight)
        nn.init.zeros_(self.collab_content_bias.weight)
        n_head, shared_dim = self.collab_mixing.shape
        if self.mixing_init == "ones":
            nn.init.ones_(self.collab_mixing)
        elif self.mixing_init == "uniform":
            nn.init.uniform_(self.collab_mixing, 0.0, 1.0)
        else:
            self.collab_mixing.zero_()
            if shared_dim >= n_head:
                owner = torch.arange(shared_dim) * n_head // shared_dim  # (R,) head of each dimension
                self.collab_mixing[owner, torch.arange(shared_dim)] = 1.0
            else:
                self.collab_mixing[torch.arange(n_head), torch.arange(n_head) * shared_dim // n_head] = 1.0

    def query_states(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """q'_h = [m_h * U^T x, e_h]: (B, N, D) -> (B, H, N, R+H)."""
        return collaborative_query_states(hidden_states, self.collab_query.weight, self.collab_mixing)

    def key_states(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """k' = [V^T y, C y], one for all heads: (B, M, D) -> (B, 1, M, R+H)."""
        return collaborative_key_states(hidden_states, self.collab_key.weight, self.collab_content_bias.weight)

    def scores(self, hidden_states: torch.Tensor, key_value_states: torch.Tensor | None = None) -> torch.Tensor:
        """Pre-softmax scores s * q'_h . k'_h (no mask): (B, N, D), (B, M, D) -> (B, H, N, M)."""
        y = hidden_states if key_value_states is None else key_value_states
        return self.scale * self.query_states(hidden_states) @ self.key_states(y).transpose(-1, -2)

    def forward(self, hidden_states: torch.Tensor, value_states: torch.Tensor,
                key_value_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                is_causal: bool = False, position_bias: torch.Tensor | None = None, dropout: float = 0.0,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend from ``hidden_states`` to ``key_value_states`` (default: itself).

        Args:
            hidden_states: query tokens x, (B, N, D).
            value_states: per-head values of the key tokens, (B, H, M, d_v).
            key_value_states: key tokens y for cross-attention, (B, M, D); ``None`` for self-attention.
            attention_mask: broadcastable to (B, H, N, M); boolean (True = attend, as in
                torch SDPA) or additive float (0 = attend, large negative = masked).
            is_causal: mask future keys (query i sees keys 0..i, top-left aligned as in SDPA).
            position_bias: additive score bias broadcastable to (B, H, N, M), e.g. T5's
                relative position bias (added after the scale, as T5 does).
            dropout: attention dropout probability, applied in training mode only.
            need_weights: also return the attention probabilities (computed explicitly
                instead of with the fused kernel).

        Returns:
            ``(output, weights)``: output (B, H, N, d_v); weights (B, H, N, M) or ``None``.
        """
        query = self.query_states(hidden_states)  # (B, H, N, R+H)
        key = self.key_states(hidden_states if key_value_states is None else key_value_states)  # (B, 1, M, R+H)
        n_query, n_key = query.shape[-2], key.shape[-2]
        p = dropout if self.training else 0.0
        if not need_weights and position_bias is None and (attention_mask is None or not is_causal):
            out = F.scaled_dot_product_attention(query, key, value_states, attn_mask=attention_mask, dropout_p=p,
                                                 is_causal=is_causal and n_query > 1, scale=self.scale)
            return out, None  # (B, H, N, d_v)
        mask = _combined_mask(attention_mask, position_bias, is_causal and n_query > 1, n_query, n_key,
                              query.dtype, query.device)
        if not need_weights:
            out = F.scaled_dot_product_attention(query, key, value_states, attn_mask=mask, dropout_p=p,
                                                 scale=self.scale)
            return out, None
        scores = self.scale * query @ key.transpose(-1, -2)  # (B, H, N, M)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        weights = torch.softmax(scores, dim=-1)
        out = F.dropout(weights, p=p) @ value_states  # (B, H, N, d_v)
        return out, weights

    def extra_repr(self) -> str:
        return (f"d_model={self.collab_query.in_features}, n_head={self.n_head}, shared_dim={self.shared_dim}, "
                f"scale={self.scale:g}")


# --------------------------------------------------------------------------- rotary decoders (RoPE, GQA)

def rotary_query_states(query: torch.Tensor, mixing: torch.Tensor, key_freq: torch.Tensor) -> torch.Tensor:
    """q'_{h,r} = q_{h,j(r)} conj(U_{g(h),r}) as [Re | Im]: (B, H, N, d) -> (B, H, N, R).

    ``query`` holds the original per-head queries in transformers' rotate_half layout
    (dimension j pairs with j + d/2: q_j + i q_{j+d/2}), ``mixing`` is U (G, R/2, 2) as
    (real, imaginary), ``key_freq`` the frequency j(r) of each component (R/2,). Head h
    reads group h // (H/G). Not yet rotated (SPEC section 2, "Rotary decoders").
    """
    half = query.shape[-1] // 2
    kv_heads = mixing.shape[0]
    re = query[..., key_freq].unflatten(-3, (kv_heads, -1))  # (B, G, H/G, N, R/2)
    im = query[..., key_freq + half].unflatten(-3, (kv_heads, -1))  # (B, G, H/G, N, R/2)
    u = mixing[..., 0].to(query.dtype)[:, None, None, :]  # (G, 1, 1, R/2)
    v = mixing[..., 1].to(query.dtype)[:, None, None, :]
    mixed = torch.cat([re * u + im * v, im * u - re * v], dim=-1)  # (B, G, H/G, N, R): (re + i im)(u - i v)
    return mixed.flatten(-4, -3)  # (B, H, N, R)


def rotary_rotate(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_freq: torch.Tensor) -> torch.Tensor:
    """Multiply every component by e^{i t theta_j(r)}: [Re | Im] states (B, *, N, R) -> same shape.

    ``cos`` and ``sin`` are transformers' position embeddings (B, N, d) = cat(cos_j, cos_j)
    (attention scaling included), gathered at the components' frequencies: this is
    transformers' ``q * cos + rotate_half(q) * sin`` on the [Re | Im] halves.
    """
    cos = cos[..., key_freq].unsqueeze(-3)  # (B, 1, N, R/2)
    sin = sin[..., key_freq].unsqueeze(-3)
    re, im = states.chunk(2, dim=-1)  # (B, *, N, R/2) each
    return torch.cat([re * cos - im * sin, im * cos + re * sin], dim=-1)


class CollaborativeRotaryAttention(nn.Module):
    """The query/key side of a rotary, grouped-query layer with shared keys (SPEC sections 2 and 4).

    Parameters and buffers (names as in the output directory, under the attention module's prefix):

    - ``collab_key``: ``nn.Linear(d_model, shared_dim)``, weight (R, D) = [Re beta_r ; Im beta_r],
      with a bias (R,) when the source key had one (Qwen2)
    - ``collab_key_freq``: buffer (R/2,) int64, the frequency j(r) of each component
    - ``collab_mixing``: ``nn.Parameter`` (G, R/2, 2), U_{g,r} as (real, imaginary)

    The queries keep the model's own per-head projection. Both sides are rotated at their
    components' frequencies, so the score of head h is a real dot product of width R,

        score_h(x_t, y_s) = s * rot_t(q'_h(x_t)) . rot_s(c(y_s))

    and the key c(y) (R numbers per token, one head shared by all query heads) is all that
    a key cache has to hold. With R = G*d, j(r) = r // G and U the identity per frequency
    this is the original layer exactly.

    Args:
        d_model: input width D.
        kv_heads: key/value heads G.
        shared_dim: R, the key width per token (even, 2 <= R).
        key_bias: whether the shared key has a bias.
    """

    def __init__(self, d_model: int, kv_heads: int, shared_dim: int, *, key_bias: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if shared_dim < 2 or shared_dim % 2:
            raise ValueError(f"shared_dim must be even and at least 2, got {shared_dim!r}")
        self._add_collab_parameters(d_model, kv_heads, shared_dim, key_bias=key_bias, device=device, dtype=dtype)

    def _add_collab_parameters(self, d_model: int, kv_heads: int, shared_dim: int, *, key_bias: bool,
                               device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        """Register collab_key, collab_key_freq and collab_mixing (uninitialised); also used by the wrappers."""
        kw = {"device": device, "dtype": dtype}
        self.collab_key = nn.Linear(d_model, shared_dim, bias=key_bias, **kw)
        self.register_buffer("collab_key_freq", torch.zeros(shared_dim // 2, dtype=torch.int64, device=device))
        self.collab_mixing = nn.Parameter(torch.zeros(kv_heads, shared_dim // 2, 2, **kw))

    def query_states(self, query: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Mixed, rotated queries: per-head queries (B, H, N, d) -> (B, H, N, R)."""
        mixed = rotary_query_states(query, self.collab_mixing, self.collab_key_freq)
        return rotary_rotate(mixed, cos, sin, self.collab_key_freq)

    def key_states(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotated shared keys, one for all heads: (B, M, D) -> (B, 1, M, R)."""
        key = self.collab_key(hidden_states).unsqueeze(-3)  # (B, 1, M, R)
        return rotary_rotate(key, cos, sin, self.collab_key_freq)
