"""--budget: the allocation (exact knapsack), the ladder, the rotary attention KL, and compress end to end."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from collabcompress.budget import allocate, rank_ladder
from collabcompress.refine import RotaryKL, refine_rotary, rotary_collab_logits, rotary_original_logits
from collabcompress.rotary import rotary_factors, rotary_scores


def test_ladder_steps_and_ends():
    assert rank_ladder(384, 8) == list(range(24, 385, 24))
    assert rank_ladder(192, 8, even=True) == list(range(16, 193, 16))
    assert rank_ladder(12, 8) == [8, 12]
    assert all(r % 2 == 0 for r in rank_ladder(30, 3, even=True))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_allocate_is_the_brute_force_optimum(seed):
    g = torch.Generator().manual_seed(seed)
    ladder = [8, 16, 24, 32]
    curves = [{r: float(torch.rand(1, generator=g)) * (40 - r) for r in ladder} for _ in range(4)]
    for total in (32, 50, 80, 128):
        ranks = allocate(curves, total)
        best = min(sum(c[r] for c, r in zip(curves, pick))
                   for pick in itertools.product(ladder, repeat=4) if sum(pick) <= total)
        assert sum(ranks) <= total
        assert math.isclose(sum(c[r] for c, r in zip(curves, ranks)), best, rel_tol=1e-12)


def test_allocate_gives_the_budget_where_the_loss_falls_most():
    flat = {8: 1.0, 16: 0.99, 32: 0.98}
    steep = {8: 5.0, 16: 1.0, 32: 0.0}
    assert allocate([flat, steep], 40) == [8, 32]
    assert allocate([steep, flat], 40) == [32, 8]


def test_allocate_refuses_a_budget_below_the_smallest_candidates():
    with pytest.raises(ValueError, match="below"):
        allocate([{8: 1.0}, {8: 1.0}], 15)


def _rotary_layer(seed=0, n_head=4, n_kv_head=2, head_dim=8, d_model=12, bias=True):
    g = torch.Generator().manual_seed(seed)
    w_q = torch.randn(n_head * head_dim, d_model, generator=g)
    w_k = torch.randn(n_kv_head * head_dim, d_model, generator=g)
    b_q = torch.randn(n_head * head_dim, generator=g) if bias else None
    b_k = torch.randn(n_kv_head * head_dim, generator=g) if bias else None
    theta = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    x = torch.randn(3, 10, d_model, generator=g)
    return w_q, b_q, w_k, b_k, theta, x


@pytest.mark.parametrize("bias", [False, True])
def test_rotary_logits_match_the_float64_reference(bias):
    w_q, b_q, w_k, b_k, theta, x = _rotary_layer(bias=bias)
    rows = torch.arange(10).expand(3, 10)
    ref = rotary_scores(x, x, w_q, b_q, None, n_head=4, head_dim=8, theta=theta, positions=torch.arange(10),
                        w_key=w_k, b_key=b_k, n_kv_head=2)
    got = rotary_original_logits(x, rows, w_q, b_q, w_k, b_k, 4, 2, 8, theta.float(), 8 ** -0.5)
    assert torch.allclose(got.double(), ref, atol=1e-4)
    f = rotary_factors(w_k, b_k, 2, 8, 10)
    ref = rotary_scores(x, x, w_q, b_q, f, n_head=4, head_dim=8, theta=theta, positions=torch.arange(10))
    got = rotary_collab_logits(x, rows, w_q, b_q, f.key.float(), None if f.key_bias is None else f.key_bias.float(),
                               f.freq, f.mixing.float(), 4, 8, theta.float(), 8 ** -0.5)
    assert torch.allclose(got.double(), ref, atol=1e-4)


def test_rotary_kl_is_zero_at_full_rank_and_falls_with_rank():
    w_q, b_q, w_k, b_k, theta, x = _rotary_layer()
    kl = RotaryKL(x, torch.tensor([10, 7, 4]), w_q, b_q, w_k, b_k, 4, 2, 8, theta, 8 ** -0.5, query_rows=6)
    losses = []
    for r in (4, 8, 16):
        f = rotary_factors(w_k, b_k, 2, 8, r)
        losses.append(kl(f.key, f.key_bias, f.freq, f.mixing))
    assert losses[-1] < 1e-6
    assert losses[0] > losses[1] > losses[2]


def test_refine_rotary_lowers_the_kl_and_is_seeded():
    w_q, b_q, w_k, b_k, theta, x = _rotary_layer(seed=3)
    kl = RotaryKL(x, torch.tensor([10, 10, 10]), w_q, b_q, w_k, b_k, 4, 2, 8, theta, 8 ** -0.5)
    f = rotary_factors(w_k, b_k, 2, 8, 6)
    a = refine_rotary(kl, f.key, f.key_bias, f.freq, f.mixing, steps=30, seed=5)
    b = refine_rotary(kl, f.key, f.key_bias, f.freq, f.mixing, steps=30, seed=5)
    assert a.kl_after < a.kl_before
    assert torch.equal(a.key, b.key) and torch.equal(a.mixing, b.mixing) and torch.equal(a.key_bias, b.key_bias)
    assert a.key.shape == f.key.shape and a.mixing.shape == f.mixing.shape
