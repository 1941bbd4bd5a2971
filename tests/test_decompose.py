"""Tests of collabcompress.maths.cp: CP-ALS in factored form and the exact concatenated form."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from collabcompress.maths.cp import (
    CPFactors,
    concatenated,
    cp_als,
    relative_error,
    whitening_factor,
)

F64 = torch.float64


# --------------------------------------------------------------------------- helpers


def random_weights(n_head: int, head_dim: int, d_model: int, seed: int, dtype=F64):
    """Gaussian query/key weights (n_head*head_dim, d_model): no shared structure at all."""
    g = torch.Generator().manual_seed(seed)
    w_query = torch.randn(n_head * head_dim, d_model, generator=g, dtype=F64)
    w_key = torch.randn(n_head * head_dim, d_model, generator=g, dtype=F64)
    return w_query.to(dtype), w_key.to(dtype)


def known_cp_weights(n_head: int, head_dim: int, d_model: int, rank: int, seed: int):
    """Weights whose slices P_h = W_Q^h^T W_K^h are exactly U diag(m_h) V^T of CP rank `rank`.

    Head h uses at most head_dim of the rank components (the others have m_hr = 0), so
    P_h has rank <= head_dim and factors as W_Q^h = (U_S diag(m_S))^T, W_K^h = V_S^T padded
    with zero rows; a random invertible T_h then mixes the rows
    (W_Q^h <- T_h^-T W_Q^h, W_K^h <- T_h W_K^h), which leaves P_h unchanged but hides
    the structure from the weights.
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d_model, rank, generator=g, dtype=F64)  # (D, R0)
    v = torch.randn(d_model, rank, generator=g, dtype=F64)  # (D, R0)
    mixing = torch.randn(n_head, rank, generator=g, dtype=F64)  # (H, R0)
    if rank > head_dim:
        for h in range(n_head):
            mixing[h, torch.randperm(rank, generator=g)[: rank - head_dim]] = 0.0
    w_query = torch.zeros(n_head, head_dim, d_model, dtype=F64)
    w_key = torch.zeros(n_head, head_dim, d_model, dtype=F64)
    for h in range(n_head):
        used = mixing[h].nonzero().flatten()
        w_query[h, : len(used)] = (u[:, used] * mixing[h, used]).T
        w_key[h, : len(used)] = v[:, used].T
        mix = torch.randn(head_dim, head_dim, generator=g, dtype=F64) + 3.0 * torch.eye(head_dim, dtype=F64)
        w_query[h] = torch.linalg.solve(mix.T, w_query[h])
        w_key[h] = mix @ w_key[h]
    return w_query.reshape(n_head * head_dim, d_model), w_key.reshape(n_head * head_dim, d_model)


def dense_slices(w_query: torch.Tensor, w_key: torch.Tensor, n_head: int) -> torch.Tensor:
    """P_h = W_Q^h^T W_K^h, (H, D, D), built explicitly (tests only)."""
    d_model = w_query.shape[1]
    q = w_query.to(F64).reshape(n_head, -1, d_model)  # (H, d, D)
    k = w_key.to(F64).reshape(n_head, -1, d_model)  # (H, d, D)
    return q.mT @ k  # (H, D, D)


def dense_relative_error(w_query, w_key, n_head, factors: CPFactors, lq=None, lk=None) -> float:
    p = dense_slices(w_query, w_key, n_head)  # (H, D, D)
    p_hat = factors.slices().to(F64)  # (H, D, D)
    if lq is not None:
        p, p_hat = lq.mT @ p @ lk, lq.mT @ p_hat @ lk
    return float((p - p_hat).norm() / p.norm())


