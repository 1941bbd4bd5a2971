"""--budget by the model's next-token KL: the shared keys as k_proj weights, the curves, the allocation."""

from __future__ import annotations

import pytest
import torch

from collabcompress.maths.budget import rank_ladder
from collabcompress.maths.rotary import key_projection, rotary_factors, rotary_scores
from helpers import budget_losses


def _layer(seed=0, n_head=4, n_kv_head=2, head_dim=8, d_model=12, bias=True):
    g = torch.Generator().manual_seed(seed)
    w_q = torch.randn(n_head * head_dim, d_model, generator=g, dtype=torch.float64)
    w_k = torch.randn(n_kv_head * head_dim, d_model, generator=g, dtype=torch.float64)
    b_q = torch.randn(n_head * head_dim, generator=g, dtype=torch.float64) if bias else None
    b_k = torch.randn(n_kv_head * head_dim, generator=g, dtype=torch.float64) if bias else None
    theta = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    x = torch.randn(2, 7, d_model, generator=g, dtype=torch.float64)
    return w_q, b_q, w_k, b_k, theta, x


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rank", [2, 6, 10])
def test_key_projection_scores_are_the_shared_keys_scores(bias, rank):
    w_q, b_q, w_k, b_k, theta, x = _layer(bias=bias)
    f = rotary_factors(w_k, b_k, 2, 8, rank)
    w_hat, b_hat = key_projection(f, 8)
    assert w_hat.shape == w_k.shape and (b_hat is None) == (b_k is None)
    pos = torch.arange(7)
    shared = rotary_scores(x, x, w_q, b_q, f, n_head=4, head_dim=8, theta=theta, positions=pos)
    as_proj = rotary_scores(x, x, w_q, b_q, None, n_head=4, head_dim=8, theta=theta, positions=pos,
                            w_key=w_hat, b_key=b_hat, n_kv_head=2)
    assert torch.allclose(shared, as_proj, atol=1e-10)
    original = rotary_scores(x, x, w_q, b_q, None, n_head=4, head_dim=8, theta=theta, positions=pos,
                             w_key=w_k, b_key=b_k, n_kv_head=2)
    assert not torch.allclose(as_proj, original, atol=1e-3)  # R < G*d: the keys did change


def test_key_projection_at_the_exact_layout_is_the_source():
    _, _, w_k, b_k, _, _ = _layer(seed=1)
    w_hat, b_hat = key_projection(rotary_factors(w_k, b_k, 2, 8, 16), 8)
    assert torch.allclose(w_hat, w_k, atol=1e-12) and torch.allclose(b_hat, b_k, atol=1e-12)


def test_ladder_with_fewer_steps():
    assert rank_ladder(192, 8, even=True, steps=8) == list(range(24, 193, 24))
    assert rank_ladder(192, 8, even=True) == list(range(16, 193, 16))


@pytest.fixture(scope="module")
def tiny_stats(rotary_stats):
    return rotary_stats("llama")


def test_budget_on_a_causal_lm_allocates_by_next_token_kl(tiny_stats, tmp_path):
    from collabcompress.commands.compress import CompressOptions, compress

    model, stats = tiny_stats
    manifest = compress(model, tmp_path / "o", CompressOptions(budget=0.5, calibration=str(stats)))
    for layer, losses in budget_losses(manifest, 0.5):
        a = layer["allocation"]
        assert a["loss"] == "next_token_kl"
        assert losses[max(losses)] == 0.0 and all(v >= 0 for v in losses.values())
        assert max(v for r, v in losses.items() if r < max(losses)) > 0  # compressing a layer changes the model
        assert a["chosen_loss"] == losses[layer["shared_dim"]]


def test_loss_curves_name_their_loss(tiny_stats, rotary_checkpoints):
    from collabcompress.files.arch import detect
    from collabcompress.commands.compress import loss_curves
    from collabcompress.files.checkpoint import open_checkpoint

    model, stats = tiny_stats
    ckpt = open_checkpoint(model)
    loss, curves = loss_curves(ckpt, detect(ckpt), stats)
    assert loss == "next_token_kl" and len(curves) == len(detect(ckpt))
    again = loss_curves(ckpt, detect(ckpt), stats)
    assert again == (loss, curves)  # seeded windows, deterministic forwards


def test_with_refinement_the_budget_allocates_by_attention_kl(tiny_stats, tmp_path):
    from collabcompress.commands.compress import CompressOptions, compress

    model, stats = tiny_stats
    manifest = compress(model, tmp_path / "o", CompressOptions(budget=0.5, calibration=str(stats), refine_steps=2))
    assert {layer["allocation"]["loss"] for layer in manifest["layers"]} == {"attention_kl"}
