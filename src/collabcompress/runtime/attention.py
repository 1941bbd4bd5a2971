"""Collaborative multi-head attention as a torch module (docs/method.md).

All heads share one query projection U^T and one key projection V^T of width R
(``shared_dim``); head h keeps a mixing vector m_h and the exact content bias c_h:

    score_h(x, y) = s * [ (U^T x) . (m_h * (V^T y))  +  c_h . y ]

(Cordonnier, Loukas, Jaggi, "Multi-Head Attention: Collaborate Instead of Concatenate",
arXiv 2006.16362). The module folds the mixing vector and the scale into the query and
the content bias into one shared key,

    q'_h = s [m_h * U^T x, e_h]        k' = [V^T y, C y]      (e_h: one-hot of head h)

so q'_h . k' = s [(U^T x) . (m_h * (V^T y)) + c_h . y]. The key k' (R + H numbers per
token, what a key cache holds, docs/method.md) is the same for every head and is never
copied per head: the scores of all heads are ONE batched matrix product
(B, H*N, R+H) @ (B, R+H, M) (:func:`collaborative_attention`). The module hands the kernel
the shared query U^T x (one linear map) and s [M, I] (:func:`collaborative_query_mixing`,
built once); the kernel writes q' block by block of batch elements into a reused buffer
(one multiply per block, the columns s e_h written once per call), so the (B, H, N, R+H)
query is never stored whole. k' is one linear map with the weight [V^T ; C] built once. Carrying the content bias as H extra columns
costs H/R more multiply-adds in the product but saves a pass over the (B, H, N, M) scores
that adding it as a per-key bias would take (measured: about 1 ms of 9 ms at MiniLM's
8 x 128, R = 192). Masks, causal attention, cross-attention and additive position biases
work as for standard attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CollaborativeAttention", "collaborative_attention", "collaborative_query_states",
           "collaborative_query_mixing", "mixed_query",
           "collaborative_key_states", "CollaborativeRotaryAttention", "rotary_query_states", "rotary_rotate"]

MIXING_INITS = ("concatenate", "ones", "uniform")


def collaborative_query_mixing(mixing: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """s [M, I] (H, R+H): row h is s [m_h, e_h], the ``mixing`` of :func:`collaborative_attention`
    for the shared query U^T x (e_h: one-hot of head h, which picks head h's content-bias
    term out of the shared key [V^T y, C y])."""
    eye = torch.eye(mixing.shape[0], dtype=mixing.dtype, device=mixing.device)
    return scale * torch.cat([mixing, eye], dim=-1)


def mixed_query(query: torch.Tensor, mixing: torch.Tensor) -> torch.Tensor:
    """Every head's query from the shared one: (B, N, R) and (H, K) -> (B, H, N, K), contiguous.

    Head h's query is ``query * mixing[h, :R]`` followed by the constants ``mixing[h, R:]``
    (the shared query padded with ones to width K, times row h of ``mixing``).
    """
    batch, n_query, shared = query.shape[0], query.shape[-2], query.shape[-1]
    mixing = mixing.to(query.dtype)
    head = query.reshape(batch, 1, n_query, shared) * mixing[:, None, :shared]  # (B, H, N, R)
    if mixing.shape[-1] == shared:
        return head
    tail = mixing[:, None, shared:].expand(batch, -1, n_query, -1)  # (B, H, N, K-R)
    return torch.cat([head, tail], dim=-1)


def collaborative_query_states(x: torch.Tensor, query_weight: torch.Tensor, mixing: torch.Tensor,
                               scale: float = 1.0) -> torch.Tensor:
    """q'_h = s [m_h * U^T x, e_h] for every head: (B, N, D) -> (B, H, N, R+H), contiguous.

    ``query_weight`` is U^T (R, D), ``mixing`` is M (H, R), ``scale`` is s. The runtime
    does not store this tensor: :func:`collaborative_attention` takes U^T x and
    :func:`collaborative_query_mixing` and mixes the query block by block.
    """
    return mixed_query(F.linear(x, query_weight), collaborative_query_mixing(mixing, scale))


def collaborative_key_states(y: torch.Tensor, key_weight: torch.Tensor, content_bias: torch.Tensor) -> torch.Tensor:
    """k' = [V^T y, C y], shared by every head: (B, M, D) -> (B, 1, M, R+H).

    ``key_weight`` is V^T (R, D), ``content_bias`` holds the rows c_h (H, D). These R + H
    numbers per token are what a key cache holds (docs/method.md).
    """
    return torch.cat([F.linear(y, key_weight), F.linear(y, content_bias)], dim=-1).unsqueeze(-3)


def collaborative_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                            mixing: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                            is_causal: bool = False, position_bias: torch.Tensor | None = None,
                            dropout: float = 0.0,
                            need_weights: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(query . key + position_bias + mask) @ value with ONE key head for all query heads.

    Args:
        query: (B, H, N, K), scale included (e.g. :func:`collaborative_query_states`); or,
            with ``mixing``, the query shared by the heads, (B, N, R) with R <= K.
        key: the shared key, (B, M, K) or (B, 1, M, K); any strides (e.g. a cache tensor).
        value: (B, G, M, d_v) with G dividing H; query head h reads value head h // (H/G).
        mixing: (H, K): head h's query is ``query * mixing[h, :R]`` followed by
            ``mixing[h, R:]`` (:func:`mixed_query`); for a collaborative layer, query = U^T x
            and mixing = s [M, I] (:func:`collaborative_query_mixing`), so head h's query is
            s [m_h * U^T x, e_h].
        attention_mask: broadcastable to (B, H, N, M); boolean (True = attend) or additive float.
        is_causal: query i sees keys 0..i (top-left aligned, as torch SDPA).
        position_bias: additive bias broadcastable to (B, H, N, M).
        dropout: dropout probability on the attention weights (pass 0 in eval mode).
        need_weights: return the weights; ``False`` lets a CUDA call use torch SDPA's fused
            kernel (weights ``None``).

    Returns:
        ``(output, weights)``: (B, H, N, d_v) and (B, H, N, M), or ``None`` without
        ``need_weights``. Without autograd the output is a view of a token-major
        (B, N, H, d_v) tensor: ``output.transpose(1, 2).reshape(B, N, H * d_v)`` is free.

    Without autograd (inference) the work runs in blocks of batch elements whose mixed
    queries and scores fit in about ``_BLOCK_BYTES`` (L2-sized): per block, one multiply
    mixes the shared query into a reused buffer (the constant columns ``mixing[:, R:]`` are
    written once per call), one batched product (c, H*N, K) @ (c, K, M) gives the scores
    of all heads, the key never copied per head; biases and masks are added in place,
    softmax runs in place, and the weights times the values are written straight into the
    token-major output, reading the values where they are (strided views of the value
    projection or the cache; no copy into head-major layout), one product per batch
    element and value head group. With autograd the same formula runs on whole tensors,
    out of place where the graph needs it.

    Rule: torch SDPA has a fused CPU kernel only when K equals d_v, and for a
    collaborative layer K > d_v (R + H or R against d), where SDPA falls back to its
    math path and broadcasts the key per head. Measured on this machine class (1 thread,
    MiniLM shapes, R 96 and 192, B x N = 1 x 128, 8 x 32, 8 x 128, 8 x 512), SDPA with
    width-R queries and the content bias as a mask was slower than this product in 7 of 8
    cases (1.8x at 8 x 512), so the product is used on the CPU (README, "How it runs"), except
    for a causal prefill without other masks and K <= 2 d_v (rotary layers up to R = 2d), where
    SDPA's fused CPU kernel with zero-padded values skips the blocks above the diagonal and
    wins (:func:`_cpu_flash`).
    On CUDA (H200, measured with H = 12, K = 204, d_v = 32, B x N = 8 x 128 to 1 x 4096) SDPA's
    fused memory-efficient kernel is used whenever the weights are not needed: the scores are
    never stored (8 x 2048: 24 MiB instead of 1,560 in float32, 97 instead of 780 in float16).
    float32: 0.5x to 1.13x this product's time. float16/bfloat16: SDPA has a fused kernel only
    for widths that are multiples of 8, so K is padded with zeros (204 -> 208, same scores);
    then 0.1x to 1.2x this product's time (3.7x faster at 8 x 2048, 9.5x at a causal 1 x 4096;
    unpadded, SDPA fell back to its math path and took 3 to 4x the product's time).
    """
    fused = not need_weights and query.dtype in _FUSED_DTYPES and (
        query.device.type == "cuda" or _cpu_flash(key, value, attention_mask, is_causal, position_bias, dropout,
                                                  n_query=query.shape[-2]))
    graph = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in
                                            (query, key, value, mixing, attention_mask, position_bias))
    if mixing is not None and (fused or graph):
        query, mixing = mixed_query(query, mixing), None
    if fused:
        return _fused(query, key, value, attention_mask, is_causal, position_bias, dropout), None
    batch, n_key = key.shape[0], key.shape[-2]
    n_head, n_query, width = (mixing.shape[0] if mixing is not None else query.shape[1]), query.shape[-2], key.shape[-1]
    key = key.reshape(batch, n_key, width)  # (B, M, K), a view for a (B, 1, M, K) key
    blocked = None
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        blocked, attention_mask = attention_mask.logical_not(), None  # at the mask's own (broadcast) shape
    future = torch.ones(n_query, n_key, dtype=torch.bool, device=key.device).triu(1) if is_causal else None
    masks = (position_bias, attention_mask, blocked, future)
    if graph:
        scores = torch.bmm(query.reshape(batch, n_head * n_query, width), key.transpose(-1, -2))  # (B, H*N, M)
        weights = _masked_softmax_(scores.view(batch, n_head, n_query, n_key), *masks, in_place=False)
        probs = F.dropout(weights, p=dropout) if dropout > 0.0 else weights
        out = probs.view(batch, value.shape[1], -1, n_key) @ value  # (B, G, (H/G)*N, d_v)
        return out.view(batch, n_head, n_query, value.shape[-1]), (weights if need_weights else None)
    return _blocks(query, key, value, mixing, masks, dropout, need_weights)