def random_moment(d_model: int, seed: int, spread: float = 3.0) -> torch.Tensor:
    """An SPD second moment with eigenvalues spread over `spread` decades."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d_model, d_model, generator=g, dtype=F64))
    eig = torch.logspace(0.0, -spread, d_model, dtype=F64)
    return (basis * eig) @ basis.mT


def assert_non_increasing(errors: tuple[float, ...]) -> None:
    for before, after in zip(errors, errors[1:]):
        assert after <= before * (1.0 + 1e-12), errors


# --------------------------------------------------------------------------- recovery and fit


@pytest.mark.parametrize(
    ("n_head", "head_dim", "d_model", "rank"),
    [(4, 8, 24, 6), (4, 8, 24, 8), (3, 4, 10, 4), (6, 8, 40, 5), (8, 8, 32, 16)],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_known_cp_rank_is_recovered(n_head, head_dim, d_model, rank, seed):
    w_query, w_key = known_cp_weights(n_head, head_dim, d_model, rank, seed)
    factors = cp_als(w_query, w_key, n_head, rank, max_iter=500)
    assert factors.relative_error < 1e-4
    assert dense_relative_error(w_query, w_key, n_head, factors) < 1e-4
    assert factors.query.shape == (rank, d_model)
    assert factors.key.shape == (rank, d_model)
    assert factors.mixing.shape == (n_head, rank)


@pytest.mark.parametrize(
    ("n_head", "head_dim", "d_model", "rank"),
    [(4, 8, 32, 5), (4, 8, 32, 16), (6, 4, 20, 12), (2, 16, 24, 20), (4, 8, 16, 24)],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_error_never_increases_across_sweeps(n_head, head_dim, d_model, rank, seed):
    w_query, w_key = random_weights(n_head, head_dim, d_model, seed)
    factors = cp_als(w_query, w_key, n_head, rank, max_iter=60, tol=0.0)
    assert factors.iterations == len(factors.errors) > 0
    assert_non_increasing(factors.errors)
    assert factors.errors[-1] == factors.relative_error
    start = cp_als(w_query, w_key, n_head, rank, max_iter=0)
    assert factors.relative_error <= start.relative_error


@pytest.mark.parametrize(("rank", "seed"), [(6, 0), (12, 1), (16, 2)])
def test_error_never_increases_on_a_low_rank_tensor(rank, seed):
    w_query, w_key = known_cp_weights(4, 8, 24, rank, seed)
    factors = cp_als(w_query, w_key, 4, rank, max_iter=200, tol=0.0)
    assert_non_increasing(factors.errors)


def test_more_sweeps_do_not_hurt():
    w_query, w_key = random_weights(4, 8, 32, 3)
    errors = [cp_als(w_query, w_key, 4, 12, max_iter=n, tol=0.0).relative_error for n in (0, 1, 5, 25)]
    assert errors == sorted(errors, reverse=True)


def test_tol_stops_early():
    w_query, w_key = random_weights(4, 8, 32, 4)
    loose = cp_als(w_query, w_key, 4, 12, max_iter=500, tol=1e-2)
    assert 0 < loose.iterations < 500
    assert_non_increasing(loose.errors)


def test_max_iter_zero_returns_the_spectral_start():
    w_query, w_key = random_weights(3, 8, 24, 5)
    factors = cp_als(w_query, w_key, 3, 10, max_iter=0)
    assert factors.iterations == 0 and factors.errors == ()
    assert 0.0 < factors.relative_error < 1.0
    assert factors.relative_error == pytest.approx(relative_error(w_query, w_key, 3, factors), rel=1e-9)


# --------------------------------------------------------------------------- exact solution


def scores(factors: CPFactors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Collaborative scores (U^T x) . (m_h * V^T y) for all heads, (H, Nx, Ny)."""
    qx = x @ factors.query.mT.to(F64)  # (Nx, R)
    ky = y @ factors.key.mT.to(F64)  # (Ny, R)
    return torch.einsum("ir,hr,jr->hij", qx, factors.mixing.to(F64), ky)


