"""CollaborativeAttention (collabcompress.runtime.attention) against the SPEC section 2 formulas.

The fused path (q' = [m_h * U^T x, 1], k' = [V^T y, c_h . y] through torch SDPA) must
equal verify.collaborative_scores + mask + softmax + values computed by hand, for every
mask kind, causal attention, cross-attention and additive position biases; the exact
concatenated tensors must reproduce the original multi-head attention; a fresh module
must have the documented initialisation and train.
"""

from __future__ import annotations

import math

import pytest
import torch

from collabcompress.maths.cp import concatenated
from collabcompress.runtime.attention import CollaborativeAttention, collaborative_key_states, collaborative_query_states
from collabcompress.maths.scores import collaborative_scores, original_scores



@pytest.fixture(autouse=True)
def _float64():
    """float64 so that fused and hand computations agree to 1e-9; restored after each test."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _random_module(d_model: int, n_head: int, shared_dim: int, seed: int, scale: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    query, key = torch.randn(shared_dim, d_model, generator=g), torch.randn(shared_dim, d_model, generator=g)
    mixing, content = torch.randn(n_head, shared_dim, generator=g), torch.randn(n_head, d_model, generator=g)
    return CollaborativeAttention.from_tensors(query, key, mixing, content, scale), (query, key, mixing, content)


def _by_hand(x, y, tensors, scale, value, mask=None, bias=None, causal=False):
    scores = collaborative_scores(x, y, *tensors, scale)  # (B, H, N, M)
    if bias is not None:
        scores = scores + bias
    if causal:
        n, m = scores.shape[-2:]
        scores = scores.masked_fill(~torch.ones(n, m, dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, -1)
    return probs @ value, probs


@pytest.mark.parametrize("d_model,n_head,shared_dim", [(16, 4, 6), (12, 3, 12), (20, 5, 2)])
@pytest.mark.parametrize("seed", [0, 1])
def test_scores_equal_spec_formula(d_model, n_head, shared_dim, seed):
    module, tensors = _random_module(d_model, n_head, shared_dim, seed)
    g = torch.Generator().manual_seed(100 + seed)
    x, y = torch.randn(2, 5, d_model, generator=g), torch.randn(2, 7, d_model, generator=g)
    expected = collaborative_scores(x, y, *tensors, module.scale)
    torch.testing.assert_close(module.scores(x, y), expected, rtol=1e-10, atol=1e-10)
    q = collaborative_query_states(x, tensors[0], tensors[2])
    k = collaborative_key_states(y, tensors[1], tensors[3])
    width = shared_dim + n_head
    assert q.shape == (2, n_head, 5, width) and k.shape == (2, 1, 7, width)  # one key for all heads
    assert torch.equal(q[..., shared_dim:], torch.eye(n_head)[None, :, None].expand(2, n_head, 5, n_head))
    torch.testing.assert_close(module.scale * q @ k.transpose(-1, -2), expected, rtol=1e-10, atol=1e-10)


def _inputs(seed=0, n=6, m=None, d_model=16, n_head=4, d_v=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, d_model, generator=g)
    y = None if m is None else torch.randn(2, m, d_model, generator=g)
    v = torch.randn(2, n_head, n if m is None else m, d_v, generator=g)
    return x, y, v


@pytest.mark.parametrize("case", ["plain", "bool", "additive", "causal", "causal+bool", "cross", "cross+bool",
                                  "bias", "bias+causal+bool", "bias+additive"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_forward_equals_hand_computation(case, need_weights):
    module, tensors = _random_module(16, 4, 6, seed=3)
    cross = case.startswith("cross")
    x, y, v = _inputs(seed=4, m=9 if cross else None)
    keys = 9 if cross else 6
    g = torch.Generator().manual_seed(5)
    mask = None
    if "bool" in case:
        mask = torch.ones(2, 1, 1, keys, dtype=torch.bool)
        mask[1, ..., -2:] = False  # padding of the second sequence
    elif "additive" in case:
        mask = torch.zeros(2, 1, 1, keys)
        mask[0, ..., :2] = torch.finfo(torch.float64).min
    bias = torch.randn(1, 4, 6, keys, generator=g) if "bias" in case else None
    causal = "causal" in case
    out, weights = module(x, v, y, mask, is_causal=causal, position_bias=bias, need_weights=need_weights)
    expected, probs = _by_hand(x, x if y is None else y, tensors, module.scale, v, mask, bias, causal)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    if need_weights:
        torch.testing.assert_close(weights, probs, rtol=1e-9, atol=1e-9)
    else:
        assert weights is None


def test_exact_concatenated_reproduces_multi_head_attention():
    """R = H*d with U, V, M of the concatenated solution and c_h = W_K^h^T b_Q^h: same softmax."""
    g = torch.Generator().manual_seed(7)
    d_model, n_head, head_dim = 24, 4, 6
    w_q = torch.randn(n_head * head_dim, d_model, generator=g)
    w_k = torch.randn(n_head * head_dim, d_model, generator=g)
    b_q, b_k = torch.randn(n_head * head_dim, generator=g), torch.randn(n_head * head_dim, generator=g)
    f = concatenated(w_q, w_k, n_head)
    content = (w_k.view(n_head, head_dim, d_model) * b_q.view(n_head, head_dim, 1)).sum(1)  # (H, D)
    scale = 1 / math.sqrt(head_dim)
    module = CollaborativeAttention.from_tensors(f.query, f.key, f.mixing, content, scale)
    x = torch.randn(3, 8, d_model, generator=g)
    v = torch.randn(3, n_head, 8, 5, generator=g)
    reference = torch.softmax(original_scores(x, x, w_q, w_k, b_q, b_k, n_head, scale), -1)
    out, probs = module(x, v, need_weights=True)
    torch.testing.assert_close(probs, reference, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, reference @ v, rtol=1e-10, atol=1e-10)


def test_fresh_concatenate_init_is_block_one_hot():
    m = CollaborativeAttention(32, 4, 16)
    mixing = m.collab_mixing.detach()
    assert torch.equal(mixing.sum(0), torch.ones(16))  # each shared dimension belongs to one head
    assert torch.equal(mixing.sum(1), torch.full((4,), 4.0))  # R/H dimensions per head
    assert torch.equal(mixing[1, 4:8], torch.ones(4))
    assert torch.count_nonzero(m.collab_content_bias.weight) == 0
    assert m.scale == pytest.approx(1 / math.sqrt(16 / 4))
    assert (m.n_head, m.shared_dim) == (4, 16)
    small = CollaborativeAttention(32, 8, 3)  # R < H: every head still gets one dimension
    assert torch.equal(small.collab_mixing.detach().sum(1), torch.ones(8))
    assert torch.equal(CollaborativeAttention(8, 2, 4, mixing_init="ones").collab_mixing.detach(), torch.ones(2, 4))
    uniform = CollaborativeAttention(8, 2, 4, mixing_init="uniform").collab_mixing.detach()
    assert uniform.min() >= 0 and uniform.max() <= 1 and uniform.unique().numel() == 8


def test_fresh_module_trains():
    torch.manual_seed(0)
    m = CollaborativeAttention(16, 4, 8)
    x, _, v = _inputs(seed=1)
    target = torch.randn(2, 4, 6, 5)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (m(x, v)[0] - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is not None for p in m.parameters())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("kwargs,message", [
    ({"d_model": 0, "n_head": 2, "shared_dim": 4}, "d_model must be a positive integer"),
    ({"d_model": 8, "n_head": 2, "shared_dim": 4, "mixing_init": "eye"}, "mixing_init must be one of"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CollaborativeAttention(**kwargs)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        CollaborativeAttention.from_tensors(torch.zeros(4, 8), torch.zeros(4, 7), torch.zeros(2, 4),
                                            torch.zeros(2, 8), 1.0)


def test_state_dict_names_are_the_output_format():
    m = CollaborativeAttention(8, 2, 4)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == {
        "collab_query.weight": (4, 8), "collab_key.weight": (4, 8), "collab_mixing": (2, 4),
        "collab_content_bias.weight": (2, 8)}