# dtypes for which collaborative_attention uses torch SDPA's fused kernel without weights
_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cpu_flash(key, value, attention_mask, is_causal, position_bias, dropout, *, n_query: int) -> bool:
    """Whether collaborative_attention runs torch SDPA's fused (flash) CPU kernel: a causal prefill
    (N > 1) with no other mask, bias or dropout, and keys at most twice as wide as the values.

    The kernel wants one width for queries, keys and values, so the values are padded with
    zeros to the key width K (the extra output columns are zeros, dropped); it skips the
    blocks above the diagonal and never stores the scores, so its products cost about
    N^2 K against N^2 (K + d_v) for the product here. Measured on one layer (2 threads, AMD
    EPYC with AVX2, float32, H = 9, G = 3, d_v = 64, causal, B x N = 1 x 32 to 1 x 1,024 and
    4 x 512; a ``/tmp`` script): K = 64 and 128 (SmolLM2 at a third and two thirds of the key
    cache) 0.3x to 0.8x this product's time without autograd and 0.2x to 1.0x with it
    (forward and backward; the least at N = 1,024); K = 192 (3 d_v) 0.5x to 1.16x without and
    0.7x to 1.36x with it, hence the limit of 2 d_v. The whole model:
    ``collabcompress bench --level model``. Decoding steps (N = 1) stay with the product.
    """
    return (is_causal and n_query > 1 and attention_mask is None and position_bias is None and dropout == 0.0
            and key.shape[-1] <= 2 * value.shape[-1])