@pytest.mark.parametrize(("n_head", "head_dim", "d_model"), [(12, 32, 384), (4, 8, 24), (6, 16, 64), (4, 8, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_concatenated_reproduces_the_scores(n_head, head_dim, d_model, dtype):
    w_query, w_key = random_weights(n_head, head_dim, d_model, 7, dtype)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(5, d_model, generator=g, dtype=F64)
    y = torch.randn(7, d_model, generator=g, dtype=F64)
    expected = torch.einsum("id,hde,je->hij", x, dense_slices(w_query, w_key, n_head), y)  # (H, 5, 7)
    for factors in (
        concatenated(w_query, w_key, n_head),
        cp_als(w_query, w_key, n_head, n_head * head_dim),
    ):
        assert factors.shared_dim == n_head * head_dim
        assert factors.iterations == 0
        assert factors.relative_error < 1e-6
        got = scores(factors, x, y)
        assert float((got - expected).norm() / expected.norm()) < 1e-5
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_concatenated_layout():
    w_query, w_key = random_weights(3, 4, 10, 0)
    factors = concatenated(w_query, w_key, 3)
    assert torch.equal(factors.query, w_query)
    assert torch.equal(factors.key, w_key)
    assert torch.equal(factors.mixing, torch.eye(3, dtype=F64).repeat_interleave(4, dim=1))


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize(
    ("n_head", "head_dim", "d_model", "rank", "seed"),
    [(4, 8, 32, 12, 0), (4, 8, 16, 24, 3), (12, 32, 384, 96, 0)],
)
def test_same_inputs_give_identical_factors(n_head, head_dim, d_model, rank, seed):
    w_query, w_key = random_weights(n_head, head_dim, d_model, 11)
    first = cp_als(w_query, w_key, n_head, rank, seed=seed, max_iter=15)
    second = cp_als(w_query.clone(), w_key.clone(), n_head, rank, seed=seed, max_iter=15)
    assert torch.equal(first.query, second.query)
    assert torch.equal(first.key, second.key)
    assert torch.equal(first.mixing, second.mixing)
    assert first.errors == second.errors
    assert first.relative_error == second.relative_error


def test_float32_inputs_are_promoted():
    w_query, w_key = random_weights(4, 8, 32, 5, torch.float32)
    from32 = cp_als(w_query, w_key, 4, 12, max_iter=10)
    from64 = cp_als(w_query.double(), w_key.double(), 4, 12, max_iter=10)
    assert from32.query.dtype == from32.key.dtype == from32.mixing.dtype == F64
    assert torch.equal(from32.query, from64.query) and torch.equal(from32.mixing, from64.mixing)


def test_scale_moves_into_the_mixing():
    w_query, w_key = random_weights(4, 8, 32, 6)
    plain = cp_als(w_query, w_key, 4, 12, max_iter=10)
    scaled = cp_als(w_query * 1e3, w_key * 1e-5, 4, 12, max_iter=10)
    assert scaled.relative_error == pytest.approx(plain.relative_error, rel=1e-6)
    torch.testing.assert_close(scaled.mixing, plain.mixing * 1e-2, rtol=1e-5, atol=1e-9)


def test_seed_only_matters_when_shared_dim_exceeds_d_model():
    w_query, w_key = random_weights(4, 8, 16, 2)  # H*d = 32 > D = 16
    small = [cp_als(w_query, w_key, 4, 12, seed=s, max_iter=5) for s in (0, 1)]
    assert torch.equal(small[0].query, small[1].query)
    large = [cp_als(w_query, w_key, 4, 24, seed=s, max_iter=5) for s in (0, 1)]
    assert not torch.equal(large[0].query, large[1].query)
    for factors in large:
        assert factors.query.shape == (24, 16) and torch.isfinite(factors.query).all()


# --------------------------------------------------------------------------- error in factored form


@pytest.mark.parametrize(("n_head", "head_dim", "d_model", "rank"), [(3, 4, 10, 5), (4, 8, 24, 9), (2, 8, 8, 12)])
def test_factored_error_matches_the_dense_error(n_head, head_dim, d_model, rank):
    w_query, w_key = random_weights(n_head, head_dim, d_model, 9)
    factors = cp_als(w_query, w_key, n_head, rank, max_iter=3)
    dense = dense_relative_error(w_query, w_key, n_head, factors)
    assert 0.01 < dense < 1.0
    assert factors.relative_error == pytest.approx(dense, rel=1e-10)
    assert relative_error(w_query, w_key, n_head, factors) == pytest.approx(dense, rel=1e-10)


def test_factored_error_of_arbitrary_factors():
    w_query, w_key = random_weights(3, 4, 10, 1)
    g = torch.Generator().manual_seed(2)
    factors = CPFactors(
        query=torch.randn(6, 10, generator=g, dtype=F64),
        key=torch.randn(6, 10, generator=g, dtype=F64),
        mixing=torch.randn(3, 6, generator=g, dtype=F64),
        relative_error=float("nan"),
    )
    dense = dense_relative_error(w_query, w_key, 3, factors)
    assert relative_error(w_query, w_key, 3, factors) == pytest.approx(dense, rel=1e-10)


# --------------------------------------------------------------------------- whitening


@pytest.mark.parametrize(("n_head", "head_dim", "d_model", "rank"), [(4, 8, 32, 8), (6, 4, 24, 10)])
@pytest.mark.parametrize("seed", [0, 1])
def test_whitened_decomposition_fits_the_whitened_metric_better(n_head, head_dim, d_model, rank, seed):
    w_query, w_key = random_weights(n_head, head_dim, d_model, seed)
    lq = whitening_factor(random_moment(d_model, seed + 10))
    lk = whitening_factor(random_moment(d_model, seed + 20))
    plain = cp_als(w_query, w_key, n_head, rank, max_iter=100)
    whitened = cp_als(w_query, w_key, n_head, rank, max_iter=100, whiten_query=lq, whiten_key=lk)
    plain_in_metric = relative_error(w_query, w_key, n_head, plain, whiten_query=lq, whiten_key=lk)
    assert whitened.relative_error <= plain_in_metric
    # The factors were mapped back: their whitened error, recomputed, is the one reported.
    recomputed = relative_error(w_query, w_key, n_head, whitened, whiten_query=lq, whiten_key=lk)
    assert recomputed == pytest.approx(whitened.relative_error, rel=1e-6)
    assert dense_relative_error(w_query, w_key, n_head, whitened, lq, lk) == pytest.approx(
        whitened.relative_error, rel=1e-6
    )
    assert_non_increasing(whitened.errors)


def test_identity_whitening_changes_nothing():
    w_query, w_key = random_weights(4, 8, 32, 4)
    eye = torch.eye(32, dtype=F64)
    plain = cp_als(w_query, w_key, 4, 12, max_iter=20)
    same = cp_als(w_query, w_key, 4, 12, max_iter=20, whiten_query=eye, whiten_key=eye)
    assert torch.equal(plain.query, same.query)
    assert torch.equal(plain.key, same.key)
    assert torch.equal(plain.mixing, same.mixing)
    assert plain.errors == same.errors
    assert torch.equal(whitening_factor(eye * 4.0, shrinkage=0.0), eye * 2.0)


def test_whitening_factor_is_the_cholesky_factor_of_the_shrunk_moment():
    moment = random_moment(16, 3)
    for shrinkage in (0.0, 0.1, 1.0):
        lower = whitening_factor(moment, shrinkage=shrinkage)
        target = (1 - shrinkage) * moment + shrinkage * float(moment.trace()) / 16 * torch.eye(16, dtype=F64)
        assert torch.equal(lower, lower.tril()) and bool((lower.diagonal() > 0).all())
        torch.testing.assert_close(lower @ lower.mT, target, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "moment",
    [
        torch.zeros(8, 8, dtype=F64),
        torch.ones(8, 8, dtype=F64),  # rank 1
        torch.diag(torch.tensor([1.0, 1e-30, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0], dtype=F64)),
        torch.diag(torch.tensor([1.0, -1e-9, 2.0, 0.0, 1.0, 0.0, 3.0, 0.0], dtype=F64)),  # slightly indefinite
        torch.full((8, 8), 1e300, dtype=F64),
    ],
    ids=["zeros", "rank1", "tiny", "indefinite", "huge"],
)
@pytest.mark.parametrize("shrinkage", [0.0, 1e-2])
def test_whitening_factor_never_fails(moment, shrinkage):
    lower = whitening_factor(moment, shrinkage=shrinkage)
    assert lower.shape == (8, 8) and lower.dtype == F64
    assert torch.isfinite(lower).all()
    assert torch.equal(lower, lower.tril())
    assert bool((lower.diagonal() > 0).all())
    # Usable by cp_als.
    w_query, w_key = random_weights(2, 4, 8, 0)
    factors = cp_als(w_query, w_key, 2, 3, max_iter=3, whiten_query=lower, whiten_key=lower)
    assert torch.isfinite(factors.query).all() and torch.isfinite(factors.mixing).all()


def test_whitening_factor_accepts_float32():
    lower = whitening_factor(torch.eye(4, dtype=torch.float32) * 9.0)
    assert lower.dtype == F64
    torch.testing.assert_close(lower, torch.eye(4, dtype=F64) * 3.0)


# --------------------------------------------------------------------------- validation


def test_cpfactors_validates_shapes():
    q, k, m = torch.zeros(4, 10), torch.zeros(4, 10), torch.zeros(3, 4)
    assert CPFactors(q, k, m, 0.5).shared_dim == 4
    with pytest.raises(ValueError, match="same shape"):
        CPFactors(q, torch.zeros(5, 10), m, 0.5)
    with pytest.raises(ValueError, match="same shape"):
        CPFactors(q, torch.zeros(4, 11), m, 0.5)
    with pytest.raises(ValueError, match="mixing"):
        CPFactors(q, k, torch.zeros(3, 5), 0.5)
    with pytest.raises(ValueError, match="2-D"):
        CPFactors(q, k, torch.zeros(4), 0.5)
    with pytest.raises(ValueError, match="2-D"):
        CPFactors(q.numpy(), k, m, 0.5)
    with pytest.raises(ValueError, match="entries"):
        CPFactors(q, k, m, 0.5, iterations=2, errors=(0.7,))
    assert CPFactors(q, k, m, 0.5, iterations=2, errors=[0.7, 0.5]).errors == (0.7, 0.5)


def test_bad_arguments_raise_value_error():
    w_query, w_key = random_weights(4, 8, 24, 0)
    with pytest.raises(ValueError, match="exceeds n_head\\*head_dim=32"):
        cp_als(w_query, w_key, 4, 33)
    for bad_rank in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="shared_dim"):
            cp_als(w_query, w_key, 4, bad_rank)
    with pytest.raises(ValueError, match="multiple of n_head=5"):
        cp_als(w_query, w_key, 5, 4)
    with pytest.raises(ValueError, match="n_head"):
        cp_als(w_query, w_key, 0, 4)
    with pytest.raises(ValueError, match="same shape"):
        cp_als(w_query, w_key[:, :20], 4, 4)
    with pytest.raises(ValueError, match="2-D"):
        cp_als(w_query[0], w_key[0], 4, 4)
    with pytest.raises(ValueError, match="floating-point"):
        cp_als(w_query.long(), w_key.long(), 4, 4)
    with pytest.raises(ValueError, match="max_iter"):
        cp_als(w_query, w_key, 4, 4, max_iter=-1)
    with pytest.raises(ValueError, match="tol"):
        cp_als(w_query, w_key, 4, 4, tol=float("nan"))
    with pytest.raises(ValueError, match="ridge"):
        cp_als(w_query, w_key, 4, 4, ridge=-1.0)
    with pytest.raises(ValueError, match="NaN"):
        cp_als(w_query * float("nan"), w_key, 4, 4)
    with pytest.raises(ValueError, match="whiten_query must be a \\(24, 24\\)"):
        cp_als(w_query, w_key, 4, 4, whiten_query=torch.eye(23))
    with pytest.raises(ValueError, match="lower triangular"):
        cp_als(w_query, w_key, 4, 4, whiten_key=torch.ones(24, 24))
    with pytest.raises(ValueError, match="non-zero diagonal"):
        cp_als(w_query, w_key, 4, 4, whiten_key=torch.zeros(24, 24))
    with pytest.raises(ValueError, match="device"):
        cp_als(w_query, w_key, 4, 4, device="no-such-device")
    with pytest.raises(ValueError, match="square"):
        whitening_factor(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="shrinkage"):
        whitening_factor(torch.eye(3), shrinkage=1.5)
    with pytest.raises(ValueError, match="NaN"):
        whitening_factor(torch.full((3, 3), float("inf")))
    factors = cp_als(w_query, w_key, 4, 4, max_iter=1)
    with pytest.raises(ValueError, match="n_head=4"):
        relative_error(w_query, w_key, 2, factors)


def test_zero_weights_give_zero_error():
    zeros = torch.zeros(8, 12)
    factors = cp_als(zeros, zeros, 2, 3)
    assert factors.relative_error == 0.0
    assert torch.equal(factors.mixing, torch.zeros(2, 3, dtype=F64))
    assert torch.isfinite(factors.query).all()


# --------------------------------------------------------------------------- devices


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_request_without_cuda_is_a_clear_error():
    w_query, w_key = random_weights(2, 4, 8, 0)
    with pytest.raises(ValueError, match="CUDA is not available"):
        cp_als(w_query, w_key, 2, 3, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    w_query, w_key = random_weights(12, 32, 384, 0, torch.float32)
    on_cpu = cp_als(w_query, w_key, 12, 96)
    on_gpu = cp_als(w_query, w_key, 12, 96, device="cuda")
    assert on_gpu.query.device.type == "cpu" and on_gpu.query.dtype == F64
    assert on_gpu.relative_error == pytest.approx(on_cpu.relative_error, rel=1e-2)
    again = cp_als(w_query, w_key, 12, 96, device="cuda")
    assert again.errors == on_gpu.errors


# --------------------------------------------------------------------------- real model


@pytest.mark.real
def test_real_minilm_layer0_at_half_rank(minilm_dir: Path):
    """Layer 0 of all-MiniLM-L6-v2 at R = 192 = H*d/2 (SPEC.md section 8: 0.259 after 20 sweeps)."""
    from safetensors import safe_open

    with safe_open(str(minilm_dir / "model.safetensors"), framework="pt") as f:
        w_query = f.get_tensor("encoder.layer.0.attention.self.query.weight")  # (384, 384)
        w_key = f.get_tensor("encoder.layer.0.attention.self.key.weight")  # (384, 384)
    factors = cp_als(w_query, w_key, 12, 192)
    assert factors.relative_error <= 0.27
    assert factors.relative_error == pytest.approx(relative_error(w_query, w_key, 12, factors), rel=1e-9)
    assert_non_increasing(factors.errors)
    # Real weights are redundant, but not in the spectral bases: the start alone is far worse.
    assert cp_als(w_query, w_key, 12, 192, max_iter=0).relative_error > 0.5
