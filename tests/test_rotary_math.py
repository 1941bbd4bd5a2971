"""Tests of collabcompress.maths.rotary: the per-frequency shared keys of RoPE / GQA layers."""

from __future__ import annotations

import math

import pytest
import torch

from collabcompress.maths.cp import whitening_factor
from collabcompress.maths.rotary import (
    RotaryFactors,
    augmented_moment,
    frequency_energy,
    group_weights,
    key_cache_at,
    key_whitening,
    original_key_cache,
    original_rotary_keys,
    query_energy,
    rotary_energy,
    rotary_factors,
    rotary_keys,
    rotary_pairs,
    rotary_scores,
    rotary_spectrum,
)

F64 = torch.float64


# --------------------------------------------------------------------------- helpers


def layer(n_head, n_kv_head, head_dim, d_model, seed, bias=False, dtype=F64):
    """Random q_proj / k_proj weights and biases (biases None unless bias)."""
    g = torch.Generator().manual_seed(seed)
    w_query = torch.randn(n_head * head_dim, d_model, generator=g, dtype=F64).to(dtype)
    w_key = torch.randn(n_kv_head * head_dim, d_model, generator=g, dtype=F64).to(dtype)
    b_query = torch.randn(n_head * head_dim, generator=g, dtype=F64).to(dtype) if bias else None
    b_key = torch.randn(n_kv_head * head_dim, generator=g, dtype=F64).to(dtype) if bias else None
    return w_query, b_query, w_key, b_key


def theta_for(head_dim, base=10000.0):
    return 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=F64) / head_dim)  # (d/2,)


def inputs(batch, tokens, d_model, seed, moment_root=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, d_model, generator=g, dtype=F64)
    return x if moment_root is None else x @ moment_root.mT


def scores(x, w_query, b_query, factors, n_head, head_dim, positions, w_key=None, b_key=None, n_kv_head=None):
    return rotary_scores(
        x, x, w_query, b_query, factors, n_head=n_head, head_dim=head_dim, theta=theta_for(head_dim),
        positions=positions, w_key=w_key, b_key=b_key, n_kv_head=n_kv_head,
    )


def linear_keys(factors_or_none, w_key, b_key, n_kv_head, head_dim, y):
    """Keys of the inputs augmented by 1 acting on y_aug (N, D'): k(y_aug) = B y + b0 * y_aug[D]."""
    d_model = w_key.shape[1]
    ys, ones = y[:, :d_model][None], y[:, d_model:]  # (1, N, D), (N, 0 or 1)

    def keys(z):
        if factors_or_none is None:
            return original_rotary_keys(w_key, b_key, n_kv_head, head_dim, z)[0]
        return rotary_keys(factors_or_none, z, head_dim)[0]  # (N, G, d/2)

    at_zero = keys(torch.zeros(1, 1, d_model, dtype=F64))[0]  # (G, d/2) = b0
    out = keys(ys) - at_zero
    return out if ones.shape[1] == 0 else out + ones[:, :, None] * at_zero  # (N, G, d/2)