# bytes of mixed queries and scores per block of batch elements in collaborative_attention, L2-sized:
# measured (MiniLM R = 192, 1 thread, under load), 256 KiB to 4 MiB took about the same time at 8 x 128
# and 8 x 512, one block for the whole batch 11 % (8 x 128) to 30 % (8 x 512) longer
_BLOCK_BYTES = 1 << 20


def _masked_softmax_(scores, position_bias, attention_mask, blocked, future, *, in_place):
    """softmax(scores + position_bias + attention_mask, keys ``blocked`` or ``future`` at -inf) over the
    last axis, (c, H, N, M); biases and masks (broadcastable) are added in place; the softmax too
    when ``in_place``. A query that sees no key attends to nothing (zeros), as torch SDPA does."""
    if position_bias is not None:
        scores += position_bias
    if attention_mask is not None:
        scores += attention_mask
    if blocked is not None:
        scores.masked_fill_(blocked, float("-inf"))
    if future is not None:
        scores.masked_fill_(future, float("-inf"))
    weights = torch.softmax(scores, -1, out=scores) if in_place else scores.softmax(-1)
    if blocked is not None or future is not None:
        empty = weights[..., :1].isnan()  # (c, H, N, 1): such a row is all NaN
        if empty.any():
            weights = weights.masked_fill_(empty, 0.0) if in_place else weights.masked_fill(empty, 0.0)
    return weights


