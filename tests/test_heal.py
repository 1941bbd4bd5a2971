"""heal(): held-out checks every few steps, undoing a whole block of steps that made it worse; its arithmetic."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_pair(rotary_checkpoints, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from collabcompress.commands.compress import CompressOptions, compress

    source = rotary_checkpoints["qwen2"]
    out = tmp_path_factory.mktemp("heal") / "o"
    compress(source, out, CompressOptions(rank=4))
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(source)).float()
    vocab = reference.config.vocab_size
    ids = torch.randint(0, vocab, (4, 24), generator=torch.Generator().manual_seed(0))
    return reference, out, ids, torch.tensor([24, 20, 24, 18])


def _healed(tiny_pair, **kw):
    from collabcompress import hf
    from collabcompress.runtime.heal import heal, trainable

    reference, out, ids, lengths = tiny_pair
    model = hf.from_pretrained(out).float()
    start = {k: p.detach().clone() for k, p in trainable(model).items()}
    result = heal(reference, model, ids, lengths, causal=True, **kw)
    return result, start, {k: p.detach().clone() for k, p in trainable(model).items()}


@pytest.mark.parametrize("check_every", [1, 3, 6])
def test_blocks_are_kept_or_undone_whole_and_never_worsen_held_out(tiny_pair, check_every):
    result, start, end = _healed(tiny_pair, steps=6, lr=1e-2, check_every=check_every)
    assert result.accepted % check_every == 0 and 0 <= result.accepted <= 6
    assert result.held_out_after <= result.held_out_before
    changed = any(not torch.equal(start[k], end[k]) for k in start)
    assert changed == (result.accepted > 0)


def test_steps_that_wreck_the_held_out_window_are_undone(tiny_pair):
    result, start, end = _healed(tiny_pair, steps=4, lr=1e3, check_every=2)  # absurd steps: worse held-out loss
    assert result.accepted == 0 and result.held_out_after == result.held_out_before
    assert all(torch.equal(start[k], end[k]) for k in start)


def test_check_every_must_be_positive(tiny_pair):
    with pytest.raises(ValueError, match="check_every"):
        _healed(tiny_pair, steps=2, check_every=0)


def test_same_seed_same_tensors(tiny_pair):
    _, _, a = _healed(tiny_pair, steps=4, lr=1e-2, check_every=2)
    _, _, b = _healed(tiny_pair, steps=4, lr=1e-2, check_every=2)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _plain_kl(reference, model, x):
    """KL(p_original || q_model) per token, averaged, from whole (T, V) logits."""
    log_p = torch.log_softmax(reference(input_ids=x[None]).logits.float(), -1)
    log_q = torch.log_softmax(model(input_ids=x[None]).logits.float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


@pytest.mark.parametrize("slice_elements", [None, 1])
def test_sliced_output_layer_loss_and_gradient_are_the_whole_logits_ones(tiny_pair, monkeypatch, slice_elements):
    from collabcompress import hf
    from collabcompress.runtime.heal import _Targets, trainable

    if slice_elements:  # one token per slice
        monkeypatch.setattr("collabcompress.runtime.heal.SLICE_ELEMENTS", slice_elements)
    reference, out, ids, lengths = tiny_pair
    model = hf.from_pretrained(out).float()
    x = ids[1, : int(lengths[1])]
    targets = _Targets(reference, causal=True, model=model, probe=x)
    assert targets.split
    for _ in range(2):  # computed, then from the cache: the original's last hidden states
        assert torch.allclose(targets(1, x), reference.base_model(input_ids=x[None]).last_hidden_state[0])
    assert list(targets.cache) == [1]
    params = list(trainable(model).values())
    for p in params:
        p.requires_grad_(True)
    got = targets.loss(model, 1, x)
    got_grads = torch.autograd.grad(got, params)
    want = _plain_kl(reference, model, x)
    want_grads = torch.autograd.grad(want, params)
    assert float(want.detach()) > 0 and float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-5 * float(w.abs().max()))


def test_a_model_whose_logits_are_not_its_output_layer_of_its_body_gets_whole_logits(tiny_pair, monkeypatch):
    from collabcompress import hf
    from collabcompress.runtime.heal import _Targets

    reference, out, ids, lengths = tiny_pair
    model = hf.from_pretrained(out).float()
    forward = type(model).forward

    def capped(self, *a, **kw):  # logits soft-capped after the output layer, as some families do
        result = forward(self, *a, **kw)
        result.logits = 3.0 * torch.tanh(result.logits / 3.0)
        return result

    monkeypatch.setattr(type(model), "forward", capped)
    x = ids[1, : int(lengths[1])]
    targets = _Targets(reference, causal=True, model=model, probe=x)
    assert not targets.split
    with torch.no_grad():
        assert float(targets.loss(model, 1, x)) == pytest.approx(float(_plain_kl(reference, model, x)), rel=1e-5)


def test_bfloat16_arithmetic_is_seeded_keeps_float32_tensors_and_never_worsens_held_out(tiny_pair):
    runs = [_healed(tiny_pair, steps=6, lr=1e-2, check_every=2, compute=torch.bfloat16) for _ in range(2)]
    (result, start, end), (_, _, again) = runs
    assert result.held_out_after <= result.held_out_before
    assert all(t.dtype == torch.float32 for t in end.values())
    assert all(torch.equal(end[k], again[k]) for k in end)
    float32, _, plain = _healed(tiny_pair, steps=6, lr=1e-2, check_every=2)
    assert result.held_out_before != float32.held_out_before  # the passes really ran in bfloat16
    assert abs(result.held_out_before - float32.held_out_before) < 0.05 * float32.held_out_before


def test_healing_computes_in_float32_or_bfloat16_only(tiny_pair):
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        _healed(tiny_pair, steps=1, compute=torch.float16)


def test_auto_arithmetic_is_bfloat16_only_where_the_cpu_has_bfloat16_units(monkeypatch):
    from collabcompress.dtypes import COMPUTE_NAMES, compute_dtype

    assert [compute_dtype(name) for name in COMPUTE_NAMES] == list(COMPUTE_NAMES)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    assert compute_dtype("auto") == "float32"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert compute_dtype("auto") == "bfloat16"


def test_several_held_out_windows_are_never_trained_on_and_weighed_by_tokens(tiny_pair, monkeypatch):
    from collabcompress import hf
    from collabcompress.runtime.heal import _Targets, held_out_count

    assert [held_out_count(n) for n in (2, 3, 7, 8, 15, 16, 64)] == [1, 1, 1, 2, 3, 4, 4]
    reference, out, ids, lengths = tiny_pair
    with pytest.raises(ValueError, match="needs one more to train on"):
        _healed(tiny_pair, steps=1, held_out=4)
    result, _, _ = _healed(tiny_pair, steps=0, held_out=2)

    model, targets = hf.from_pretrained(out).float(), _Targets(reference, causal=True)
    with torch.no_grad():
        losses = [float(targets.loss(model, i, ids[i, : int(lengths[i])])) for i in (2, 3)]
    want = (losses[0] * 24 + losses[1] * 18) / 42
    assert result.held_out_before == pytest.approx(want, rel=1e-6)
    # training touches windows 0 and 1 only: the held-out ones are only ever judged, without gradients
    seen, trained, judged = [], _Targets.loss, _Targets.judge
    monkeypatch.setattr(_Targets, "loss", lambda self, m, i, x: seen.append((i, torch.is_grad_enabled()))
                        or trained(self, m, i, x))
    monkeypatch.setattr(_Targets, "judge", lambda self, m, i, x: seen.append((i, "judged")) or judged(self, m, i, x))
    _healed(tiny_pair, steps=4, held_out=2)
    assert {i for i, how in seen if how is True} == {0, 1} and {i for i, how in seen if how == "judged"} == {2, 3}
    assert all(how in (True, "judged") for _, how in seen)


@pytest.mark.parametrize("slice_elements", [None, 1])
def test_a_held_out_check_from_the_originals_moments_is_the_kl(tiny_pair, monkeypatch, slice_elements):
    from collabcompress import hf
    from collabcompress.runtime.heal import _Targets

    if slice_elements:
        monkeypatch.setattr("collabcompress.runtime.heal.SLICE_ELEMENTS", slice_elements)
    reference, out, ids, lengths = tiny_pair
    model = hf.from_pretrained(out).float()
    with torch.no_grad():  # a compressed model nudged off its fit: the KL is not small
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    x = ids[3, : int(lengths[3])]
    targets = _Targets(reference, causal=True, model=model, probe=x)
    with torch.no_grad():
        want = float(_plain_kl(reference, model, x))
    for _ in range(2):  # computed, then from the cache; the original's hidden states are not kept
        assert targets.judge(model, 3, x) == pytest.approx(want, rel=1e-5)
    assert list(targets.moments) == [3] and not targets.cache
    a, c = targets.moments[3]
    assert a.shape == (18, reference.config.hidden_size) and c.shape == (18,)
    assert _Targets(reference, causal=True).judge(model, 3, x) == pytest.approx(want, rel=1e-5)


def test_kl_moments_with_an_output_bias_and_two_output_layers():
    from collabcompress.runtime.heal import _kl_from_moments, _kl_moments

    g = torch.Generator().manual_seed(0)
    ref_hidden, hidden = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    ref_w, ref_b, w, b = (torch.randn(*s, generator=g) for s in ((11, 5), (11,), (11, 5), (11,)))
    log_p = torch.log_softmax(ref_hidden @ ref_w.T + ref_b, -1)
    log_q = torch.log_softmax(hidden @ w.T + b, -1)
    want = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    assert _kl_from_moments(hidden, w, b, *_kl_moments(ref_hidden, ref_w, ref_b, w, b), None) == pytest.approx(want, rel=1e-5)
