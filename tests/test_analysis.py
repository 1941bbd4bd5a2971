"""Spectral analysis: Gram-matrix spectra against explicit concatenations, rank choice."""

from __future__ import annotations

import pytest
import torch

from collabcompress.maths.spectra import choose_rank, gram_matrices, layer_spectrum, rank_for_energy


def _weights(n_head: int, head_dim: int, d_model: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w_q = torch.randn(n_head * head_dim, d_model, generator=g, dtype=torch.float64)
    w_k = torch.randn(n_head * head_dim, d_model, generator=g, dtype=torch.float64)
    return w_q, w_k


def _explicit(w_q, w_k, n_head):
    d = w_q.shape[0] // n_head
    p = [w_q[h * d:(h + 1) * d].T @ w_k[h * d:(h + 1) * d] for h in range(n_head)]  # H x (D, D)
    return torch.cat(p, dim=1), torch.cat([ph.T for ph in p], dim=1), p  # (D, H*D) each


@pytest.mark.parametrize("n_head,head_dim,d_model,seed", [(4, 8, 24, 0), (3, 5, 12, 1), (6, 4, 16, 2), (2, 16, 20, 3)])
def test_gram_spectrum_equals_explicit_singular_values(n_head, head_dim, d_model, seed):
    w_q, w_k = _weights(n_head, head_dim, d_model, seed)
    p_q, p_k, p = _explicit(w_q, w_k, n_head)
    sp = layer_spectrum(w_q, w_k, n_head)
    width = n_head * head_dim
    for side, dense in ((sp.sv_query, p_q), (sp.sv_key, p_k)):
        expected = torch.linalg.svdvals(dense)[: min(width, d_model)]
        assert torch.allclose(side[: expected.numel()], expected, rtol=1e-8, atol=1e-8 * float(expected[0]))
        assert torch.all(side[expected.numel():] == 0)
    for h in range(n_head):
        expected = torch.linalg.svdvals(p[h])[:head_dim]
        assert torch.allclose(sp.sv_head[h], expected, rtol=1e-8, atol=1e-8 * float(expected[0]))


def test_gram_matrices_are_products_of_concatenations():
    w_q, w_k = _weights(3, 4, 10, 7)
    p_q, p_k, _ = _explicit(w_q, w_k, 3)
    g_q, g_k = gram_matrices(w_q, w_k, 3)
    assert torch.allclose(g_q, p_q @ p_q.T)
    assert torch.allclose(g_k, p_k @ p_k.T)


def test_energy_and_rank_on_known_spectrum():
    # Heads spanning the same 2-dimensional subspace: the concatenation has rank 2.
    d_model, n_head, head_dim = 12, 4, 3
    basis = torch.linalg.qr(torch.randn(d_model, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))[0]
    w_q = torch.cat([torch.randn(head_dim, 2, dtype=torch.float64) @ basis.T for _ in range(n_head)])
    w_k = torch.cat([torch.randn(head_dim, 2, dtype=torch.float64) @ basis.T for _ in range(n_head)])
    sp = layer_spectrum(w_q, w_k, n_head)
    assert sp.rank_at(1.0) == 2
    assert sp.energy_query[-1] == pytest.approx(1.0)
    assert sp.redundancy(1.0) == pytest.approx(1 - 2 / 12)
    assert all(r <= 2 for r in sp.head_effective_rank(0.99))
    assert torch.all(sp.energy_query[1:] >= sp.energy_query[:-1])


@pytest.mark.parametrize("tau", [0.0, -0.1, 1.5, float("nan")])
def test_energy_outside_unit_interval_is_refused(tau):
    w_q, w_k = _weights(2, 4, 8, 0)
    with pytest.raises(ValueError):
        layer_spectrum(w_q, w_k, 2).rank_at(tau)


def test_rank_choice_rules():
    assert choose_rank(130, 384) == 136
    assert choose_rank(130, 384, multiple_of=1) == 130
    assert choose_rank(5, 384, min_rank=64) == 64
    assert choose_rank(300, 384, max_rank=256) == 256
    assert choose_rank(383, 384) == 384
    assert choose_rank(390, 384, multiple_of=16) == 384
    w_q, w_k = _weights(4, 8, 32, 0)
    sp = layer_spectrum(w_q, w_k, 4)
    assert rank_for_energy(sp, 0.95) % 8 == 0 or rank_for_energy(sp, 0.95) == sp.width
