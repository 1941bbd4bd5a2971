"""The cost model of docs/method.md: pure functions of layer shapes, no I/O.

Counting rules (docs/method.md; per token, sequence length N, multiply-add = 2 FLOPs):

* key/query side, per compressed layer (D = d_model, H = heads, d = head_dim, R = shared_dim):
  ``qk_params_before = 2*D*H*d`` (+ the query/key bias elements that exist),
  ``qk_params_after = 2*D*R + H*R + H*D``;
  ``proj_flops_before = 4*D*H*d``, ``proj_flops_after = 4*D*R + 2*D*H + H*R``;
  ``score_flops_before = 2*N*H*d``, ``score_flops_after = 2*N*H*R``. The content bias
  c_h . y is computed once per key token (the ``2*D*H`` term of the projection); adding
  it to the scores is an addition of a bias and, like every bias, not counted.
* crossover ``N* = (proj_before - proj_after) / (2*H*(R - d))`` for R > d: above N*
  the compressed layer costs more; for R <= d there is none (``null``).
* whole model: every 2-D weight used as a Linear / Conv1D does ``2*in*out`` FLOPs per
  token, counted from the tensor shapes; embedding and position tables (names holding
  ``embed``, ``position`` or ``relative_attention_bias``, or the modules ``wte``, ``wpe``,
  ``shared``), norms, biases and tensors of other ranks (e.g. convolutions) are not
  counted. Every attention layer (compressed or not) adds scores ``2*N*H*d`` (or
  ``2*N*H*R`` when compressed) and value mixing ``2*N*H*d``. A full, bidirectional
  attention over N tokens is assumed (a causal decoder averages about N/2). A block whose
  weights are shared across layers (ALBERT) is counted once.
* key cache per token and layer: ``H*d`` elements before, ``R + H`` after (V^T y and the
  H content-bias terms c_h . y).
* shared values (docs/method.md "Shared values"; G = value heads, H without grouped-query
  attention, r_v = the latent's width): value cache per token and layer ``G*d`` before,
  ``r_v`` after; value projection ``2*D*G*d`` FLOPs per token before, ``2*D*r_v + 2*H*r_v*d``
  after (the latent c = A y, then each head's attention-weighted latent lifted by its
  group's B_g: per head, not per group, so the up-projection (G*d, r_v) is not counted from
  its shape); value mixing ``2*N*H*d`` before, ``2*N*H*r_v`` after (the attention weights
  the latent). A layer without shared values keeps its value figures. A rotary decoder absorbs
  each head's lift into its output projection where that is cheaper (``r_v (D - d) < D d``,
  :func:`output_absorbed`): then the lift term is the change of the output projection,
  ``2*D*H*(r_v - d)`` (negative for r_v < d), since o_proj is counted from its stored shape.

:mod:`collabcompress.commands.report` applies these to a compressed directory; the CLI renders the
result (:mod:`collabcompress.tables`). Imports neither torch nor rich.

Reference: Cordonnier, Loukas, Jaggi, "Multi-Head Attention: Collaborate Instead of
Concatenate", arXiv 2006.16362.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "qk_params", "projection_flops", "score_flops", "value_flops", "key_cache_elements",
    "crossover_seq_len", "linear_crossover", "matmul_flops", "saved_fraction", "LayerCost",
    "rotary_key_params", "rotary_proj_flops", "RotaryLayerCost", "value_cache_elements", "value_proj_flops", "output_absorbed",
]

# Tables looked up by index (gathers), not multiplied: no matmul FLOPs.
_TABLE = re.compile(r"embed|position|relative_attention_bias|(?:^|\.)(?:wte|wpe|shared)(?:\.|$)")


# ---- docs/method.md, one attention layer; shared_dim None = the original layer -------------

def qk_params(d_model: int, n_head: int, head_dim: int, shared_dim: int | None = None, *,
              bias_elements: int = 0) -> int:
    """Key/query parameters: ``2*D*H*d`` (+ biases) before, ``2*D*R + H*R + H*D`` after."""
    if shared_dim is None:
        return 2 * d_model * n_head * head_dim + bias_elements
    return 2 * d_model * shared_dim + n_head * shared_dim + n_head * d_model


def projection_flops(d_model: int, n_head: int, head_dim: int, shared_dim: int | None = None) -> int:
    """Key/query projection FLOPs per token: ``4*D*H*d`` before, ``4*D*R + 2*D*H + H*R`` after."""
    if shared_dim is None:
        return 4 * d_model * n_head * head_dim
    return 4 * d_model * shared_dim + 2 * d_model * n_head + n_head * shared_dim


def score_flops(seq_len: int, n_head: int, head_dim: int, shared_dim: int | None = None) -> int:
    """Attention-score FLOPs per query token against ``seq_len`` keys: ``2*N*H*d`` or ``2*N*H*R``."""
    return 2 * seq_len * n_head * (head_dim if shared_dim is None else shared_dim)


def value_flops(seq_len: int, n_head: int, head_dim: int, value_rank: int | None = None) -> int:
    """Value-mixing FLOPs per token: ``2*N*H*d``, or ``2*N*H*r_v`` with shared values (the
    attention weights each head's copy of the r_v-wide latent)."""
    return 2 * seq_len * n_head * (head_dim if value_rank is None else value_rank)


def output_absorbed(d_model: int, head_dim: int, value_rank: int) -> bool:
    """Whether a rotary decoder's shared values are cheaper with each head's lift absorbed into the
    output projection (W_O,h B_g: D x r_v per head, 2*D*H*r_v FLOPs per token) than lifted
    first (2*H*r_v*d, then the original 2*D*H*d): when ``r_v (D - d) < D d``."""
    return value_rank * (d_model - head_dim) < d_model * head_dim


def value_proj_flops(d_model: int, n_head: int, n_value_head: int, head_dim: int, value_rank: int | None = None,
                     *, absorbed: bool = False) -> int:
    """Value-projection FLOPs per token: ``2*D*G*d`` before; with shared values
    ``2*D*r_v + 2*H*r_v*d`` (the latent, then each head's lift by its group's up-projection), or
    with the lift ``absorbed`` into the output projection ``2*D*r_v + 2*D*H*(r_v - d)`` (the
    output projection, counted from its stored shape at 2*D*H*d, then costs 2*D*H*r_v)."""
    if value_rank is None:
        return 2 * d_model * n_value_head * head_dim
    lift = 2 * d_model * n_head * (value_rank - head_dim) if absorbed else 2 * n_head * value_rank * head_dim
    return 2 * d_model * value_rank + lift


def value_cache_elements(n_value_head: int, head_dim: int, value_rank: int | None = None) -> int:
    """Value-cache elements per token and layer: ``G*d`` before, ``r_v`` with shared values."""
    return n_value_head * head_dim if value_rank is None else value_rank


def key_cache_elements(n_head: int, head_dim: int, shared_dim: int | None = None) -> int:
    """Key-cache elements per token: ``H*d`` before, ``R + H`` after (V^T y and c_h . y)."""
    return n_head * head_dim if shared_dim is None else shared_dim + n_head


def crossover_seq_len(d_model: int, n_head: int, head_dim: int, shared_dim: int) -> float | None:
    """``N* = (proj_before - proj_after) / (2*H*(R - d))`` for R > d, else ``None``.

    Above N* the compressed layer costs more FLOPs per token than the original; a value
    <= 0 means it costs more at every length.
    """
    if shared_dim <= head_dim:
        return None
    saved = projection_flops(d_model, n_head, head_dim) - projection_flops(d_model, n_head, head_dim, shared_dim)
    return saved / (2 * n_head * (shared_dim - head_dim))


# ---- rotary layers (docs/method.md "Rotary decoders"); shared_dim None = the original layer -----

def rotary_key_params(d_model: int, n_kv_head: int, head_dim: int, shared_dim: int | None = None, *,
                      key_bias: bool = False) -> int:
    """Key-side parameters of a rotary layer: k_proj ``G*d*D`` (+ ``G*d`` bias) before;
    ``R*D`` (+ ``R`` bias) shared keys, ``G*R`` mixing (G x R/2 complex) and ``R/2`` frequency
    indices after. The query projection is unchanged and counted by the caller."""
    if shared_dim is None:
        return n_kv_head * head_dim * (d_model + key_bias)
    return shared_dim * (d_model + key_bias) + n_kv_head * shared_dim + shared_dim // 2


def rotary_proj_flops(d_model: int, n_head: int, n_kv_head: int, head_dim: int, shared_dim: int | None = None) -> int:
    """Query/key projection FLOPs per token of a rotary layer: ``2*D*H*d + 2*D*G*d`` before;
    ``2*D*H*d + 2*D*R + 4*H*R`` after (the query mixing q'_{h,r} = q_{h,j(r)} conj(U_{g,r}):
    one complex product, 4 multiply-adds, per head and component). The rotations cost the
    same kind of work before and after and are not counted."""
    query = 2 * d_model * n_head * head_dim
    if shared_dim is None:
        return query + 2 * d_model * n_kv_head * head_dim
    return query + 2 * d_model * shared_dim + 4 * n_head * shared_dim


def matmul_flops(name: str, shape: Sequence[int]) -> int:
    """FLOPs per token of a tensor used as a Linear / Conv1D weight: ``2*in*out`` for a 2-D
    weight; 0 for embedding and position tables, norms, biases and other ranks."""
    if len(shape) != 2 or _TABLE.search(name):
        return 0
    return 2 * shape[0] * shape[1]


@dataclass(frozen=True)
class LayerCost:
    """One attention layer and its docs/method.md figures.

    ``shared_dim`` is ``None`` for a layer that was not compressed (its figures are the
    same before and after); ``qk_params_before`` counts the bias elements that exist.
    ``value_rank`` is r_v for a layer with shared values, else ``None`` (values unchanged).
    """

    module: str
    index: int | None
    n_head: int
    head_dim: int
    d_model: int
    shared_dim: int | None
    relative_error: float | None
    qk_params_before: int
    value_rank: int | None = None

    def __post_init__(self) -> None:
        for name in ("n_head", "head_dim", "d_model"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        for name in ("shared_dim", "value_rank"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")

    @property
    def value_heads(self) -> int:
        """G, the value heads (H here; a rotary layer's key/value heads)."""
        return self.n_head

    def _r(self, after: bool) -> int | None:
        return self.shared_dim if after else None

    def record_fields(self) -> dict[str, int | bool]:
        """What the report's record of the layer adds to the common fields (a rotary layer: ``kv_heads``, ``rotary``)."""
        return {}

    def qk_params(self, after: bool) -> int:
        if not after or self.shared_dim is None:
            return self.qk_params_before
        return qk_params(self.d_model, self.n_head, self.head_dim, self.shared_dim)

    def proj_flops(self, after: bool) -> int:
        return projection_flops(self.d_model, self.n_head, self.head_dim, self._r(after))

    def score_flops(self, seq_len: int, after: bool) -> int:
        return score_flops(seq_len, self.n_head, self.head_dim, self._r(after))

    def _rv(self, after: bool) -> int | None:
        return self.value_rank if after else None

    def value_flops(self, seq_len: int, after: bool = False) -> int:
        return value_flops(seq_len, self.n_head, self.head_dim, self._rv(after))

    def value_proj_flops(self, after: bool) -> int:
        return value_proj_flops(self.d_model, self.n_head, self.value_heads, self.head_dim, self._rv(after))

    def key_cache(self, after: bool) -> int:
        return key_cache_elements(self.n_head, self.head_dim, self._r(after))

    def value_cache(self, after: bool) -> int:
        return value_cache_elements(self.value_heads, self.head_dim, self._rv(after))

    @property
    def crossover(self) -> float | None:
        if self.shared_dim is None:
            return None
        return crossover_seq_len(self.d_model, self.n_head, self.head_dim, self.shared_dim)


def linear_crossover(fixed_before: int, fixed_after: int, slope_before: int, slope_after: int) -> float | None:
    """Where ``fixed + slope*N`` of the original and the compressed model meet, if the compressed one
    grows faster; else ``None``."""
    if slope_after <= slope_before:
        return None
    return (fixed_before - fixed_after) / (slope_after - slope_before)


def saved_fraction(before: int, after: int) -> float:
    """``(before - after) / before``, 0 when there was nothing before."""
    return (before - after) / before if before else 0.0


@dataclass(frozen=True)
class RotaryLayerCost(LayerCost):
    """A rotary layer (docs/method.md): G key/value heads, the query
    projection unchanged, the key side replaced by R shared rotary key reals.

    ``qk_params_before`` counts q_proj and k_proj with their biases; after, q_proj and its bias
    plus :func:`rotary_key_params`. Key cache per token: ``G*d`` before, ``R`` after (one
    shared key head, values unchanged). Scores: ``2*N*H*d`` before, ``2*N*H*R`` after.
    """

    n_kv_head: int = 1
    key_bias: bool = False
    query_params: int = 0  # q_proj weight and bias elements, unchanged

    def record_fields(self) -> dict[str, int | bool]:
        return {"kv_heads": self.n_kv_head, "rotary": True}

    @property
    def value_heads(self) -> int:
        return self.n_kv_head

    def qk_params(self, after: bool) -> int:
        if not after or self.shared_dim is None:
            return self.qk_params_before
        return self.query_params + rotary_key_params(self.d_model, self.n_kv_head, self.head_dim, self.shared_dim,
                                                     key_bias=self.key_bias)

    def proj_flops(self, after: bool) -> int:
        return rotary_proj_flops(self.d_model, self.n_head, self.n_kv_head, self.head_dim, self._r(after))

    def key_cache(self, after: bool) -> int:
        return self.shared_dim if after and self.shared_dim is not None else self.n_kv_head * self.head_dim

    def value_proj_flops(self, after: bool) -> int:
        """As :class:`LayerCost`, with the lift absorbed into o_proj where that is cheaper (:func:`output_absorbed`:
        the rotary decoders' runtime chooses so)."""
        rv = self._rv(after)
        absorbed = rv is not None and output_absorbed(self.d_model, self.head_dim, rv)
        return value_proj_flops(self.d_model, self.n_head, self.value_heads, self.head_dim, rv, absorbed=absorbed)

    @property
    def crossover(self) -> float | None:
        if self.shared_dim is None:
            return None
        return linear_crossover(self.proj_flops(False), self.proj_flops(True), 2 * self.n_head * self.head_dim,
                                2 * self.n_head * self.shared_dim)