def fitted_error(factors, w_key, b_key, n_kv_head, head_dim, weights=None, lower=None):
    """||diag(w)(B - B_hat) L||_F / ||diag(w) B L||_F measured through the keys themselves."""
    width = w_key.shape[1] + (b_key is not None)
    lower = torch.eye(width, dtype=F64) if lower is None else lower
    basis = lower.mT  # rows L e_i: (B_hat L)[g, j, i] = k_hat(L e_i)
    orig = linear_keys(None, w_key, b_key, n_kv_head, head_dim, basis)  # (D', G, d/2)
    approx = linear_keys(factors, w_key, b_key, n_kv_head, head_dim, basis)
    w = torch.ones(n_kv_head, head_dim // 2, dtype=F64) if weights is None else weights.sqrt()
    return float(((orig - approx) * w).norm() / (orig * w).norm())


# --------------------------------------------------------------------------- pairing and transformers


def test_rotary_pairs_layout():
    w = torch.arange(2 * 6 * 3, dtype=F64).reshape(12, 3)  # G = 2, d = 6, D = 3
    pairs = rotary_pairs(w, 2, 6)
    assert pairs.shape == (2, 3, 3) and pairs.dtype == torch.complex128
    assert torch.equal(pairs[1, 2].real, w[6 + 2]) and torch.equal(pairs[1, 2].imag, w[6 + 2 + 3])
    bias = rotary_pairs(torch.arange(12, dtype=torch.float32), 2, 6)
    assert bias.shape == (2, 3) and bias[0, 1] == complex(1, 4)
    with pytest.raises(ValueError, match="rows"):
        rotary_pairs(w[:10], 2, 6)
    with pytest.raises(ValueError, match="even"):
        rotary_pairs(w, 4, 3)


def _transformers_rope(head_dim, n_head, n_kv_head, d_model, positions):
    """cos, sin (1, N, d) of transformers' LlamaRotaryEmbedding for a tiny llama, and theta."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = transformers.LlamaConfig(
        hidden_size=d_model, num_attention_heads=n_head, num_key_value_heads=n_kv_head,
        head_dim=head_dim, intermediate_size=8, num_hidden_layers=1, vocab_size=8,
    )
    rope = LlamaRotaryEmbedding(config)
    theta = rope.inv_freq.to(F64)  # (d/2,)
    cos_tf, sin_tf = rope(torch.zeros(1, 1, d_model, dtype=F64), positions[None])
    # transformers builds cos in float32; the float64 twin of its layout cat(theta, theta):
    angle = positions.to(F64)[:, None] * torch.cat([theta, theta])  # (N, d)
    cos, sin = angle.cos()[None], angle.sin()[None]
    assert torch.allclose(cos, cos_tf.to(F64), atol=1e-4) and torch.allclose(sin, sin_tf.to(F64), atol=1e-4)
    return cos, sin, theta


@pytest.mark.parametrize("bias", [False, True])
def test_pairing_matches_transformers_apply_rotary_pos_emb(bias):
    """SPEC's complex formula is transformers' rotate_half RoPE, GQA included; and the
    compressed runtime of rotary_api.md (a real width-R dot product, cos/sin gathered at
    collab_key_freq) gives rotary_scores' compressed scores."""
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    n_head, n_kv_head, head_dim, d_model = 4, 2, 8, 12
    w_query, b_query, w_key, b_key = layer(n_head, n_kv_head, head_dim, d_model, seed=1, bias=bias)
    positions = torch.tensor([5, 0, 9, 2, 31, 7])
    cos, sin, theta = _transformers_rope(head_dim, n_head, n_kv_head, d_model, positions)
    x = inputs(1, 6, d_model, seed=2)  # (1, N, D)
    q = torch.nn.functional.linear(x, w_query, b_query).view(1, 6, n_head, head_dim).transpose(1, 2)
    k = torch.nn.functional.linear(x, w_key, b_key).view(1, 6, n_kv_head, head_dim).transpose(1, 2)
    q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)  # (1, H, N, d), (1, G, N, d)
    k_rot = k_rot.repeat_interleave(n_head // n_kv_head, dim=1)  # (1, H, N, d)
    expected = q_rot @ k_rot.mT / math.sqrt(head_dim)  # (1, H, N, N)
    kw = dict(n_head=n_head, head_dim=head_dim, theta=theta, positions=positions)
    got = rotary_scores(x, x, w_query, b_query, None, w_key=w_key, b_key=b_key, n_kv_head=n_kv_head, **kw)
    assert got.shape == (1, n_head, 6, 6) and got.dtype == F64
    assert torch.allclose(got, expected, rtol=0, atol=1e-10)

    factors = rotary_factors(w_key, b_key, n_kv_head, head_dim, 6)
    half = factors.rank // 2
    c = torch.nn.functional.linear(x, factors.key, factors.key_bias)[:, None]  # (1, 1, N, R)
    q_c = torch.complex(q[..., : head_dim // 2], q[..., head_dim // 2 :])  # (1, H, N, d/2)
    mixing = factors.mixing_complex()[torch.arange(n_head) // (n_head // n_kv_head)]  # (H, R/2)
    q_mixed = q_c[..., factors.freq] * mixing[:, None].conj()  # (1, H, N, R/2)
    q_real = torch.cat([q_mixed.real, q_mixed.imag], dim=-1)  # (1, H, N, R)
    index = torch.cat([factors.freq, factors.freq])  # cos' = cat(cos_j[freq], cos_j[freq])
    q_rot, c_rot = apply_rotary_pos_emb(q_real, c, cos[..., index], sin[..., index])
    runtime = q_rot @ c_rot.mT / math.sqrt(head_dim)  # (1, H, N, N)
    assert c_rot.shape == (1, 1, 6, 2 * half)
    compressed = rotary_scores(x, x, w_query, b_query, factors, **kw)
    assert torch.allclose(compressed, runtime, rtol=0, atol=1e-10)


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("n_head,n_kv_head", [(4, 2), (4, 4)])
@pytest.mark.parametrize("bias", [False, True])
def test_full_rank_is_the_original_exactly(n_head, n_kv_head, bias):
    head_dim, d_model = 8, 16
    w_query, b_query, w_key, b_key = layer(n_head, n_kv_head, head_dim, d_model, seed=3, bias=bias)
    full = original_key_cache(n_kv_head, head_dim)
    factors = rotary_factors(w_key, b_key, n_kv_head, head_dim, full, weights=torch.rand(n_kv_head, 4, dtype=F64))
    assert factors.rank == full and factors.relative_error == 0.0 and factors.energy == 1.0
    half = head_dim // 2
    # r = j*G + g: group g's key at frequency j, U the identity per frequency.
    assert torch.equal(factors.freq, torch.arange(half).repeat_interleave(n_kv_head))
    for j in range(half):
        for g in range(n_kv_head):
            r = j * n_kv_head + g
            assert torch.equal(factors.key[r], w_key[g * head_dim + j])
            assert torch.equal(factors.key[full // 2 + r], w_key[g * head_dim + half + j])
            if bias:
                assert factors.key_bias[r] == b_key[g * head_dim + j]
                assert factors.key_bias[full // 2 + r] == b_key[g * head_dim + half + j]
    expected_mixing = torch.eye(n_kv_head, dtype=F64).repeat(1, half)
    assert torch.equal(factors.mixing[..., 0], expected_mixing)
    assert torch.equal(factors.mixing[..., 1], torch.zeros_like(expected_mixing))
    assert (factors.key_bias is None) == (not bias)
    x = inputs(2, 7, d_model, seed=4)
    positions = torch.tensor([0, 3, 1000, 17, 4, 250, 9])
    original = scores(x, w_query, b_query, None, n_head, head_dim, positions, w_key, b_key, n_kv_head)
    compressed = scores(x, w_query, b_query, factors, n_head, head_dim, positions)
    assert torch.allclose(compressed, original, rtol=0, atol=1e-10)


def test_full_rank_keeps_float32_values_and_ignores_whitening():
    _, _, w_key, b_key = layer(4, 2, 8, 16, seed=5, bias=True, dtype=torch.float32)
    lower = whitening_factor(torch.eye(17, dtype=F64) * 3.0)
    factors = rotary_factors(w_key, b_key, 2, 8, 16, lower=lower)
    assert factors.key.dtype == F64 and factors.key_bias.dtype == F64
    assert torch.equal(factors.key[:8].to(torch.float32), w_key.view(2, 8, 16)[:, :4].transpose(0, 1).reshape(8, 16))


# --------------------------------------------------------------------------- the rotation commutes


@pytest.mark.parametrize("rank", [4, 10, 16])
def test_scores_depend_on_relative_position_only(rank):
    n_head, n_kv_head, head_dim, d_model = 4, 2, 8, 12
    w_query, b_query, w_key, b_key = layer(n_head, n_kv_head, head_dim, d_model, seed=6, bias=True)
    factors = rotary_factors(w_key, b_key, n_kv_head, head_dim, rank)
    x = inputs(1, 5, d_model, seed=7)
    positions = torch.tensor([0, 4, 1, 9, 2])
    for f in (None, factors):
        here = scores(x, w_query, b_query, f, n_head, head_dim, positions, w_key, b_key, n_kv_head)
        there = scores(x, w_query, b_query, f, n_head, head_dim, positions + 123, w_key, b_key, n_kv_head)
        assert torch.allclose(here, there, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- the fit


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("whiten", [False, True])
def test_error_is_measured_and_never_increases_with_rank(bias, whiten):
    n_head, n_kv_head, head_dim, d_model = 6, 3, 8, 10
    w_query, b_query, w_key, b_key = layer(n_head, n_kv_head, head_dim, d_model, seed=8, bias=bias)
    weights = group_weights(query_energy(w_query, b_query, n_head, head_dim), n_kv_head)
    lower = None
    if whiten:
        root = torch.randn(d_model, d_model, generator=torch.Generator().manual_seed(9), dtype=F64)
        mean = torch.linspace(-1, 1, d_model, dtype=F64)
        lower = key_whitening(root @ root.mT / d_model, mean, bias=bias)
    errors = []
    for rank in range(2, n_kv_head * head_dim + 1, 2):
        factors = rotary_factors(w_key, b_key, n_kv_head, head_dim, rank, weights=weights, lower=lower)
        measured = fitted_error(factors, w_key, b_key, n_kv_head, head_dim, weights, lower)
        assert measured == pytest.approx(factors.relative_error, abs=1e-9)
        assert factors.energy == pytest.approx(1.0 - factors.relative_error**2, abs=1e-12)
        errors.append(factors.relative_error)
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:]))
    assert errors[0] > 0.1 and errors[-1] == 0.0


def test_rank_one_keys_per_frequency_are_recovered_at_r_equal_d():
    n_head, n_kv_head, head_dim, d_model = 4, 4, 8, 12
    half = head_dim // 2
    g = torch.Generator().manual_seed(10)
    beta = torch.randn(half, d_model, generator=g, dtype=torch.complex128)  # one key per frequency
    mix = torch.randn(n_kv_head, half, generator=g, dtype=torch.complex128)  # B_j = mix[:, j] beta_j
    keys = mix[:, :, None] * beta  # (G, d/2, D)
    w_key = torch.cat([keys.real, keys.imag], dim=1).reshape(n_kv_head * head_dim, d_model)
    assert torch.allclose(rotary_pairs(w_key, n_kv_head, head_dim), keys)
    w_query = torch.randn(n_head * head_dim, d_model, generator=g, dtype=F64)
    factors = rotary_factors(w_key, None, n_kv_head, head_dim, head_dim)
    assert torch.equal(factors.freq, torch.arange(half))
    assert factors.relative_error < 1e-7 and factors.energy == pytest.approx(1.0, abs=1e-12)
    x = inputs(1, 6, d_model, seed=11)
    positions = torch.arange(6) * 5
    original = scores(x, w_query, None, None, n_head, head_dim, positions, w_key, None, n_kv_head)
    compressed = scores(x, w_query, None, factors, n_head, head_dim, positions)
    assert torch.allclose(compressed, original, rtol=0, atol=1e-9)
    assert torch.allclose(rotary_keys(factors, x, head_dim), original_rotary_keys(w_key, None, 4, 8, x), atol=1e-10)


def test_components_are_ranked_across_frequencies_and_beat_an_even_split():
    n_kv_head, head_dim, d_model = 3, 8, 10
    _, _, w_key, _ = layer(3, n_kv_head, head_dim, d_model, seed=12)
    w_key = w_key * torch.tensor([1.0, 5.0, 0.2, 2.0]).repeat(2).repeat(n_kv_head)[:, None]  # per frequency
    sv = rotary_spectrum(w_key, None, n_kv_head, head_dim)  # (d/2, G)
    direct = torch.linalg.svdvals(rotary_pairs(w_key, n_kv_head, head_dim).transpose(0, 1))
    assert torch.allclose(sv, direct, atol=1e-12)
    factors = rotary_factors(w_key, None, n_kv_head, head_dim, 8)  # 4 components
    power = sv.square()
    kept = power.flatten().sort(descending=True).values[:4].sum()
    assert factors.energy == pytest.approx(float(kept / power.sum()), abs=1e-12)
    assert factors.freq.tolist() == sorted(factors.freq.tolist())
    # One component per frequency is a worse allocation for these spread-out spectra.
    even = power[:, 1:].sum() / power.sum()
    assert factors.relative_error < math.sqrt(float(even)) - 0.05
    assert factors.energy == pytest.approx(float(rotary_energy(sv)[3]), abs=1e-12)


def test_weighted_whitened_fit_lowers_the_error_it_targets():
    """The score error on data with a skewed moment and skewed query energies: the weighted,
    whitened fit beats the plain fit at the same key cache, in its metric and on samples."""
    n_head, n_kv_head, head_dim, d_model = 4, 2, 8, 12
    w_query, _, w_key, _ = layer(n_head, n_kv_head, head_dim, d_model, seed=13)
    w_query = w_query * torch.logspace(-1, 1, head_dim // 2, dtype=F64).repeat(2 * n_head)[:, None]
    root = torch.diag(torch.logspace(-1.5, 0.5, d_model, dtype=F64))  # y = root z
    moment = root @ root.mT
    weights = group_weights(query_energy(w_query, None, n_head, head_dim, moment), n_kv_head)
    lower = key_whitening(moment, shrinkage=0.0)
    plain = rotary_factors(w_key, None, n_kv_head, head_dim, 6)
    fitted = rotary_factors(w_key, None, n_kv_head, head_dim, 6, weights=weights, lower=lower)
    target = fitted_error(fitted, w_key, None, n_kv_head, head_dim, weights, lower)
    assert target < 0.8 * fitted_error(plain, w_key, None, n_kv_head, head_dim, weights, lower)
    x = inputs(4, 64, d_model, seed=14, moment_root=root)
    positions = torch.randperm(64, generator=torch.Generator().manual_seed(15)) * 7
    original = scores(x, w_query, None, None, n_head, head_dim, positions, w_key, None, n_kv_head)
    err = {
        name: (scores(x, w_query, None, f, n_head, head_dim, positions) - original).square().mean()
        for name, f in (("plain", plain), ("fitted", fitted))
    }
    assert err["fitted"] < 0.7 * err["plain"]


# --------------------------------------------------------------------------- query energies and spectrum helpers


@pytest.mark.parametrize("bias", [False, True])
def test_query_energy_is_the_sample_mean_of_squared_queries(bias):
    n_head, n_kv_head, head_dim, d_model = 4, 2, 6, 5
    w_query, b_query, _, _ = layer(n_head, n_kv_head, head_dim, d_model, seed=16, bias=bias)
    x = inputs(1, 40, d_model, seed=17)[0] + 0.5  # (N, D), non-zero mean
    moment, mean = x.mT @ x / x.shape[0], x.mean(0)
    q = original_rotary_keys(w_query, b_query, n_head, head_dim, x[None])[0]  # (N, H, d/2)
    energy = query_energy(w_query, b_query, n_head, head_dim, moment, mean)
    assert energy.shape == (n_head, head_dim // 2)
    assert torch.allclose(energy, q.abs().square().mean(0), rtol=1e-12, atol=1e-12)
    free = query_energy(w_query, b_query, n_head, head_dim)
    a = rotary_pairs(w_query, n_head, head_dim)
    expected = a.abs().square().sum(-1) + (0 if b_query is None else rotary_pairs(b_query, n_head, head_dim).abs().square())
    assert torch.allclose(free, expected, rtol=1e-12)
    weights = group_weights(energy, n_kv_head)
    assert torch.allclose(weights, energy.view(2, 2, 3).sum(1))
    assert torch.allclose(weights[1], energy[2] + energy[3])
    if bias:
        with pytest.raises(ValueError, match="mean"):
            query_energy(w_query, b_query, n_head, head_dim, moment)


def test_key_cache_at_and_energy_curve():
    n_kv_head, head_dim = 3, 8
    _, _, w_key, b_key = layer(3, n_kv_head, head_dim, 20, seed=18, bias=True)
    sv = rotary_spectrum(w_key, b_key, n_kv_head, head_dim)
    assert sv.shape == (head_dim // 2, n_kv_head) and bool((sv.diff(dim=1) <= 0).all())
    curve = rotary_energy(sv)
    assert curve.shape == (12,) and bool((curve.diff() >= 0).all()) and float(curve[-1]) == pytest.approx(1.0)
    share = frequency_energy(sv)
    assert share.shape == sv.shape and float(share.sum()) == pytest.approx(1.0)
    assert original_key_cache(n_kv_head, head_dim) == 24
    previous = 0
    for tau in (0.3, 0.6, 0.9, 0.99, 1.0):
        cache = key_cache_at(sv, tau)
        assert cache % 2 == 0 and previous <= cache <= 24
        assert rotary_factors(w_key, b_key, n_kv_head, head_dim, cache).energy >= tau - 1e-12
        if cache > 2:
            assert rotary_factors(w_key, b_key, n_kv_head, head_dim, cache - 2).energy < tau
        previous = cache
    with pytest.raises(ValueError, match="energy"):
        key_cache_at(sv, 0.0)


def test_augmented_whitening_factor():
    root = torch.randn(5, 5, generator=torch.Generator().manual_seed(19), dtype=F64)
    moment, mean = root @ root.mT + torch.eye(5, dtype=F64), torch.arange(5, dtype=F64) / 10
    aug = augmented_moment(moment, mean)
    assert aug.shape == (6, 6) and aug[5, 5] == 1.0 and torch.equal(aug[:5, 5], mean)
    lower = key_whitening(moment, mean, bias=True, shrinkage=0.0)
    assert torch.allclose(lower @ lower.mT, aug, atol=1e-12)
    assert key_whitening(moment).shape == (5, 5)
    with pytest.raises(ValueError, match="mean"):
        key_whitening(moment, bias=True)


# --------------------------------------------------------------------------- contract


@pytest.mark.parametrize("bias", [False, True])
def test_shapes_dtypes_and_determinism(bias):
    n_kv_head, head_dim, d_model = 3, 8, 14
    w_query, b_query, w_key, b_key = layer(6, n_kv_head, head_dim, d_model, seed=20, bias=bias, dtype=torch.float32)
    weights = group_weights(query_energy(w_query, b_query, 6, head_dim), n_kv_head)
    lower = key_whitening(torch.eye(d_model, dtype=F64) * 2, torch.zeros(d_model, dtype=F64), bias=bias)
    runs = [rotary_factors(w_key, b_key, n_kv_head, head_dim, 10, weights=weights, lower=lower) for _ in range(2)]
    factors = runs[0]
    assert isinstance(factors, RotaryFactors)
    assert factors.key.shape == (10, d_model) and factors.key.dtype == F64
    assert factors.freq.shape == (5,) and factors.freq.dtype == torch.int64
    assert factors.mixing.shape == (n_kv_head, 5, 2) and factors.mixing.dtype == F64
    assert (factors.key_bias is not None) == bias
    if bias:
        assert factors.key_bias.shape == (10,) and factors.key_bias.dtype == F64
    for name in ("key", "freq", "mixing") + (("key_bias",) if bias else ()):
        a, b = getattr(runs[0], name), getattr(runs[1], name)
        assert a.numpy().tobytes() == b.numpy().tobytes(), name
    assert runs[0].relative_error == runs[1].relative_error
    assert rotary_keys(factors, inputs(2, 3, d_model, seed=21), head_dim).shape == (2, 3, n_kv_head, head_dim // 2)


@pytest.mark.parametrize("rank", [0, 1, 7, 26, -2, 2.0, True])
def test_bad_rank_is_a_value_error(rank):
    _, _, w_key, _ = layer(4, 3, 8, 10, seed=22)
    with pytest.raises(ValueError, match="R"):
        rotary_factors(w_key, None, 3, 8, rank)


def test_bad_inputs_are_value_errors():
    _, _, w_key, b_key = layer(4, 2, 8, 10, seed=23, bias=True)
    with pytest.raises(ValueError, match="shape"):
        rotary_factors(w_key, None, 3, 8, 4)
    with pytest.raises(ValueError, match="bias"):
        rotary_factors(w_key, b_key[:-1], 2, 8, 4)
    with pytest.raises(ValueError, match="weights"):
        rotary_factors(w_key, None, 2, 8, 4, weights=torch.ones(2, 3, dtype=F64))
    with pytest.raises(ValueError, match="weights"):
        rotary_factors(w_key, None, 2, 8, 4, weights=-torch.ones(2, 4, dtype=F64))
    with pytest.raises(ValueError, match="lower"):
        rotary_factors(w_key, b_key, 2, 8, 4, lower=torch.eye(10, dtype=F64))  # the bias needs D+1
    with pytest.raises(ValueError, match="NaN"):
        rotary_factors(w_key * float("nan"), None, 2, 8, 4)
    with pytest.raises(ValueError, match="multiple"):
        group_weights(torch.ones(5, 4, dtype=F64), 2)
    with pytest.raises(ValueError, match="freq"):
        RotaryFactors(torch.zeros(4, 3), None, torch.tensor([1, 0]), torch.zeros(2, 2, 2), 0.0, 1.0)