def _blocks(query, key, value, mixing, masks, dropout, need_weights):
    """collaborative_attention without autograd, block by block of batch elements (see there)."""
    batch, n_key, width = key.shape
    n_query, groups, d_v = query.shape[-2], value.shape[1], value.shape[-1]
    n_head = mixing.shape[0] if mixing is not None else query.shape[1]
    per_element = n_head * n_query * (width + n_key) * query.element_size()
    chunk = max(1, min(batch, _BLOCK_BYTES // per_element))
    out = query.new_empty(batch, n_query, n_head, d_v).transpose(1, 2)  # (B, H, N, d_v), token-major memory
    weights = query.new_empty(batch, n_head, n_query, n_key) if need_weights else None
    buffer = None if need_weights else query.new_empty(chunk, n_head, n_query, n_key)
    if mixing is not None:
        shared = query.shape[-1]
        query = query.reshape(batch, 1, n_query, shared)
        mixing = mixing.to(query.dtype)
        mixed = query.new_empty(chunk, n_head, n_query, width)
        mixed[..., shared:] = mixing[:, None, shared:]  # constant columns (e_h): once per call
        head_mixing = mixing[:, None, :shared]  # (H, 1, R)
    shape = (batch, n_head, n_query, n_key)
    masks = [None if m is None else m.expand(shape) for m in masks]  # views
    for start in range(0, batch, chunk):
        stop = min(batch, start + chunk)
        size = stop - start
        if mixing is not None:
            q = mixed[:size]
            torch.mul(query[start:stop], head_mixing, out=q[..., :shared])
        else:
            q = query[start:stop]
        scores = weights[start:stop] if need_weights else buffer[:size]
        torch.bmm(q.reshape(size, n_head * n_query, width), key[start:stop].transpose(-1, -2),
                  out=scores.view(size, n_head * n_query, n_key))
        probs = _masked_softmax_(scores, *[None if m is None else m[start:stop] for m in masks], in_place=True)
        if dropout > 0.0:
            probs = F.dropout(probs, p=dropout)
        _weighted_values(probs, value[start:stop], out[start:stop])
    return out, weights


def _weighted_values(probs: torch.Tensor, value: torch.Tensor, out: torch.Tensor) -> None:
    """out = probs @ value of each head's group, written into ``out`` (c, H, N, d_v), any strides:
    probs (c, H, N, M), value (c, G, M, d_v) with any strides (torch.bmm reads strided batches)."""
    n_head, n_query = probs.shape[1:3]
    groups = value.shape[1]
    per_group = n_head // groups
    for b in range(probs.shape[0]):
        if groups == n_head:
            torch.bmm(probs[b], value[b], out=out[b])
        elif n_query == 1:  # decoding: the heads of a group are the rows of one product
            torch.bmm(probs[b].view(groups, per_group, -1), value[b],
                      out=out[b, :, 0].view(groups, per_group, -1))
        else:
            for g in range(groups):
                heads = slice(g * per_group, (g + 1) * per_group)
                torch.bmm(probs[b, heads], value[b, g].expand(per_group, -1, -1), out=out[b, heads])


def _fused(query, key, value, attention_mask, is_causal, position_bias, dropout) -> torch.Tensor:
    """torch SDPA on the shared key broadcast to the query heads (a view); one mask for
    the bias, the mask and causality; value heads repeated only for grouped values. In half
    precision the query/key width is padded with zeros to a multiple of 8 (same scores), the
    alignment SDPA's fused kernels ask for; on the CPU, whose fused kernel wants one width
    for all three, the narrower side is padded with zeros too (same scores, extra output
    columns zero and dropped)."""
    batch, n_head, n_query, width = query.shape
    n_key, d_v = key.shape[-2], value.shape[-1]
    key = key.reshape(batch, 1, n_key, width)
    target = width + (-width % 8 if query.dtype in (torch.float16, torch.bfloat16) else 0)
    if query.device.type == "cpu":
        target = max(target, d_v)
        if target > d_v:
            value = F.pad(value, (0, target - d_v))
    if target > width:
        query, key = F.pad(query, (0, target - width)), F.pad(key, (0, target - width))
        width = target
    key = key.expand(batch, n_head, n_key, width)
    if value.shape[1] != n_head:
        value = value.repeat_interleave(n_head // value.shape[1], dim=1)  # (B, H, M, d_v)
    mask = position_bias
    if attention_mask is not None:
        if mask is None:
            mask = attention_mask
        elif attention_mask.dtype == torch.bool:
            mask = mask.masked_fill(attention_mask.logical_not(), float("-inf"))
        else:
            mask = mask + attention_mask
    causal = is_causal and mask is None
    if is_causal and mask is not None:
        future = torch.ones(n_query, n_key, dtype=torch.bool, device=query.device).triu(1)  # (N, M)
        mask = mask & ~future if mask.dtype == torch.bool else mask.masked_fill(future, float("-inf"))
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(query.dtype)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                         scale=1.0)
    return out[..., :d_v] if out.shape[-1] != d_v else out


class CollaborativeAttention(nn.Module):
    """Attention scores of docs/method.md from the tensors of section 4, for every head at once.

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
        """A module holding copies of the tensors of docs/method.md (U^T, V^T, M, c) with scale s."""
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
        """q'_h = s [m_h * U^T x, e_h], scale included: (B, N, D) -> (B, H, N, R+H)."""
        return mixed_query(self.collab_query(hidden_states), self.query_mixing())

    def query_mixing(self) -> torch.Tensor:
        """s [M, I] (H, R+H), the ``mixing`` of :func:`collaborative_attention` for the shared
        query U^T x (``collab_query``); cached while neither M nor s changes (not while training M)."""
        mixing = self.collab_mixing
        if torch.is_grad_enabled() and mixing.requires_grad:
            return collaborative_query_mixing(mixing, self.scale)
        stamp = (mixing.data_ptr(), mixing._version, mixing.dtype, self.scale)
        cached = self.__dict__.get("_collab_query_mixing")
        if cached is None or cached[0] != stamp:
            cached = self.__dict__["_collab_query_mixing"] = (stamp, collaborative_query_mixing(mixing, self.scale)
                                                              .detach())
        return cached[1]

    def key_states(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """k' = [V^T y, C y], one for all heads: (B, M, D) -> (B, 1, M, R+H), what a key cache holds.

        One linear map with the weight [V^T ; C] (R+H, D), built once per parameter version.
        """
        return F.linear(hidden_states, self._key_weight()).unsqueeze(-3)

    def _key_weight(self) -> torch.Tensor:
        """[V^T ; C] (R+H, D); cached while neither parameter changes (not while training them)."""
        key, content = self.collab_key.weight, self.collab_content_bias.weight
        if torch.is_grad_enabled() and (key.requires_grad or content.requires_grad):
            return torch.cat([key, content])
        stamp = (key.data_ptr(), key._version, content.data_ptr(), content._version, key.dtype, content.dtype)
        cached = self.__dict__.get("_collab_key_weight")
        if cached is None or cached[0] != stamp:
            cached = self.__dict__["_collab_key_weight"] = (stamp, torch.cat([key, content]).detach())
        return cached[1]

    def scores(self, hidden_states: torch.Tensor, key_value_states: torch.Tensor | None = None) -> torch.Tensor:
        """Pre-softmax scores q'_h . k' (no mask): (B, N, D), (B, M, D) -> (B, H, N, M)."""
        y = hidden_states if key_value_states is None else key_value_states
        return self.query_states(hidden_states) @ self.key_states(y).transpose(-1, -2)

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
            need_weights: also return the attention probabilities.

        Returns:
            ``(output, weights)``: output (B, H, N, d_v); weights (B, H, N, M) or ``None``.
        """
        query = self.collab_query(hidden_states)  # (B, N, R): U^T x, mixed per head by the kernel
        key = self.key_states(hidden_states if key_value_states is None else key_value_states)  # (B, 1, M, R+H)
        out, weights = collaborative_attention(query, key, value_states, mixing=self.query_mixing(),
                                               attention_mask=attention_mask,
                                               is_causal=is_causal and query.shape[-2] > 1,
                                               position_bias=position_bias,
                                               dropout=dropout if self.training else 0.0, need_weights=need_weights)
        return out, weights  # (B, H, N, d_v); weights None without need_weights

    def extra_repr(self) -> str:
        return (f"d_model={self.collab_query.in_features}, n_head={self.n_head}, shared_dim={self.shared_dim}, "
                f"scale={self.scale:g}")


# --------------------------------------------------------------------------- rotary decoders (RoPE, GQA)

def rotary_query_states(query: torch.Tensor, mixing: torch.Tensor, key_freq: torch.Tensor) -> torch.Tensor:
    """q'_{h,r} = q_{h,j(r)} conj(U_{g(h),r}) as [Re | Im]: (B, H, N, d) -> (B, H, N, R).

    ``query`` holds the original per-head queries in transformers' rotate_half layout
    (dimension j pairs with j + d/2: q_j + i q_{j+d/2}), ``mixing`` is U (G, R/2, 2) as
    (real, imaginary), ``key_freq`` the frequency j(r) of each component (R/2,). Head h
    reads group h // (H/G). Not yet rotated (docs/method.md).
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


def _complex_mul(states: torch.Tensor, real: torch.Tensor, imag: torch.Tensor) -> torch.Tensor:
    """[Re z | Im z] states (..., R) times w = real + i imag (..., R/2 broadcastable) -> [Re zw | Im zw].

    Written into one buffer (no concatenation) unless autograd needs the graph.
    """
    half = states.shape[-1] // 2
    re, im = states[..., :half], states[..., half:]
    if torch.is_grad_enabled() and any(t.requires_grad for t in (states, real, imag)):
        return torch.cat([re * real - im * imag, re * imag + im * real], dim=-1)
    out = torch.empty_like(states, memory_format=torch.contiguous_format)
    out_re, out_im = out[..., :half], out[..., half:]
    torch.mul(re, real, out=out_re).addcmul_(im, imag, value=-1.0)
    torch.mul(re, imag, out=out_im).addcmul_(im, real)
    return out


class CollaborativeRotaryAttention(nn.Module):
    """The query/key side of a rotary, grouped-query layer with shared keys (docs/method.md).

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

    def query_states(self, query: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     scale: float = 1.0) -> torch.Tensor:
        """Mixed, rotated, scaled queries s q'_{h,r} e^{i t theta_j(r)}: per-head queries (B, H, N, d) -> (B, H, N, R).

        One gather of the components' dimensions [j(r) | j(r) + d/2], then one complex
        multiplication per component by s conj(U_{g,r}) e^{i t theta_j(r)} (mixing, rotation and
        scale combined on the small (B, G, N, R/2) factor first); equals
        ``rotary_rotate(rotary_query_states(query, U, j), cos, sin, j)`` times s.
        """
        freq, index = self._freq_index(query.shape[-1] // 2)
        states = query.index_select(-1, index)  # (B, H, N, R): [Re q_j(r) | Im q_j(r)]
        cos, sin = cos.index_select(-1, freq).unsqueeze(-3), sin.index_select(-1, freq).unsqueeze(-3)  # (B, 1, N, R/2)
        mixing = scale * self.collab_mixing.to(query.dtype)
        u, v = mixing[..., 0].unsqueeze(-2), mixing[..., 1].unsqueeze(-2)  # (G, 1, R/2)
        real = torch.addcmul(u * cos, v, sin).unsqueeze(-3)  # (B, G, 1, N, R/2): Re (u - iv)(cos + i sin)
        imag = torch.addcmul(u * sin, v, cos, value=-1.0).unsqueeze(-3)
        grouped = states.unflatten(-3, (self.collab_mixing.shape[0], -1))  # (B, G, H/G, N, R)
        return _complex_mul(grouped, real, imag).flatten(-4, -3)  # (B, H, N, R)

    def key_states(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotated shared keys, one for all heads: (B, M, D) -> (B, 1, M, R)."""
        freq, _ = self._freq_index(cos.shape[-1] // 2)
        cos, sin = cos.index_select(-1, freq).unsqueeze(-3), sin.index_select(-1, freq).unsqueeze(-3)  # (B, 1, M, R/2)
        return _complex_mul(self.collab_key(hidden_states).unsqueeze(-3), cos, sin)  # (B, 1, M, R)

    def _freq_index(self, half: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(j(r) (R/2,), [j(r) | j(r) + d/2] (R,)), rebuilt only when collab_key_freq changes (or
        inference mode does: one built under ``torch.inference_mode`` cannot be saved for backward)."""
        freq = self.collab_key_freq
        stamp = (freq.data_ptr(), freq._version, half, torch.is_inference_mode_enabled())
        cached = self.__dict__.get("_collab_freq_index")
        if cached is None or cached[0] != stamp:
            cached = self.__dict__["_collab_freq_index"] = (stamp, (freq, torch.cat([freq, freq + half])))
        return cached[1]
